#!/usr/bin/env python3
"""Handover chaos: two real controller processes against the sandbox API server process, with pod/claim
churn, while the leader is paused (SIGSTOP/SIGCONT), killed (SIGKILL) or stopped (SIGTERM) and the API
server injects faults (409 and 5xx on claim writes, slow claim writes, dropped watches with the log
compacted so that resumes get 410).

Every state is checked by an independent checker (tests/support/validity.py, which shares no code with the
controller): sampled during the run and at the end of every round, no device is held by two live claims
unless shared, counters and shared capacity hold; at the end, after every pod is gone and the controller
had time to converge, no claim is left allocated without a consumer.

    .venv/bin/python hack/chaos_handover.py --seed 7 --rounds 20 [--json out.json] [--keep-logs DIR]

Exit status 0 when there are no violations. Keep one invocation under ~3 minutes (about 5 s per round);
run several seeds for more rounds.

The lease timings are short (3 s lease, 2 s renew deadline, 0.4 s retry) so that a handover takes seconds;
injected write delays stay below lease duration - renew deadline, the margin the fence relies on (as with
client-go: a write slower than that margin could land after another instance took over).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from driver.api import constants as C  # noqa: E402
from driver.api.deviceclasses import device_classes  # noqa: E402
from driver.api.kube import Kube, KubeError, claim_path  # noqa: E402
from driver.api.quantity import Quantity  # noqa: E402
from tests.support import validity  # noqa: E402
from tests.support.cluster import claim, node, node_slices, pod, request  # noqa: E402

LEASE = ("default", "partita-controller")
LEASE_PATH = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE[0]}/leases/{LEASE[1]}"
CLAIMS = "/apis/resource.k8s.io/v1/namespaces/default/resourceclaims"
PODS = "/api/v1/namespaces/default/pods"
TIMING = {"lease": 3.0, "renew": 2.0, "retry": 0.4}
MAX_DELAY = 0.8          # < lease - renew


# -- processes ------------------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """In the child: SIGKILL it when this harness dies, however it dies (Linux), so nothing is left running."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except OSError:
        pass


class ApiProcess:
    def __init__(self, logdir: Path):
        self.log = open(logdir / "apiserver.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controller.sandbox.apiserver", "--test-hooks", "--bookmark-interval", "0.5"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=self.log, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
            preexec_fn=_die_with_parent)
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http"):
            raise RuntimeError(f"the API server did not start; see {self.log.name}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class ControllerProcess:
    def __init__(self, name: str, url: str, logdir: Path):
        self.name, self.url, self.logdir = name, url, logdir
        self.proc: subprocess.Popen | None = None
        self.paused = False
        self.starts = 0
        self.exits: list[int] = []

    def start(self) -> None:
        self.starts += 1
        log = open(self.logdir / f"{self.name}.log", "a")  # noqa: SIM115
        log.write(f"--- start {self.starts} at {time.time():.3f}\n")
        log.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controller.cli", "controller", "--kube-api", self.url, "--leader-elect",
             "--leader-identity", f"{self.name}-{self.starts}", "--leader-lease-duration", str(TIMING["lease"]),
             "--leader-renew-deadline", str(TIMING["renew"]), "--leader-retry-period", str(TIMING["retry"]),
             "--metrics-port", "-1", "--health-port", "-1", "--resync-seconds", "30", "--log-level", "INFO"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)},
            preexec_fn=_die_with_parent)
        log.close()
        self.paused = False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, sig)
            self.paused = sig == signal.SIGSTOP

    def reap(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            self.exits.append(self.proc.returncode)
            self.proc = None

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reap()

    def log_text(self) -> str:
        return (self.logdir / f"{self.name}.log").read_text(errors="replace")


# -- the independent check ------------------------------------------------------------------------------
def reqs_of(c: dict) -> list[validity.Req]:
    out = []
    for r in (c.get("spec") or {}).get("devices", {}).get("requests") or []:
        ex = r.get("exactly") or {}
        cls = ex.get("deviceClassName")
        kind = {C.DEVICE_CLASS_GPU: "gpu", C.DEVICE_CLASS_MIG: "mig", C.DEVICE_CLASS_SHARED: "shared"}[cls]
        mem = ((ex.get("capacity") or {}).get("requests") or {}).get("memory")
        out.append(validity.Req(r["name"], kind, count=int(ex.get("count", 1)),
                                memory=Quantity.parse(mem) if mem else None, tolerations=[C.managed_toleration()]))
    return out


def violations(slices: list[dict], claims: list[dict]) -> list[str]:
    allocated = [c for c in claims if (c.get("status") or {}).get("allocation")]
    problems = validity.check(slices, C.DEFAULT_DRIVER_NAME,
                              [(reqs_of(c), c["status"]["allocation"]) for c in allocated])
    names = [c["metadata"]["name"] for c in allocated]
    out = []
    for p in problems:          # the checker numbers claims; name them
        parts = p.split(" ", 2)
        if len(parts) == 3 and parts[0] == "claim" and parts[1].isdigit():
            p = f"claim {names[int(parts[1])]} {parts[2]}"
        out.append(p)
    return out


# -- the run --------------------------------------------------------------------------------------------
@dataclass
class Figures:
    seed: int
    rounds: int = 0
    actions: dict = field(default_factory=dict)
    faults: dict = field(default_factory=dict)
    pods_created: int = 0
    claims_allocated: int = 0
    pods_bound: int = 0
    lease_transitions: int = 0
    samples_checked: int = 0
    violations: list = field(default_factory=list)
    leaks: list = field(default_factory=list)
    writes_refused_by_fence: int = 0
    double_allocations_logged: int = 0
    controller_exits: dict = field(default_factory=dict)
    seconds: float = 0.0


class Chaos:
    def __init__(self, seed: int, rounds: int, logdir: Path, *, nodes: int = 2, gpus: int = 2,
                 in_flight: int = 10, round_seconds: float = 3.0):
        self.rng = random.Random(seed)
        self.fig = Figures(seed)
        self.rounds, self.logdir = rounds, logdir
        self.nodes, self.gpus, self.in_flight, self.round_seconds = nodes, gpus, in_flight, round_seconds
        self.n = 0
        self.ends: dict[str, float] = {}          # bound pod -> when it finishes
        self.created_at: dict[str, float] = {}
        self.seen_allocated: set[str] = set()
        self.doomed: set[str] = set()              # claims to delete once their pod is gone
        self._actions: list[str] = []
        self.slices: list[dict] = []
        self.stopping = False

    # -- cluster setup and workload ---------------------------------------------------------------
    async def setup(self, kube: Kube) -> None:
        for c in device_classes():
            await kube.create("/apis/resource.k8s.io/v1/deviceclasses", c)
        for i in range(self.nodes):
            name = f"node-{i}"
            n = await kube.create("/api/v1/nodes", node(name))
            for s in node_slices(name, f"H100-SXM5-80GB:{self.gpus}", uid=n["metadata"]["uid"]):
                await kube.create("/apis/resource.k8s.io/v1/resourceslices", s)
        self.slices = (await kube.list("/apis/resource.k8s.io/v1/resourceslices"))["items"]

    def _new_claim(self, name: str) -> dict:
        roll = self.rng.random()
        if roll < 0.6:
            return claim(name, [request()])
        if roll < 0.8:
            return claim(name, [request(cls=C.DEVICE_CLASS_MIG, selectors=[
                "device.attributes['gpu.partita.dev'].migProfile == '1g.10gb'"])])
        return claim(name, [request(cls=C.DEVICE_CLASS_SHARED, capacity={"requests": {"memory": "10Gi"}})])

    async def churn(self, kube: Kube) -> None:
        while not self.stopping:
            try:
                await self._churn_once(kube)
            except (KubeError, OSError, asyncio.TimeoutError):
                pass           # the harness rides out injected faults too (they target claims' writes)
            await asyncio.sleep(0.1)

    async def _churn_once(self, kube: Kube, create: bool = True) -> None:
        now = time.monotonic()
        pods = {p["metadata"]["name"]: p for p in (await kube.list(PODS))["items"]}
        claims = {c["metadata"]["name"]: c for c in (await kube.list(CLAIMS))["items"]}
        for c in claims.values():
            if (c.get("status") or {}).get("allocation"):
                if c["metadata"]["uid"] not in self.seen_allocated:
                    self.seen_allocated.add(c["metadata"]["uid"])
                    self.fig.claims_allocated += 1
        await self._claim_controller(kube, pods, claims)
        live = [p for p in pods.values() if not p["metadata"].get("deletionTimestamp")]
        for _ in range(max(0, self.in_flight - len(live)) if create else 0):
            self.n += 1
            name = f"w{self.n}"
            await kube.create(CLAIMS, self._new_claim(name))
            await kube.create(PODS, pod(name, [name]))
            self.created_at[name] = now
            self.fig.pods_created += 1
        for name, p in pods.items():
            c = claims.get(name)
            bound = bool((p.get("spec") or {}).get("nodeName"))
            if create and not bound and c is not None and (c.get("status") or {}).get("allocation"):
                await self._bind(kube, p, c)
                self.ends[name] = now + self.rng.uniform(0.5, 3.0)
            elif not create or (bound and now >= self.ends.get(name, 0)) or \
                    (not bound and now - self.created_at.get(name, now) > 8):
                await self._finish(kube, name)

    async def _claim_controller(self, kube: Kube, pods: dict, claims: dict) -> None:
        """kube-controller-manager's part, level-triggered: drop consumers that are gone from reservedFor,
        and delete the claims chosen to go with their pod (retried every tick, faults or not)."""
        uids = {p["metadata"]["uid"] for p in pods.values()}
        for name, c in claims.items():
            reserved = (c.get("status") or {}).get("reservedFor") or []
            keep = [r for r in reserved if r.get("uid") in uids]
            if len(keep) != len(reserved):
                c["status"] = {**c["status"], "reservedFor": keep}
                if not keep:
                    del c["status"]["reservedFor"]
                try:
                    await kube.replace(claim_path("default", name, status=True), c)
                except KubeError:
                    pass
            if name in self.doomed and not c["metadata"].get("deletionTimestamp"):
                try:
                    await kube.delete(claim_path("default", name))
                except KubeError:
                    pass

    async def _bind(self, kube: Kube, p: dict, c: dict) -> None:
        name = p["metadata"]["name"]
        node_name = c["status"]["allocation"]["nodeSelector"]["nodeSelectorTerms"][0]["matchFields"][0]["values"][0]
        c["status"]["reservedFor"] = [{"resource": "pods", "name": name, "uid": p["metadata"]["uid"]}]
        try:
            await kube.replace(claim_path("default", name, status=True), c)
        except KubeError:
            return            # changed meanwhile (or an injected fault): next tick
        await kube.create(f"{PODS}/{name}/binding", {"apiVersion": "v1", "kind": "Binding",
                                                      "metadata": {"name": name}, "target": {"kind": "Node", "name": node_name}})
        fresh = await kube.get(f"{PODS}/{name}")
        fresh["status"] = {**(fresh.get("status") or {}), "phase": "Running"}
        await kube.replace(f"{PODS}/{name}/status", fresh)
        self.fig.pods_bound += 1

    async def _finish(self, kube: Kube, name: str) -> None:
        """The pod ends (deleted); its claim goes too (70%) or stays for the controller to release."""
        if self.rng.random() < 0.7:
            self.doomed.add(name)
        try:
            await kube.delete(f"{PODS}/{name}")
        except KubeError as e:
            if not e.not_found:
                raise
        self.ends.pop(name, None)

    # -- checking ---------------------------------------------------------------------------------
    async def sample(self, kube: Kube, when: str) -> None:
        claims = (await kube.list(CLAIMS))["items"]
        self.fig.samples_checked += 1
        for p in violations(self.slices, claims):
            msg = f"{when}: {p}"
            if msg not in self.fig.violations:
                self.fig.violations.append(msg)

    async def sampler(self, kube: Kube) -> None:
        while not self.stopping:
            try:
                await self.sample(kube, f"round {self.fig.rounds} (sampled)")
            except (KubeError, OSError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.25)

    # -- faults -----------------------------------------------------------------------------------
    async def leader(self, kube: Kube, procs: dict[str, ControllerProcess]) -> ControllerProcess | None:
        try:
            lease = await kube.get(LEASE_PATH)
        except KubeError:
            return None
        holder = (lease.get("spec") or {}).get("holderIdentity") or ""
        return procs.get(holder.rsplit("-", 1)[0])      # identities are <process>-<start number>

    async def api_fault(self, kube: Kube) -> None:
        kind = self.rng.choice(["409", "500", "slow", "410", "none"])
        self.fig.faults[kind] = self.fig.faults.get(kind, 0) + 1
        if kind == "none":
            return
        if kind == "410":
            await kube.request("POST", "/_test/drop-watches", body={})
            await kube.request("POST", "/_test/compact", body={})
            return
        status = {"409": 409, "500": self.rng.choice([500, 503]), "slow": 0}[kind]
        delay = self.rng.uniform(0.1, MAX_DELAY) if kind == "slow" else 0.0
        for verb in ("update", "get"):
            await kube.request("POST", "/_test/fault", body={
                "plural": "resourceclaims", "verb": verb, "status": status if verb == "update" else 0,
                "count": self.rng.randint(1, 4), "delay": delay})

    async def action(self, kube: Kube, procs: dict[str, ControllerProcess]) -> None:
        lead = await self.leader(kube, procs)
        if not self._actions:         # each block of 5 rounds does each action once, in a seeded order
            self._actions = ["pause-short", "pause-long", "kill", "term", "pause-standby"]
            self.rng.shuffle(self._actions)
        kind = self._actions.pop()
        self.fig.actions[kind] = self.fig.actions.get(kind, 0) + 1
        if kind == "pause-standby":
            lead = next((p for p in procs.values() if p is not lead), None)
        if lead is None or not lead.alive():
            return
        if kind.startswith("pause"):
            seconds = self.rng.uniform(0.3, TIMING["renew"]) if kind == "pause-short" else \
                self.rng.uniform(TIMING["renew"], 2 * TIMING["lease"])
            lead.signal(signal.SIGSTOP)
            await asyncio.sleep(seconds)
            lead.signal(signal.SIGCONT)
        elif kind == "kill":
            lead.signal(signal.SIGKILL)
        else:
            lead.signal(signal.SIGTERM)

    def revive(self, procs: dict[str, ControllerProcess]) -> None:
        """What the Deployment does: a controller that exited is started again."""
        for p in procs.values():
            if not p.alive():
                p.reap()
                p.start()

    # -- main -------------------------------------------------------------------------------------
    async def run(self) -> Figures:
        t0 = time.monotonic()
        api = ApiProcess(self.logdir)
        procs: dict[str, ControllerProcess] = {}
        kube = await Kube.connect(api.url)
        try:
            await self.setup(kube)
            procs = {n: ControllerProcess(n, api.url, self.logdir) for n in ("ctl-a", "ctl-b")}
            for p in procs.values():
                p.start()
            churn = asyncio.create_task(self.churn(kube))
            sampler = asyncio.create_task(self.sampler(kube))
            for r in range(self.rounds):
                self.fig.rounds = r + 1
                await asyncio.sleep(self.round_seconds * self.rng.uniform(0.5, 1.0))
                if self.rng.random() < 0.6:
                    await self.api_fault(kube)
                await self.action(kube, procs)
                await asyncio.sleep(self.rng.uniform(0.2, 1.5))
                self.revive(procs)
                await self.sample(kube, f"end of round {r + 1}")
            # wind down: every pod finishes; the controller must release everything
            self.stopping = True
            await asyncio.gather(churn, sampler, return_exceptions=True)
            await kube.request("POST", "/_test/clear-faults", body={})
            for p in procs.values():
                p.signal(signal.SIGCONT)
            self.revive(procs)
            await self.settle(kube)
            lease = await kube.get(LEASE_PATH)
            self.fig.lease_transitions = int(lease["spec"].get("leaseTransitions") or 0)
        finally:
            await kube.close()
            for p in procs.values():
                p.stop()
            api.stop()
        for name, p in procs.items():
            text = p.log_text()
            self.fig.writes_refused_by_fence += text.count("not writing ")
            self.fig.double_allocations_logged += text.count("DOUBLE ALLOCATION")
            self.fig.controller_exits[name] = p.exits
        self.fig.seconds = round(time.monotonic() - t0, 1)
        return self.fig

    async def settle(self, kube: Kube, timeout: float = 25.0) -> None:
        """Every pod ends; then the controller has ``timeout`` to release every allocation."""
        deadline = time.monotonic() + timeout
        claims: list[dict] = []
        while time.monotonic() < deadline:
            try:
                await self._churn_once(kube, create=False)
                claims = (await kube.list(CLAIMS))["items"]
                pods = (await kube.list(PODS))["items"]
            except (KubeError, OSError, asyncio.TimeoutError):
                continue
            await self.sample(kube, "final state")
            if not pods and not any((c.get("status") or {}).get("allocation") for c in claims):
                break
            await asyncio.sleep(0.5)
        self.fig.leaks = [f"claim {c['metadata']['name']} is still allocated with no consumer {timeout:.0f}s after "
                          "its pod was deleted" for c in claims if (c.get("status") or {}).get("allocation")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--gpus", type=int, default=2, help="GPUs per node (H100, fake)")
    p.add_argument("--in-flight", type=int, default=10, help="pods kept in flight")
    p.add_argument("--round-seconds", type=float, default=3.0)
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--keep-logs", help="directory for the processes' logs (default: a temporary one, removed)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.nodes < 1 or args.gpus < 1 or args.in_flight < 1:
        p.error("--rounds, --nodes, --gpus and --in-flight must be >= 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # run the cleanup (finally) on SIGTERM too
    with tempfile.TemporaryDirectory(prefix="partita-chaos-") as tmp:
        logdir = Path(args.keep_logs or tmp)
        logdir.mkdir(parents=True, exist_ok=True)
        fig = asyncio.run(Chaos(args.seed, args.rounds, logdir, nodes=args.nodes, gpus=args.gpus,
                                in_flight=args.in_flight, round_seconds=args.round_seconds).run())
        out = fig.__dict__
        text = json.dumps(out, indent=2)
        print(text)
        if args.json:
            Path(args.json).write_text(text + "\n")
        bad = len(fig.violations) + len(fig.leaks)
        print(f"seed {fig.seed}: {fig.rounds} rounds, {fig.lease_transitions} lease transitions, "
              f"{fig.pods_created} pods, {fig.claims_allocated} claims allocated, {fig.samples_checked} states "
              f"checked: {len(fig.violations)} violations, {len(fig.leaks)} leaks ({fig.seconds}s)", file=sys.stderr)
        if bad and not args.keep_logs:
            print("logs: rerun with --keep-logs DIR to keep them", file=sys.stderr)
        return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
