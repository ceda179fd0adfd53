"""Per-resource create/update rules (kubernetes pkg/registry/*/strategy.go): what a create keeps, what a
write may change, the fields a gate that is off drops, and the validation beyond the schema.

The generic part (decoding, defaulting, schema validation) is ``controller/sandbox/validation.py``; a
resource without rules of its own gets :class:`Strategy` as it is."""

from __future__ import annotations

from controller.sandbox import validation

from .errors import ApiError
from .gates import FeatureGates
from .resources import Resource


class Strategy:
    #: a create keeps the status it is given (else a resource with a status subresource drops it)
    keeps_status_on_create = False

    def prepare_for_create(self, obj: dict, gates: FeatureGates) -> None:
        """Adjust a new object after admission."""

    def prepare_for_update(self, obj: dict, old: dict, gates: FeatureGates) -> None:
        """Adjust a main-resource write after admission."""

    def prepare_for_status_update(self, obj: dict, old: dict, gates: FeatureGates) -> None:
        """Adjust, then validate, a status write (``obj`` is the old object with the new status)."""


def admit(res: Resource, obj: dict, old: dict | None, field_validation: str) -> dict:
    """Decoding, defaulting and validation of a create or update (controller/sandbox/validation.py)."""
    try:
        stored, _warnings = validation.admit(obj, old, field_validation)
    except validation.Rejected as e:
        name = (obj.get("metadata") or {}).get("name", "")
        raise ApiError(e.code, e.reason, e.message, e.details(name, res.group, res.kind)) from None
    return stored
