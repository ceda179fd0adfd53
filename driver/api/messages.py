"""Bounded error messages: the one place that decides how long a message Partita reports may be.

Errors reach the kubelet (gRPC responses, whose default receive limit is 4 MiB for the whole
NodePrepareResources answer), pod Events (the API server caps an Event message at 1 KiB) and logs. A
message that echoes its input (a 3 MB claim name, a 2 MB config) must not grow with that input, so
every such message goes through :func:`bound`, lists of problems through :func:`bound_list`, and an
echoed value through :func:`brief`.

    bound("x" * 5000)                     # 'xxx… (3,990 more bytes)' within MAX_MESSAGE bytes
    bound_list(["a", "b", ...], sep="; ")  # 'a; b; ... and 998 more'
    f"got {brief(value)}"                  # repr of value, cut to about 80 characters
"""

from __future__ import annotations

from typing import Iterable, Sequence

#: bytes (UTF-8) of one message: an Event message's upper limit upstream, and 4,096 of them still fit
#: one kubelet gRPC response
MAX_MESSAGE = 1024
#: the shortest a message is cut to when many share one response
MIN_MESSAGE = 128
#: bytes of an echoed value inside a message
MAX_ECHO = 80


def _cut(data: bytes, size: int) -> str:
    """The first ``size`` bytes of UTF-8 ``data`` as text, never splitting a character."""
    return data[:max(size, 0)].decode("utf-8", "ignore")


def bound(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` if it fits ``limit`` UTF-8 bytes, else its start and how much was left out."""
    if len(text) * 4 <= limit:          # fits even if every character takes 4 bytes: skip encoding
        return text
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    suffix = f"… ({len(data):,} bytes in all, cut to {limit:,})"
    if len(suffix.encode()) >= limit:
        return _cut(data, limit)
    return _cut(data, limit - len(suffix.encode())) + suffix


def bound_list(items: Iterable[str], limit: int = MAX_MESSAGE, sep: str = "; ") -> str:
    """``items`` joined by ``sep`` while they fit ``limit`` bytes, then ``... and N more``. The first
    item always shows, itself cut (:func:`bound`) when it alone is too long."""
    items = items if isinstance(items, Sequence) else list(items)
    if not items:
        return ""

    def more(n: int) -> str:
        return f"{sep}... and {n:,} more" if n else ""

    first = items[0]
    head = bound(first, limit - len(more(len(items) - 1).encode()))
    out = [head]
    used = len(head.encode("utf-8", "replace"))
    if head != first:
        return head + more(len(items) - 1)
    sep_len = len(sep.encode())
    for i in range(1, len(items)):
        size = sep_len + len(items[i].encode("utf-8", "replace"))
        if used + size + len(more(len(items) - i - 1).encode()) > limit:
            return sep.join(out) + more(len(items) - i)
        out.append(items[i])
        used += size
    return sep.join(out)


def brief(value: object, limit: int = MAX_ECHO) -> str:
    """``repr(value)`` for quoting inside a message, cut to ``limit`` bytes."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}… ({len(value):,} characters)"
    return bound(repr(value), limit)
