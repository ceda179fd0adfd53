"""PATCH bodies: JSON merge patch (RFC 7386; strategic merge patch is treated as merge patch) and JSON
patch (RFC 6902, 422 on a failed ``test``)."""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch

from .errors import ApiError


def merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if not isinstance(target, dict):
        target = {}
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        else:
            target[k] = merge(target.get(k), v)
    return target


def apply(content_type: str, old: dict, body: Any) -> tuple[dict, bool]:
    """The patched object and whether a resourceVersion in it is a precondition (merge patches only)."""
    if content_type == "application/json-patch+json":
        try:
            return jsonpatch.apply_patch(old, body), False
        except jsonpatch.JsonPatchTestFailed as e:
            raise ApiError(422, "Invalid", f"the server rejected our request due to an error in our request: {e}") from None
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
            raise ApiError(422, "Invalid", str(e)) from None
    return merge(copy.deepcopy(old), body), True
