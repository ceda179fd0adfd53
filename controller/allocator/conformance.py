"""Allocator conformance runner: ``python -m controller.allocator.conformance DIR [--strategy first-fit]``.

Runs every ``*.yaml`` fixture in DIR through Partita's allocator and compares the outcome with upstream's. Prints
``PASS name`` or ``FAIL name: <why>`` per fixture and a closing ``N passed, M failed``; exits non-zero when any
fixture failed or could not be read. A fixture needing a feature Partita does not implement is a FAIL.

A fixture (``schema: dra-allocator-fixture/v1``) is one upstream allocator test case as data
(tests/reference/conformance, tests/fixtures/allocator)::

    name: <upstream case>            features: [DRAPrioritizedList, ...]   # upstream feature gate names
    input:
      node: {name, labels}           deviceClasses: [...]   resourceSlices: [...]   # resource.k8s.io/v1, in order
      allocatedDevices: [{driver, pool, device}]             allocatedShares: [{driver, pool, device, shareID}]
      aggregatedCapacity: [{driver, pool, device, capacity: {name: quantity}}]
      claims: [...]                  # allocated together, in this order
    expected:
      outcome: allocated | unsatisfiable | error
      errorContains: <substring>     errorIsNodeLocal: <bool>
      allocations: [{claim: <name>, allocation: <AllocationResult>}]   # one per claim, in the claims' order
    compare: {claimOrder: ignore|exact, deviceResultsOrder: ignore|exact, nodeSelectorOrder: ignore,
              configMustBeAbsent, allocationTimestampMustBeAbsent, shareID: any-non-null, quantities: by-value}

Allocations are matched to claims by position (see :func:`compare`), never by name.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from driver.api.quantity import Quantity, QuantityError
from driver.errors import PartitaError

from .allocator import Allocator
from .pools import SliceIndex
from .search import SearchLimitExceeded
from .types import FEATURE_NAMES, AllocatedState, AllocationError, DeviceID, Features, Node

SCHEMA = "dra-allocator-fixture/v1"
#: upstream allocator features Partita does not implement (yet)
UNSUPPORTED_FEATURES = {"DRAListTypeAttributes"}
#: fixtures Partita knowingly disagrees with, name -> upstream evidence (reported, still counted as FAIL)
KNOWN_DISAGREEMENTS: dict[str, str] = {}


#: how run_fixture's answer starts when the search gave up (max_steps)
SEARCH_LIMIT = "search limit exceeded"


class FixtureError(PartitaError):
    pass


def load(path: Path) -> dict:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise FixtureError(f"cannot read fixture: {e}") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise FixtureError(f"not a {SCHEMA} fixture (schema: {doc.get('schema') if isinstance(doc, dict) else None!r})")
    for key in ("name", "input", "expected"):
        if key not in doc:
            raise FixtureError(f"fixture has no {key!r}")
    return doc


def _state(inp: dict) -> AllocatedState:
    st = AllocatedState()
    for d in inp.get("allocatedDevices") or []:
        st.add_device(DeviceID(d["driver"], d["pool"], d["device"]))
    for d in inp.get("allocatedShares") or []:
        st.add_share(DeviceID(d["driver"], d["pool"], d["device"]), d["shareID"])
    for d in inp.get("aggregatedCapacity") or []:
        did = DeviceID(d["driver"], d["pool"], d["device"])
        st.add_capacity(did, {k: Quantity.parse(v) for k, v in (d.get("capacity") or {}).items()})
    return st


def run_fixture(doc: dict, strategy: str = "first-fit", max_steps: int = 0) -> str:
    """"" when the fixture passes, else why it does not. ``max_steps``: bound the search per node as the
    controller does (0: exhaustive, as upstream); exceeding it is a failure that says so."""
    features = doc.get("features") or []
    unknown = [f for f in features if f not in FEATURE_NAMES]
    unsupported = [f for f in features if f in UNSUPPORTED_FEATURES]
    if unknown or unsupported:
        return f"feature(s) not implemented by Partita: {', '.join(unknown + unsupported)}"
    inp, exp = doc["input"], doc["expected"]
    node = Node(inp["node"]["name"], dict(inp["node"].get("labels") or {}))
    classes = {c["metadata"]["name"]: c for c in inp.get("deviceClasses") or []}
    slices = SliceIndex()
    for i, s in enumerate(inp.get("resourceSlices") or []):
        s = {**s, "metadata": {**(s.get("metadata") or {}), "name": s["metadata"].get("name", f"slice-{i}")}}
        if any(s["metadata"]["name"] == x.name for x in slices.slices()):
            # upstream fixtures may reuse a slice name across pools; names only order slices within a pool
            s = {**s, "metadata": {**s["metadata"], "name": f"{s['metadata']['name']}~{i}"}}
        slices.upsert(s)
    allocator = Allocator(Features.from_names(features), strategy, max_steps=max_steps)
    claims = inp.get("claims") or []
    outcome = exp.get("outcome")
    try:
        results = allocator.allocate(node, claims, slices, classes, _state(inp))
    except SearchLimitExceeded as e:
        return f"{SEARCH_LIMIT}: {e}"
    except AllocationError as e:
        if outcome != "error":
            return f"expected {outcome}, got error: {e}"
        want = exp.get("errorContains", "")
        if want and want not in str(e):
            return f"error {str(e)!r} does not contain {want!r}"
        if "errorIsNodeLocal" in exp and bool(exp["errorIsNodeLocal"]) != e.node_local:
            return f"error node-local={e.node_local}, expected {exp['errorIsNodeLocal']}"
        return ""
    if outcome == "error":
        return f"expected an error containing {exp.get('errorContains')!r}, got {'no result' if results is None else 'an allocation'}"
    if outcome == "unsatisfiable":
        return "" if results is None else f"expected unsatisfiable, got an allocation: {results}"
    if outcome != "allocated":
        return f"unknown expected outcome {outcome!r}"
    if results is None:
        return "expected an allocation, got unsatisfiable"
    return compare(doc, claims, results)


def _norm_quantity(v: Any) -> Any:
    try:
        return ("q", Quantity.parse(v).value)
    except (QuantityError, TypeError):
        return v


def _norm_result(r: dict, cmp: dict) -> dict:
    out = dict(r)
    if "consumedCapacity" in out and cmp.get("quantities") == "by-value":
        out["consumedCapacity"] = {k: _norm_quantity(v) for k, v in out["consumedCapacity"].items()}
    if cmp.get("shareID") == "any-non-null" and out.get("shareID"):
        out["shareID"] = "<share>"
    for k in ("tolerations", "bindingConditions", "bindingFailureConditions"):
        if not out.get(k):
            out.pop(k, None)
    if out.get("adminAccess") is False:
        out.pop("adminAccess")
    return out


def _norm_selector(sel: dict | None, cmp: dict) -> Any:
    if sel is None:
        return None
    if cmp.get("nodeSelectorOrder") != "ignore":
        return sel

    def req(r):
        return (r.get("key"), r.get("operator"), tuple(sorted(r.get("values") or [])))

    return sorted((tuple(sorted(req(r) for r in t.get("matchExpressions") or [])),
                   tuple(sorted(req(r) for r in t.get("matchFields") or []))) for t in sel.get("nodeSelectorTerms") or [])


def _drop_nulls(v: Any) -> Any:
    """``requests: null`` and an absent ``requests`` mean the same (Go's nil slice)."""
    if isinstance(v, dict):
        return {k: _drop_nulls(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_drop_nulls(x) for x in v]
    return v


def compare(doc: dict, claims: list[dict], results: list[dict]) -> str:
    """Expected allocations are matched to the claims by position, never by name: upstream fixtures may give two
    claims one name (``several different drivers``), and claims in different namespaces may share one. With
    ``claimOrder: exact`` allocation i must be claim i's; with ``ignore`` (upstream's ``ConsistOf``) each expected
    allocation must equal a different actual one."""
    cmp = doc.get("compare") or {}
    expected = doc["expected"].get("allocations") or []
    got = [(c["metadata"]["name"], r) for c, r in zip(claims, results)]
    if len(got) != len(expected):
        return (f"{len(got)} allocations {[n for n, _ in got]} != {len(expected)} expected "
                f"{[a['claim'] for a in expected]}")
    if cmp.get("claimOrder") == "exact":
        order_got, order_exp = [n for n, _ in got], [a["claim"] for a in expected]
        if order_got != order_exp:
            return f"claim order {order_got} != expected {order_exp}"
        for i, (a, (_, have)) in enumerate(zip(expected, got)):
            why = _compare_allocation(a["allocation"], have, cmp)
            if why:
                return f"claim #{i} {a['claim']}: {why}"
        return ""
    unused = list(range(len(got)))
    for i, a in enumerate(expected):
        same_name = [j for j in unused if got[j][0] == a["claim"]]
        if not same_name:
            return f"expected allocation #{i} for claim {a['claim']}: no such claim left among {[n for n, _ in got]}"
        whys = [(j, _compare_allocation(a["allocation"], got[j][1], cmp)) for j in same_name]
        match = next((j for j, why in whys if not why), None)
        if match is None:
            return f"claim {a['claim']}: {whys[0][1]}"
        unused.remove(match)
    return ""


def _compare_allocation(want: dict, have: dict, cmp: dict) -> str:
    """Why one actual AllocationResult differs from the expected one ("" when it does not)."""
    w_res = [_norm_result(_drop_nulls(r), cmp) for r in (want.get("devices") or {}).get("results") or []]
    h_res = [_norm_result(_drop_nulls(r), cmp) for r in (have.get("devices") or {}).get("results") or []]
    if cmp.get("deviceResultsOrder", "ignore") == "ignore":
        key = lambda r: repr(sorted(r.items()))  # noqa: E731
        w_res, h_res = sorted(w_res, key=key), sorted(h_res, key=key)
    if w_res != h_res:
        return f"results\n  got      {h_res}\n  expected {w_res}"
    if cmp.get("shareID") == "any-non-null":
        for r in (have.get("devices") or {}).get("results") or []:
            want_share = any((x.get("driver"), x.get("pool"), x.get("device")) ==
                             (r.get("driver"), r.get("pool"), r["device"]) and x.get("shareID")
                             for x in (want.get("devices") or {}).get("results") or [])
            if want_share and not r.get("shareID"):
                return f"result for {r['device']} has no shareID"
    if cmp.get("configMustBeAbsent"):
        if (have.get("devices") or {}).get("config"):
            return f"devices.config must be absent, got {have['devices']['config']}"
    elif _drop_nulls((want.get("devices") or {}).get("config")) != _drop_nulls((have.get("devices") or {}).get("config")):
        return f"config\n  got      {(have.get('devices') or {}).get('config')}\n" \
               f"  expected {(want.get('devices') or {}).get('config')}"
    if cmp.get("allocationTimestampMustBeAbsent") and "allocationTimestamp" in have:
        return "allocationTimestamp must be absent"
    if _norm_selector(want.get("nodeSelector"), cmp) != _norm_selector(have.get("nodeSelector"), cmp):
        return f"nodeSelector {have.get('nodeSelector')} != expected {want.get('nodeSelector')}"
    return ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m controller.allocator.conformance",
                                description="Run allocator conformance fixtures.")
    p.add_argument("directory", type=Path)
    p.add_argument("--strategy", default="first-fit")
    args = p.parse_args(argv)
    files = sorted(args.directory.glob("*.yaml")) if args.directory.is_dir() else []
    if not files:
        print(f"FAIL {args.directory}: no fixtures found (expected *.yaml files in a directory)")
        print("0 passed, 1 failed")
        return 1
    passed = failed = 0
    for f in files:
        try:
            doc = load(f)
            name = doc["name"]
            why = run_fixture(doc, args.strategy)
        except FixtureError as e:
            name, why = f.name, str(e)
        except Exception as e:  # noqa: BLE001 - report, never crash the run
            name, why = f.name, f"runner error: {type(e).__name__}: {e}"
        if why and name in KNOWN_DISAGREEMENTS:
            why += f" (known disagreement: {KNOWN_DISAGREEMENTS[name]})"
        if why:
            failed += 1
            print(f"FAIL {name}: {' '.join(why.split())}")
        else:
            passed += 1
            print(f"PASS {name}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
