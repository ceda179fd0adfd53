#!/usr/bin/env python3
"""Plugin kill chaos: SIGKILL the real plugin process (fake GPUs) during prepare/unprepare streams, restart
it, finish the stream as the kubelet would (retry what was interrupted), and check the node with an
independent checker (tests/support/node_check.py) after every round and at the end.

Each round runs one random step of the stream (prepare a new claim, prepare a prepared one again,
unprepare one; whole-GPU, MIG and MPS-shared claims, one or two claims per call) and kills the plugin
during it: either at a random moment (a timer) or at a random crash point (PARTITA_CRASH_AT, the plugin
then kills itself when it gets there). Some rounds simulate a node reboot instead of a restart (fake GPU
state, CDI specs and MPS daemons gone, a new boot id, the checkpoint kept). After the last round every
claim is unprepared and the node must be clean.

Usage: PYTHONPATH=$PWD .venv/bin/python hack/chaos_plugin.py [--seed N] [--rounds 200] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controller.sandbox.apiserver import ApiServer  # noqa: E402
from controller.sandbox.plugin import PluginProcess  # noqa: E402
from driver.api import naming  # noqa: E402
from driver.kubeletapi.dra.v1 import api_pb2 as v1  # noqa: E402
from driver.kubeletapi.dra.v1 import api_pb2_grpc as v1_grpc  # noqa: E402
from driver.nvml import profile_from_spec  # noqa: E402
from driver.nvml.fake import fake_gpu_uuid  # noqa: E402
from driver.plugin import boot  # noqa: E402
from driver.plugin.faults import ENV, POINTS  # noqa: E402
from driver.plugin.mps import PID_FILE  # noqa: E402
from tests.support.claims import allocated_claim  # noqa: E402
from tests.support.node_check import check_node  # noqa: E402

NODE = "node-a"
DRIVER = "gpu.partita.dev"
PROFILE = profile_from_spec("H100-SXM5-80GB:2,A100-SXM4-80GB:1", NODE)


@dataclass(frozen=True)
class Slot:
    """One kind of claim the stream prepares and unprepares again and again (never two at once)."""
    name: str
    devices: tuple[str, ...]
    mps: bool = False


def _slots() -> list[Slot]:
    g0, g1, a100 = (naming.gpu_device_name(fake_gpu_uuid(NODE, i)) for i in range(3))
    shared = naming.shared_device_name(a100)
    return [
        Slot("mig-3g", (naming.mig_device_name(g0, "3g.40gb", 4),)),
        Slot("mig-2g", (naming.mig_device_name(g0, "2g.20gb", 0),)),
        Slot("mig-1g-pair", (naming.mig_device_name(g0, "1g.10gb", 2), naming.mig_device_name(g0, "1g.10gb", 3))),
        Slot("whole", (g1,)),
        Slot("mps-a", (shared,), mps=True),
        Slot("mps-b", (shared,), mps=True),
    ]


def _claim(slot: Slot, serial: int) -> dict:
    name = f"{slot.name}-{serial}"
    if not slot.mps:
        return allocated_claim(name, list(slot.devices))
    config = [{"source": "FromClaim", "requests": ["gpu"], "opaque": {"driver": DRIVER, "parameters": {
        "apiVersion": "gpu.partita.dev/v1alpha1", "kind": "GpuConfig", "sharing": {"strategy": "MPS"}}}}]
    claim = allocated_claim(name, list(slot.devices), share_ids={d: str(uuidlib.uuid4()) for d in slot.devices},
                            config=config)
    for r in claim["status"]["allocation"]["devices"]["results"]:
        r["consumedCapacity"] = {"memory": "10Gi"}
    return claim


@dataclass
class Report:
    seed: int
    rounds: int = 0
    #: how: timer (mid-call), timer-after-answer, point:<p> (in the call), retry:<p> (in the kubelet's retry),
    #: start:<p> (in the start-up recovery); none: a round whose call did not reach its process's crash point
    kills: Counter = field(default_factory=Counter)
    reboots: int = 0
    calls: Counter = field(default_factory=Counter)
    retries: int = 0
    refusals: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        return (f"seed {self.seed}: {self.rounds} rounds in {self.seconds:.1f}s, kills "
                f"{sum(n for k, n in self.kills.items() if k != 'none')} "
                f"({dict(sorted(self.kills.items()))}), reboots {self.reboots}, calls {dict(self.calls)}, "
                f"retries {self.retries}, refusals {len(self.refusals)}, violations {len(self.violations)}")


class Chaos:
    def __init__(self, workdir: Path, seed: int):
        self.workdir = workdir
        self.rng = random.Random(seed)
        self.report = Report(seed=seed)
        self.server = ApiServer()
        self.plugin: PluginProcess | None = None
        self.slots = _slots()
        self.prepared: dict[str, dict] = {}       # slot name -> claim the kubelet saw prepared
        self.serial = 0
        self.crash_at: str | None = None
        self.timer_next = False
        self.point_rate = 0.7        # processes started with a crash point (the rest die by a timer)
        self.reboot_rate = 0.08      # kills that are node reboots
        self.boot_file = workdir / "boot_id"
        self.boot_file.write_text("boot-0\n")

    # -- plugin process ----------------------------------------------------------------------------
    @property
    def plugin_dir(self) -> Path:
        assert self.plugin is not None
        return self.plugin.paths.plugin_dir(DRIVER)

    async def start(self, crash_at: str | None = None) -> None:
        """Start the plugin (killing itself at ``crash_at`` when it gets there); one that dies in its
        start-up recovery at that point is started again without it."""
        env = {boot.ENV: str(self.boot_file)}
        if crash_at:
            env[ENV] = crash_at
        self.plugin = PluginProcess(PROFILE, PROFILE.nodes[0], self.workdir, self.url, DRIVER, "INFO", env=env)
        self.plugin.start()
        try:
            await self.plugin.wait_ready()
        except RuntimeError:
            if not crash_at or self.plugin.proc.wait(10) != -signal.SIGKILL:
                raise
            self.report.kills[f"start:{crash_at}"] += 1
            await self.start()
            return
        self.crash_at = crash_at
        self.timer_next = False

    def _died(self) -> bool:
        """The plugin killed itself (at its crash point), allowing a moment for the kernel to reap it."""
        try:
            return self.plugin.proc.wait(5) == -signal.SIGKILL
        except subprocess.TimeoutExpired:
            return False

    def kill(self) -> None:
        if self.plugin is not None and self.plugin.alive():
            self.plugin.proc.send_signal(signal.SIGKILL)
        if self.plugin is not None and self.plugin.proc is not None:
            self.plugin.proc.wait(10)

    def reboot(self) -> None:
        """Power loss: the plugin, the MPS daemons, the GPUs' state and /var/run/cdi are gone."""
        self.kill()
        self.stop_daemons()
        shutil.rmtree(self.plugin_dir / "fake-nvml", ignore_errors=True)
        for f in self.plugin.paths.cdi.glob("*"):
            f.unlink()
        self.boot_file.write_text(f"boot-{uuidlib.uuid4()}\n")
        self.report.reboots += 1

    def stop_daemons(self) -> None:
        if self.plugin is None:
            return
        for pid_file in (self.plugin_dir / "mps").glob(f"*/{PID_FILE}"):
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
            pid_file.unlink(missing_ok=True)

    # -- kubelet calls ---------------------------------------------------------------------------
    async def call(self, method: str, claims: list[dict], timeout: float = 20) -> dict[str, str]:
        refs = [v1.Claim(namespace=c["metadata"]["namespace"], name=c["metadata"]["name"], uid=c["metadata"]["uid"])
                for c in claims]
        req = (v1.NodePrepareResourcesRequest if method == "prepare" else v1.NodeUnprepareResourcesRequest)(claims=refs)
        rpc = "NodePrepareResources" if method == "prepare" else "NodeUnprepareResources"
        # a channel of its own subchannels: the process-wide pool remembers a dead plugin's socket as failed
        async with grpc.aio.insecure_channel(f"unix://{self.plugin_dir / 'dra.sock'}",
                                             options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            resp = await getattr(v1_grpc.DRAPluginStub(ch), rpc)(req, timeout=timeout)
        self.report.calls[method] += 1
        return {uid: r.error for uid, r in resp.claims.items()}

    def _step(self) -> tuple[str, list[tuple[Slot, dict]]]:
        """The next step of the stream: a method and the claims it names (one or two)."""
        free = [s for s in self.slots if s.name not in self.prepared]
        busy = [s for s in self.slots if s.name in self.prepared]
        roll = self.rng.random()
        if busy and (roll < 0.45 or not free):
            picked = self.rng.sample(busy, min(len(busy), self.rng.choice((1, 1, 2))))
            method = "unprepare" if self.rng.random() < 0.8 else "prepare"
            return method, [(s, self.prepared[s.name]) for s in picked]
        picked = self.rng.sample(free, min(len(free), self.rng.choice((1, 1, 2))))
        out = []
        for s in picked:
            self.serial += 1
            claim = self.server.create(_claim(s, self.serial))     # the API server assigns the uid
            out.append((s, claim))
        return "prepare", out

    def _settle(self, method: str, step: list[tuple[Slot, dict]], errors: dict[str, str]) -> None:
        for slot, claim in step:
            err = errors.get(claim["metadata"]["uid"], "no answer")
            if err:
                raise RuntimeError(f"{method} of {claim['metadata']['name']} kept failing: {err}")
            if method == "prepare":
                self.prepared[slot.name] = claim
            else:
                self.prepared.pop(slot.name, None)
                self.server.delete("resourceclaims", claim["metadata"]["name"], "default", group="resource.k8s.io")

    async def finish(self, method: str, step: list[tuple[Slot, dict]]) -> None:
        """The kubelet retries an interrupted call until it succeeds (the plugin may die again meanwhile)."""
        errors: dict[str, str] = {}
        for attempt in range(6):
            try:
                errors = await self.call(method, [c for _, c in step])
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE and self.plugin.alive():
                    self.report.retries += 1       # a connection reset right after the start: retried
                    await asyncio.sleep(0.1)
                    continue
                if not self._died():
                    raise RuntimeError(f"{method} after the restart failed: {e.details()}\n"
                                       f"{self.plugin.log_tail()}") from None
                self.report.kills[f"retry:{self.crash_at}"] += 1
                self.kill()
                await self.start()
                continue
            if all(not errors.get(c["metadata"]["uid"], "x") for _, c in step):
                break
            self.report.retries += 1
            self.report.refusals += [e for e in errors.values() if e]
            await asyncio.sleep(0.05 * (attempt + 1))
        self._settle(method, step, errors)

    def check(self, where: str) -> None:
        found = check_node(plugin_dir=self.plugin_dir, cdi_dir=self.plugin.paths.cdi, profile=PROFILE,
                           node_name=NODE, expected_uids={c["metadata"]["uid"] for c in self.prepared.values()})
        self.report.violations += [f"{where}: {v}" for v in found]

    # -- rounds ----------------------------------------------------------------------------------
    async def round(self, n: int) -> None:
        """One step of the stream. A plugin started with a crash point dies only if the step reaches it
        (otherwise it serves the next round too); one started without is killed by a timer at a random
        moment of the step. A killed plugin is restarted (sometimes after a simulated reboot) and the
        step finished as the kubelet would."""
        method, step = self._step()
        point = None if self.timer_next else self.crash_at
        call = asyncio.create_task(self.call(method, [c for _, c in step]))
        if point is None:
            await asyncio.sleep(self.rng.uniform(0, 0.05))
            how = "timer" if self.plugin.alive() and not call.done() else "timer-after-answer"
            self.kill()
            down = True
        else:
            await asyncio.wait([call], timeout=20)
            down = call.exception() is not None and self._died()
            how = f"point:{point}" if down else "none"
            self.timer_next = not down      # a point this stream did not reach: the timer kills it next round
        errors: dict[str, str] | None
        try:
            errors = await call
        except grpc.aio.AioRpcError:
            errors = None
        self.report.kills[how] += 1
        if down:
            if self.rng.random() < self.reboot_rate:
                self.reboot()
            self.kill()
            await self.start(crash_at=self._next_point())
            await self.finish(method, step)
        elif errors is not None and all(not errors.get(c["metadata"]["uid"], "x") for _, c in step):
            self._settle(method, step, errors)
        else:
            await self.finish(method, step)
        self.check(f"round {n} ({method} {[c['metadata']['name'] for _, c in step]}, {how})")

    def _next_point(self) -> str | None:
        """The crash point of the next plugin process, or None: killed by a timer instead."""
        return self.rng.choice(POINTS) if self.rng.random() < self.point_rate else None

    async def run(self, rounds: int) -> Report:
        t0 = time.monotonic()
        self.url = await self.server.start()
        try:
            await self.start(crash_at=self._next_point())
            for n in range(rounds):
                await self.round(n)
                self.report.rounds += 1
            busy = list(self.prepared.items())
            if busy:
                await self.finish("unprepare", [(next(s for s in self.slots if s.name == k), c) for k, c in busy])
            self.check("end")
        finally:
            self.kill()
            self.stop_daemons()
            await self.server.stop()
            self.report.seconds = time.monotonic() - t0
        return self.report


def run_chaos(seed: int, rounds: int) -> Report:
    workdir = Path(tempfile.mkdtemp(prefix="chaos-", dir="/tmp"))     # short: unix socket paths
    try:
        return asyncio.run(Chaos(workdir, seed).run(rounds))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--json", help="write the report to this file")
    args = p.parse_args()
    report = run_chaos(args.seed, args.rounds)
    print(report.summary())
    for v in report.violations[:50]:
        print("VIOLATION", v)
    if args.json:
        data = {**asdict(report), "kills": dict(report.kills), "calls": dict(report.calls)}
        Path(args.json).write_text(json.dumps(data, indent=2))
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
