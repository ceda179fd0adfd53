"""``partita`` conventions shared by every command: --version, validated choices (one-line errors, exit 2,
never a traceback), one -o vocabulary, and the cluster flags (--kubeconfig, --context, -n) that go through
``Kube.connect`` in one place."""

from __future__ import annotations

import asyncio
import importlib.metadata
import subprocess
import sys

import pytest
import yaml

from controller.cli import build_parser, main
from controller.operator.controller import ControllerConfig
from controller.operator.main import run_controller
from controller.sandbox.apiserver import ApiServer
from driver.api.kube import Kube
from driver.cliopts import OUTPUTS


def test_version_is_the_distributions(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"partita {importlib.metadata.version('partita')}"


@pytest.mark.parametrize("command", [["controller"], ["plugin"], ["webhook"], ["sandbox"]])
def test_a_bad_log_level_is_a_one_line_error_naming_the_choices(command, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main([*command, "--log-level", "bogus"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert f"partita {command[0]}: error: argument --log-level: invalid log level 'bogus' (choose from DEBUG, " \
           "INFO, WARNING, ERROR, CRITICAL)" in err
    assert "Traceback" not in err
    # lower case is a level too
    assert build_parser([*command]).parse_args([*command, "--log-level", "debug"]).log_level == "DEBUG"


@pytest.mark.parametrize("command, flag, good, bad", [
    (["status"], "--watch", "0.5", ["0.05", "3601", "nan", "soon"]),
    (["sandbox"], "--job-run-time", "0", ["-1", "3601", "inf", "two"]),
    (["sandbox"], "--idle-period", "3600", ["4000", "nan"]),
])
def test_a_seconds_flag_takes_its_range_and_refuses_the_rest_in_one_line(command, flag, good, bad, capsys) -> None:
    assert getattr(build_parser(command).parse_args([*command, flag, good]), flag[2:].replace("-", "_")) == float(good)
    for value in bad:
        with pytest.raises(SystemExit) as e:
            build_parser(command).parse_args([*command, flag, value])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"argument {flag}: " in err and "seconds" in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()[-1]) < 160 and value in err.strip().splitlines()[-1], err


def test_a_bad_log_level_from_the_environment_is_refused_the_same_way() -> None:
    r = subprocess.run([sys.executable, "-m", "controller", "controller"], capture_output=True, text=True,
                       timeout=60, env={"LOG_LEVEL": "loud", "PATH": "/usr/bin:/bin", **_pythonpath()})
    assert r.returncode == 2 and "invalid log level 'loud'" in r.stderr and "Traceback" not in r.stderr


def _pythonpath() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k == "PYTHONPATH"}


@pytest.mark.parametrize("command", [["inventory"], ["explain"], ["sandbox"]])
def test_every_printing_command_takes_the_same_output_formats(command, capsys) -> None:
    for fmt in OUTPUTS:
        assert build_parser(command).parse_args([*command, "-o", fmt]).output == fmt
    assert build_parser(command).parse_args([*command, "-o", "text"]).output == "table"
    assert "-o text is deprecated; use -o table" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([*command, "-o", "xml"])
    assert e.value.code == 2
    assert "invalid output 'xml' (choose from table, wide, yaml, json)" in capsys.readouterr().err


def test_inventory_wide_adds_columns_and_names_every_device(capsys) -> None:
    assert main(["inventory", "--fake", "H100-SXM5-80GB:1"]) == 0
    table = capsys.readouterr().out
    assert main(["inventory", "--fake", "H100-SXM5-80GB:1", "-o", "wide"]) == 0
    wide = capsys.readouterr().out
    assert "ARCH" not in table and "(25 in all)" in table
    header = next(ln for ln in wide.splitlines() if ln.startswith("UUID"))
    assert header.split()[-4:] == ["ROOT", "DEVICE", "ID", "MINOR"] and "ARCH" in header
    assert "Hopper" in wide and "0x233010DE" in wide and "in all" not in wide


def test_inventory_profile_errors_name_the_inventorys_own_flag(tmp_path, capsys) -> None:
    assert main(["inventory", "--profile", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert "pass an existing file to --profile or use --fake MODEL:COUNT" in err and "--fake-profile" not in err


# -- cluster connection ---------------------------------------------------------------------------
@pytest.fixture
def api():
    s = ApiServer()
    url = s.start_in_thread()
    yield s, url
    s.stop_in_thread()


def _kubeconfig(tmp_path, url: str) -> str:
    cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "plain",
           "clusters": [{"name": "sandbox", "cluster": {"server": url}}],
           "users": [{"name": "me", "user": {"token": "secret-token"}}],
           "contexts": [{"name": "plain", "context": {"cluster": "sandbox", "user": "me"}},
                        {"name": "team", "context": {"cluster": "sandbox", "user": "me", "namespace": "team-a"}}]}
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_kube_connect_takes_a_kubeconfig_and_context_and_knows_its_namespace(api, tmp_path) -> None:
    _, url = api
    kc = _kubeconfig(tmp_path, url)

    async def go() -> list:
        out = []
        for context in (None, "team"):
            async with await Kube.connect(kubeconfig=kc, context=context) as kube:
                await kube.get("/api/v1/namespaces")          # it reaches the server the context names
                out.append((kube.namespace, kube.server, kube.configuration.api_key.get("BearerToken")))
        return out

    assert asyncio.run(go()) == [("default", url, "Bearer secret-token"), ("team-a", url, "Bearer secret-token")]
    with pytest.raises(Exception, match="nope"):
        asyncio.run(Kube.connect(kubeconfig=kc, context="nope"))


def test_the_controller_connects_through_the_kubeconfig_context_and_leases_in_its_namespace(api, tmp_path) -> None:
    server, url = api
    kc = _kubeconfig(tmp_path, url)
    args = build_parser(["controller"]).parse_args(["controller", "--kubeconfig", kc, "--context", "team"])
    assert (args.kubeconfig, args.context, args.leader_election_namespace) == (kc, "team", None)

    async def go() -> dict | None:
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(run_controller(ControllerConfig(), stop, ready=ready, kubeconfig=kc,
                                                  context="team", leader_election=(None, "partita-controller")))
        try:
            await asyncio.wait_for(ready.wait(), 30)        # its informers listed through the same connection
            return server.get("leases", "partita-controller", "team-a", group="coordination.k8s.io")
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)

    lease = asyncio.run(go())
    assert lease is not None and lease["spec"]["holderIdentity"]


# -- progress ----------------------------------------------------------------------------------------
def test_progress_lines_say_what_is_waited_for_and_only_when_asked(capsys) -> None:
    import io

    from controller.sandbox.progress import Progress

    stream = io.StringIO()
    state = {"n": 0}

    def what() -> str:
        state["n"] += 1
        return f"pods to settle: {state['n']} pending"

    async def go(p: Progress) -> None:
        async with p.waiting(what):
            await asyncio.sleep(0.35)

    asyncio.run(go(Progress(True, stream, interval=0.1)))
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 2 and lines[0].startswith("sandbox: waiting for pods to settle: 1 pending (")
    # not a terminal (as under pytest) and not forced: nothing at all
    quiet = Progress.for_stderr(forced=False, interval=0.1)
    assert not quiet.enabled
    asyncio.run(go(quiet))
    assert capsys.readouterr().err == ""
    assert Progress.for_stderr(forced=True).enabled


def test_an_unreachable_cluster_is_one_message_with_the_flags_that_fix_it(capsys) -> None:
    from driver.cliopts import connect_or

    class Refused(Exception):
        pass

    args = build_parser(["status"]).parse_args(["status", "--kubeconfig", "/nonexistent/kubeconfig"])
    with pytest.raises(Refused) as e:
        asyncio.run(connect_or(args, Refused))
    msg = str(e.value)
    assert msg.startswith("cannot reach the API server (kubeconfig /nonexistent/kubeconfig): ") and "\n" not in msg
    assert msg.endswith("; pass --kubeconfig FILE, --context NAME or --kube-api URL"), msg
    # explain names its other way: files instead of the cluster
    assert main(["explain", "--claim", "c", "--kubeconfig", "/nonexistent/kc"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("partita explain: cannot reach the API server (kubeconfig /nonexistent/kc): "), err
    assert err.rstrip().endswith("--kube-api URL, or give the slices as files (--slices)"), err
