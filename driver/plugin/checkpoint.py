"""The plugin's checkpoint: which claims are prepared on this node, and how.

A versioned JSON document (``apiVersion: gpu.partita.dev/v1``, ``kind: PluginCheckpoint``) in the
plugin data directory, written completely or not at all (:mod:`driver.plugin.durable`: exclusive
no-follow temp file, every byte checked, fsync, rename, fsync of the directory) and re-read at the start
of every Prepare and Unprepare, so state lives on disk only (a restarted or a second plugin instance
sees it). Newer plugins read older versions; an unknown version, a corrupt file (not UTF-8, not JSON,
wrong schema) or one that cannot be read or written raises :class:`CheckpointError`, answered per call;
the file on disk is left untouched, so nothing is lost.

A claim is recorded ``Preparing`` before any step with side effects (MIG instances) and ``Prepared``
when done; ``Unpreparing`` before unprepare destroys or removes anything. A restart (or the next call)
undoes an interrupted prepare and finishes an interrupted unprepare. ``bootID`` is the node's boot id
when the checkpoint was written: a different one at start means the node rebooted (MIG instances, CDI
specs under /var/run and MPS daemons are gone while the prepared claims are still recorded).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from driver.api.config import GpuConfig
from driver.errors import PartitaError
from driver.plugin import durable

API_VERSION = "gpu.partita.dev/v1"
KIND = "PluginCheckpoint"
SUPPORTED_VERSIONS = (API_VERSION,)


class CheckpointError(PartitaError):
    """The checkpoint cannot be read; the message names the file and what to do."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class MigInstance(_Model):
    """A MIG device Partita created (or is about to create) for a claim."""

    gpu_uuid: str = Field(alias="gpuUUID")
    profile_id: int = Field(alias="profileID")
    placement_start: int = Field(alias="placementStart")
    placement_size: int = Field(alias="placementSize")
    gpu_instance_id: int | None = Field(default=None, alias="gpuInstanceID")
    compute_instance_id: int | None = Field(default=None, alias="computeInstanceID")
    uuid: str | None = None
    #: False for a MIG device that already existed (static MIG): used, never destroyed, by Partita
    created: bool = True


class PreparedDevice(_Model):
    request_names: list[str] = Field(alias="requestNames")
    pool: str
    device: str
    share_id: str | None = Field(default=None, alias="shareID")
    cdi_device_ids: list[str] = Field(alias="cdiDeviceIDs")
    type: str                                   # gpu | mig | shared
    gpu_uuid: str = Field(alias="gpuUUID")
    mig: MigInstance | None = None
    config: GpuConfig | None = None             # the effective opaque config applied (sharing), defaults filled
    consumed_capacity: dict[str, str] | None = Field(default=None, alias="consumedCapacity")
    edits: dict | None = None                   # extra CDI container edits of a share (env, mounts)
    #: True for an admin-access result (monitoring): never a use of the device, changes nothing on it.
    #: Written only when True, so checkpoints without admin claims stay readable by older plugins;
    #: absent (older checkpoints) means False.
    admin_access: bool | None = Field(default=None, alias="adminAccess")


class PreparedClaim(_Model):
    uid: str
    namespace: str
    name: str
    state: Literal["Preparing", "Prepared", "Unpreparing"]
    devices: list[PreparedDevice] = []
    cdi_spec: str = Field(default="", alias="cdiSpec")


class Checkpoint(_Model):
    api_version: str = Field(default=API_VERSION, alias="apiVersion")
    kind: str = KIND
    #: /proc/sys/kernel/random/boot_id when this was written (absent in checkpoints of older plugins)
    boot_id: str | None = Field(default=None, alias="bootID")
    claims: dict[str, PreparedClaim] = {}


class CheckpointStore:
    def __init__(self, path: Path):
        self.path = path
        self._dir_ready = False
        #: successful writes so far (a batch tells from it whether it wrote anything yet)
        self.writes = 0

    def read(self) -> Checkpoint:
        try:
            raw_bytes = durable.read_file(self.path, what="checkpoint")
        except durable.DurableError as e:
            raise CheckpointError(f"{e.strerror}. The plugin keeps serving but will not prepare or unprepare "
                                  "claims until it can read it") from None
        if raw_bytes is None:
            return Checkpoint()
        try:
            raw = raw_bytes.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self._unreadable(f"it is not UTF-8 text (byte {e.start}: {raw_bytes[e.start:e.start + 1]!r})") from None
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise self._unreadable(f"it is not valid JSON ({e})") from None
        if not isinstance(data, dict) or data.get("kind") != KIND:
            raise self._unreadable(f"it is not a {KIND} (kind {data.get('kind') if isinstance(data, dict) else None!r})")
        if data.get("apiVersion") not in SUPPORTED_VERSIONS:
            raise self._unreadable(f"its apiVersion {data.get('apiVersion')!r} is not one this plugin reads "
                                   f"({', '.join(SUPPORTED_VERSIONS)}); it was probably written by a newer Partita — "
                                   "roll the plugin forward again")
        try:
            return Checkpoint.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise self._unreadable(f"field {where}: {first['msg']}") from None

    def _unreadable(self, why: str) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {self.path} is unreadable: {why}. The plugin keeps serving but will not prepare or "
            "unprepare claims until it is repaired, so no prepared state is lost. Repair or restore the file; "
            "or, once no pod on this node uses Partita devices, delete it and restart the plugin")

    def ensure_dir(self) -> None:
        """The checkpoint's directory exists, is a real directory of the plugin's user and only it can write."""
        try:
            durable.private_dir(self.path.parent, what="plugin directory")
        except durable.DurableError as e:
            raise CheckpointError(e.strerror) from None
        self._dir_ready = True

    def write(self, cp: Checkpoint) -> None:
        """Completely or not at all; on failure a :class:`CheckpointError` and the old file unchanged."""
        if not self._dir_ready:
            self.ensure_dir()
        data = cp.model_dump_json(by_alias=True, exclude_none=True).encode()
        try:
            durable.write_file(self.path, data, what="checkpoint")
        except durable.DurableError as e:
            raise CheckpointError(f"{e.strerror}. The previous checkpoint is unchanged") from None
        self.writes += 1
