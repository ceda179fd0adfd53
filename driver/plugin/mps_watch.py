"""Keeps the MPS control daemons that prepared MPS shares use running, between prepares.

On a real node the daemon a plugin instance starts lives in that instance's container (its PID namespace
and cgroup): when the container stops -- a plugin restart, or the old pod of a rollout after the new one
has adopted the daemon -- the daemon and its MPS server die with it, and the clients connected to them
fail. The kubelet does not prepare a claim again for a container restart, so without this watch the
restarted clients would find no daemon until some pod's prepare noticed. Every ``every`` seconds the
plugin checks the GPUs its prepared MPS shares use and, when a daemon is down, runs the start-up
reconciliation (:meth:`driver.plugin.prepare.DeviceState.recover`, under the checkpoint's cross-instance
lock), which starts it again with the shares' settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from driver.plugin.prepare import DeviceState
from driver.plugin.sharing import strategy_of, uses_sharing

log = logging.getLogger(__name__)


def mps_gpus(state: DeviceState) -> set[str]:
    """GPU UUIDs that prepared MPS shares use."""
    return {d.gpu_uuid for c in state.prepared_claims().values() if c.state == "Prepared" for d in c.devices
            if uses_sharing(d.type, d.config) and strategy_of(d.config)[0] == "MPS"}


def down(state: DeviceState) -> list[str]:
    return sorted(g for g in mps_gpus(state) if not state.sharing.mps.running(g))


async def watch_mps_daemons(state: DeviceState, stop: asyncio.Event, every: float = 10.0) -> None:
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
        if stop.is_set():
            return
        try:
            missing = await asyncio.to_thread(down, state)
            if missing:
                log.warning("the MPS control daemon of GPU(s) %s that prepared MPS shares use is not running "
                            "(it ran in a plugin container that stopped, or crashed): starting it again",
                            ", ".join(missing))
                await state.recover()
                still = await asyncio.to_thread(down, state)
                if still:
                    log.error("the MPS control daemon of GPU(s) %s could not be started again; see the log above",
                              ", ".join(still))
        except Exception:  # noqa: BLE001 - a checkpoint or NVML error: logged, tried again next time
            log.exception("checking the MPS control daemons failed")
