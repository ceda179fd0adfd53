"""Injected faults: the next N requests matching (plural, verb, name) wait, then fail or are served late."""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass
class Fault:
    plural: str
    verb: str
    status: int           # 0: no error, only the delay
    count: int
    name: str | None
    delay: float = 0.0


#: the reason a real API server gives with each status code an injected fault answers
REASONS = {409: "Conflict", 429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable"}


class Faults:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def add(self, plural: str, verb: str, status: int, count: int = 1, name: str | None = None,
            delay: float = 0.0) -> None:
        if status and not 400 <= status <= 599:
            raise ValueError(f"inject_fault: status {status} is not an HTTP error (400-599), nor 0 for a delay only")
        if count < 1 or delay < 0:
            raise ValueError(f"inject_fault: count must be >= 1 and delay >= 0 (got count={count}, delay={delay})")
        with self._lock:
            self._faults.append(Fault(plural, verb, status, count, name, delay))

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def take(self, plural: str, verb: str, name: str | None) -> Fault | None:
        """The first fault matching a request, counted down (gone at zero)."""
        with self._lock:
            for f in self._faults:
                if f.plural == plural and f.verb == verb and (f.name is None or f.name == name) and f.count > 0:
                    f.count -= 1
                    if f.count == 0:
                        self._faults.remove(f)
                    return f
        return None
