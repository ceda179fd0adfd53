"""Differential testing of Partita's allocator (first-fit) against upstream's, compiled as ``draalloc``
(shared/oracle/README.md).

Each case (tests/support/diffgen.py) goes through ``draalloc batch`` without ``-allocator`` (the
implementation kube-scheduler picks for the features) and through Partita's allocator the way a
conformance fixture is run (``controller.allocator.conformance.run_fixture`` on a fixture whose
``expected`` is draalloc's output): outcome, error vs unsatisfiable, ``errorIsNodeLocal``, and per claim
the results in order (request, device, adminAccess, tolerations, shareID present, consumed capacity by
value), config and node selector must be the same. Error messages are not compared.

A disagreement is classified:

* ``upstream-bug``: it vanishes against ``draalloc-patched`` (the counter leak of upstream's
  ``allocateDevice``; Partita's answer is the correct one). For a case where kube-scheduler picks
  ``stable`` (which has the same leak, the patch only fixes ``incubating``) the patched build is run
  with ``incubating`` forced.
* ``upstream-constraint-leak``: the same family of upstream bug, not covered by the patch: when
  ``allocateDevice`` rejects a device because its capacity does not fit (allocator_incubating.go at the
  oracle's commit, lines 1429-1440: ``return false, nil, nil`` after the constraints were added at
  1398-1414), the device stays counted in the claim's constraints, so a later device of the same
  claim is compared with a value nobody holds. It only happens for a multi-allocatable device of an
  ``All`` request whose capacity was checked before the search (and then taken by another request). A
  disagreement is this bug when Partita's allocator, made to leak the same way (test-only emulation:
  :func:`upstream_constraint_leak`), decides exactly as draalloc.
* ``stable-vs-incubating``: kube-scheduler picks upstream's ``stable`` implementation (features without
  DRAConsumableCapacity and DRADeviceBindingConditions) and Partita agrees with upstream's
  ``incubating`` one on the same input. Upstream itself decides differently there: stable's
  ``GatherPools`` (structured/internal/stable/pools_stable.go) walks a Go map, so its pool order is
  random, and it neither sorts slices by name nor pools by driver/pool name, nor moves pools with
  binding conditions last; incubating (pools_incubating.go: ``sortPoolsByID``, ``sortSlicesByName``)
  is deterministic. Partita implements incubating's order (the one kube-scheduler uses whenever
  consumable capacity is enabled, as Partita's controller runs).
* ``search-limit``: Partita's search gave up after ``MAX_STEPS`` steps on the node (a tenth of the
  controller's default bound, where a pod would stay pending with that reason) where upstream searched on. Not a
  disagreement about semantics; counted so that the generator keeps such cases rare.
* ``oracle-timeout``: draalloc did not answer within ``ORACLE_TIMEOUT_S`` (its search is unbounded);
  nothing to compare.
* ``unexplained``: everything else — a bug to fix in Partita's allocator.

``draalloc`` warnings (unknown or duplicate fields) and ``oracle-failure`` outcomes are bugs in the
generated input and are counted separately.
"""

from __future__ import annotations

import contextlib
import copy
import json
import select
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from controller.allocator.conformance import SEARCH_LIMIT

REPO = Path(__file__).resolve().parents[2]
ORACLE_DIR = REPO.parent / "shared" / "oracle"
ORACLE = ORACLE_DIR / "draalloc"
PATCHED = ORACLE_DIR / "draalloc-patched"

#: disagreements explained by upstream's own behaviour, cases Partita's bounded search (MAX_STEPS) gave up
#: on, and cases upstream did not decide within ORACLE_TIMEOUT_S: counted and reported, never a failure
EXPLAINED = ("upstream-bug", "upstream-constraint-leak", "stable-vs-incubating", "search-limit", "oracle-timeout")

COMPARE = {"claimOrder": "exact", "deviceResultsOrder": "exact", "nodeSelectorOrder": "ignore",
           "shareID": "any-non-null", "quantities": "by-value"}


#: upstream's search is exhaustive and unbounded; stable's (no start location within a request, so
#: permutations rather than combinations) runs for minutes on a few small unsatisfiable cases
ORACLE_TIMEOUT_S = 10.0


def oracle_present() -> bool:
    return ORACLE.is_file() and PATCHED.is_file()


def _die_with_parent() -> None:
    """In the oracle's child process: end it when the test process ends, however it ends (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Oracle:
    """One long-lived ``draalloc batch`` process: one JSON line in, one line out."""

    def __init__(self, binary: Path = ORACLE):
        self.binary = binary
        self._p: subprocess.Popen | None = None

    def _proc(self) -> subprocess.Popen:
        if self._p is None or self._p.poll() is not None:
            self._p = subprocess.Popen([str(self.binary), "batch"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL, text=True, bufsize=1, preexec_fn=_die_with_parent)
        return self._p

    def run(self, inp: dict, allocator: str | None = None) -> dict:
        p = self._proc()
        data = dict(inp, allocator=allocator) if allocator else inp
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(json.dumps(data) + "\n")
        p.stdin.flush()
        ready, _, _ = select.select([p.stdout], [], [], ORACLE_TIMEOUT_S)
        if not ready:
            p.kill()
            self.close()
            return {"outcome": "oracle-timeout", "error": f"{self.binary.name} took over {ORACLE_TIMEOUT_S}s"}
        line = p.stdout.readline()
        if not line:
            self.close()
            return {"outcome": "oracle-failure", "error": f"{self.binary.name} exited"}
        return json.loads(line)

    def close(self) -> None:
        if self._p is not None:
            if self._p.stdin:
                self._p.stdin.close()
            try:
                self._p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._p.kill()
                self._p.wait()
            self._p = None

    def __enter__(self) -> "Oracle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fixture(inp: dict, out: dict, name: str = "difftest", comment: str = "") -> dict:
    """A conformance fixture (dra-allocator-fixture/v1) whose expected result is ``out`` (draalloc's)."""
    features = list(inp.get("features") or [])
    body = {k: v for k, v in inp.items() if k not in ("features", "allocator")}
    expected: dict[str, Any] = {"outcome": out["outcome"]}
    if out["outcome"] == "error":
        expected["errorIsNodeLocal"] = bool(out.get("errorIsNodeLocal"))
        expected["upstreamError"] = out.get("error", "")
    if out["outcome"] == "allocated":
        expected["allocations"] = [{"claim": c["metadata"]["name"], "allocation": a}
                                   for c, a in zip(inp.get("claims") or [], out.get("allocations") or [])]
    doc = {"schema": "dra-allocator-fixture/v1", "name": name, "features": features, "input": body,
           "expected": expected, "compare": dict(COMPARE)}
    if comment:
        doc["comment"] = comment
    return doc


#: Partita's search bound per node in the differential test, a tenth of the controller's default
#: (ControllerConfig.max_search_steps) to keep runs short; a case that needs more is ``search-limit``
MAX_STEPS = 20_000


def compare(inp: dict, out: dict) -> str:
    """"" when Partita's allocator decides as ``out`` (a draalloc output) on ``inp``, else why not."""
    from controller.allocator.conformance import run_fixture

    try:
        return run_fixture(fixture(inp, out), max_steps=MAX_STEPS)
    except Exception as e:  # noqa: BLE001 - a crash of ours is a disagreement, never a crash of the run
        return f"Partita's allocator raised {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"


@contextlib.contextmanager
def upstream_constraint_leak() -> Iterator[None]:
    """Partita's allocator with upstream's constraint leak (see the module docstring), for classifying
    disagreements only: a device rejected by the capacity check in ``Run._allocate_device`` is not
    removed from the claim's constraints."""
    from controller.allocator import search

    orig_fits = search.Run._capacity_fits
    orig_prepare = search.Run.prepare

    def fits(self, rd, dev):  # noqa: ANN001
        ok = orig_fits(self, rd, dev)
        if not ok and sys._getframe(1).f_code.co_name == "_allocate_device":   # noqa: SLF001
            self._leak_skip = len(self.constraints[rd.claim_index])
        return ok

    def prepare(self):  # noqa: ANN001
        orig_prepare(self)
        self._leak_skip = 0
        run = self
        for cons in self.constraints:
            for c in cons:
                orig_remove = c.remove

                def remove(request, subrequest, dev, orig_remove=orig_remove):  # noqa: ANN001
                    if run._leak_skip > 0:
                        run._leak_skip -= 1
                        return
                    orig_remove(request, subrequest, dev)
                c.remove = remove

    search.Run._capacity_fits, search.Run.prepare = fits, prepare
    try:
        yield
    finally:
        search.Run._capacity_fits, search.Run.prepare = orig_fits, orig_prepare


@dataclass
class Verdict:
    category: str   # agree, one of EXPLAINED, unexplained or oracle-failure
    why: str = ""
    oracle: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class Differ:
    def __init__(self) -> None:
        self.oracle = Oracle(ORACLE)
        self.patched = Oracle(PATCHED)

    def close(self) -> None:
        self.oracle.close()
        self.patched.close()

    def __enter__(self) -> "Differ":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def judge(self, inp: dict) -> Verdict:
        out = self.oracle.run(inp)
        warnings = list(out.get("warnings") or [])
        if out.get("outcome") in ("oracle-failure", "oracle-timeout"):
            return Verdict(out["outcome"], out.get("error", ""), out, warnings)
        why = compare(inp, out)
        if not why:
            return Verdict("agree", "", out, warnings)
        if why.startswith(SEARCH_LIMIT):
            return Verdict("search-limit", why, out, warnings)
        stable = out.get("allocator") == "stable"
        if stable:
            inc = self.oracle.run(inp, "incubating")
            if not inc["outcome"].startswith("oracle-") and not compare(inp, inc):
                return Verdict("stable-vs-incubating", why, out, warnings)
        pat = self.patched.run(inp, "incubating" if stable else None)
        if not pat["outcome"].startswith("oracle-") and not compare(inp, pat):
            return Verdict("upstream-bug", why, out, warnings)
        with upstream_constraint_leak():
            if not compare(inp, out) or (not pat["outcome"].startswith("oracle-") and not compare(inp, pat)):
                return Verdict("upstream-constraint-leak", why, out, warnings)
        return Verdict("unexplained", why, out, warnings)


# -- shrinking ----------------------------------------------------------------------------------------
def _requests(claim: dict) -> list:
    return claim["spec"]["devices"]["requests"]


def _candidates(inp: dict) -> Iterator[dict]:
    """Smaller variants of ``inp``, each one removal (biggest first)."""
    def variant(edit: Callable[[dict], Any]) -> dict:
        c = copy.deepcopy(inp)
        edit(c)
        return c

    claims = inp.get("claims") or []
    if len(claims) > 1:
        for i in range(len(claims)):
            yield variant(lambda c, i=i: c["claims"].pop(i))
    for i in range(len(inp.get("resourceSlices") or [])):
        yield variant(lambda c, i=i: c["resourceSlices"].pop(i))
    for i, cl in enumerate(claims):
        reqs = _requests(cl)
        if len(reqs) > 1:
            for j in range(len(reqs)):
                yield variant(lambda c, i=i, j=j: _requests(c["claims"][i]).pop(j))
    for key in ("allocatedDevices", "allocatedShares", "aggregatedCapacity"):
        for i in range(len(inp.get(key) or [])):
            yield variant(lambda c, key=key, i=i: c[key].pop(i))
    for i, s in enumerate(inp.get("resourceSlices") or []):
        for j in range(len(s["spec"].get("devices") or [])):
            yield variant(lambda c, i=i, j=j: c["resourceSlices"][i]["spec"]["devices"].pop(j))
    used = {e.get("deviceClassName") for cl in claims for r in _requests(cl)
            for e in ([r["exactly"]] if "exactly" in r else []) + list(r.get("firstAvailable") or [])}
    for i, k in enumerate(inp.get("deviceClasses") or []):
        if k["metadata"]["name"] not in used:
            yield variant(lambda c, i=i: c["deviceClasses"].pop(i))
    for i, cl in enumerate(claims):
        d = cl["spec"]["devices"]
        for key in ("constraints", "config"):
            if d.get(key):
                yield variant(lambda c, i=i, key=key: c["claims"][i]["spec"]["devices"].pop(key))
        for j, r in enumerate(_requests(cl)):
            subs = r.get("firstAvailable") or []
            if len(subs) > 1:
                for k in range(len(subs)):
                    yield variant(lambda c, i=i, j=j, k=k: _requests(c["claims"][i])[j]["firstAvailable"].pop(k))
            specs = [("exactly", None)] if "exactly" in r else [("firstAvailable", k) for k in range(len(subs))]
            for where, k in specs:
                e = r[where] if k is None else r[where][k]
                for key in ("selectors", "tolerations", "capacity", "adminAccess"):
                    if key in e:
                        def drop(c, i=i, j=j, where=where, k=k, key=key):
                            rr = _requests(c["claims"][i])[j][where]
                            (rr if k is None else rr[k]).pop(key)
                        yield variant(drop)
                if e.get("count", 1) > 1:
                    def less(c, i=i, j=j, where=where, k=k):
                        rr = _requests(c["claims"][i])[j][where]
                        (rr if k is None else rr[k])["count"] -= 1
                    yield variant(less)
    for i, s in enumerate(inp.get("resourceSlices") or []):
        for j, dv in enumerate(s["spec"].get("devices") or []):
            for key in ("attributes", "capacity", "taints", "consumesCounters", "allowMultipleAllocations",
                        "bindingConditions"):
                if key in dv:
                    def drop_dev(c, i=i, j=j, key=key):
                        x = c["resourceSlices"][i]["spec"]["devices"][j]
                        x.pop(key)
                        if key == "bindingConditions":
                            x.pop("bindingFailureConditions", None)
                            x.pop("bindsToNode", None)
                    yield variant(drop_dev)
            for a in list(dv.get("attributes") or {}):
                yield variant(lambda c, i=i, j=j, a=a: c["resourceSlices"][i]["spec"]["devices"][j]["attributes"].pop(a))
    for f in inp.get("features") or []:
        yield variant(lambda c, f=f: c["features"].remove(f))


def shrink(inp: dict, still_fails: Callable[[dict], bool], budget_s: float = 30.0) -> dict:
    """Greedy one-removal-at-a-time shrinking while ``still_fails`` holds (within ``budget_s``)."""
    deadline = time.monotonic() + budget_s
    best = inp
    progress = True
    while progress and time.monotonic() < deadline:
        progress = False
        for cand in _candidates(best):
            if time.monotonic() > deadline:
                break
            if still_fails(cand):
                best, progress = cand, True
                break
    return best


def write_fixture(directory: Path, name: str, inp: dict, verdict: Verdict, comment: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    doc = fixture(inp, verdict.oracle, name=name, comment=comment)
    path = directory / f"{name}.yaml"
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    path.write_text(header + yaml.safe_dump(doc, sort_keys=False, width=120))
    return path


@dataclass
class Summary:
    cases: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    warnings: list[tuple[int, str]] = field(default_factory=list)
    failures: list[tuple[int, Verdict, dict]] = field(default_factory=list)   # (index, verdict, input)
    allocators: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)

    def add(self, index: int, inp: dict, v: Verdict) -> None:
        self.cases += 1
        self.counts[v.category] = self.counts.get(v.category, 0) + 1
        self.allocators[v.oracle.get("allocator", "?")] = self.allocators.get(v.oracle.get("allocator", "?"), 0) + 1
        self.outcomes[v.oracle.get("outcome", "?")] = self.outcomes.get(v.oracle.get("outcome", "?"), 0) + 1
        for w in v.warnings:
            self.warnings.append((index, w))
        if v.category not in ("agree",):
            self.failures.append((index, v, inp))

    def unexplained(self) -> list[tuple[int, Verdict, dict]]:
        return [f for f in self.failures if f[1].category in ("unexplained", "oracle-failure")]


def run(seed: int, n: int, start: int = 0, differ: Differ | None = None) -> Summary:
    from tests.support.diffgen import cases

    own = differ is None
    d = differ or Differ()
    s = Summary()
    try:
        for i, inp in cases(seed, n, start):
            s.add(i, inp, d.judge(inp))
    finally:
        if own:
            d.close()
    return s
