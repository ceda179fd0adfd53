"""MPS control daemons: one per GPU that serves MPS shares, started by the first such share and stopped
with the last (docs/architecture.md §5).

Each daemon has a plugin-private state directory under the plugin directory (``<root>/<gpu hash>``:
which GPU it serves, the daemon's PID as the plugin recorded it, the stand-in's control socket, the
daemon's logs) and in it a pipe directory, the only thing CDI mounts into the claim's containers (at
the path CUDA looks at by default). Workloads can write to the pipe directory, so the plugin reads
nothing from it for identity or signalling: the PID it may signal comes from the private directory and
is checked against the kernel's view of that process (``/proc``: the stand-in's command line, or the
real daemon's executable and pipe directory) before any signal, so a planted or reused PID is never
signalled. On real nodes the daemon is the NVIDIA driver's ``nvidia-cuda-mps-control -d`` (the binary
must be on the plugin's PATH, i.e. the driver's user-space tools mounted into the plugin container),
whose control pipe lives in the pipe directory by MPS's design; on fake nodes it is
:mod:`driver.plugin.mps_standin`, whose control socket is private. Both are driven through the same
commands, so this module has one code path per operation.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from driver.errors import PartitaError
from driver.plugin import durable, mps_protocol as proto
from driver.plugin.mps_protocol import CONTROL_SOCKET

log = logging.getLogger(__name__)

#: where CUDA looks for the MPS pipe directory when the variable is unset
CONTAINER_PIPE_DIR = "/tmp/nvidia-mps"
#: the daemon's PID as the plugin recorded it, in the private directory
PID_FILE = "daemon.pid"
REAL_BINARY = "nvidia-cuda-mps-control"


class MpsError(PartitaError):
    """An MPS daemon could not be started, told or stopped; the message says what to check."""


@dataclass(frozen=True)
class MpsDirs:
    #: plugin-private: never mounted into a workload
    root: Path

    @property
    def pipe(self) -> Path:
        """The only directory workloads get (read-write: MPS clients talk to the daemon through it)."""
        return self.root / "pipe"

    @property
    def log(self) -> Path:
        return self.root / "log"

    @property
    def control(self) -> Path:
        """The stand-in's control socket (private; the real daemon's control pipe is in :attr:`pipe`)."""
        return self.root / CONTROL_SOCKET

    @property
    def pid_file(self) -> Path:
        return self.root / PID_FILE


class MpsDaemons:
    def __init__(self, root: Path, backend_kind: str):
        self.root = root
        self.fake = backend_kind == "fake"

    def dirs(self, gpu_uuid: str) -> MpsDirs:
        # short and stable: socket paths must stay under 108 bytes
        return MpsDirs(self.root / hashlib.sha256(gpu_uuid.encode()).hexdigest()[:12])

    # -- lifecycle ------------------------------------------------------------------------------
    def running(self, gpu_uuid: str) -> bool:
        try:
            self.control(gpu_uuid, proto.GET_SERVER_LIST)
        except MpsError:
            return False
        return True

    def start(self, gpu_uuid: str, active_thread_percentage: int | None = None,
              pinned_memory_limit: str | None = None) -> None:
        """Start the GPU's daemon unless it runs, then apply the defaults given."""
        d = self.dirs(gpu_uuid)
        if not self.running(gpu_uuid):
            d.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            d.root.chmod(0o700)                                # private: only the plugin writes here
            for p in (d.pipe, d.log):
                p.mkdir(parents=True, exist_ok=True)
            durable.write_file(d.root / "gpu", (gpu_uuid + "\n").encode(), what="MPS marker")  # its GPU
            d.pid_file.unlink(missing_ok=True)
            env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(d.pipe), "CUDA_MPS_LOG_DIRECTORY": str(d.log),
                   "CUDA_VISIBLE_DEVICES": gpu_uuid}
            pid: int | None
            if self.fake:
                log_file = open(d.log / "standin.out", "ab")   # noqa: SIM115 - the child owns it
                proc = subprocess.Popen([sys.executable, "-m", "driver.plugin.mps_standin", "--pipe-dir",
                                         str(d.pipe), "--log-dir", str(d.log), "--control", str(d.control),
                                         "--gpu", gpu_uuid], env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
                log_file.close()
                pid = proc.pid
            else:
                res = subprocess.run([self._binary(), "-d"], env=env, capture_output=True, text=True, timeout=30)
                if res.returncode != 0:
                    raise MpsError(f"nvidia-cuda-mps-control -d for GPU {gpu_uuid} failed (exit {res.returncode}): "
                                   f"{(res.stderr or res.stdout).strip()}; see {d.log}/control.log")
                pid = None
            self._wait(gpu_uuid, up=True)
            pid = pid if pid is not None else self._find_real_daemon(d)
            if pid is not None:
                durable.write_file(d.pid_file, f"{pid}\n".encode(), what="MPS daemon PID")
            log.info("started the MPS control daemon of GPU %s (pipe %s)", gpu_uuid, d.pipe)
        if active_thread_percentage is not None:
            self.control(gpu_uuid, proto.set_active_thread_percentage(active_thread_percentage))
        if pinned_memory_limit is not None:
            self.control(gpu_uuid, proto.set_pinned_mem_limit(pinned_memory_limit))

    def stop(self, gpu_uuid: str) -> None:
        if not self.running(gpu_uuid):
            return
        self.control(gpu_uuid, proto.QUIT)
        try:
            self._wait(gpu_uuid, up=False)
        except MpsError:
            pid = self.daemon_pid(gpu_uuid)
            if pid is None:
                raise
            log.warning("the MPS control daemon of GPU %s ignored quit; sending SIGTERM to %d", gpu_uuid, pid)
            os.kill(pid, signal.SIGTERM)
            self._wait(gpu_uuid, up=False)
        self.dirs(gpu_uuid).pid_file.unlink(missing_ok=True)
        log.info("stopped the MPS control daemon of GPU %s", gpu_uuid)

    def running_gpus(self) -> list[str]:
        """GPU UUIDs whose daemon runs (each daemon directory names its GPU in a ``gpu`` file)."""
        out = []
        for marker in sorted(self.root.glob("*/gpu")) if self.root.exists() else []:
            gpu = marker.read_text().strip()
            if gpu and self.running(gpu):
                out.append(gpu)
        return out

    # -- commands -------------------------------------------------------------------------------
    def control(self, gpu_uuid: str, command: str) -> str:
        d = self.dirs(gpu_uuid)
        if self.fake:
            return self._fake_control(d, command)
        env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(d.pipe), "CUDA_MPS_LOG_DIRECTORY": str(d.log)}
        try:
            res = subprocess.run([self._binary()], input=command + "\n", env=env, capture_output=True, text=True,
                                 timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise MpsError(f"MPS control of GPU {gpu_uuid}: {e}") from None
        if res.returncode != 0:
            raise MpsError(f"MPS control of GPU {gpu_uuid} ({command!r}) failed: {(res.stderr or res.stdout).strip()}")
        return res.stdout.strip()

    @staticmethod
    def _fake_control(d: MpsDirs, command: str) -> str:
        try:
            return proto.ask(d.control, command)
        except proto.ProtocolError as e:
            raise MpsError(str(e)) from None

    def daemon_pid(self, gpu_uuid: str) -> int | None:
        """The PID of the GPU's daemon, from the private PID file and only when ``/proc`` confirms that
        process is that daemon (a PID reused after a reboot or a crash is never signalled)."""
        d = self.dirs(gpu_uuid)
        try:
            pid = int(d.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if pid > 1 and self._is_daemon(pid, d):
            return pid
        log.warning("PID %d in %s is not the MPS control daemon of GPU %s (per /proc); not signalling it", pid,
                    d.pid_file, gpu_uuid)
        return None

    def _is_daemon(self, pid: int, d: MpsDirs) -> bool:
        proc = Path("/proc") / str(pid)
        try:
            if self.fake:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                return b"driver.plugin.mps_standin" in argv and \
                    any(a == b"--control" and b == str(d.control).encode() for a, b in zip(argv, argv[1:]))
            if os.path.basename(os.readlink(proc / "exe")) != REAL_BINARY:
                return False
            return f"CUDA_MPS_PIPE_DIRECTORY={d.pipe}".encode() in (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            return False

    def _find_real_daemon(self, d: MpsDirs) -> int | None:
        """The real daemon forks away from ``-d``: find it in ``/proc`` by executable and pipe directory."""
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and self._is_daemon(int(entry.name), d):
                return int(entry.name)
        log.warning("started the MPS control daemon for pipe directory %s but cannot find its process in /proc; "
                    "it will only be stopped with quit", d.pipe)
        return None

    def _wait(self, gpu_uuid: str, *, up: bool, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.running(gpu_uuid) != up:
            if time.monotonic() > deadline:
                raise MpsError(f"the MPS control daemon of GPU {gpu_uuid} did not {'start' if up else 'stop'} "
                               f"within {timeout:.0f}s; see {self.dirs(gpu_uuid).log}/control.log")
            time.sleep(0.02)

    @staticmethod
    def _binary() -> str:
        path = shutil.which("nvidia-cuda-mps-control")
        if path is None:
            raise MpsError("nvidia-cuda-mps-control is not on the plugin's PATH; MPS sharing needs the NVIDIA "
                           "driver's user-space tools in the plugin container (mount the driver root, or use "
                           "strategy TimeSlicing)")
        return path
