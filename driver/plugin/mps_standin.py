"""A stand-in for ``nvidia-cuda-mps-control -d`` on fake-GPU nodes (sandbox, kind, tests).

Like the real control daemon it runs detached from the plugin (it outlives a plugin restart), keeps
the per-GPU defaults it is told (``set_default_active_thread_percentage``,
``set_default_device_pinned_mem_limit``), logs every command to ``control.log`` in its log directory and
exits on ``quit`` or SIGTERM. Its control endpoint is the unix socket ``--control``, which the plugin
keeps in its private directory: nothing in the pipe directory (mounted into workloads, so writable by
them) is read, trusted or removed by it — it only creates the pipe directory for clients. The plugin
records the stand-in's PID itself; :mod:`driver.plugin.mps` talks to it or to the real daemon.

    python -m driver.plugin.mps_standin --pipe-dir DIR --log-dir DIR --control SOCKET --gpu UUID
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from pathlib import Path

from driver.plugin import mps_protocol as proto
from driver.plugin.mps_protocol import CONTROL_SOCKET  # noqa: F401 - where tests and tools look for it


class Daemon:
    def __init__(self, pipe_dir: Path, log_dir: Path, control: Path, gpu: str):
        self.pipe_dir, self.log_dir, self.control, self.gpu = pipe_dir, log_dir, control, gpu
        self.active_thread_percentage = "100.0"
        self.pinned: dict[str, str] = {}
        self.running = True

    def log(self, line: str) -> None:
        with open(self.log_dir / "control.log", "a") as f:
            f.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {line}\n")

    def handle(self, command: str) -> str:
        words = command.split()
        self.log(f"Command: {command}")
        if not words:
            return ""
        op, args = words[0], words[1:]
        if op == proto.QUIT:
            self.running = False
            return ""
        if op == proto.GET_SERVER_LIST:
            return ""
        if op == proto.SET_ACTIVE_THREAD_PERCENTAGE and len(args) == 1:
            try:
                value = float(args[0])
            except ValueError:
                return f"Invalid value {args[0]}"
            if not 0 < value <= 100:
                return f"Invalid value {args[0]}"
            self.active_thread_percentage = f"{value:.1f}"
            return self.active_thread_percentage
        if op == proto.GET_ACTIVE_THREAD_PERCENTAGE:
            return self.active_thread_percentage
        if op == proto.SET_PINNED_MEM_LIMIT and len(args) == 2:
            self.pinned[args[0]] = args[1]
            return ""
        if op == proto.GET_PINNED_MEM_LIMIT and len(args) == 1:
            return self.pinned.get(args[0], "")
        return f"Unrecognized command: {command}"

    def serve(self) -> int:
        sock_path = self.control
        sock_path.unlink(missing_ok=True)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(sock_path))
        srv.listen(8)
        srv.settimeout(0.5)
        self.log(f"Control daemon started for GPU {self.gpu} (pid {os.getpid()})")
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "running", False))
        try:
            while self.running:
                try:
                    conn, _ = srv.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.settimeout(5)
                    proto.send_line(conn, self.handle(proto.recv_line(conn)))
        finally:
            srv.close()
            sock_path.unlink(missing_ok=True)
            self.log("Control daemon exited")
        return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m driver.plugin.mps_standin")
    p.add_argument("--pipe-dir", type=Path, required=True)
    p.add_argument("--log-dir", type=Path, required=True)
    p.add_argument("--control", type=Path, required=True, help="control socket path (keep it out of --pipe-dir)")
    p.add_argument("--gpu", required=True)
    a = p.parse_args(argv)
    a.pipe_dir.mkdir(parents=True, exist_ok=True)
    a.log_dir.mkdir(parents=True, exist_ok=True)
    return Daemon(a.pipe_dir, a.log_dir, a.control, a.gpu).serve()


if __name__ == "__main__":
    sys.exit(main())
