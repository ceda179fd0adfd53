"""Shared pytest fixtures. Area-specific fixtures live in the test modules that use them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Reference files the tests need (CDI schema, kubelet protos, GPU models, upstream allocator cases), kept in
#: the repository with their provenance (tests/reference/README.md), so the suite passes in any clone.
REFERENCE = REPO / "tests" / "reference"
#: The project's reference set beside a development checkout (present in CI, absent in a user's clone). Tests
#: that compare us with it (the upstream allocator oracle, our copies of its files) run where it is present.
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return REFERENCE


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared, for the tests that compare us with it; they are skipped only where it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"the project's reference set is not at {SHARED} (a user's clone has none; CI has it)")
    return SHARED


@pytest.fixture(scope="session")
def cdi_validator():
    """Validator of the CDI spec schema (tests/reference/cdi/schema.json) that our specs must satisfy."""
    import jsonschema
    import referencing
    import referencing.jsonschema

    root = REFERENCE / "cdi"
    schema = json.loads((root / "schema.json").read_text())
    defs = json.loads((root / "defs.json").read_text())
    registry = referencing.Registry().with_resource("defs.json", referencing.Resource.from_contents(
        defs, default_specification=referencing.jsonschema.DRAFT7))
    return jsonschema.Draft7Validator(schema, registry=registry)
