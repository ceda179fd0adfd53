"""``GpuConfig``: the opaque device configuration users put in DeviceClasses and ResourceClaims.

    config:
    - requests: [notebook]
      opaque:
        driver: gpu.partita.dev
        parameters:
          apiVersion: gpu.partita.dev/v1alpha1
          kind: GpuConfig
          sharing:
            strategy: TimeSlicing            # or MPS
            timeSlicingConfig: {interval: Medium}      # Default | Short | Medium | Long
            # mpsConfig: {defaultActiveThreadPercentage: 50, defaultPinnedDeviceMemoryLimit: 10Gi}

Validated in the controller (an Event on the pod), by the admission webhook, and in the kubelet
plugin; every error names the field and the allowed values. Class config applies first, claim config
after; of the configs that apply to a request, the last one wins (as the upstream example driver and
NVIDIA's driver do).
"""

from __future__ import annotations

from typing import Iterable, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from driver.api.messages import bound_list, brief
from driver.api.quantity import Quantity, QuantityError
from driver.errors import PartitaError

API_VERSION = "gpu.partita.dev/v1alpha1"
KIND = "GpuConfig"
STRATEGIES = ("TimeSlicing", "MPS")
INTERVALS = ("Default", "Short", "Medium", "Long")
#: what a share gets when no config says otherwise (and what a GPU is set back to when its last share goes)
DEFAULT_STRATEGY = "TimeSlicing"
DEFAULT_INTERVAL = "Default"
#: ``source`` of an allocation's config entries, in the order they apply (a later entry wins)
SOURCES = ("FromClass", "FromClaim")


class ConfigError(PartitaError, ValueError):
    """An invalid GpuConfig; the message names the field and what is allowed."""


class _Model(BaseModel):
    # strict: JSON types are taken as they are (no true -> 1, "50" -> 50, 50.0 -> 50, 10 -> "10")
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, strict=True)


class TimeSlicingConfig(_Model):
    interval: Literal["Default", "Short", "Medium", "Long"] = DEFAULT_INTERVAL


class MpsConfig(_Model):
    default_active_thread_percentage: int | None = Field(default=None, alias="defaultActiveThreadPercentage",
                                                         ge=1, le=100)
    default_pinned_device_memory_limit: str | None = Field(default=None, alias="defaultPinnedDeviceMemoryLimit")

    @field_validator("default_pinned_device_memory_limit")
    @classmethod
    def _quantity(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            q = Quantity.parse(v)
        except QuantityError as e:
            raise ValueError(str(e)) from None
        if q.sign() <= 0:
            raise ValueError(f"must be a positive quantity such as 10Gi, got {v!r}")
        return v


class Sharing(_Model):
    strategy: Literal["TimeSlicing", "MPS"] = DEFAULT_STRATEGY
    time_slicing_config: TimeSlicingConfig | None = Field(default=None, alias="timeSlicingConfig")
    mps_config: MpsConfig | None = Field(default=None, alias="mpsConfig")

    @model_validator(mode="after")
    def _matching_config(self) -> "Sharing":
        if self.strategy == "TimeSlicing" and self.mps_config is not None:
            raise ValueError("mpsConfig cannot be used with strategy TimeSlicing; set strategy: MPS or remove mpsConfig")
        if self.strategy == "MPS" and self.time_slicing_config is not None:
            raise ValueError("timeSlicingConfig cannot be used with strategy MPS; set strategy: TimeSlicing or "
                             "remove timeSlicingConfig")
        return self

    def normalized(self) -> "Sharing":
        if self.strategy == "TimeSlicing":
            return Sharing(strategy="TimeSlicing", timeSlicingConfig=self.time_slicing_config or TimeSlicingConfig())
        return Sharing(strategy="MPS", mpsConfig=self.mps_config or MpsConfig())


class GpuConfig(_Model):
    api_version: Literal["gpu.partita.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["GpuConfig"]
    sharing: Sharing | None = None

    def normalized(self) -> "GpuConfig":
        """The same config with every default filled in (``sharing``, its strategy and that strategy's settings)."""
        return GpuConfig(apiVersion=API_VERSION, kind=KIND, sharing=(self.sharing or Sharing()).normalized())

    @property
    def settings(self) -> Sharing:
        """The sharing settings, defaults filled in."""
        return (self.sharing or Sharing()).normalized()

    @property
    def strategy(self) -> str:
        return self.settings.strategy

    def to_json(self) -> dict:
        return self.model_dump(by_alias=True, exclude_none=True)


_ALLOWED = {
    "strategy": f"one of {', '.join(STRATEGIES)}",
    "interval": f"one of {', '.join(INTERVALS)}",
    "apiVersion": f"{API_VERSION!r}",
    "kind": f"{KIND!r}",
    "defaultActiveThreadPercentage": "an integer from 1 to 100",
    "defaultPinnedDeviceMemoryLimit": "a quantity string such as '10Gi'",
    "sharing": "an object with strategy and timeSlicingConfig or mpsConfig",
    "timeSlicingConfig": "an object such as {interval: Medium}",
    "mpsConfig": "an object such as {defaultActiveThreadPercentage: 50}",
}
#: pydantic error types that mean "wrong type or value" for a field listed in _ALLOWED
_WRONG_VALUE = ("literal_error", "greater_than_equal", "less_than_equal", "int_parsing", "int_type", "string_type",
                "model_type", "model_attributes_type", "dict_type", "is_instance_of")


def _json_type(value: object) -> str:
    """How a value was written in the YAML/JSON, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number with a fraction"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def parse_gpu_config(parameters: object, where: str = "opaque.parameters") -> GpuConfig:
    """Validate ``parameters`` of an opaque config for our driver; errors name ``where`` + the field."""
    if not isinstance(parameters, dict):
        raise ConfigError(f"{where}: expected a GpuConfig object (apiVersion {API_VERSION}, kind {KIND}), "
                          f"got {type(parameters).__name__}")
    try:
        return GpuConfig.model_validate(parameters)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            path = ".".join(str(p) for p in err["loc"])
            leaf = str(err["loc"][-1]) if err["loc"] else ""
            if err["type"] == "extra_forbidden":
                msg = "unknown field; remove it"
            elif leaf in _ALLOWED and err["type"] in _WRONG_VALUE:
                value = err.get("input")
                msg = f"must be {_ALLOWED[leaf]}, got {brief(value)} ({_json_type(value)})"
            elif err["type"] == "missing":
                msg = "required field is missing"
            else:
                msg = err["msg"].removeprefix("Value error, ")
            msgs.append(f"{where}.{path}: {msg}" if path else f"{where}: {msg}")
        raise ConfigError(bound_list(msgs)) from None


def config_applies(config_requests: list[str] | None, request: str) -> bool:
    """Whether a config entry's ``requests`` covers a result's request (``req`` covers ``req/sub``)."""
    if not config_requests:
        return True
    return request in config_requests or request.split("/", 1)[0] in config_requests


def settings_of(config: GpuConfig | None) -> Sharing:
    """The sharing settings a device is set up with: its config's, else the defaults (no config at all)."""
    return config.settings if config is not None else Sharing().normalized()


def resolve(configs: Iterable[Mapping], driver: str, request: str, *, where: str = "config",
            strict: bool = True) -> GpuConfig | None:
    """The GpuConfig that applies to ``request`` (``req`` or ``req/sub``, as allocation results name it),
    defaults filled in; None when no config of ``driver`` applies.

    ``configs`` are DeviceAllocationConfiguration entries (``source``, ``requests``, ``opaque``), as
    ``status.allocation.devices.config`` holds them: the ``FromClass`` entries apply first, then the
    ``FromClaim`` entries, each in list order, and of those that apply the last one wins (as the upstream
    example driver and NVIDIA's driver do); entries for other drivers are ignored. ``strict``: an invalid
    config of ``driver`` or an unknown ``source`` raises :class:`ConfigError` naming ``where[i]`` (the plugin,
    which must not prepare it); otherwise an invalid entry is skipped (the controller, for which invalid
    configs are reported elsewhere and do not decide placement)."""
    return _choose(parsed_configs(configs, driver, where=where, strict=strict), request)


def parsed_configs(configs: Iterable[Mapping], driver: str, *, where: str = "config",
                   strict: bool = True) -> list[tuple[list[str] | None, GpuConfig]]:
    """``driver``'s entries of ``configs`` in the order they apply, parsed: (requests, config). Parse once and
    :func:`resolve_parsed` for each request when a claim has many."""
    entries = list(configs)
    if strict:
        unknown = {c.get("source") for c in entries} - set(SOURCES) - {None}
        if unknown:
            raise ConfigError(f"{where} has unknown source {sorted(unknown)}; expected FromClass or FromClaim")
    out = []
    for source in SOURCES:
        for i, c in enumerate(entries):
            opaque = c.get("opaque") or {}
            if c.get("source") != source or opaque.get("driver") != driver:
                continue
            try:
                out.append((c.get("requests"), parse_gpu_config(opaque.get("parameters"),
                                                                f"{where}[{i}].opaque.parameters")))
            except ConfigError:
                if strict:
                    raise
    return out


def resolve_parsed(parsed: list[tuple[list[str] | None, GpuConfig]], request: str) -> GpuConfig | None:
    """:func:`resolve` over entries :func:`parsed_configs` already parsed."""
    return _choose(parsed, request)


def _choose(parsed: list[tuple[list[str] | None, GpuConfig]], request: str) -> GpuConfig | None:
    chosen = None
    for requests, cfg in parsed:
        if config_applies(requests, request):
            chosen = cfg
    return chosen.normalized() if chosen is not None else None


def validate_claim_configs(spec: dict, driver_name: str, where: str) -> list[str]:
    """Errors of every opaque config for our driver in a claim/template/class spec (``devices.config``
    or DeviceClass ``config``) — what the controller, webhook and plugin check."""
    errors = []
    configs = (spec.get("devices") or {}).get("config") if "devices" in spec else spec.get("config")
    for i, c in enumerate(configs or []):
        opaque = c.get("opaque") or {}
        if opaque.get("driver") != driver_name:
            continue
        try:
            parse_gpu_config(opaque.get("parameters"), f"{where}.config[{i}].opaque.parameters")
        except ConfigError as e:
            errors.append(str(e))
    return errors
