"""The one root of Partita's exceptions, and the result type used where a failure is passed on as a value.

Every exception class the project defines derives from :class:`PartitaError` (tests/test_errors.py checks
it), so a caller can tell our refusals from a bug (``except PartitaError``) and one place can decide how a
refusal is shown. The classes keep their own homes (``driver/nvml/errors.py``, ``driver/plugin/...``,
``controller/allocator/types.py``, ...), names and messages; a message names the object, the field and
the fix.

Where a failure is carried to later code instead of raised (one claim of a batch could not be read, the
others are prepared), it travels as a :class:`Result`, never as an exception object stored in a value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


class PartitaError(Exception):
    """A refusal or failure Partita reports; its message is complete (object, field, fix)."""


@dataclass(frozen=True)
class Result(Generic[T]):
    """A value, or the message saying why there is none (``error`` set, ``value`` None)."""

    value: T | None = None
    error: str | None = None

    @classmethod
    def ok(cls, value: T) -> "Result[T]":
        return cls(value=value)

    @classmethod
    def failed(cls, error: str) -> "Result[T]":
        if not error:
            raise ValueError("Result.failed needs the message saying what failed")
        return cls(error=error)
