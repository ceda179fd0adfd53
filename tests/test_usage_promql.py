"""docs/monitoring.md: the dcgm-exporter joins parse (promql_parser) and, evaluated on sample series, give each
dcgm-exporter series the claim and pod of Partita's partita_gpu_device_info; every plugin metric is documented."""

from __future__ import annotations

import re
from pathlib import Path

import promql_parser as pp
import pytest
from prometheus_client import REGISTRY

from driver.nvml import open_backend, profile_from_spec
from driver.inventory import discover
from driver.api import naming
from driver.nvml.interface import Placement
from driver.plugin import metrics
from driver.plugin.checkpoint import MigInstance, PreparedDevice
from driver.plugin.observers import claim_view
from driver.plugin.usage import UsageSampler

DOC = Path(__file__).resolve().parents[1] / "docs" / "monitoring.md"
NODE = "promql-node"
Series = tuple[dict[str, str], float]


def queries() -> list[str]:
    return re.findall(r"```promql\n(.*?)```", DOC.read_text(), re.S)


# -- a small evaluator of exactly what the documented joins use --------------------------------------------
class Refused(Exception):
    """What Prometheus answers with an error (duplicate series on the one side of a join)."""


def _matches(m, labels: dict[str, str]) -> bool:
    v = labels.get(m.name, "")
    op = str(m.op)
    if op.endswith("NotEqual"):
        return v != m.value
    if op.endswith("Equal"):
        return v == m.value
    if op.endswith("NotRe"):
        return re.fullmatch(m.value, v) is None
    if op.endswith("Re"):
        return re.fullmatch(m.value, v) is not None
    raise AssertionError(f"matcher {op}")


def evaluate(expr, db: dict[str, list[Series]]) -> list[Series]:
    if isinstance(expr, pp.ParenExpr):
        return evaluate(expr.expr, db)
    if isinstance(expr, pp.VectorSelector):
        return [({k: v for k, v in labels.items()}, value) for labels, value in db.get(expr.name, [])
                if all(_matches(m, labels) for m in expr.matchers.matchers)]
    if isinstance(expr, pp.Call):
        assert expr.func.name == "label_replace", expr.func.name
        inner, dst, repl, src, regex = expr.args
        out = []
        for labels, value in evaluate(inner, db):
            m = re.fullmatch(regex.val, labels.get(src.val, ""))
            new = dict(labels)
            new.pop("__name__", None)
            if m:
                new[dst.val] = m.expand(repl.val.replace("$", "\\"))
            out.append((new, value))
        return out
    if isinstance(expr, pp.BinaryExpr):
        assert str(expr.op) == "*", expr.op
        mod = expr.modifier
        on = list(mod.matching.labels)
        assert str(mod.matching.type).endswith("Include")          # on(...)
        lhs, rhs = evaluate(expr.lhs, db), evaluate(expr.rhs, db)
        right: dict[tuple, Series] = {}
        for labels, value in rhs:
            key = tuple(labels.get(k, "") for k in on)
            if key in right:
                raise Refused(f"found duplicate series for the match group {dict(zip(on, key))} on the right "
                              "hand-side of the operation: many-to-many matching not allowed")
            right[key] = (labels, value)
        extra = list(mod.group_labels or [])
        assert str(mod.card).endswith("ManyToOne")                 # group_left
        out = []
        for labels, value in lhs:
            key = tuple(labels.get(k, "") for k in on)
            if key not in right:
                continue
            rlabels, rvalue = right[key]
            new = {k: v for k, v in labels.items() if k != "__name__"}
            new.update({k: rlabels[k] for k in extra if k in rlabels})
            out.append((new, value * rvalue))
        return out
    if isinstance(expr, pp.AggregateExpr):
        assert str(expr.op) == "sum" and str(expr.modifier.type).endswith("By")
        by = list(expr.modifier.labels)
        groups: dict[tuple, float] = {}
        for labels, value in evaluate(expr.expr, db):
            key = tuple(labels.get(k, "") for k in by)
            groups[key] = groups.get(key, 0.0) + value
        return [(dict(zip(by, k)), v) for k, v in groups.items()]
    raise AssertionError(f"unsupported expression {type(expr).__name__}")


# -- sample series: Partita's from the real sampler, dcgm-exporter's as it labels them ------------------------
def _partita_series() -> tuple[dict[str, list[Series]], dict[str, str]]:
    b = open_backend("fake", profile=profile_from_spec("H100-SXM5-80GB:3", NODE), node_name=NODE)
    b.init()
    inv = discover(b, NODE)
    g0, g1, g2 = (g.uuid for g in inv.gpus)
    h1 = b.device_by_uuid(g1)
    b.set_mig_mode(h1, True)
    small = b.create_mig_device(h1, 19, Placement(0, 1))
    other = b.create_mig_device(h1, 19, Placement(1, 1))
    inv = discover(b, NODE)

    def dev(uuid, type_, mig=None, share=None):
        name = naming.gpu_device_name(uuid)
        if type_ == "mig":
            name = naming.mig_device_name(name, "1g.10gb", mig.placement.start)
        if type_ == "shared":
            name = naming.shared_device_name(name)
        m = MigInstance(gpuUUID=uuid, profileID=19, placementStart=mig.placement.start, placementSize=1,
                        gpuInstanceID=mig.gpu_instance_id, computeInstanceID=mig.compute_instance_id,
                        uuid=mig.uuid) if mig else None
        return PreparedDevice(requestNames=["gpu"], pool=NODE, device=name, cdiDeviceIDs=["x=y"], type=type_,
                              gpuUUID=uuid, mig=m, shareID=share, consumedCapacity={"memory": "8Gi"} if share else None)

    s = UsageSampler(b, NODE)
    claims = [("train", "trainer-0", [dev(g0, "gpu")]), ("nb", "notebook-0", [dev(g1, "mig", small)]),
              ("s1", "pod-s1", [dev(g2, "shared", share="00000000-0000-0000-0000-000000000001")]),
              ("s2", "pod-s2", [dev(g2, "shared", share="00000000-0000-0000-0000-000000000002")])]
    for name, pod, devices in claims:
        c = {"metadata": {"uid": f"uid-{name}"}, "status": {"reservedFor": [{"resource": "pods", "name": pod,
                                                                           "uid": f"p-{name}"}]}}
        s.prepared(claim_view("gpu.partita.dev", f"uid-{name}", "team-a" if name != "nb" else "team-b", name, c,
                              devices, inv))
    db: dict[str, list[Series]] = {}
    for fam in REGISTRY.collect():
        for smp in fam.samples:
            if smp.name == "partita_gpu_device_info" and smp.labels.get("node") == NODE:
                db.setdefault(smp.name, []).append((dict(smp.labels), smp.value))
    for name, _, _ in claims:
        s.unprepared(f"uid-{name}")
    gi = {"small": str(small.gpu_instance_id), "other": str(other.gpu_instance_id)}
    return db, {"g0": g0, "g1": g1, "g2": g2, **gi}


def _dcgm(ids: dict[str, str]) -> dict[str, list[Series]]:
    host = {"Hostname": NODE, "modelName": "NVIDIA H100 80GB HBM3"}
    return {
        "DCGM_FI_DEV_GPU_UTIL": [({"UUID": ids["g0"], "gpu": "0", **host}, 87.0),
                                 ({"UUID": ids["g2"], "gpu": "2", **host}, 40.0)],
        "DCGM_FI_DEV_FB_USED": [({"UUID": ids["g0"], "gpu": "0", **host}, 30000.0)],
        # per MIG instance: the parent GPU's UUID, and the GPU instance id
        "DCGM_FI_PROF_GR_ENGINE_ACTIVE": [
            ({"UUID": ids["g1"], "gpu": "1", "GPU_I_ID": ids["small"], "GPU_I_PROFILE": "1g.10gb", **host}, 0.25),
            ({"UUID": ids["g1"], "gpu": "1", "GPU_I_ID": ids["other"], "GPU_I_PROFILE": "1g.10gb", **host}, 0.75)],
    }


@pytest.fixture(scope="module")
def db():
    partita, ids = _partita_series()
    return {**partita, **_dcgm(ids)}, ids


def test_the_documented_queries_parse_and_use_exported_metrics() -> None:
    qs = queries()
    assert len(qs) >= 3
    exported = {m._name for m in vars(metrics).values() if hasattr(m, "_name")}
    for q in qs:
        pp.parse(q)
        for name in re.findall(r"\b(partita_[a-z_]+)", q):
            assert name in exported, name


def test_whole_gpu_join_gives_the_dcgm_series_its_claim_and_pod(db) -> None:
    series, ids = db
    [whole, mig, by_ns] = [pp.parse(q) for q in queries()[:3]]
    out = evaluate(whole, series)
    assert len(out) == 1                         # the shared GPU's claims are not whole: no match
    labels, value = out[0]
    assert value == 87.0 and labels["UUID"] == ids["g0"] and labels["gpu_uuid"] == ids["g0"]
    assert (labels["claim_namespace"], labels["claim_name"], labels["pod_namespace"], labels["pod_name"]) == \
        ("team-a", "train", "team-a", "trainer-0")
    assert evaluate(by_ns, series) == [({"pod_namespace": "team-a"}, 30000.0)]


def test_mig_join_matches_the_claimed_gpu_instance_only(db) -> None:
    series, ids = db
    mig = pp.parse(queries()[1])
    [(labels, value)] = evaluate(mig, series)
    assert value == 0.25 and labels["GPU_I_ID"] == ids["small"] and labels["pod_name"] == "notebook-0"
    assert labels["claim_namespace"] == "team-b"


def test_a_join_on_the_gpu_alone_is_refused_for_a_shared_gpu_as_prometheus_does(db) -> None:
    series, _ = db
    q = pp.parse('label_replace(DCGM_FI_DEV_GPU_UTIL, "gpu_uuid", "$1", "UUID", "(.+)") * on(gpu_uuid) '
                 'group_left(claim_name) partita_gpu_device_info{mode="shared"}')
    with pytest.raises(Refused, match="many-to-many"):
        evaluate(q, series)


def test_every_plugin_metric_is_documented() -> None:
    text = DOC.read_text()
    for m in vars(metrics).values():
        if hasattr(m, "_name"):
            name = m._name + ("_total" if type(m).__name__ == "Counter" else "")
            assert f"`{name}`" in text, name
