"""The controller on a thread of its own with its own event loop, as if in its own process.

kopf's shutdown treats every task of its event loop as its own (it waits for them, then cancels them), so
the controller must not share a loop with the API emulator or the sandbox's stand-ins.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from controller.operator.controller import ControllerConfig
from controller.operator.main import Running, run_controller


class _NotMainThread(logging.Filter):
    """kopf warns that it cannot install signal handlers off the main thread; here that is intended."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "OS signals are ignored" not in record.getMessage()


logging.getLogger("kopf._core.reactor.running").addFilter(_NotMainThread())


class ControllerThread:
    """``start()`` runs :func:`run_controller` against ``url``; ``stop()`` stops it and waits."""

    def __init__(self, cfg: ControllerConfig, url: str, running: list[Running],
                 leader_election: tuple[str, str] | None = None):
        self.cfg, self.url, self.running, self.leader_election = cfg, url, running, leader_election
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self.result: int | BaseException | None = None

    def start(self, wait: bool = True) -> None:
        def main() -> None:
            async def go() -> int:
                self._loop = asyncio.get_running_loop()
                self._stop = asyncio.Event()
                ready = asyncio.Event()
                waiter = asyncio.create_task(ready.wait())
                waiter.add_done_callback(lambda _: self._ready.set())
                return await run_controller(self.cfg, self._stop, kube_api=self.url, ready=ready,
                                            started=self.running, leader_election=self.leader_election)
            try:
                self.result = asyncio.run(go())
            except BaseException as e:  # noqa: BLE001 - reported to the test
                self.result = e
            finally:
                self._ready.set()

        self._thread = threading.Thread(target=main, name="controller", daemon=True)
        self._thread.start()
        if wait and not self._ready.wait(20):
            raise TimeoutError("the controller did not get ready within 20s")
        if isinstance(self.result, BaseException):
            raise RuntimeError(f"the controller failed to start: {self.result!r}") from self.result

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:
                pass   # the loop closed meanwhile: already stopped
        if self._thread is not None:
            self._thread.join(20)
