"""Stop every process a sandbox run left behind, found by its work directory (Linux ``/proc``).

Each node's plugin runs in a session of its own (``start_new_session``), and the plugin starts its MPS
control stand-ins in sessions of their own too, as MPS daemons outlive a plugin restart on a real node:
neither a terminal's Ctrl-C nor the sandbox's exit reaches them. Every one of them names a path under the
sandbox's work directory on its command line (``--cdi-root``, ``--pipe-dir``) and runs one of Partita's own
modules (:data:`MODULES`), which is how they are found: nothing else is touched, whatever the work
directory (``--workdir`` may be any folder).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


#: ``python -m <module> [<first argument>]`` of the processes a sandbox starts: the plugin, MPS stand-ins
MODULES = (("driver", "plugin"), ("driver.plugin.mps_standin", None))


def _ours(args: list[str]) -> bool:
    for i, a in enumerate(args[:-1]):
        if a == "-m":
            for module, first in MODULES:
                if args[i + 1] == module and (first is None or args[i + 2:i + 3] == [first]):
                    return True
    return False


def processes_under(workdir: Path) -> list[int]:
    """Process IDs (not this one) of a sandbox's plugins and MPS stand-ins whose command line names a path
    inside ``workdir``."""
    root = str(Path(workdir).resolve())
    prefixes = (root + os.sep, root)
    out = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            args = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue      # gone meanwhile, or not ours to read
        if _ours(args) and any(a.startswith(prefixes) for a in args):
            out.append(int(entry.name))
    return out


def reap(workdir: Path, grace: float = 5.0) -> list[int]:
    """SIGTERM every process under ``workdir``, SIGKILL those still there after ``grace`` seconds; returns
    the PIDs that had to be stopped this way."""
    pids = processes_under(workdir)
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    left = pids
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if _alive(p)]
    for pid in left:
        _signal(pid, signal.SIGKILL)
    return pids


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)       # reap it if it is our child (a zombie is not alive)
    except ChildProcessError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
