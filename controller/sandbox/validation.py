"""Create/update admission of the sandbox API server: decoding, defaulting and validation as the real one.

What a real API server does to a write before it stores it, for the kinds the emulator serves:

1. **Decoding** against the kind's schema. The schema is the official client's models (``kubernetes``
   is a runtime dependency; its models carry every field's JSON name and type), so nothing here is
   written by hand per field. An unknown field (``deviceClass:`` for ``deviceClassName:``) is what the
   ``fieldValidation`` parameter says: ``Strict`` (what kubectl sends, and what the sandbox's manifest
   apply uses) refuses it with 400 BadRequest ``strict decoding error: unknown field "<path>"``;
   ``Warn`` (the server's default, what the Python client gets) and ``Ignore`` drop it, as decoding into
   Go structs does. A value of the wrong JSON type is always 400.
2. **Defaulting** (``pkg/apis/resource/v1/defaults.go``): ``allocationMode: ExactCount`` and, for
   ExactCount, ``count: 1`` on exact requests and subrequests; ``operator: Equal`` on tolerations.
3. **Validation** (``pkg/apis/resource/validation``) for the resource.k8s.io kinds: required fields, DNS
   names, enums, list limits, references between requests/constraints/config, and every CEL selector
   compiled at create (claims, templates, device classes) with the allocator's own compiler; an
   expression over the cost limit is Forbidden ("too complex, exceeds cost limit"). Every kind's
   ``metadata.name`` is checked as a DNS subdomain (a DNS label for namespaces), and a pod's DRA parts
   (``spec.resourceClaims`` and the containers' ``resources.claims`` references). A failure is 422
   Invalid with a Status whose ``details.causes`` name each field, as the real server answers.

Spec immutability (``spec`` of claims and templates, ``spec`` of slices is mutable) is checked on update.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Iterator

import kubernetes.client as k8s

from controller.allocator.cel import CelCompileError, CelCostError, validate_selector
from driver.api import naming
from driver.errors import PartitaError

#: (apiVersion, kind) -> the official client's model
MODELS: dict[tuple[str, str], type] = {
    ("v1", "Pod"): k8s.V1Pod, ("v1", "Node"): k8s.V1Node, ("v1", "Namespace"): k8s.V1Namespace,
    ("v1", "Event"): k8s.CoreV1Event, ("v1", "ConfigMap"): k8s.V1ConfigMap, ("v1", "Service"): k8s.V1Service,
    ("v1", "ServiceAccount"): k8s.V1ServiceAccount, ("events.k8s.io/v1", "Event"): k8s.EventsV1Event,
    ("coordination.k8s.io/v1", "Lease"): k8s.V1Lease,
    ("resource.k8s.io/v1", "ResourceSlice"): k8s.V1ResourceSlice,
    ("resource.k8s.io/v1", "ResourceClaim"): k8s.ResourceV1ResourceClaim,
    ("resource.k8s.io/v1", "ResourceClaimTemplate"): k8s.V1ResourceClaimTemplate,
    ("resource.k8s.io/v1", "DeviceClass"): k8s.V1DeviceClass,
    ("resource.k8s.io/v1", "DeviceTaintRule"): k8s.V1DeviceTaintRule,
    ("apps/v1", "Deployment"): k8s.V1Deployment, ("apps/v1", "StatefulSet"): k8s.V1StatefulSet,
    ("batch/v1", "Job"): k8s.V1Job,
}
DNS1123_LABEL = re.compile(f"^{naming.DNS_LABEL.pattern}$")
DNS1123_SUBDOMAIN = re.compile(f"^{naming.DNS_SUBDOMAIN.pattern}$")
C_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
REQUESTS_MAX = 32            # DeviceRequestsMaxSize
SELECTORS_MAX = 32           # DeviceSelectorsMaxSize
SUBREQUESTS_MAX = 8          # FirstAvailableDeviceRequestMaxSize
TOLERATIONS_MAX = 16         # DeviceTolerationsMaxLength
CONSTRAINTS_MAX = 32         # DeviceConstraintsMaxSize
CONFIG_MAX = 32              # DeviceConfigMaxSize
DEVICES_MAX = 128            # ResourceSliceMaxDevices
ALLOCATION_RESULTS_MAX = 32  # AllocationResultsMaxSize


@dataclass(frozen=True)
class FieldError:
    field: str
    reason: str          # FieldValueRequired / FieldValueInvalid / FieldValueNotSupported / FieldValueForbidden ...
    detail: str

    def text(self) -> str:
        return f"{self.field}: {self.detail}"


class Rejected(PartitaError):
    """The write is refused: ``code`` 400 (decoding) or 422 (validation), with the field errors."""

    def __init__(self, code: int, reason: str, message: str, errors: list[FieldError]):
        super().__init__(message)
        self.code, self.reason, self.message, self.errors = code, reason, message, errors

    def details(self, name: str, group: str, kind: str) -> dict:
        return {"name": name, "group": group, "kind": kind,
                "causes": [{"reason": e.reason, "message": e.detail, "field": e.field} for e in self.errors]}


# -- 1. decoding ------------------------------------------------------------------------------------
_INNER = re.compile(r"^(List|Dict)\[(?:str, )?(.*)\]$")


def _model(name: str) -> type | None:
    m = getattr(k8s, name, None)
    return m if isinstance(m, type) and hasattr(m, "attribute_map") else None


def _decode(value: Any, type_name: str, path: str, unknown: list[str], wrong: list[FieldError]) -> Any:
    """``value`` with unknown fields removed (recorded in ``unknown``); type mismatches in ``wrong``."""
    if value is None:
        return None
    m = _INNER.match(type_name)
    if m:
        kind, inner = m.groups()
        if kind == "List":
            if not isinstance(value, list):
                wrong.append(FieldError(path, "FieldValueTypeInvalid", f"expected a list, got {type(value).__name__}"))
                return value
            return [_decode(v, inner, f"{path}[{i}]", unknown, wrong) for i, v in enumerate(value)]
        if not isinstance(value, dict):
            wrong.append(FieldError(path, "FieldValueTypeInvalid", f"expected a map, got {type(value).__name__}"))
            return value
        return {key: _decode(v, inner, f"{path}[{key}]", unknown, wrong) for key, v in value.items()}
    model = _model(type_name)
    if model is not None:
        if not isinstance(value, dict):
            wrong.append(FieldError(path, "FieldValueTypeInvalid", f"expected an object, got {type(value).__name__}"))
            return value
        by_json = {j: p for p, j in model.attribute_map.items()}
        out = {}
        for key, v in value.items():
            child = f"{path}.{key}" if path else key
            py = by_json.get(key)
            if py is None:
                unknown.append(child)
                continue
            out[key] = _decode(v, model.openapi_types[py], child, unknown, wrong)
        return out
    # strings accept numbers: the client types quantities (``cpu: 1``) as strings
    expected = {"str": (str, int, float), "int": int, "bool": bool, "float": (int, float), "datetime": str,
                "date": str}.get(type_name)
    if expected is not None and (not isinstance(value, expected) or (expected is int and isinstance(value, bool))):
        wrong.append(FieldError(path, "FieldValueTypeInvalid",
                                f"expected {type_name}, got {type(value).__name__} {value!r}"))
    return value


def decode(obj: dict, field_validation: str = "Warn") -> tuple[dict, list[str]]:
    """The object as the server would store it, and the warnings for dropped fields (Warn). Raises
    :class:`Rejected` (400) for a type mismatch, or an unknown field under ``Strict``."""
    model = MODELS.get((obj.get("apiVersion", ""), obj.get("kind", "")))
    if model is None:
        return obj, []
    unknown: list[str] = []
    wrong: list[FieldError] = []
    decoded = _decode(obj, model.__name__, "", unknown, wrong)
    kind, version = obj["kind"], obj["apiVersion"].rpartition("/")[2]
    prefix = f"{kind} in version \"{version}\" cannot be handled as a {kind}: "
    if wrong:
        raise Rejected(400, "BadRequest", prefix + "; ".join(e.text() for e in wrong), wrong)
    if unknown and field_validation == "Strict":
        errors = [FieldError(u, "FieldValueInvalid", "unknown field") for u in unknown]
        raise Rejected(400, "BadRequest", prefix + "strict decoding error: " +
                       ", ".join(f'unknown field "{u}"' for u in unknown), errors)
    warnings = [f'unknown field "{u}"' for u in unknown] if field_validation == "Warn" else []
    return decoded, warnings


# -- 2. defaulting ----------------------------------------------------------------------------------
def _default_exact(req: dict) -> None:
    if not req.get("allocationMode"):
        req["allocationMode"] = "ExactCount"
    if req["allocationMode"] == "ExactCount" and not req.get("count"):
        req["count"] = 1
    for t in req.get("tolerations") or []:
        if isinstance(t, dict) and not t.get("operator"):
            t["operator"] = "Equal"


def _claim_specs(obj: dict) -> list[tuple[str, dict]]:
    kind = obj.get("kind")
    if kind == "ResourceClaim":
        return [("spec", obj.get("spec"))] if isinstance(obj.get("spec"), dict) else []
    if kind == "ResourceClaimTemplate":
        spec = (obj.get("spec") or {}).get("spec") if isinstance(obj.get("spec"), dict) else None
        return [("spec.spec", spec)] if isinstance(spec, dict) else []
    return []


def default(obj: dict) -> None:
    for _, spec in _claim_specs(obj):
        for req in ((spec.get("devices") or {}).get("requests") or []):
            if not isinstance(req, dict):
                continue
            if isinstance(req.get("exactly"), dict):
                _default_exact(req["exactly"])
            for sub in req.get("firstAvailable") or []:
                if isinstance(sub, dict):
                    _default_exact(sub)


# -- 3. validation ----------------------------------------------------------------------------------
class _Errors(list):
    def required(self, path: str, detail: str = "Required value") -> None:
        self.append(FieldError(path, "FieldValueRequired", detail))

    def invalid(self, path: str, value: Any, detail: str) -> None:
        self.append(FieldError(path, "FieldValueInvalid", f"Invalid value: {_show(value)}: {detail}"))

    def unsupported(self, path: str, value: Any, allowed: list[str]) -> None:
        self.append(FieldError(path, "FieldValueNotSupported", f"Unsupported value: {_show(value)}: supported "
                               "values: " + ", ".join(f'"{a}"' for a in allowed)))

    def forbidden(self, path: str, detail: str) -> None:
        self.append(FieldError(path, "FieldValueForbidden", f"Forbidden: {detail}"))

    def too_many(self, path: str, n: int, limit: int) -> None:
        self.append(FieldError(path, "FieldValueTooMany", f"Too many: {n}: must have at most {limit} items"))

    def duplicate(self, path: str, value: Any) -> None:
        self.append(FieldError(path, "FieldValueDuplicate", f"Duplicate value: {_show(value)}"))


def _show(v: Any) -> str:
    return f'"{v}"' if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)


def _items(errs: _Errors, path: str, items: list, limit: int) -> Iterator[tuple[str, dict]]:
    """A list field with at most ``limit`` entries: reports too many, then yields each object entry with its
    path (what is not an object was reported by the strict decoding already)."""
    if len(items) > limit:
        errs.too_many(path, len(items), limit)
    for i, item in enumerate(items):
        if isinstance(item, dict):
            yield f"{path}[{i}]", item


def _dns(errs: _Errors, path: str, value: Any, label: bool = False) -> None:
    if not isinstance(value, str) or not value:
        errs.required(path)
        return
    limit, pattern = (63, DNS1123_LABEL) if label else (253, DNS1123_SUBDOMAIN)
    if len(value) > limit:
        errs.invalid(path, value, f"must be no more than {limit} characters")
    elif not pattern.match(value):
        errs.invalid(path, value, _LABEL_RULE if label else _SUBDOMAIN_RULE)


_LABEL_RULE = ("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start "
               "and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is "
               f"'{DNS1123_LABEL.pattern[1:-1]}')")
_SUBDOMAIN_RULE = ("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and "
                   "must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation "
                   f"is '{DNS1123_SUBDOMAIN.pattern[1:-1]}')")


def _selectors(errs: _Errors, path: str, selectors: Any) -> None:
    if not isinstance(selectors, list):
        return
    if len(selectors) > SELECTORS_MAX:
        errs.too_many(path, len(selectors), SELECTORS_MAX)
    for i, sel in enumerate(selectors):
        p = f"{path}[{i}]"
        cel = (sel or {}).get("cel") if isinstance(sel, dict) else None
        if not isinstance(cel, dict):
            errs.required(f"{p}.cel")
            continue
        expr = cel.get("expression")
        if not isinstance(expr, str) or not expr:
            errs.required(f"{p}.cel.expression")
            continue
        try:
            validate_selector(expr)
        except CelCostError:
            errs.forbidden(f"{p}.cel.expression", "too complex, exceeds cost limit")
        except CelCompileError as e:
            errs.invalid(f"{p}.cel.expression", expr, str(e))


def _tolerations(errs: _Errors, path: str, tolerations: Any) -> None:
    if not isinstance(tolerations, list):
        return
    for p, t in _items(errs, path, tolerations, TOLERATIONS_MAX):
        key, op = t.get("key") or "", t.get("operator") or "Equal"
        if key and not _qualified_name(key):
            errs.invalid(f"{p}.key", key, "name part must consist of alphanumeric characters, '-', '_' or '.', and "
                         "must start and end with an alphanumeric character (with an optional DNS subdomain prefix "
                         "and '/')")
        if op not in ("Exists", "Equal"):
            errs.unsupported(f"{p}.operator", op, ["Equal", "Exists"])
        elif op == "Exists" and t.get("value"):
            errs.invalid(f"{p}.value", t["value"], "must be empty when `operator` is 'Exists'")
        elif op == "Equal" and not key:
            errs.invalid(f"{p}.operator", op, "must be 'Exists' when `key` is empty")
        if t.get("effect") not in (None, "", "NoSchedule", "NoExecute", "None"):
            errs.unsupported(f"{p}.effect", t["effect"], ["NoExecute", "NoSchedule", "None"])


def _qualified_name(name: str) -> bool:
    return naming.is_qualified_name(name)


def _exact(errs: _Errors, path: str, req: dict, sub: bool = False) -> None:
    _dns(errs, f"{path}.deviceClassName", req.get("deviceClassName"))
    mode = req.get("allocationMode")
    if mode == "ExactCount":
        count = req.get("count")
        if isinstance(count, int) and count <= 0:
            errs.invalid(f"{path}.count", count, "must be greater than zero")
        elif isinstance(count, int) and count > ALLOCATION_RESULTS_MAX:
            errs.invalid(f"{path}.count", count, f"must not be more than {ALLOCATION_RESULTS_MAX}")
    elif mode == "All":
        if req.get("count"):
            errs.invalid(f"{path}.count", req["count"], "must not be specified when allocationMode is 'All'")
    else:
        errs.unsupported(f"{path}.allocationMode", mode, ["All", "ExactCount"])
    _selectors(errs, f"{path}.selectors", req.get("selectors"))
    _tolerations(errs, f"{path}.tolerations", req.get("tolerations"))


def _claim_spec(errs: _Errors, path: str, spec: dict) -> None:
    devices = spec.get("devices")
    if not isinstance(devices, dict):
        return          # a claim without devices is valid (and useless), as upstream
    names: dict[str, set[str]] = {}
    for p, req in _items(errs, f"{path}.devices.requests", devices.get("requests") or [], REQUESTS_MAX):
        name = req.get("name")
        _dns(errs, f"{p}.name", name, label=True)
        if isinstance(name, str) and name in names:
            errs.duplicate(f"{p}.name", name)
        subs: set[str] = set()
        exactly, first = req.get("exactly"), req.get("firstAvailable")
        if exactly is None and not first:
            errs.required(p, "Required value: exactly one of `exactly` or `firstAvailable` is required")
        elif exactly is not None and first:
            errs.invalid(p, "{...}", "exactly one of `exactly` or `firstAvailable` is required, but multiple "
                         "fields are set")
        elif isinstance(exactly, dict):
            _exact(errs, f"{p}.exactly", exactly)
        else:
            for sp, sub in _items(errs, f"{p}.firstAvailable", first, SUBREQUESTS_MAX):
                _dns(errs, f"{sp}.name", sub.get("name"), label=True)
                if sub.get("name") in subs:
                    errs.duplicate(f"{sp}.name", sub.get("name"))
                subs.add(sub.get("name"))
                _exact(errs, sp, sub, sub=True)
        if isinstance(name, str):
            names[name] = subs

    def refs(where: str, requests_: Any) -> None:
        for j, r in enumerate(requests_ or []):
            base, _, sub = str(r).partition("/")
            if base not in names or (sub and sub not in names[base]):
                errs.invalid(f"{where}[{j}]", r, "must be the name of a request in the claim or the name of a "
                             "request and a subrequest separated by '/'")

    for p, c in _items(errs, f"{path}.devices.constraints", devices.get("constraints") or [], CONSTRAINTS_MAX):
        refs(f"{p}.requests", c.get("requests"))
        set_ = [k for k in ("matchAttribute", "distinctAttribute") if c.get(k)]
        if not set_:
            errs.required(p, "Required value: exactly one of `matchAttribute` or `distinctAttribute` is required")
        elif len(set_) > 1:
            errs.invalid(p, "{...}", "exactly one of `matchAttribute` or `distinctAttribute` is required, but "
                         "multiple fields are set")
        for key in set_:
            v = c[key]
            if "/" not in v or not _qualified_name(v):
                errs.invalid(f"{p}.{key}", v, "must be a fully qualified name (a domain and an identifier "
                             "separated by '/')")
    for p, c in _items(errs, f"{path}.devices.config", devices.get("config") or [], CONFIG_MAX):
        refs(f"{p}.requests", c.get("requests"))
        _opaque(errs, p, c)


def _opaque(errs: _Errors, p: str, c: dict) -> None:
    opaque = c.get("opaque")
    if not isinstance(opaque, dict):
        errs.required(f"{p}.opaque")
        return
    _dns(errs, f"{p}.opaque.driver", opaque.get("driver"))
    if opaque.get("parameters") is None:
        errs.required(f"{p}.opaque.parameters")


def _device_class(errs: _Errors, obj: dict) -> None:
    spec = obj.get("spec") or {}
    _selectors(errs, "spec.selectors", spec.get("selectors"))
    for i, c in enumerate(spec.get("config") or []):
        if isinstance(c, dict):
            _opaque(errs, f"spec.config[{i}]", c)


def _resource_slice(errs: _Errors, obj: dict) -> None:
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        errs.required("spec")
        return
    _dns(errs, "spec.driver", spec.get("driver"))
    pool = spec.get("pool")
    if not isinstance(pool, dict):
        errs.required("spec.pool")
    else:
        if not pool.get("name"):
            errs.required("spec.pool.name")
        if not isinstance(pool.get("resourceSliceCount"), int) or pool["resourceSliceCount"] <= 0:
            errs.invalid("spec.pool.resourceSliceCount", pool.get("resourceSliceCount"), "must be greater than zero")
        if isinstance(pool.get("generation"), int) and pool["generation"] < 0:
            errs.invalid("spec.pool.generation", pool["generation"], "must be greater than or equal to 0")
    node = [k for k in ("nodeName", "nodeSelector", "allNodes", "perDeviceNodeSelection") if spec.get(k)]
    if len(node) != 1:
        errs.required("spec", "Required value: exactly one of `nodeName`, `nodeSelector`, `allNodes`, "
                      "`perDeviceNodeSelection` is required" + (", but multiple fields are set" if node else ""))
    seen: set[str] = set()
    for p, d in _items(errs, "spec.devices", spec.get("devices") or [], DEVICES_MAX):
        _dns(errs, f"{p}.name", d.get("name"), label=True)
        if d.get("name") in seen:
            errs.duplicate(f"{p}.name", d.get("name"))
        seen.add(d.get("name"))
        for name, attr in (d.get("attributes") or {}).items():
            values = [key for key in ("int", "bool", "string", "version", "ints", "bools", "strings", "versions")
                      if isinstance(attr, dict) and attr.get(key) is not None]
            if len(values) != 1:
                errs.invalid(f"{p}.attributes[{name}]", "{...}", "exactly one value must be specified")


def _pod_claims(errs: _Errors, obj: dict) -> None:
    """The DRA parts of pod validation: ``spec.resourceClaims`` and the containers' claim references."""
    spec = obj.get("spec") or {}
    names: set[str] = set()
    for i, rc in enumerate(spec.get("resourceClaims") or []):
        if not isinstance(rc, dict):
            continue
        p = f"spec.resourceClaims[{i}]"
        _dns(errs, f"{p}.name", rc.get("name"), label=True)
        if rc.get("name") in names:
            errs.duplicate(f"{p}.name", rc.get("name"))
        names.add(rc.get("name"))
        sources = [k for k in ("resourceClaimName", "resourceClaimTemplateName") if rc.get(k)]
        if len(sources) != 1:
            errs.invalid(p, "{...}", "must specify one of: `resourceClaimName`, `resourceClaimTemplateName`")
        for k in sources:
            _dns(errs, f"{p}.{k}", rc[k])
    for group in ("initContainers", "containers"):
        for j, c in enumerate(spec.get(group) or []):
            for m, ref in enumerate(((c or {}).get("resources") or {}).get("claims") or []):
                name = (ref or {}).get("name")
                if not name:
                    errs.required(f"spec.{group}[{j}].resources.claims[{m}].name")
                elif name not in names:
                    errs.append(FieldError(f"spec.{group}[{j}].resources.claims[{m}].name", "FieldValueNotFound",
                                           f'Not found: "{name}"'))


def validate(obj: dict, old: dict | None = None) -> None:
    """Raises :class:`Rejected` (422) with every field error."""
    errs = _Errors()
    md = obj.get("metadata") or {}
    kind = obj.get("kind")
    _dns(errs, "metadata.name", md.get("name"), label=kind == "Namespace")
    for path, spec in _claim_specs(obj):
        _claim_spec(errs, path, spec)
    if kind == "ResourceClaimTemplate" and not isinstance((obj.get("spec") or {}).get("spec"), dict):
        errs.required("spec.spec")
    if kind == "DeviceClass":
        _device_class(errs, obj)
    if kind == "ResourceSlice":
        _resource_slice(errs, obj)
    if kind == "Pod":
        _pod_claims(errs, obj)
    if old is not None and kind in ("ResourceClaim", "ResourceClaimTemplate") and obj.get("spec") != old.get("spec"):
        errs.invalid("spec", "{...}", "field is immutable")
    if errs:
        group = obj.get("apiVersion", "").rpartition("/")[0]
        what = f"{kind}.{group}" if group else kind
        body = errs[0].text() if len(errs) == 1 else "[" + ", ".join(e.text() for e in errs) + "]"
        raise Rejected(422, "Invalid", f'{what} "{md.get("name", "")}" is invalid: {body}', list(errs))


def admit(obj: dict, old: dict | None = None, field_validation: str = "Warn") -> tuple[dict, list[str]]:
    """Decode, default and validate a create (``old`` None) or update; returns the object to store and
    the warnings. Raises :class:`Rejected`."""
    stored, warnings = decode(obj, field_validation)
    default(stored)
    validate(stored, old)
    return stored, warnings


# -- claim status.devices (KEP-4817), validated on status writes ------------------------------------
#: upstream pkg/apis/resource/types.go
DEVICE_STATUS_MAX_CONDITIONS = 8          # AllocatedDeviceStatusMaxConditions
DEVICE_STATUS_DATA_MAX = 10 * 1024        # AllocatedDeviceStatusDataMaxLength
NETWORK_INTERFACE_NAME_MAX = 256          # NetworkDeviceDataInterfaceNameMaxLength
NETWORK_HARDWARE_ADDRESS_MAX = 128        # NetworkDeviceDataHardwareAddressMaxLength
NETWORK_IPS_MAX = 16                      # NetworkDeviceDataMaxIPs
CONDITION_REASON = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
CONDITION_STATUSES = ("True", "False", "Unknown")
UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def _shared_id(driver: Any, pool: Any, device: Any, share: Any) -> str:
    """upstream's SharedDeviceID as it prints: driver/pool/device, and /shareID when set"""
    base = f"{driver}/{pool}/{device}"
    return f"{base}/{share}" if share else base


def _conditions(errs: _Errors, path: str, conditions: Any) -> None:
    """metav1validation.ValidateConditions"""
    seen: set[str] = set()
    for i, c in enumerate(conditions if isinstance(conditions, list) else []):
        p = f"{path}[{i}]"
        if not isinstance(c, dict):
            errs.invalid(p, c, "must be an object")
            continue
        ctype = c.get("type")
        if not ctype:
            errs.required(f"{p}.type")
        elif not isinstance(ctype, str) or not _qualified_name(ctype):
            errs.invalid(f"{p}.type", ctype, "name part must consist of alphanumeric characters, '-', '_' or '.', "
                         "and must start and end with an alphanumeric character")
        elif ctype in seen:
            errs.duplicate(f"{p}.type", ctype)
        else:
            seen.add(ctype)
        if c.get("status") not in CONDITION_STATUSES:
            errs.unsupported(f"{p}.status", c.get("status"), list(CONDITION_STATUSES))
        gen = c.get("observedGeneration")
        if isinstance(gen, int) and gen < 0:
            errs.invalid(f"{p}.observedGeneration", gen, "must be greater than or equal to zero")
        if not c.get("lastTransitionTime"):
            errs.required(f"{p}.lastTransitionTime", "Required value: must be set")
        reason = c.get("reason")
        if not reason:
            errs.required(f"{p}.reason")
        elif not isinstance(reason, str) or not CONDITION_REASON.match(reason):
            errs.invalid(f"{p}.reason", reason, "a condition reason must start with alphabetic character, optionally "
                         "followed by a string of alphanumeric characters or '_,:', and must end with an alphanumeric "
                         f"character or '_' (regex used for validation is '{CONDITION_REASON.pattern[1:-1]}')")
        elif len(reason) > 1024:
            errs.append(FieldError(f"{p}.reason", "FieldValueTooLong", "Too long: may not be more than 1024 bytes"))
        message = c.get("message")
        if isinstance(message, str) and len(message) > 32768:
            errs.append(FieldError(f"{p}.message", "FieldValueTooLong", "Too long: may not be more than 32768 bytes"))


def claim_device_status(errs: _Errors, claim: dict) -> None:
    """``status.devices`` as upstream validates a claim status update (validateDeviceStatus): names, a share
    id that is a UUID, each entry an allocated device of the claim and listed once, at most 8 conditions, valid
    conditions, ``data`` a JSON object of at most 10 KiB, networkData within its limits."""
    status = claim.get("status") or {}
    entries = status.get("devices")
    if not entries:
        return
    results = (((status.get("allocation") or {}).get("devices") or {}).get("results")) or []
    allocated = {_shared_id(r.get("driver"), r.get("pool"), r.get("device"), r.get("shareID"))
                 for r in results if isinstance(r, dict)}
    seen: set[str] = set()
    for i, d in enumerate(entries if isinstance(entries, list) else []):
        p = f"status.devices[{i}]"
        if not isinstance(d, dict):
            errs.invalid(p, d, "must be an object")
            continue
        _dns(errs, f"{p}.driver", d.get("driver"))
        pool = d.get("pool")
        if not isinstance(pool, str) or not pool:
            errs.required(f"{p}.pool")
        else:
            for part in pool.split("/"):
                _dns(errs, f"{p}.pool", part)
        _dns(errs, f"{p}.device", d.get("device"), label=True)
        share = d.get("shareID")
        if share is not None and (not isinstance(share, str) or not UUID_RE.match(share)):
            errs.invalid(f"{p}.shareID", share, "must be a lowercase UUID in 8-4-4-4-12 format")
        key = _shared_id(d.get("driver"), d.get("pool"), d.get("device"), share)
        if key in seen:
            errs.duplicate(p, key)
        seen.add(key)
        if key not in allocated:
            errs.invalid(p, key, "must be an allocated device in the claim")
        conditions = d.get("conditions") or []
        if isinstance(conditions, list) and len(conditions) > DEVICE_STATUS_MAX_CONDITIONS:
            errs.too_many(f"{p}.conditions", len(conditions), DEVICE_STATUS_MAX_CONDITIONS)
        _conditions(errs, f"{p}.conditions", conditions)
        if "data" in d and d["data"] is not None:
            raw = json.dumps(d["data"], separators=(",", ":"))
            if len(raw) > DEVICE_STATUS_DATA_MAX:
                errs.append(FieldError(f"{p}.data", "FieldValueTooLong",
                                       f"Too long: may not be more than {DEVICE_STATUS_DATA_MAX} bytes"))
            elif not isinstance(d["data"], dict):
                errs.invalid(f"{p}.data", "<value omitted>", "must be a valid JSON object")
        net = d.get("networkData")
        if isinstance(net, dict):
            if len(str(net.get("interfaceName") or "")) > NETWORK_INTERFACE_NAME_MAX:
                errs.append(FieldError(f"{p}.networkData.interfaceName", "FieldValueTooLong",
                                       f"Too long: may not be more than {NETWORK_INTERFACE_NAME_MAX} bytes"))
            if len(str(net.get("hardwareAddress") or "")) > NETWORK_HARDWARE_ADDRESS_MAX:
                errs.append(FieldError(f"{p}.networkData.hardwareAddress", "FieldValueTooLong",
                                       f"Too long: may not be more than {NETWORK_HARDWARE_ADDRESS_MAX} bytes"))
            if len(net.get("ips") or []) > NETWORK_IPS_MAX:
                errs.too_many(f"{p}.networkData.ips", len(net.get("ips") or []), NETWORK_IPS_MAX)


def drop_deallocated_status_devices(new: dict, old: dict) -> None:
    """upstream's dropDeallocatedStatusDevices (resourceclaim strategy): entries of devices the old claim had
    allocated and the new one no longer has are removed, so clearing an allocation needs no status.devices
    edit."""
    def ids(claim: dict) -> set[str]:
        results = ((((claim.get("status") or {}).get("allocation") or {}).get("devices") or {}).get("results")) or []
        return {_shared_id(r.get("driver"), r.get("pool"), r.get("device"), r.get("shareID"))
                for r in results if isinstance(r, dict)}
    gone = ids(old) - ids(new)
    status = new.get("status") or {}
    entries = status.get("devices")
    if not gone or not isinstance(entries, list):
        return
    kept = [d for d in entries if not (isinstance(d, dict) and _shared_id(d.get("driver"), d.get("pool"),
                                                                            d.get("device"), d.get("shareID")) in gone)]
    if kept:
        status["devices"] = kept
    else:
        status.pop("devices", None)


def validate_claim_status(claim: dict) -> None:
    """Raises :class:`Rejected` (422) for an invalid ``status.devices``."""
    errs = _Errors()
    claim_device_status(errs, claim)
    if errs:
        md = claim.get("metadata") or {}
        body = errs[0].text() if len(errs) == 1 else "[" + ", ".join(e.text() for e in errs) + "]"
        raise Rejected(422, "Invalid", f'ResourceClaim.resource.k8s.io "{md.get("name", "")}" is invalid: {body}',
                       list(errs))


__all__ = ["MODELS", "FieldError", "Rejected", "admit", "decode", "default", "drop_deallocated_status_devices",
           "validate", "validate_claim_status"]
