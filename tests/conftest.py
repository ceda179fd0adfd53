"""Shared pytest fixtures. Area-specific fixtures live in the test modules that use them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: The read-only reference material (design, kubelet protos, CDI schema, GPU models, fixtures).
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"reference material not found at {SHARED}: the tests expect ../shared beside the clone")
    return SHARED


@pytest.fixture(scope="session")
def cdi_validator(shared_dir):
    """Validator of ../shared/reference/cdi/schema.json (the CDI spec schema our specs must satisfy)."""
    import jsonschema
    import referencing
    import referencing.jsonschema

    root = shared_dir / "reference" / "cdi"
    schema = json.loads((root / "schema.json").read_text())
    defs = json.loads((root / "defs.json").read_text())
    registry = referencing.Registry().with_resource("defs.json", referencing.Resource.from_contents(
        defs, default_specification=referencing.jsonschema.DRAFT7))
    return jsonschema.Draft7Validator(schema, registry=registry)
