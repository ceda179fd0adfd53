"""Random allocate/release streams through both strategies, every state checked by an independent
validity checker (tests/support/validity.py). Fixed seed in CI; hack/bench_allocator.py runs longer ones."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.allocstream import KINDS, MIG_PROFILES, WHOLE, cluster_slices, run_stream

CLUSTER = cluster_slices()

alloc_op = st.one_of(
    st.tuples(st.just("alloc"), st.just("whole"), st.sampled_from(sorted(WHOLE))),
    st.tuples(st.just("alloc"), st.just("mig"), st.sampled_from(MIG_PROFILES)),
    st.tuples(st.just("alloc"), st.just("shared"), st.integers(1, 40)),
    st.tuples(st.just("alloc"), st.just("pair"), st.none()),
)
release_op = st.tuples(st.just("release"), st.integers(0, 1000))
streams = st.lists(st.one_of(alloc_op, alloc_op, release_op), min_size=1, max_size=40)


@pytest.mark.parametrize("strategy", ["first-fit", "pack"])
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(ops=streams)
def test_random_streams_never_break_an_invariant(strategy, ops) -> None:
    result = run_stream(ops, strategy, *CLUSTER)
    assert not result.problems, "\n".join(result.problems)


def test_the_checker_catches_a_double_allocation() -> None:
    """The checker itself must fail on a bad state (a test that cannot fail proves nothing)."""
    from tests.support.allocstream import DRIVER, make_claim
    from tests.support.validity import check

    slices, _ = CLUSTER
    gpu = next(d["name"] for s in slices for d in s["spec"].get("devices") or []
               if d["attributes"]["type"]["string"] == "gpu" and s["spec"]["nodeName"] == "node-b")
    alloc = {"devices": {"results": [{"request": "gpu", "driver": DRIVER, "pool": "node-b", "device": gpu}]}}
    _, reqs = make_claim("whole", "any")
    assert any("allocated 2 times" in p for p in check(slices, DRIVER, [(reqs, alloc), (reqs, alloc)]))
    # a whole H100 and a MIG device of the same GPU: together they overrun the GPU's counters
    devs = [(s["spec"]["nodeName"], d) for s in slices for d in s["spec"].get("devices") or []]
    whole = next(d for n, d in devs if n == "node-a" and d["attributes"]["type"]["string"] == "gpu" and not any(
        t["key"] == "example.com/maintenance" for t in d.get("taints", [])))
    mig = next(d for n, d in devs if n == "node-a" and d["attributes"]["type"]["string"] == "mig"
               and d["attributes"]["parentUUID"]["string"] == whole["attributes"]["uuid"]["string"]
               and d["attributes"]["migProfile"]["string"] == "1g.10gb")
    _, mreqs = make_claim("mig", "1g.10gb")
    both = [(reqs, {"devices": {"results": [{"request": "gpu", "driver": DRIVER, "pool": "node-a",
                                             "device": whole["name"]}]}}),
            (mreqs, {"devices": {"results": [{"request": "mig", "driver": DRIVER, "pool": "node-a",
                                              "device": mig["name"]}]}})]
    problems = check(slices, DRIVER, both)
    assert any(p.startswith("counter node-a/") for p in problems), problems
    # the tainted GPU is refused to a request without the toleration
    tainted = next(d for n, d in devs if n == "node-a" and any(
        t["key"] == "example.com/maintenance" for t in d.get("taints", [])))
    problems = check(slices, DRIVER, [(reqs, {"devices": {"results": [
        {"request": "gpu", "driver": DRIVER, "pool": "node-a", "device": tainted["name"]}]}})])
    assert any("untolerated taint" in p for p in problems), problems


def test_kinds_cover_every_device_type() -> None:
    assert set(KINDS) == {"whole", "mig", "shared", "pair"}
