"""MPS control daemons: one per GPU that serves MPS shares, started by the first such share and stopped
with the last (ARCHITECTURE §5).

Each daemon has a pipe and a log directory under the plugin directory (a hostPath, so CDI can mount them
into the claim's containers at the paths CUDA looks at by default). On real nodes the daemon is the
NVIDIA driver's ``nvidia-cuda-mps-control -d`` (the binary must be on the plugin's PATH, i.e. the driver's
user-space tools mounted into the plugin container); on fake nodes it is :mod:`driver.plugin.mps_standin`.
Both are driven through the same commands, so this module has one code path per operation.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from driver.plugin import durable
from driver.plugin.mps_standin import PID_FILE, recv_line

log = logging.getLogger(__name__)

#: where CUDA looks for the MPS pipe and log directories when the variables are unset
CONTAINER_PIPE_DIR = "/tmp/nvidia-mps"
CONTAINER_LOG_DIR = "/var/log/nvidia-mps"


class MpsError(Exception):
    """An MPS daemon could not be started, told or stopped; the message says what to check."""


@dataclass(frozen=True)
class MpsDirs:
    root: Path

    @property
    def pipe(self) -> Path:
        return self.root / "pipe"

    @property
    def log(self) -> Path:
        return self.root / "log"


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
            self.control(gpu_uuid, "get_server_list")
        except MpsError:
            return False
        return True

    def start(self, gpu_uuid: str, active_thread_percentage: int | None = None,
              pinned_memory_limit: str | None = None) -> None:
        """Start the GPU's daemon unless it runs, then apply the defaults given."""
        d = self.dirs(gpu_uuid)
        if not self.running(gpu_uuid):
            for p in (d.pipe, d.log):
                p.mkdir(parents=True, exist_ok=True)
            durable.write_file(d.root / "gpu", (gpu_uuid + "\n").encode(), what="MPS marker")  # its GPU
            env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(d.pipe), "CUDA_MPS_LOG_DIRECTORY": str(d.log),
                   "CUDA_VISIBLE_DEVICES": gpu_uuid}
            if self.fake:
                log_file = open(d.log / "standin.out", "ab")   # noqa: SIM115 - the child owns it
                subprocess.Popen([sys.executable, "-m", "driver.plugin.mps_standin", "--pipe-dir", str(d.pipe),
                                  "--log-dir", str(d.log), "--gpu", gpu_uuid], env=env, stdout=log_file,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
                log_file.close()
            else:
                res = subprocess.run([self._binary(), "-d"], env=env, capture_output=True, text=True, timeout=30)
                if res.returncode != 0:
                    raise MpsError(f"nvidia-cuda-mps-control -d for GPU {gpu_uuid} failed (exit {res.returncode}): "
                                   f"{(res.stderr or res.stdout).strip()}; see {d.log}/control.log")
            self._wait(gpu_uuid, up=True)
            log.info("started the MPS control daemon of GPU %s (pipe %s)", gpu_uuid, d.pipe)
        if active_thread_percentage is not None:
            self.control(gpu_uuid, f"set_default_active_thread_percentage {active_thread_percentage}")
        if pinned_memory_limit is not None:
            self.control(gpu_uuid, f"set_default_device_pinned_mem_limit 0 {pinned_memory_limit}")

    def stop(self, gpu_uuid: str) -> None:
        if not self.running(gpu_uuid):
            return
        self.control(gpu_uuid, "quit")
        try:
            self._wait(gpu_uuid, up=False)
        except MpsError:
            pid = self._pid(gpu_uuid)
            if pid is None:
                raise
            log.warning("the MPS control daemon of GPU %s ignored quit; sending SIGTERM to %d", gpu_uuid, pid)
            os.kill(pid, signal.SIGTERM)
            self._wait(gpu_uuid, up=False)
        log.info("stopped the MPS control daemon of GPU %s", gpu_uuid)

    def running_gpus(self) -> list[str]:
        """GPU UUIDs whose daemon runs (each daemon directory names its GPU in a ``gpu`` file)."""
        out = []
        for marker in self.root.glob("*/gpu") if self.root.exists() else []:
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
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(str(d.pipe / "control"))
            s.sendall(command.encode() + b"\n")
            reply = recv_line(s)
        except OSError as e:
            raise MpsError(f"no MPS control daemon answers at {d.pipe / 'control'}: {e}") from None
        finally:
            s.close()
        if reply.startswith(("Invalid", "Unrecognized")):
            raise MpsError(f"MPS control daemon refused {command!r}: {reply}")
        return reply

    def _pid(self, gpu_uuid: str) -> int | None:
        try:
            return int((self.dirs(gpu_uuid).pipe / PID_FILE).read_text().strip())
        except (OSError, ValueError):
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
