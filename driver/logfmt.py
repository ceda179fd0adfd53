"""``--log-format text|json`` for the plugin, the controller and the sandbox (issue 14 item 7).

``text`` (the default) is the line the commands always printed, ``<time> <LEVEL> <logger>: <message>``, with
the structured fields appended as ``key=value``. ``json`` prints one JSON object per line::

    {"time": "2026-12-07T15:20:01.123Z", "level": "INFO", "logger": "driver.plugin.prepare",
     "message": "prepared claim ml/nb (uid 5b…): gpu-…", "claim": "ml/nb", "claimUID": "5b…", "node": "node-a"}

Structured fields (:data:`FIELDS`): ``claim`` (namespace/name), ``claimUID``, ``pod`` (namespace/name), ``node``
and ``device``. A log call passes them with ``extra=fields(claim=..., device=...)``; a process-wide value (the
plugin's node) is set once by :func:`configure`; and a claim passed as a log argument (any object with
``namespace``, ``name`` and ``uid``, such as the plugin's ``ClaimRef``) fills ``claim`` and ``claimUID`` by
itself, so existing log calls carry them without a change.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
from typing import Any, TextIO

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: record attribute -> JSON key
FIELDS = {"claim": "claim", "claim_uid": "claimUID", "pod": "pod", "node": "node", "device": "device"}
_HANDLER_MARK = "_partita_logfmt"


def fields(*, claim: str | None = None, claim_uid: str | None = None, pod: str | None = None,
           node: str | None = None, device: str | None = None) -> dict[str, str]:
    """The ``extra=`` of a log call: only the fields given."""
    given = {"claim": claim, "claim_uid": claim_uid, "pod": pod, "node": node, "device": device}
    return {k: str(v) for k, v in given.items() if v}


def _claim_in_args(args: Any) -> Any:
    for a in args if isinstance(args, tuple) else ():
        if all(isinstance(getattr(a, k, None), str) for k in ("namespace", "name", "uid")):
            return a
    return None


class StructuredFields(logging.Filter):
    """Adds the process-wide fields, and ``claim``/``claimUID`` from a claim among the log arguments."""

    def __init__(self, **static: str):
        super().__init__()
        self.static = {k: v for k, v in static.items() if v}

    def filter(self, record: logging.LogRecord) -> bool:
        for k, v in self.static.items():
            if not getattr(record, k, None):
                setattr(record, k, v)
        if not getattr(record, "claim", None):
            ref = _claim_in_args(record.args)
            if ref is not None:
                record.claim = f"{ref.namespace}/{ref.name}"
                if not getattr(record, "claim_uid", None):
                    record.claim_uid = ref.uid
        return True


def _present(record: logging.LogRecord) -> dict[str, str]:
    return {key: str(getattr(record, attr)) for attr, key in FIELDS.items() if getattr(record, attr, None)}


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = _present(record)
        if not extra:
            return line
        head, sep, tail = line.partition("\n")          # fields before a traceback, on the message line
        return head + " " + " ".join(f"{k}={v}" for k, v in extra.items()) + sep + tail


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        out: dict[str, Any] = {"time": stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z",
                               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        out.update(_present(record))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def _format_type(value: str) -> str:
    v = str(value).strip().lower()
    if v not in LOG_FORMATS:
        raise argparse.ArgumentTypeError(f"invalid log format {value!r} (choose from {', '.join(LOG_FORMATS)})")
    return v


def add_log_format(p: argparse.ArgumentParser, env: str = "LOG_FORMAT") -> None:
    p.add_argument("--log-format", type=_format_type, default=os.environ.get(env) or "text",
                   metavar="|".join(LOG_FORMATS),
                   help=f"log lines as text, or one JSON object per line with the fields claim, pod, node, device "
                        f"(env {env}; default %(default)s)")


def configure(fmt: str = "text", level: str | int | None = None, stream: TextIO | None = None,
              **static: str) -> logging.Handler | None:
    """One handler on the root logger with the format, replacing the one a previous call installed.
    ``static``: fields of every record (``node=...``). Where someone else configured logging (an embedding
    process, a test runner) and the format is text, their handlers stay and only the level is set (returns
    None); json replaces plain stream handlers to stdout/stderr."""
    fmt = _format_type(fmt)
    root = logging.getLogger()
    if level is not None:
        root.setLevel(str(level).upper() if isinstance(level, str) else level)
    foreign = [h for h in root.handlers if not getattr(h, _HANDLER_MARK, False)]
    if foreign and fmt == "text" and stream is None:
        return None
    for h in list(root.handlers):
        if getattr(h, _HANDLER_MARK, False) or (type(h) is logging.StreamHandler and
                                                getattr(h, "stream", None) in (sys.stderr, sys.stdout)):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(StructuredFields(**static))
    root.addHandler(handler)
    return handler
