"""Our in-repository copies of the reference files (tests/reference/) equal the project's reference set.

Runs where ../shared is present (CI), and is skipped only in a clone without it: there the copies are all the
suite has, which is why they must not drift from their origin.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REFERENCE

#: directory here -> directory in ../shared, with the file pattern both hold
COPIED_DIRS = [
    ("cdi", "reference/cdi", "*.json"),
    ("kubelet-api", "reference/kubelet-api", "*.proto"),
    ("conformance", "conformance/allocator", "*.yaml"),
]
COPIED_FILES = [("gpu-models.yaml", "reference/gpu-models.yaml")]


def _names(d: Path, pattern: str) -> set[str]:
    return {p.name for p in d.glob(pattern)}


@pytest.mark.parametrize("ours,theirs,pattern", COPIED_DIRS, ids=[d[0] for d in COPIED_DIRS])
def test_copied_directories_hold_the_same_files(ours, theirs, pattern, shared_dir) -> None:
    here, there = _names(REFERENCE / ours, pattern), _names(shared_dir / theirs, pattern)
    assert here, f"tests/reference/{ours} is empty"
    assert there - here == set(), f"copy {sorted(there - here)} from ../shared/{theirs} into tests/reference/{ours}"
    assert here - there == set(), f"tests/reference/{ours} has {sorted(here - there)}, which ../shared/{theirs} lacks"


def _pairs() -> list[tuple[str, str]]:
    out = list(COPIED_FILES)
    for ours, theirs, pattern in COPIED_DIRS:
        out += [(f"{ours}/{p.name}", f"{theirs}/{p.name}") for p in sorted((REFERENCE / ours).glob(pattern))]
    return out


@pytest.mark.parametrize("ours,theirs", _pairs(), ids=[p[0] for p in _pairs()])
def test_each_copy_is_byte_identical(ours, theirs, shared_dir) -> None:
    origin = shared_dir / theirs
    assert origin.is_file(), f"../shared/{theirs} is gone: remove tests/reference/{ours} or find its new origin"
    assert (REFERENCE / ours).read_bytes() == origin.read_bytes(), \
        f"tests/reference/{ours} differs from ../shared/{theirs}: copy it again (cp, never edit)"
