"""Differential test: Partita's allocator (first-fit) against upstream's own allocator compiled as draalloc
(../shared/oracle), on random cases (tests/support/diffgen.py, judged by tests/support/difftest.py).

Runs whenever ../shared/oracle exists (a missing binary there is a failure); skips only without it.
The long runs are ``hack/difftest.py --cases 100000 --seed S``.
"""

from __future__ import annotations

import copy
import random

import pytest

from controller.allocator.conformance import load, run_fixture
from tests.support import diffgen, difftest
from tests.support.alloc import claim, cls, dev, req, slice_

pytestmark = pytest.mark.skipif(not difftest.ORACLE_DIR.is_dir(),
                                reason=f"upstream allocator oracle not found at {difftest.ORACLE_DIR}")

SEED = 20261207
CASES = 2000


def _input(claims, slices, classes=None, features=("DRAPartitionableDevices", "DRAConsumableCapacity")) -> dict:
    for c in claims:
        for r in c["spec"]["devices"]["requests"]:
            for e in [r["exactly"]] if "exactly" in r else r.get("firstAvailable") or []:
                e.setdefault("allocationMode", "ExactCount")
                if e["allocationMode"] == "ExactCount":
                    e.setdefault("count", 1)
    return {"features": list(features), "node": {"name": "node-1", "labels": {}},
            "deviceClasses": classes or [cls()], "resourceSlices": slices, "claims": claims}


def _consumes(mem: str) -> list[dict]:
    return [{"counterSet": "gpu", "counters": {"mem": {"value": mem}}}]


def _counter_leak_case() -> dict:
    """Upstream keeps p2's counters after rejecting it for its constraint, so "w" no longer fits."""
    counters = slice_("counters", counters={"gpu": {"mem": "8Gi"}}, count=2)
    parts = slice_("devices", [dev("p2", {"model": "b"}, consumesCounters=_consumes("8Gi")),
                               dev("w", {"model": "a"}, consumesCounters=_consumes("8Gi"))], count=2)
    anchor = slice_("other", [dev("a0", {"model": "a"})], pool="pool-0")
    c = claim("c", req("x", selectors=['device.attributes["driver-a"].model == "a"']), req("y"),
              constraints=[{"matchAttribute": "driver-a/model"}])
    return _input([c], [anchor, counters, parts])


def _constraint_leak_case() -> dict:
    """Upstream counts d00 in the claim's constraint after rejecting it for its capacity (All request)."""
    s = slice_("s", [dev("d00", {"example.com/model": "c"}, cap={"memory": "8Gi"}, allowMultipleAllocations=True),
                     dev("d01", {"example.com/model": "a"})])
    c = claim("c", req("r0"), req("r1", mode="All"), constraints=[{"matchAttribute": "example.com/model"}])
    return _input([c], [s], [cls("class-a", "")], features=("DRAConsumableCapacity",))


@pytest.fixture(scope="module")
def differ():
    with difftest.Differ() as d:
        yield d


def test_partita_decides_as_upstream_on_random_cases(differ) -> None:
    s = difftest.run(SEED, CASES, differ=differ)
    assert s.cases == CASES
    assert not s.warnings, f"draalloc warned about generated input (a generator bug): {s.warnings[:5]}"
    bad = s.unexplained()
    assert not bad, f"{len(bad)} unexplained disagreement(s) with upstream; first: " + "; ".join(
        f"case {i} ({v.category}, draalloc {v.oracle.get('allocator')} {v.oracle.get('outcome')}): {v.why[:300]}"
        for i, v, _ in bad[:3]) + f" -- rerun with hack/difftest.py --seed {SEED} --cases {CASES} --out DIR"
    # the generator reaches every outcome and both upstream implementations kube-scheduler may pick
    assert s.outcomes.get("allocated", 0) >= CASES // 10, s.outcomes
    assert s.outcomes.get("unsatisfiable", 0) >= CASES // 10, s.outcomes
    assert s.outcomes.get("error", 0) >= CASES // 20, s.outcomes
    assert s.allocators.get("incubating", 0) and s.allocators.get("stable", 0), s.allocators
    assert s.counts.get("agree", 0) >= CASES * 0.95, s.counts


def test_a_wrong_answer_is_a_disagreement(differ) -> None:
    inp = _input([claim("c", req(count=2))], [slice_("s1", [dev("d1"), dev("d2"), dev("d3")])])
    out = differ.oracle.run(inp)
    assert out["outcome"] == "allocated" and difftest.compare(inp, out) == ""
    wrong = copy.deepcopy(out)
    wrong["allocations"][0]["devices"]["results"][1]["device"] = "d3"
    assert "results" in difftest.compare(inp, wrong)
    assert difftest.compare(inp, {"outcome": "unsatisfiable"}) == "expected unsatisfiable, got an allocation: " + \
        repr(run_partita(inp))
    assert difftest.compare(inp, {"outcome": "error", "errorIsNodeLocal": False}).startswith("expected an error")


def run_partita(inp: dict):
    from controller.allocator import AllocatedState, Allocator, Features, Node, SliceIndex

    return Allocator(Features.from_names(inp["features"])).allocate(
        Node("node-1", {}), inp["claims"], SliceIndex.from_slices(inp["resourceSlices"]),
        {c["metadata"]["name"]: c for c in inp["deviceClasses"]}, AllocatedState())


def test_known_upstream_counter_leak_is_told_apart(differ) -> None:
    inp = _counter_leak_case()
    v = differ.judge(inp)
    assert v.oracle["outcome"] == "unsatisfiable" and v.oracle["allocator"] == "incubating"
    assert v.category == "upstream-bug", v.why
    assert differ.patched.run(inp)["outcome"] == "allocated"


def test_upstream_constraint_leak_is_told_apart(differ) -> None:
    inp = _constraint_leak_case()
    v = differ.judge(inp)
    assert v.oracle["outcome"] == "unsatisfiable", v.oracle
    assert v.category == "upstream-constraint-leak", v.why
    assert "constraint would not be satisfied" in v.why           # Partita: the fatal constraint error


def test_check_order_case_agrees_with_upstream(differ) -> None:
    """The All request whose device lacks the attribute and has no counters left (tests/test_allocator_semantics.py)."""
    counters = slice_("counters", counters={"gpu": {"mem": "8Gi"}}, count=2)
    parts = slice_("devices", [dev("p0", {"model": "a"}, consumesCounters=_consumes("4Gi")),
                               dev("p1", {"model": "a"}, consumesCounters=_consumes("4Gi")),
                               dev("p2", consumesCounters=_consumes("4Gi"))], count=2)
    inp = _input([claim("c", req(mode="All"), constraints=[{"matchAttribute": "driver-a/model"}])], [counters, parts])
    v = differ.judge(inp)
    assert (v.category, v.oracle["outcome"]) == ("agree", "unsatisfiable"), v.why


def test_shrunk_disagreement_is_a_loadable_fixture_with_the_same_verdict(differ, tmp_path) -> None:
    inp = _counter_leak_case()
    inp["resourceSlices"].append(slice_("extra", [dev("e0"), dev("e1", {"model": "z"})], pool="pool-9", driver="driver-z"))
    inp["claims"].insert(0, _input([claim("other", req(cls_name="class-a"))], [])["claims"][0])
    small = difftest.shrink(inp, lambda c: differ.judge(c).category == "upstream-bug", budget_s=60)
    assert len(small["resourceSlices"]) < len(inp["resourceSlices"]) and len(small["claims"]) == 1
    v = differ.judge(small)
    assert v.category == "upstream-bug"
    path = difftest.write_fixture(tmp_path, "upstream-bug-x", small, v, "shrunk by the test")
    doc = load(path)
    assert doc["expected"]["outcome"] == "unsatisfiable"
    assert run_fixture(doc) == "expected unsatisfiable, got an allocation: " + repr(run_partita(
        dict(doc["input"], features=doc["features"])))


def test_cases_are_reproducible_by_index() -> None:
    assert list(diffgen.cases(7, 4, start=3)) == list(diffgen.cases(7, 7))[3:]
    assert diffgen.case(random.Random("x")) == diffgen.case(random.Random("x"))


def test_hack_command_runs_a_range_and_writes_disagreements_as_fixtures(tmp_path) -> None:
    import subprocess
    import sys

    # case 10 of seed 5 is the known upstream counter leak (case 11 needs more than the search bound)
    res = subprocess.run([sys.executable, str(difftest.REPO / "hack" / "difftest.py"), "--cases", "4", "--seed", "5",
                          "--start", "9", "--shrink-explained-s", "5", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=170, cwd=difftest.REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "seed 5 cases 9..12: 4 in" in res.stdout and "(next: --start 13)" in res.stdout
    assert "  unexplained: 0" in res.stdout and "  draalloc warnings: 0" in res.stdout
    written = sorted(p.name for p in tmp_path.glob("*.yaml"))
    assert "upstream-bug-5-10.yaml" in written, res.stdout
    assert all(n.split("-5-")[0] in difftest.EXPLAINED for n in written), written
    doc = load(tmp_path / "upstream-bug-5-10.yaml")
    assert doc["comment"].startswith("difftest seed 5 case 10: upstream-bug")
    assert run_fixture(doc) != ""                      # Partita's answer is not upstream's (buggy) one
