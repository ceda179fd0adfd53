"""Label and field selectors as the Kubernetes API parses them (apimachinery pkg/labels and pkg/fields)."""

from __future__ import annotations

import re
from dataclasses import dataclass


def _split(expr: str) -> list[str]:
    """Split on commas that are not inside ``(...)`` (``env in (a,b),tier``)."""
    out, depth, cur = [], 0, ""
    for ch in expr:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


_SET = re.compile(r"^([A-Za-z0-9./_-]+)\s+(in|notin)\s+\(([^)]*)\)$")


@dataclass(frozen=True)
class LabelSelector:
    reqs: tuple[tuple[str, str, tuple[str, ...]], ...] = ()

    @classmethod
    def parse(cls, expr: str) -> "LabelSelector":
        reqs = []
        for part in _split(expr or ""):
            m = _SET.match(part)
            if m:
                reqs.append((m.group(1), m.group(2), tuple(v.strip() for v in m.group(3).split(",") if v.strip())))
            elif "!=" in part:
                k, v = part.split("!=", 1)
                reqs.append((k.strip(), "!=", (v.strip(),)))
            elif "==" in part:
                k, v = part.split("==", 1)
                reqs.append((k.strip(), "=", (v.strip(),)))
            elif "=" in part:
                k, v = part.split("=", 1)
                reqs.append((k.strip(), "=", (v.strip(),)))
            elif part.startswith("!"):
                reqs.append((part[1:].strip(), "!exists", ()))
            else:
                reqs.append((part, "exists", ()))
        return cls(tuple(reqs))

    def matches(self, obj: dict) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        for key, op, values in self.reqs:
            present = key in labels
            val = labels.get(key)
            if op == "=" and val != values[0]:
                return False
            if op == "!=" and val == values[0]:
                return False
            if op == "in" and val not in values:
                return False
            if op == "notin" and present and val in values:
                return False
            if op == "exists" and not present:
                return False
            if op == "!exists" and present:
                return False
        return True


@dataclass(frozen=True)
class FieldSelector:
    reqs: tuple[tuple[str, bool, str], ...] = ()   # (dotted path, equal?, value)

    @classmethod
    def parse(cls, expr: str) -> "FieldSelector":
        reqs = []
        for part in _split(expr or ""):
            if "!=" in part:
                k, v = part.split("!=", 1)
                reqs.append((k.strip(), False, v.strip()))
            elif "==" in part:
                k, v = part.split("==", 1)
                reqs.append((k.strip(), True, v.strip()))
            elif "=" in part:
                k, v = part.split("=", 1)
                reqs.append((k.strip(), True, v.strip()))
            else:
                raise ValueError(f"invalid field selector {part!r}: expected key=value or key!=value")
        return cls(tuple(reqs))

    def matches(self, obj: dict) -> bool:
        for path, equal, value in self.reqs:
            cur: object = obj
            for p in path.split("."):
                cur = cur.get(p) if isinstance(cur, dict) else None
            text = "" if cur is None else (str(cur).lower() if isinstance(cur, bool) else str(cur))
            if (text == value) != equal:
                return False
        return True
