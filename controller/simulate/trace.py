"""Trace files of past pods: CSV (a header row) or JSON (an array of objects, or one object per line).

Fields: ``arrival`` (tick the pod arrived, a number >= 0), ``duration`` (ticks it ran, a number > 0;
rounded up to whole ticks), ``request`` (its shape: ``gpu:N``, ``mig:PROFILE``, ``shared:MEMORY``, see
:mod:`.shapes`) and, optionally, ``model`` (the built-in GPU model key it was limited to). Other
columns are ignored, so exports with more fields load as they are. Every error names the file, the
line and the field.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from .errors import SimulateError
from .shapes import parse_shape
from .workload import Request

REQUIRED = ("arrival", "duration", "request")
OPTIONAL = ("model",)


def load_trace(path: Path) -> list[Request]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SimulateError(f"trace file {path} does not exist; pass an existing CSV or JSON file to --trace") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SimulateError(f"cannot read trace file {path}: {e}") from None
    stripped = text.lstrip()
    if path.suffix.lower() in (".json", ".jsonl", ".ndjson") or stripped.startswith(("[", "{")):
        rows = _json_rows(path, text)
    else:
        rows = _csv_rows(path, text)
    out = []
    for line, row in rows:
        out.append(_request(path, line, row, len(out)))
    if not out:
        raise SimulateError(f"{path}: the trace has no requests; add rows with {', '.join(REQUIRED)}")
    out.sort(key=lambda r: (r.arrival, r.id))
    return [Request(i, r.arrival, r.duration, r.shape, r.source) for i, r in enumerate(out)]


def _csv_rows(path: Path, text: str) -> list[tuple[int, dict]]:
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except StopIteration:
        raise SimulateError(f"{path} line 1: the trace is empty; write a header row ({','.join(REQUIRED)}) "
                            "and one row per pod") from None
    except csv.Error as e:
        raise SimulateError(f"{path} line 1: not valid CSV: {e}") from None
    names = [h.strip().lower() for h in header]
    for col in REQUIRED:
        if col not in names:
            raise SimulateError(f"{path} line 1: missing column {col!r}; the header must name "
                                f"{', '.join(REQUIRED)} (and optionally {', '.join(OPTIONAL)}), got {','.join(header)}")
    rows = []
    try:
        for values in reader:
            line = reader.line_num
            if not any(v.strip() for v in values):
                continue
            if len(values) < len(names):
                values = values + [""] * (len(names) - len(values))
            rows.append((line, dict(zip(names, (v.strip() for v in values)))))
    except csv.Error as e:
        raise SimulateError(f"{path} line {reader.line_num}: not valid CSV: {e}") from None
    return rows


def _json_rows(path: Path, text: str) -> list[tuple[int, dict]]:
    """Objects with the line each starts on (json gives no positions, so elements are decoded one by one)."""
    decoder = json.JSONDecoder()
    rows: list[tuple[int, dict]] = []
    pos = _skip(text, 0)
    array = text.startswith("[", pos)
    if array:
        pos = _skip(text, pos + 1)
    while pos < len(text):
        if array and text[pos] == "]":
            if _skip(text, pos + 1) < len(text):
                raise SimulateError(f"{path} line {_line(text, pos + 1)}: text after the end of the JSON array")
            return rows
        line = _line(text, pos)
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise SimulateError(f"{path} line {e.lineno}: not valid JSON: {e.msg}") from None
        if not isinstance(obj, dict):
            raise SimulateError(f"{path} line {line}: each request must be a JSON object with "
                                f"{', '.join(REQUIRED)}, got {type(obj).__name__}")
        rows.append((line, {str(k).lower(): v for k, v in obj.items()}))
        pos = _skip(text, pos)
        if array and pos < len(text) and text[pos] == ",":
            pos = _skip(text, pos + 1)
    if array:
        raise SimulateError(f"{path} line {_line(text, len(text))}: the JSON array is not closed; end it with ]")
    return rows


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _request(path: Path, line: int, row: dict, index: int) -> Request:
    where = f"{path} line {line}"
    for col in REQUIRED:
        if row.get(col) in (None, ""):
            raise SimulateError(f"{where}: field {col!r} is missing or empty; every request needs "
                                f"{', '.join(REQUIRED)}")
    arrival = _number(where, "arrival", row["arrival"], minimum=0.0)
    duration = _number(where, "duration", row["duration"], minimum=0.0, strict=True)
    model = row.get("model")
    try:
        shape = parse_shape(str(row["request"]), "" if model in (None, "") else str(model))
    except ValueError as e:
        field = "model" if "GPU model" in str(e) and model not in (None, "") else "request"
        raise SimulateError(f"{where}: field {field!r}: {e}") from None
    return Request(index, math.floor(arrival), max(1, math.ceil(duration)), shape, where)


def _number(where: str, field: str, value: object, minimum: float, strict: bool = False) -> float:
    try:
        n = float(value)  # type: ignore[arg-type]
        ok = math.isfinite(n) and not isinstance(value, bool)
    except (TypeError, ValueError):
        ok = False
    if not ok or n < minimum or (strict and n <= minimum):
        bound = f"greater than {minimum:g}" if strict else f"at least {minimum:g}"
        raise SimulateError(f"{where}: field {field!r}: {value!r} is not a number {bound} (ticks)")
    return n
