"""Progress lines on stderr while the sandbox waits (only on a terminal, or with ``--progress``), so that
stdout stays clean for ``-o json``/``yaml``."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import AsyncIterator, Callable, TextIO


class Progress:
    def __init__(self, enabled: bool, stream: TextIO | None = None, interval: float = 3.0):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.interval = interval

    @classmethod
    def for_stderr(cls, forced: bool, interval: float = 3.0) -> "Progress":
        try:
            tty = sys.stderr.isatty()
        except (AttributeError, ValueError):
            tty = False
        return cls(forced or tty, sys.stderr, interval)

    def say(self, line: str) -> None:
        if self.enabled:
            print(f"sandbox: {line}", file=self.stream, flush=True)

    @contextlib.asynccontextmanager
    async def waiting(self, what: Callable[[], str] | str) -> AsyncIterator[None]:
        """While the body runs: after each ``interval`` seconds, a line saying what it waits for."""
        if not self.enabled:
            yield
            return
        started = time.monotonic()

        async def tick() -> None:
            while True:
                await asyncio.sleep(self.interval)
                text = what() if callable(what) else what
                self.say(f"waiting for {text} ({time.monotonic() - started:.0f}s)")

        task = asyncio.create_task(tick())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
