"""What one reconcile decided, for the one place that acts on it (``Controller._settle``): Events to post,
the allocation metric to count, and what the work queue does with the key next."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

DONE = "done"          # nothing more to do for the key (its backoff ends)
BACKOFF = "backoff"    # try again later (exponential backoff, at least ``at_least`` seconds)
AGAIN = "again"        # queue it again at once (decide on fresh data)
WAIT = "wait"          # leave it: an event will queue it again (our own write is not visible yet)


@dataclass(frozen=True)
class Note:
    """An Event: on ``obj`` (a pod, usually the one reconciled)."""

    obj: Mapping
    type: str              # Normal or Warning
    reason: str
    message: str


@dataclass
class Outcome:
    next: str = DONE
    at_least: float = 0.0
    result: str | None = None          # partita_controller_allocations_total{result=...}
    seconds: float | None = None       # allocation time, for partita_controller_allocation_seconds
    notes: list[Note] = field(default_factory=list)
    conflict: bool = False             # a write was refused for a resourceVersion conflict

    def note(self, obj: Mapping, etype: str, reason: str, message: str) -> "Outcome":
        self.notes.append(Note(obj, etype, reason, message))
        return self
