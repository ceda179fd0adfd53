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

Used by ``partita plugin --nvml fake --fake-profile FILE``, the sandbox and the chart's kind mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

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


class GpuGroup(_Model):
    model: str
    count: int = Field(default=1, ge=1, le=64)
    mig_enabled: bool = Field(default=False, alias="migEnabled")
    #: indexes (within this group) of GPUs the fake reports unhealthy
    unhealthy: tuple[int, ...] = ()

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
        return self


class NodeProfile(_Model):
    name: str = Field(min_length=1)
    gpus: tuple[GpuGroup, ...] = ()

    def gpu_list(self) -> list[tuple[str, bool, bool]]:
        """(model key, MIG enabled at boot, healthy) per slot, in slot order."""
        out = []
        for g in self.gpus:
            for i in range(g.count):
                out.append((g.model, g.mig_enabled, i not in g.unhealthy))
        return out


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
                  "nodes[].name, nodes[].gpus[].model/count/migEnabled/unhealthy)"
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
