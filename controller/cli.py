"""The ``partita`` command.

Node-side commands (``inventory``, ``plugin``) come from :mod:`driver.cli`; cluster-side and tooling
commands are listed in :data:`COMMANDS` and imported only when used, so ``partita inventory`` stays
fast and a missing optional part gives a clear message instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys

from driver import cli as driver_cli
from driver import logfmt

#: name -> (module with add_arguments(parser) and run(args) -> int, help)
COMMANDS = {
    "controller": ("controller.operator.main", "run the controller that allocates Partita claims (Deployment)"),
    "sandbox": ("controller.sandbox.main", "run a simulated cluster with fake GPUs on this machine"),
    "explain": ("controller.explain_cmd", "say why a claim cannot be allocated, and what would fix it"),
    "status": ("controller.status", "show GPUs by mode, memory allocated, usage, idle claims and pending pods"),
    "simulate": ("controller.simulate.main", "compare allocation strategies under churn on a simulated cluster"),
    "webhook": ("controller.webhook", "serve the admission webhook that rejects malformed GpuConfig"),
}


def version() -> str:
    """The installed distribution's version (a source checkout run without installing says so)."""
    try:
        return importlib.metadata.version("partita")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed; run from a source checkout)"


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="partita", description="Partita: DRA driver and operator for NVIDIA GPUs (whole, MIG, shared).")
    parser.add_argument("--version", action="version", version=f"partita {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    driver_cli.add_subcommands(sub, wanted)
    for name, (module, help_) in COMMANDS.items():
        driver_cli.add_command(sub, name, module, "add_arguments", "run", help_, load=name == wanted)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    if not logging.getLogger().handlers or getattr(args, "log_format", "text") != "text":
        logfmt.configure(getattr(args, "log_format", "text"), logging.INFO)
    try:
        return int(args._run(args))
    except BrokenPipeError:         # `partita ... | head`: the reader left; no traceback
        sys.stderr.close()
        return 141


if __name__ == "__main__":
    sys.exit(main())
