"""One fake-GPU node's kubelet plugin, run as the real thing: ``python -m driver plugin`` in its own process,
with its own sockets, CDI directory, checkpoint and fake NVML state under the sandbox's work directory."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from driver.api import constants as C
from driver.nvml.profile import FakeGpuProfile, NodeProfile
from driver.plugin.sockets import socket_paths


@dataclass
class NodePaths:
    root: Path

    @property
    def registry(self) -> Path:
        return self.root / "plugins_registry"

    @property
    def plugins(self) -> Path:
        return self.root / "plugins"

    @property
    def cdi(self) -> Path:
        return self.root / "cdi"

    @property
    def profile(self) -> Path:
        return self.root / "gpus.yaml"

    def plugin_dir(self, driver: str) -> Path:
        """Checkpoint, sockets, fake NVML state (``fake-nvml/``) and MPS directories of the plugin."""
        return self.plugins / driver

    @property
    def log(self) -> Path:
        return self.root / "plugin.log"

    def registration_socket(self, driver: str, instance_uid: str = "") -> Path:
        return socket_paths(driver, self.registry, self.plugin_dir(driver), instance_uid).registration


class PluginProcess:
    """Start, wait for, and stop one node's plugin."""

    def __init__(self, profile: FakeGpuProfile, node: NodeProfile, workdir: Path, api_url: str,
                 driver: str = C.DEFAULT_DRIVER_NAME, log_level: str = "INFO", env: dict[str, str] | None = None,
                 instance_uid: str = ""):
        self.profile = profile
        self.node = node
        self.driver = driver
        self.paths = NodePaths(workdir / node.name)
        self.api_url = api_url
        self.log_level = log_level
        self.env = env or {}
        self.instance_uid = instance_uid     # set: per-instance socket names (--rolling-update on), as in a surge rollout
        self.metrics_url = ""                # the plugin's /metrics on 127.0.0.1 (partita status --metrics-url)
        self.proc: subprocess.Popen | None = None
        self._stale: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        return self.node.name

    def start(self) -> None:
        self.paths.root.mkdir(parents=True, exist_ok=True)
        profile = self.profile.model_dump(by_alias=True, mode="json")
        profile["nodes"] = [self.node.model_dump(by_alias=True, mode="json")]
        self.paths.profile.write_text(yaml.safe_dump(profile, sort_keys=False))
        cmd = [sys.executable, "-m", "driver", "plugin", "--node-name", self.name, "--driver-name", self.driver,
               "--nvml", "fake", "--fake-profile", str(self.paths.profile),
               "--cdi-root", str(self.paths.cdi),
               "--kubelet-registrar-directory-path", str(self.paths.registry),
               "--kubelet-plugins-directory-path", str(self.paths.plugins),
               "--kube-api", self.api_url, "--health-port", "-1", "--metrics-port", str(self._metrics_port()),
               "--log-level", self.log_level]
        if self.instance_uid:
            cmd += ["--instance-uid", self.instance_uid, "--rolling-update", "on"]
        sock = self.paths.registration_socket(self.driver, self.instance_uid)
        self._stale = _identity(sock)     # a socket left by a killed predecessor is not readiness
        log = open(self.paths.log, "ab")   # noqa: SIM115 - owned by the child for its lifetime
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()

    def _metrics_port(self) -> int:
        """The plugin's metrics port on 127.0.0.1 (what `partita status --metrics-url` reads): env METRICS_PORT
        when given (-1: off), else a free one."""
        port = int(self.env.get("METRICS_PORT", "0") or 0)
        if port == 0:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.metrics_url = f"http://127.0.0.1:{port}/metrics" if port > 0 else ""
        return port

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.paths.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Until the registration socket exists (the DRA socket is served before it)."""
        sock = self.paths.registration_socket(self.driver, self.instance_uid)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while _identity(sock) in (None, self._stale):
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"the plugin of node {self.name} exited (code {self.proc and self.proc.returncode}):\n"
                                   f"{self.log_tail()}")
            if loop.time() > deadline:
                raise RuntimeError(f"the plugin of node {self.name} did not register within {timeout:.0f}s:\n"
                                   f"{self.log_tail()}")
            await asyncio.sleep(0.05)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, as the kubelet would on a DaemonSet rollout; SIGKILL if it does not stop in time."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns
