"""Fake-GPU profile files: which GPUs each fake node has.

    apiVersion: gpu.partita.dev/v1alpha1
    kind: FakeGpuProfile
    driverVersion: "580.105.08"        # optional
    cudaDriverVersion: "13.0"          # optional
    nodes:
    - name: node-a                      # an exact node name, or "*" = any node not listed
      gpus:
      - {model: H100-SXM5-80GB, count: 8, migEnabled: false}
      - {model: L4, count: 2, unhealthy: [1]}
      - {model: A100-SXM4-80GB, count: 1, load: {smUtil: 30, memoryUsedMiB: 4096}}   # a background process
      healthEvents:                     # optional: injected once the health monitor registers (docs/health.md)
      - {kind: xid, gpu: 0, xid: 79}

Health events are also injected at runtime, one JSON object a line, into the file ``partita plugin
--fake-events FILE`` watches (``partita fake-inject`` appends to it); :func:`parse_injection` checks each.

Used by ``partita plugin --nvml fake --fake-profile FILE``, the sandbox and the chart's kind mode.
"""

from __future__ import annotations

from pathlib import Path
import json
from typing import Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from driver.errors import PartitaError

from .models import get_model, known_models

API_VERSION = "gpu.partita.dev/v1alpha1"
KIND = "FakeGpuProfile"
DEFAULT_DRIVER_VERSION = "580.105.08"
DEFAULT_CUDA_DRIVER_VERSION = "13.0"
ANY_NODE = "*"


class ProfileError(PartitaError, ValueError):
    """A profile file or ``--fake`` value that cannot be used; the message says where and how to fix it."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class GpuLoad(_Model):
    """A background compute process on each GPU of a group (the fake's usage figures)."""

    sm_util: int = Field(default=0, ge=0, le=100, alias="smUtil")
    memory_used_mib: int = Field(default=0, ge=0, alias="memoryUsedMiB")


class GpuGroup(_Model):
    model: str
    count: int = Field(default=1, ge=1, le=64)
    mig_enabled: bool = Field(default=False, alias="migEnabled")
    #: indexes (within this group) of GPUs the fake reports unhealthy
    unhealthy: tuple[int, ...] = ()
    #: a background process on each GPU of the group (usage: utilization and memory used)
    load: GpuLoad | None = None

    @field_validator("model")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in known_models():
            raise ValueError(f"unknown GPU model {v!r}; use one of: {', '.join(known_models())}")
        return v

    @model_validator(mode="after")
    def _mig_only_on_mig_models(self) -> "GpuGroup":
        if self.mig_enabled and not get_model(self.model).mig_capable:
            raise ValueError(f"migEnabled is true but {self.model} does not support MIG; remove migEnabled "
                             "or use a MIG-capable model (A100-SXM4-40GB, A100-SXM4-80GB, H100-SXM5-80GB, "
                             "H200-SXM-141GB)")
        bad = [i for i in self.unhealthy if not 0 <= i < self.count]
        if bad:
            raise ValueError(f"unhealthy lists GPU indexes {bad} outside 0..{self.count - 1}")
        if self.load is not None and self.load.memory_used_mib > get_model(self.model).memory_mib:
            raise ValueError(f"load.memoryUsedMiB {self.load.memory_used_mib} is more than a {self.model} has "
                             f"({get_model(self.model).memory_mib} MiB)")
        return self


#: kinds of injectable health events (docs/health.md "Fake GPUs"): NVML events (xid, ecc_dbe,
#: fallen_off_bus), conditions the periodic check reads (retired pages / remapped rows pending, a failed
#: row remapping, the driver's recovery action) and an operator's GPU reset
INJECTION_KINDS = ("xid", "ecc_dbe", "fallen_off_bus", "retired_pages_pending", "remapped_rows_pending",
                   "remapped_rows_failure", "recovery_action", "reset")
RECOVERY_ACTION_NAMES = ("none", "gpu_reset", "node_reboot", "drain_p2p", "drain_and_reset")


class InjectionError(PartitaError, ValueError):
    """An injected health event that cannot be applied; the message names the event, the field and the fix."""


class HealthInjection(_Model):
    """One injected health event. ``gpu``: index on the node or GPU UUID; a MIG instance by ``mig`` (its
    UUID) or ``gpuInstance`` (and ``computeInstance``)."""

    kind: str
    gpu: Union[int, str, None] = None
    mig: str | None = None
    xid: int | None = Field(default=None, ge=1, le=65535)
    gpu_instance: int | None = Field(default=None, ge=0, alias="gpuInstance")
    compute_instance: int | None = Field(default=None, ge=0, alias="computeInstance")
    #: retired_pages_pending / remapped_rows_pending / remapped_rows_failure: set (true) or clear (false)
    value: bool = True
    #: recovery_action: what the driver asks for
    action: str = "gpu_reset"

    @model_validator(mode="after")
    def _consistent(self) -> "HealthInjection":
        if self.kind not in INJECTION_KINDS:
            raise ValueError(f"unknown health event kind {self.kind!r}; use one of {', '.join(INJECTION_KINDS)}")
        if self.gpu is None and self.mig is None:
            raise ValueError(f"{self.kind} event names no device; give gpu (index or GPU UUID) or mig (MIG UUID)")
        if self.kind == "xid" and self.xid is None:
            raise ValueError("xid event without an xid number; give xid, e.g. 79 (fallen off the bus) or 48 (DBE)")
        if self.kind != "xid" and self.xid is not None:
            raise ValueError(f"xid is only for kind xid (this is {self.kind}); remove it")
        on_instance = self.mig is not None or self.gpu_instance is not None
        if on_instance and self.kind not in ("xid", "ecc_dbe"):
            raise ValueError(f"{self.kind} is a condition of the whole GPU; remove mig/gpuInstance")
        if self.compute_instance is not None and self.gpu_instance is None:
            raise ValueError("computeInstance needs gpuInstance")
        if self.kind == "recovery_action" and self.action not in RECOVERY_ACTION_NAMES:
            raise ValueError(f"unknown recovery action {self.action!r}; use one of {', '.join(RECOVERY_ACTION_NAMES)}")
        return self

    def to_json(self) -> str:
        return json.dumps(self.model_dump(by_alias=True, exclude_defaults=True) | {"kind": self.kind},
                          sort_keys=True)


def parse_injection(data: object, source: str = "health event") -> HealthInjection:
    """An injected event from a decoded JSON object (or a JSON text); InjectionError naming what is wrong."""
    if isinstance(data, (str, bytes)):
        try:
            data = json.loads(data)
        except ValueError as e:
            raise InjectionError(f"{source}: not JSON ({e}); write one object a line, e.g. "
                                 '{"kind": "xid", "gpu": 0, "xid": 79}') from None
    if not isinstance(data, dict):
        raise InjectionError(f"{source}: expected a JSON object with kind and gpu, got {type(data).__name__}")
    try:
        return HealthInjection.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            msg = "unknown field; fields: kind, gpu, mig, xid, gpuInstance, computeInstance, value, action"
        raise InjectionError(f"{source}: {where + ': ' if where else ''}{msg}") from None


class NodeProfile(_Model):
    name: str = Field(min_length=1)
    gpus: tuple[GpuGroup, ...] = ()
    #: health events injected once the health monitor has registered for events (docs/health.md)
    health_events: tuple[HealthInjection, ...] = Field(default=(), alias="healthEvents")

    def gpu_list(self) -> list[tuple[str, bool, bool]]:
        """(model key, MIG enabled at boot, healthy) per slot, in slot order."""
        out = []
        for g in self.gpus:
            for i in range(g.count):
                out.append((g.model, g.mig_enabled, i not in g.unhealthy))
        return out

    def loads(self) -> list["GpuLoad | None"]:
        """The background load per slot, in slot order (None: no background process)."""
        return [g.load for g in self.gpus for _ in range(g.count)]


class FakeGpuProfile(_Model):
    api_version: Literal["gpu.partita.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["FakeGpuProfile"]
    driver_version: str = Field(default=DEFAULT_DRIVER_VERSION, alias="driverVersion")
    cuda_driver_version: str = Field(default=DEFAULT_CUDA_DRIVER_VERSION, alias="cudaDriverVersion")
    nodes: tuple[NodeProfile, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_nodes(self) -> "FakeGpuProfile":
        seen: set[str] = set()
        for n in self.nodes:
            if n.name in seen:
                raise ValueError(f"node {n.name!r} is listed twice; merge its gpus into one entry")
            seen.add(n.name)
        return self

    def node(self, name: str) -> NodeProfile:
        """The entry for a node: its exact name, else the ``"*"`` entry."""
        for n in self.nodes:
            if n.name == name:
                return n
        for n in self.nodes:
            if n.name == ANY_NODE:
                return n
        listed = ", ".join(n.name for n in self.nodes)
        raise ProfileError(f"the fake GPU profile has no entry for node {name!r} (listed: {listed}); "
                           f"add a node entry named {name!r} or a catch-all entry named \"*\"")


def _format_validation_error(source: str, err: ValidationError) -> str:
    lines = []
    errs = err.errors()
    deeper = [e["loc"] for e in errs]
    for e in errs:
        # a failed item also makes pydantic report its list as too short; the item's error says it all
        if e["type"] == "too_short" and any(len(d) > len(e["loc"]) and d[:len(e["loc"])] == e["loc"] for d in deeper):
            continue
        path = ""
        for part in e["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field; remove it (fields: apiVersion, kind, driverVersion, cudaDriverVersion, " \
                  "nodes[].name, nodes[].gpus[].model/count/migEnabled/unhealthy/load, nodes[].healthEvents)"
        elif e["type"] == "literal_error" and path == "apiVersion":
            msg = f"must be {API_VERSION!r}"
        elif e["type"] == "literal_error" and path == "kind":
            msg = f"must be {KIND!r}"
        elif e["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"  {path or '(top level)'}: {msg}" + (f" (got {e['input']!r})" if e["type"] not in ("missing",) and not isinstance(e.get("input"), dict) else ""))
    return f"invalid fake GPU profile {source}:\n" + "\n".join(lines)


def parse_profile(data: object, source: str = "<profile>") -> FakeGpuProfile:
    if not isinstance(data, dict):
        raise ProfileError(f"invalid fake GPU profile {source}: expected a YAML mapping with apiVersion "
                           f"{API_VERSION!r}, kind {KIND!r} and nodes, got {type(data).__name__}")
    try:
        return FakeGpuProfile.model_validate(data)
    except ValidationError as e:
        raise ProfileError(_format_validation_error(source, e)) from None


def load_profile(path: str | Path, flag: str = "--fake-profile",
                 alternative: str = "--fake MODEL:COUNT") -> FakeGpuProfile:
    """``flag`` and ``alternative``: the calling command's own flags, which the error messages name."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ProfileError(f"fake GPU profile {p} does not exist; pass an existing file to {flag} "
                           f"or use {alternative}") from None
    except OSError as e:
        raise ProfileError(f"cannot read fake GPU profile {p}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ProfileError(f"fake GPU profile {p} is not valid YAML: {e}") from None
    return parse_profile(data, str(p))


def profile_from_spec(spec: str, node_name: str = ANY_NODE) -> FakeGpuProfile:
    """``--fake MODEL:COUNT[,MODEL:COUNT]`` as a one-node profile (``"H100-SXM5-80GB:8,L4:2"``)."""
    gpus = []
    for i, item in enumerate(p.strip() for p in spec.split(",")):
        if not item:
            raise ProfileError(f"--fake {spec!r}: entry {i + 1} is empty; write MODEL:COUNT[,MODEL:COUNT]")
        model, _, count = item.partition(":")
        try:
            n = int(count) if count else 1
        except ValueError:
            raise ProfileError(f"--fake {spec!r}: count {count!r} of {model} is not a number; "
                               "write MODEL:COUNT, e.g. H100-SXM5-80GB:8") from None
        gpus.append({"model": model, "count": n})
    return parse_profile({"apiVersion": API_VERSION, "kind": KIND,
                          "nodes": [{"name": node_name, "gpus": gpus}]}, f"--fake {spec!r}")
