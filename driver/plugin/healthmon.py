"""The plugin's GPU health monitor: NVML events and periodic checks -> a health state per GPU and per MIG
device -> taints in the ResourceSlices, the kubelet's health stream and the metrics (docs/health.md).

The one table of what each observation means (:func:`classify_event`, :func:`classify_check`):

=================================================  ========  =====================================
observation                                         state     why
=================================================  ========  =====================================
XID 13, 31, 43, 45, 68, 109 (+ --health-ignore-xids) (none)  the application's error; GPU is fine
XID 79 / GPU answers NVML_ERROR_GPU_IS_LOST          lost      fallen off the bus, unreachable
double-bit ECC event, XID 48, 95, 119, 120, 140      fatal     uncorrectable; needs a GPU reset
row remapping failed                                 fatal     the board needs service
recovery action gpu_reset/node_reboot/drain_and_reset fatal    the driver asks for a reset
XID 63, 64, 74, 92, 94 and every other XID           degraded  correctable / contained; watch it
retired pages or remapped rows pending               degraded  repaired at the next reset
recovery action drain_p2p                            degraded  peer-to-peer traffic must drain
=================================================  ========  =====================================

States rank healthy < degraded < fatal < lost; a device shows the worst of what applies to it (its own
MIG instance, then its GPU). A GPU- or instance-level state ends only after a *quiet period*
(``--health-quiet-period``) with no bad event and a clean check: a reset done by an operator, a GPU
back on the bus or a condition that cleared all recover without a plugin restart.

Floods (thousands of XIDs a second) are coalesced: an event that does not change a state changes
nothing downstream, and the publisher reconciles at most twice a second whatever the rate.
Events are waited for in a thread (``nvmlEventSetWait_v2`` blocks); state lives behind a lock and every
change is handed to the asyncio loop, where the listeners (publisher, health stream, metrics) run.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

from driver.api import naming
from driver.inventory import Inventory
from driver.nvml import errors
from driver.nvml.events import (EVENT_ECC_DBE, HEALTH_EVENT_TYPES, RECOVERY_ACTION_DRAIN_P2P, RECOVERY_ACTION_NONE,
                                RECOVERY_ACTIONS, XID_FALLEN_OFF_BUS, HealthCheck, HealthEvent)
from driver.nvml.interface import NvmlBackend
from driver.plugin import metrics

log = logging.getLogger(__name__)

HEALTHY, DEGRADED, FATAL, LOST = "healthy", "degraded", "fatal", "lost"
STATES = (HEALTHY, DEGRADED, FATAL, LOST)
_RANK = {s: i for i, s in enumerate(STATES)}
EFFECTS = ("NoSchedule", "NoExecute", "None")
DEFAULT_EFFECTS: Mapping[str, str] = {DEGRADED: "NoSchedule", FATAL: "NoExecute", LOST: "NoExecute"}

#: XIDs caused by the application, not the GPU (the list NVIDIA's driver ignores too)
APPLICATION_XIDS = frozenset({13, 31, 43, 45, 68, 109})
FATAL_XIDS = frozenset({48, 95, 119, 120, 140})
DEGRADED_XIDS = frozenset({63, 64, 74, 92, 94})
_XID_TEXT = {13: "graphics engine exception", 31: "GPU memory page fault", 43: "GPU stopped processing",
             45: "preemptive cleanup", 48: "double-bit ECC error", 63: "ECC page retirement or row remapping "
             "recorded", 64: "ECC page retirement or row remapping failed", 68: "video decoder exception",
             74: "NVLink error", 79: "GPU has fallen off the bus", 92: "high single-bit ECC error rate",
             94: "contained ECC error", 95: "uncontained ECC error", 109: "context switch timeout",
             119: "GSP RPC timeout", 120: "GSP error", 140: "unrecovered ECC error"}


def worse(a: str, b: str) -> str:
    return a if _RANK[a] >= _RANK[b] else b


def classify_event(ev: HealthEvent, ignored_xids: frozenset[int] = APPLICATION_XIDS) -> tuple[str | None, str]:
    """(state, reason) an NVML event puts its device in; state None: not a health problem."""
    if ev.kind == EVENT_ECC_DBE:
        return FATAL, "double-bit ECC error"
    text = _XID_TEXT.get(ev.xid, "")
    label = f"XID {ev.xid}" + (f" ({text})" if text else "")
    if ev.xid == XID_FALLEN_OFF_BUS:
        return LOST, label
    if ev.xid in ignored_xids:
        return None, label
    if ev.xid in FATAL_XIDS:
        return FATAL, label
    if ev.xid in DEGRADED_XIDS:
        return DEGRADED, label
    return DEGRADED, f"XID {ev.xid} (not in Partita's table: treated as degraded)"


def classify_check(check: HealthCheck | None) -> tuple[str, str]:
    """(state, reason) from one periodic check; None: the GPU did not answer (NVML_ERROR_GPU_IS_LOST)."""
    if check is None:
        return LOST, "GPU does not answer (NVML_ERROR_GPU_IS_LOST)"
    if check.remapped_rows_failure:
        return FATAL, "row remapping failed: the GPU needs service"
    action = check.recovery_action
    if action not in (RECOVERY_ACTION_NONE, RECOVERY_ACTION_DRAIN_P2P):
        return FATAL, f"the driver asks for recovery action {RECOVERY_ACTIONS.get(action, action)}"
    if action == RECOVERY_ACTION_DRAIN_P2P:
        return DEGRADED, "the driver asks to drain peer-to-peer traffic (recovery action drain_p2p)"
    if check.remapped_rows_pending:
        return DEGRADED, "remapped rows pending: applied at the next GPU reset"
    if check.retired_pages_pending:
        return DEGRADED, "retired pages pending: applied at the next GPU reset"
    return HEALTHY, ""


def parse_effects(text: str) -> dict[str, str]:
    """``degraded=NoSchedule,fatal=NoExecute,lost=NoExecute`` (the flag --health-taint-effects); states
    left out keep their default."""
    out = dict(DEFAULT_EFFECTS)
    for item in (p.strip() for p in (text or "").split(",")):
        if not item:
            continue
        state, sep, effect = item.partition("=")
        if not sep or state not in (DEGRADED, FATAL, LOST) or effect not in EFFECTS:
            raise ValueError(f"--health-taint-effects {text!r}: entry {item!r} must be STATE=EFFECT with STATE one "
                             f"of degraded, fatal, lost and EFFECT one of {', '.join(EFFECTS)}")
        out[state] = effect
    return out


def parse_xids(text: str) -> frozenset[int]:
    """``--health-ignore-xids 13,31``: XIDs to ignore besides the application XIDs."""
    out = set()
    for item in (p.strip() for p in (text or "").split(",")):
        if not item:
            continue
        if not item.isdigit():
            raise ValueError(f"--health-ignore-xids {text!r}: {item!r} is not an XID number; write e.g. 13,31")
        out.add(int(item))
    return frozenset(out)


@dataclass(frozen=True)
class HealthConfig:
    quiet_seconds: float = 60.0        # how long a device must stay clean before it is healthy again
    check_interval: float = 5.0        # seconds between periodic checks; 0: none
    events: bool = True                # wait for NVML events
    effects: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_EFFECTS))
    extra_ignored_xids: frozenset[int] = frozenset()
    wait_ms: int = 200                 # one nvmlEventSetWait_v2 (the thread notices a stop this often)

    @property
    def ignored_xids(self) -> frozenset[int]:
        return APPLICATION_XIDS | self.extra_ignored_xids


@dataclass(frozen=True)
class DeviceHealth:
    state: str = HEALTHY
    reason: str = ""
    since: float = 0.0                 # wall-clock seconds when the device entered this state

    @property
    def healthy(self) -> bool:
        return self.state == HEALTHY

    def time_added(self) -> str:
        """``since`` as a taint's timeAdded (RFC 3339, seconds, UTC)."""
        return datetime.datetime.fromtimestamp(int(self.since), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


_OK = DeviceHealth()


@dataclass(frozen=True)
class HealthView:
    """A snapshot: the unhealthy GPUs by UUID and the unhealthy MIG devices by published device name."""

    gpus: Mapping[str, DeviceHealth] = field(default_factory=dict)
    migs: Mapping[str, DeviceHealth] = field(default_factory=dict)
    mig_parents: Mapping[str, str] = field(default_factory=dict)    # MIG device name -> GPU UUID
    version: int = 0

    def gpu(self, uuid: str) -> DeviceHealth:
        return self.gpus.get(uuid, _OK)

    def device(self, gpu_uuid: str, device_name: str) -> DeviceHealth:
        """A published (or prepared) device: the worse of its MIG device's and its GPU's health."""
        g, m = self.gpus.get(gpu_uuid, _OK), self.migs.get(device_name, _OK)
        return m if _RANK[m.state] > _RANK[g.state] else g


@dataclass
class _Track:
    """One GPU (key: UUID) or one MIG device (key: device name)."""

    gpu_uuid: str
    event_state: str = HEALTHY
    event_reason: str = ""
    check_state: str = HEALTHY
    check_reason: str = ""
    last_bad: float = -1e18            # monotonic time of the last bad observation
    current: DeviceHealth = _OK


class HealthMonitor:
    def __init__(self, backend: NvmlBackend, inventory: Inventory, config: HealthConfig = HealthConfig(), *,
                 node_name: str = "", clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.backend = backend
        self.inventory = inventory
        self.config = config
        self.node_name = node_name or inventory.node_name
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._tracks: dict[str, _Track] = {}
        self._version = 0
        self._listeners: list[Callable[[HealthView], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._notify_pending = False
        self._stopping = threading.Event()
        self.unmonitored: dict[str, str] = {}        # GPU UUID -> why NVML events are not watched
        self.events_seen = 0
        self._handles: dict[str, Any] = {}
        self._gpu_names = {g.uuid: naming.gpu_device_name(g.uuid) for g in inventory.gpus}
        self._profiles = {g.uuid: {p.profile_id: p.name for p in g.mig_profiles} for g in inventory.gpus}

    # -- listeners ------------------------------------------------------------------------------
    def subscribe(self, fn: Callable[[HealthView], None]) -> None:
        """``fn(view)`` on the asyncio loop after every change of any device's state."""
        self._listeners.append(fn)

    def view(self) -> HealthView:
        with self._lock:
            gpus = {k: t.current for k, t in self._tracks.items() if not t.current.healthy and k == t.gpu_uuid}
            migs = {k: t.current for k, t in self._tracks.items() if not t.current.healthy and k != t.gpu_uuid}
            parents = {k: t.gpu_uuid for k, t in self._tracks.items() if k != t.gpu_uuid}
            return HealthView(gpus, migs, parents, self._version)

    def _changed(self) -> None:
        """Called with the lock held: a state changed; listeners run once on the loop, however many changed."""
        self._version += 1
        if self._notify_pending:
            return
        self._notify_pending = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                if _running_loop() is loop:
                    loop.call_soon(self._notify)
                else:
                    loop.call_soon_threadsafe(self._notify)
                return
            except RuntimeError:
                pass
        self._notify_pending = False          # no loop yet (tests, start-up): listeners read view() later

    def _notify(self) -> None:
        with self._lock:
            self._notify_pending = False
        view = self.view()
        for fn in self._listeners:
            try:
                fn(view)
            except Exception:  # noqa: BLE001 - a listener must not stop health monitoring
                log.exception("health listener %r failed", fn)

    # -- observations ---------------------------------------------------------------------------
    def _track(self, key: str, gpu_uuid: str) -> _Track:
        t = self._tracks.get(key)
        if t is None:
            t = self._tracks[key] = _Track(gpu_uuid)
        return t

    def record_event(self, ev: HealthEvent) -> None:
        """One NVML event (from the event thread, or a test)."""
        self.events_seen += 1
        metrics.HEALTH_EVENTS.labels(self.node_name, ev.kind).inc()
        state, reason = classify_event(ev, self.config.ignored_xids)
        if state is None:
            log.debug("GPU %s: %s ignored (an application error)", ev.gpu_uuid, reason)
            return
        key = ev.gpu_uuid
        if ev.gpu_instance_id is not None and state != LOST:
            mig = self._mig_device_name(ev.gpu_uuid, ev.gpu_instance_id)
            if mig is not None:
                key = mig
                reason = f"{reason} on MIG GPU instance {ev.gpu_instance_id}"
            else:
                reason = f"{reason} on GPU instance {ev.gpu_instance_id}, which is gone: the whole GPU counts"
        with self._lock:
            t = self._track(key, ev.gpu_uuid)
            t.last_bad = self._clock()
            if _RANK[state] >= _RANK[t.event_state]:
                t.event_state, t.event_reason = state, reason
            self._evaluate(key, t)

    def record_check(self, gpu_uuid: str, check: HealthCheck | None) -> None:
        """One periodic check of a GPU; None: it did not answer."""
        state, reason = classify_check(check)
        with self._lock:
            t = self._track(gpu_uuid, gpu_uuid)
            if state != HEALTHY:
                t.last_bad = self._clock()
                if state != t.check_state:
                    metrics.HEALTH_EVENTS.labels(self.node_name, _check_kind(check)).inc()
            t.check_state, t.check_reason = state, reason
            self._evaluate(gpu_uuid, t)

    def tick(self) -> None:
        """Re-evaluate every device (recoveries after the quiet period)."""
        with self._lock:
            for key, t in self._tracks.items():
                self._evaluate(key, t)

    def _evaluate(self, key: str, t: _Track) -> None:
        quiet = self._clock() - t.last_bad >= self.config.quiet_seconds
        if quiet and t.check_state == HEALTHY:
            state, reason = HEALTHY, ""
            t.event_state, t.event_reason = HEALTHY, ""
        elif _RANK[t.check_state] >= _RANK[t.event_state]:
            state, reason = t.check_state, t.check_reason
        else:
            state, reason = t.event_state, t.event_reason
        if state == HEALTHY and t.current.healthy:
            return
        if state == t.current.state:
            if reason != t.current.reason and reason:
                t.current = replace(t.current, reason=reason)
            return
        if state == HEALTHY:
            log.info("%s is healthy again (clean for the %.0fs quiet period)", _what(key, t), self.config.quiet_seconds)
        else:
            log.warning("%s is %s: %s", _what(key, t), state, reason)
        t.current = DeviceHealth(state, reason, self._wall()) if state != HEALTHY else _OK
        self._changed()

    def _mig_device_name(self, gpu_uuid: str, gi_id: int) -> str | None:
        gpu_name = self._gpu_names.get(gpu_uuid)
        if gpu_name is None:
            return None
        try:
            h = self._handle(gpu_uuid)
            gi = next((g for g in self.backend.gpu_instances(h) if g.id == gi_id), None)
        except errors.NvmlError:
            return None
        profile = self._profiles.get(gpu_uuid, {}).get(gi.profile_id) if gi is not None else None
        if gi is None or profile is None:
            return None
        return naming.mig_device_name(gpu_name, profile, gi.placement.start)

    def _handle(self, uuid: str) -> Any:
        h = self._handles.get(uuid)
        if h is None:
            h = self._handles[uuid] = self.backend.device_by_uuid(uuid)
        return h

    # -- periodic checks ------------------------------------------------------------------------
    def check_now(self) -> None:
        """One check of every GPU (blocking NVML calls)."""
        for g in self.inventory.gpus:
            try:
                check: HealthCheck | None = self.backend.health_check(self._handle(g.uuid))
            except errors.GpuLostError:
                check = None
            except errors.NotSupportedError:
                continue
            except errors.NvmlError as e:
                log.debug("health check of GPU %s failed: %s", g.uuid, e)
                continue
            self.record_check(g.uuid, check)
        self.tick()

    # -- NVML events ----------------------------------------------------------------------------
    def _event_thread(self) -> None:
        try:
            es = self.backend.event_set_create()
        except errors.NvmlError as e:
            log.warning("NVML events are not available (%s): GPUs are only checked every %.0fs", e,
                        self.config.check_interval)
            self.unmonitored = {g.uuid: str(e) for g in self.inventory.gpus}
            return
        try:
            registered = 0
            for g in self.inventory.gpus:
                try:
                    self.backend.register_events(es, self._handle(g.uuid), HEALTH_EVENT_TYPES)
                    registered += 1
                except errors.NvmlError as e:
                    self.unmonitored[g.uuid] = str(e)
                    log.warning("GPU %s: NVML health events not watched (%s); it is checked periodically only",
                                g.uuid, e)
            if not registered:
                return
            while not self._stopping.is_set():
                try:
                    ev = self.backend.event_set_wait(es, self.config.wait_ms)
                except errors.GpuLostError:
                    self.check_now()                  # which GPU: the check tells
                    self._stopping.wait(self.config.wait_ms / 1000)
                    continue
                except errors.NvmlError as e:
                    log.warning("waiting for NVML events failed: %s", e)
                    self._stopping.wait(1.0)
                    continue
                if ev is not None:
                    self.record_event(ev)
        except Exception:  # noqa: BLE001 - the thread must end cleanly; the periodic checks go on
            log.exception("the NVML event thread failed; GPUs are checked periodically only")
        finally:
            try:
                self.backend.event_set_free(es)
            except errors.NvmlError:
                pass

    async def run(self, stop: asyncio.Event) -> None:
        """Watch events (in a thread) and check every ``check_interval``, until ``stop``."""
        self._loop = asyncio.get_running_loop()
        thread = None
        if self.config.events:
            thread = threading.Thread(target=self._event_thread, name="nvml-events", daemon=True)
            thread.start()
        period = self.config.check_interval if self.config.check_interval > 0 else 1.0
        try:
            while not stop.is_set():
                if self.config.check_interval > 0:
                    await asyncio.to_thread(self.check_now)
                else:
                    self.tick()
                try:
                    await asyncio.wait_for(stop.wait(), timeout=min(period, max(self.config.quiet_seconds / 4, 0.2)))
                except asyncio.TimeoutError:
                    pass
        finally:
            self._stopping.set()
            if thread is not None:
                await asyncio.to_thread(thread.join, 5.0)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver changes on ``loop`` (run() does this itself)."""
        self._loop = loop


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _check_kind(check: HealthCheck | None) -> str:
    if check is None:
        return "fallen_off_bus"
    if check.remapped_rows_failure:
        return "remapped_rows_failure"
    if check.recovery_action != RECOVERY_ACTION_NONE:
        return "recovery_action"
    if check.remapped_rows_pending:
        return "remapped_rows_pending"
    return "retired_pages_pending"


def _what(key: str, t: _Track) -> str:
    return f"GPU {key}" if key == t.gpu_uuid else f"MIG device {key} (GPU {t.gpu_uuid})"


def health_taints(view: HealthView, effects: Mapping[str, str]) -> "HealthTaints":
    """The slice builder's input: each unhealthy GPU and MIG device with the effect configured for its state."""
    from driver.slices import HealthTaint, HealthTaints

    def taint(h: DeviceHealth) -> HealthTaint:
        return HealthTaint(h.state, effects.get(h.state, DEFAULT_EFFECTS[h.state]), h.time_added())

    return HealthTaints(gpus={u: taint(h) for u, h in view.gpus.items()},
                        devices={n: taint(h) for n, h in view.migs.items()})
