"""Flags every ``partita`` command spells the same way: output format, log level, cluster connection.

* ``-o/--output table|wide|yaml|json`` (:func:`add_output`): ``wide`` is the table with more columns;
  the old ``text`` is accepted as ``table`` with a deprecation note on stderr.
* ``--log-level`` (:func:`add_log_level`): one of :data:`LOG_LEVELS`, case-insensitive; anything else is a
  one-line argparse error (exit 2), also when the bad value comes from the environment default.
* A number of seconds in a range (:func:`seconds`), the type of every ``SECONDS`` flag.
* ``--kubeconfig``, ``--context``, ``-n/--namespace``, ``--kube-api`` (:func:`add_cluster`) for commands
  that talk to an API server; :func:`connect` turns them into a :class:`driver.api.kube.Kube` through
  :meth:`Kube.connect` (:func:`driver.api.kube.configure`, the one place connections are set up).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

OUTPUTS = ("table", "wide", "yaml", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: old output names -> the name they mean now
DEPRECATED_OUTPUTS = {"text": "table"}


def _output_type(choices: Sequence[str]):  # noqa: ANN202
    def convert(value: str) -> str:
        v = value.strip().lower()
        if v in DEPRECATED_OUTPUTS and v not in choices:
            new = DEPRECATED_OUTPUTS[v]
            print(f"partita: -o {v} is deprecated; use -o {new}", file=sys.stderr)
            return new
        if v not in choices:
            raise argparse.ArgumentTypeError(f"invalid output {value!r} (choose from {', '.join(choices)})")
        return v
    return convert


def add_output(p: argparse.ArgumentParser, choices: Sequence[str] = OUTPUTS, default: str = "table",
               help_: str = "") -> None:
    p.add_argument("-o", "--output", type=_output_type(tuple(choices)), choices=tuple(choices), default=default,
                   metavar="|".join(choices),
                   help=help_ or f"output format: {', '.join(choices)} (default {default}; wide adds columns)")


def _log_level(value: str) -> str:
    v = str(value).strip().upper()
    if v not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"invalid log level {value!r} (choose from {', '.join(LOG_LEVELS)})")
    return v


def add_log_level(p: argparse.ArgumentParser, default: str, help_: str = "log level") -> None:
    p.add_argument("--log-level", type=_log_level, default=default, metavar="|".join(LOG_LEVELS),
                   help=f"{help_} (default {default})")


def seconds(low: float = 0.0, high: float | None = None, example: str = "5"):  # noqa: ANN201
    """An argparse type for a number of seconds from ``low`` to ``high`` (no upper bound with None): anything
    else is a one-line argparse error naming the value and the range (argparse names the flag)."""
    span = f"from {low:g} to {high:g} seconds" if high is not None else f"{low:g} seconds or more"

    def convert(value: str) -> float:
        try:
            v = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number of seconds {value!r}: give {span}, e.g. "
                                             f"{example}") from None
        if not (v >= low and (high is None or v <= high)):      # NaN fails both
            raise argparse.ArgumentTypeError(f"{value}: give {span}")
        return v
    return convert


def add_cluster(p: argparse.ArgumentParser, *, kube_api_default: str | None = None, namespace: bool = True,
                kube_api_help: str = "plain-HTTP API server URL (sandbox, tests, kubectl proxy); default: "
                                     "in-cluster, then the kubeconfig") -> None:
    g = p.add_argument_group("cluster connection")
    g.add_argument("--kubeconfig", metavar="FILE",
                   help="kubeconfig file (default: in a pod its service account, else $KUBECONFIG, else "
                        "~/.kube/config)")
    g.add_argument("--context", help="kubeconfig context (default: the current context)")
    if namespace:
        g.add_argument("-n", "--namespace",
                       help="namespace (default: the kubeconfig context's, in a pod its own, else default)")
    g.add_argument("--kube-api", default=kube_api_default, metavar="URL", help=kube_api_help)


async def connect(args: argparse.Namespace):  # noqa: ANN201 - driver.api.kube.Kube, imported lazily
    """The API client the cluster flags ask for."""
    from driver.api.kube import Kube

    return await Kube.connect(getattr(args, "kube_api", None), kubeconfig=getattr(args, "kubeconfig", None),
                              context=getattr(args, "context", None))


def unreachable(args: argparse.Namespace, error: BaseException, also: str = "") -> str:
    """The one message for an API server a command cannot reach (no kubeconfig, a bad URL, a refused
    connection), with the flags that fix it; ``also`` names another way, e.g. files instead of the cluster."""
    return (f"cannot reach the API server ({where(args)}): {error}; pass --kubeconfig FILE, --context NAME or "
            f"--kube-api URL{', or ' + also if also else ''}")


async def connect_or(args: argparse.Namespace, error: Callable[[str], Exception], also: str = ""):  # noqa: ANN201
    """:func:`connect`, with a failure raised as ``error(``:func:`unreachable```)``: one line, not a traceback."""
    try:
        return await connect(args)
    except Exception as e:  # noqa: BLE001 - no kubeconfig, bad URL: a clear message, not a traceback
        raise error(unreachable(args, e, also)) from None


def where(args: argparse.Namespace) -> str:
    """The cluster the flags name, for messages."""
    if getattr(args, "kube_api", None):
        return str(args.kube_api)
    parts = [f"kubeconfig {args.kubeconfig}" if getattr(args, "kubeconfig", None) else "",
             f"context {args.context}" if getattr(args, "context", None) else ""]
    named = ", ".join(p for p in parts if p)
    return named or ("in-cluster" if os.environ.get("KUBERNETES_SERVICE_HOST") else "kubeconfig")


__all__ = ["LOG_LEVELS", "OUTPUTS", "add_cluster", "add_log_level", "add_output", "connect", "connect_or", "seconds", "unreachable",
           "where"]
