"""--log-format text|json: structured fields claim, pod, node, device; the same flag on every long-running command."""

from __future__ import annotations

import argparse
import io
import json
import logging
import subprocess
import sys

import pytest

from driver import logfmt
from driver.plugin.prepare import ClaimRef


@pytest.fixture
def root():
    r = logging.getLogger()
    handlers, level = list(r.handlers), r.level
    yield r
    for h in list(r.handlers):
        if h not in handlers:
            r.removeHandler(h)
    for h in handlers:
        if h not in r.handlers:
            r.addHandler(h)
    r.setLevel(level)


def _lines(buf: io.StringIO) -> list[str]:
    return [line for line in buf.getvalue().splitlines() if line]


def test_json_lines_carry_the_structured_fields(root) -> None:
    buf = io.StringIO()
    logfmt.configure("json", "INFO", stream=buf, node="node-a")
    log = logging.getLogger("driver.plugin.prepare")
    ref = ClaimRef("ml", "nb", "5b7c0e1a-0000-4000-8000-000000000001")
    log.info("prepared claim %s (uid %s): %s", ref, ref.uid, "gpu-1")
    log.warning("share of %s", "x", extra=logfmt.fields(pod="ml/jupyter-0", device="gpu-1-shared"))
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    log.debug("not shown")
    first, second, third = (json.loads(line) for line in _lines(buf))
    assert first["message"] == f"prepared claim ml/nb (uid {ref.uid}): gpu-1"
    assert (first["level"], first["logger"], first["claim"], first["claimUID"], first["node"]) == \
        ("INFO", "driver.plugin.prepare", "ml/nb", ref.uid, "node-a")
    assert first["time"].endswith("Z") and "T" in first["time"]
    assert (second["pod"], second["device"], second["node"]) == ("ml/jupyter-0", "gpu-1-shared", "node-a")
    assert "claim" not in second
    assert "ValueError: boom" in third["exception"] and third["level"] == "ERROR"


def test_text_lines_keep_their_form_and_append_the_fields(root) -> None:
    buf = io.StringIO()
    logfmt.configure("text", "INFO", stream=buf, node="node-a")
    logging.getLogger("x").info("hello %s", ClaimRef("ml", "nb", "u1"))
    logging.getLogger("x").info("plain", extra={"node": "other"})
    a, b = _lines(buf)
    assert a.endswith(" INFO x: hello ml/nb claim=ml/nb claimUID=u1 node=node-a")
    assert b.endswith(" INFO x: plain node=other")
    # configure again: one handler, not two
    logfmt.configure("json", stream=buf)
    assert sum(getattr(h, "_partita_logfmt", False) for h in root.handlers) == 1


def test_a_bad_format_is_refused_naming_the_choices(monkeypatch) -> None:
    p = argparse.ArgumentParser()
    logfmt.add_log_format(p)
    assert p.parse_args(["--log-format", "JSON"]).log_format == "json"
    monkeypatch.setenv("LOG_FORMAT", "json")
    p = argparse.ArgumentParser()
    logfmt.add_log_format(p)
    assert p.parse_args([]).log_format == "json"
    with pytest.raises(argparse.ArgumentTypeError, match="choose from text, json"):
        logfmt.configure("yaml")


@pytest.mark.parametrize("command", [["-m", "driver", "plugin"], ["-m", "controller.cli", "controller"],
                                     ["-m", "controller.cli", "sandbox"]])
def test_the_plugin_controller_and_sandbox_take_the_flag(command) -> None:
    bad = subprocess.run([sys.executable, *command, "--log-format", "yaml"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "invalid log format 'yaml' (choose from text, json)" in bad.stderr


def test_the_controller_logs_json_when_asked() -> None:
    # no API server at this address: the controller logs its retries, as JSON lines
    proc = subprocess.Popen([sys.executable, "-m", "controller.cli", "controller", "--log-format", "json",
                             "--kube-api", "http://127.0.0.1:9", "--metrics-port", "-1", "--health-port", "-1",
                             "--no-leader-elect"], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()
    record = json.loads(line)
    assert record["level"] in ("WARNING", "ERROR", "INFO") and record["logger"].startswith("controller")
