"""The opt-in idle policy (issue 14 item 4; controller/operator/idlepolicy.py): the decision as a table, the
flags, and the controller acting on pods of idle claims against the API emulator (annotate, evict through
pods/eviction with a PodDisruptionBudget's 429 retried, the rate limit, dry run)."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging

import pytest

from controller.operator import metrics
from controller.operator.controller import ControllerConfig
from controller.operator.idlepolicy import (ANNOTATION_IDLE_SINCE, LABEL, REASON_BLOCKED, REASON_DRY_RUN,
                                            REASON_EVICTED, REASON_IDLE, IdlePolicyError, IdleSettings, decide,
                                            idle_since, parse_classes)
from controller.operator.main import add_arguments, idle_settings, run as run_main
from driver.api import constants as C
from tests.support.cluster import FAST, claim, cluster, pod, request

DRIVER = C.DEFAULT_DRIVER_NAME
PARTITA = {C.DEVICE_CLASS_GPU, C.DEVICE_CLASS_MIG, C.DEVICE_CLASS_SHARED}
NOW = 1_800_000_000.0


def _stamp(seconds_ago: float) -> str:
    t = datetime.datetime.fromtimestamp(NOW - seconds_ago, datetime.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _claim(name: str = "c", cls: str = C.DEVICE_CLASS_GPU, idle: str | None = "True", ago: float = 3600,
           devices: int = 1, idle_devices: int | None = None, driver: str = DRIVER) -> dict:
    results = [{"request": "gpu", "driver": driver, "pool": "node-a", "device": f"gpu-{i}"} for i in range(devices)]
    entries = []
    for i in range(devices if idle_devices is None else idle_devices):
        conds = [{"type": "Ready", "status": "True", "reason": "Prepared", "lastTransitionTime": _stamp(7200)}]
        if idle is not None:
            conds.append({"type": "Idle", "status": idle, "reason": "BelowThreshold", "lastTransitionTime": _stamp(ago)})
        entries.append({"driver": driver, "pool": "node-a", "device": f"gpu-{i}", "conditions": conds})
    c = claim(name, [request(cls=cls)], namespace="ml")
    c["status"] = {"allocation": {"devices": {"results": results}}, "devices": entries}
    return c


def _pod(priority: int | None = 0, phase: str = "Running", annotations: dict | None = None,
         labels: dict | None = None, claims: tuple[str, ...] = ("c",)) -> dict:
    p = pod("nb", list(claims), namespace="ml")
    if priority is not None:
        p["spec"]["priority"] = priority
    p["spec"]["nodeName"] = "node-a"
    p["status"] = {"phase": phase}
    p["metadata"]["annotations"] = annotations or {}
    p["metadata"]["labels"] = labels or {}
    return p


ON = IdleSettings(enabled=True, grace_seconds=600)
JOB = {"batch.kubernetes.io/job-name": "train"}
GANG = {"partita.dev/gang": "g", "partita.dev/gang-size": "2"}

# (case, namespace label, settings, pod kwargs, claim kwargs, expected action, a word of the reason)
TABLE = [
    ("master switch off", "evict", IdleSettings(grace_seconds=600), {}, {}, "none", "off"),
    ("namespace annotate", "annotate", ON, {}, {}, "annotate", "namespace label"),
    ("namespace evict", "evict", ON, {}, {}, "evict", "namespace label"),
    ("no label, no class", None, ON, {}, {}, "none", "no idle policy"),
    ("label off", "off", ON, {}, {}, "none", "is off"),
    ("label invalid", "kill", ON, {}, {}, "none", "not one of"),
    ("class evict", None, IdleSettings(enabled=True, grace_seconds=600, classes={C.DEVICE_CLASS_GPU: "evict"}),
     {}, {}, "evict", "DeviceClass gpu.partita.dev"),
    ("class of another class only", None,
     IdleSettings(enabled=True, grace_seconds=600, classes={C.DEVICE_CLASS_MIG: "evict"}), {}, {}, "none", "no idle"),
    ("namespace label wins over the class", "annotate",
     IdleSettings(enabled=True, grace_seconds=600, classes={C.DEVICE_CLASS_GPU: "evict"}), {}, {}, "annotate", "label"),
    ("label off beats a class", "off",
     IdleSettings(enabled=True, grace_seconds=600, classes={C.DEVICE_CLASS_GPU: "evict"}), {}, {}, "none", "off"),
    ("priority 1 is not below 1", "evict", ON, {"priority": 1}, {}, "none", "priority 1"),
    ("negative priority", "evict", ON, {"priority": -10}, {}, "evict", "priority -10"),
    ("no priority field is 0", "evict", ON, {"priority": None}, {}, "evict", "priority 0"),
    ("higher threshold", "evict", IdleSettings(enabled=True, grace_seconds=600, priority_below=1000),
     {"priority": 500}, {}, "evict", "priority 500"),
    ("within the grace period", "evict", ON, {}, {"ago": 300}, "none", "grace"),
    ("just past the grace period", "evict", ON, {}, {"ago": 601}, "evict", "beyond"),
    ("not idle: Idle False", "evict", ON, {}, {"idle": "False"}, "none", "not reported idle"),
    ("not judged yet", "evict", ON, {}, {"idle": None}, "none", "not reported idle"),
    ("one of two devices idle", "evict", ON, {}, {"devices": 2, "idle_devices": 1}, "none", "gpu-1"),
    ("both devices idle", "evict", ON, {}, {"devices": 2}, "evict", "beyond"),
    ("Job pod", "evict", ON, {"labels": JOB}, {}, "none", "Job"),
    ("gang member", "evict", ON, {"annotations": GANG}, {}, "none", "gang ml/g"),
    ("gang member, gangs included", "evict", IdleSettings(enabled=True, grace_seconds=600, include_gangs=True),
     {"annotations": GANG}, {}, "evict", "beyond"),
    ("pod not running", "evict", ON, {"phase": "Pending"}, {}, "none", "not running"),
    ("another driver's claim", "evict", ON, {}, {"cls": "gpu.nvidia.com"}, "none", "other drivers"),
]


@pytest.mark.parametrize("case,label,settings,pod_kw,claim_kw,action,why", TABLE, ids=[t[0] for t in TABLE])
def test_the_decision_table(case, label, settings, pod_kw, claim_kw, action, why) -> None:
    labels = {LABEL: label} if label is not None else {}
    d = decide(_pod(**pod_kw), [_claim(**claim_kw)], labels, settings, DRIVER, PARTITA, NOW)
    assert d.action == action, (case, d)
    assert why in d.why or why in d.source, (case, d)


def test_idle_since_is_the_latest_transition_of_the_claims_devices() -> None:
    c = _claim(devices=2)
    c["status"]["devices"][1]["conditions"][1]["lastTransitionTime"] = _stamp(700)
    assert idle_since(c, DRIVER) == (_stamp(700), "")
    # other drivers' devices of the claim are not ours to judge; a claim without ours is never idle
    assert idle_since(_claim(driver="other.example.com"), DRIVER)[0] is None
    # a pod with a second, busy claim is not idle as a whole
    d = decide(_pod(claims=("c", "d")), [_claim(), _claim("d", idle="False")], {LABEL: "evict"}, ON, DRIVER,
               PARTITA, NOW)
    assert d.action == "none" and "claim ml/d" in d.why
    # a claim the cache does not know yet decides nothing
    assert decide(_pod(), [None], {LABEL: "evict"}, ON, DRIVER, PARTITA, NOW).action == "none"


def test_class_actions_parse_and_bad_ones_name_the_setting() -> None:
    assert parse_classes("gpu.partita.dev=annotate, mig.partita.dev=evict") == {
        "gpu.partita.dev": "annotate", "mig.partita.dev": "evict"}
    assert parse_classes("") == {}
    for bad, word in (("gpu.partita.dev", "CLASS=annotate"), ("gpu.partita.dev=delete", "CLASS=annotate"),
                      ("a=evict,a=annotate", "listed twice")):
        with pytest.raises(IdlePolicyError, match=word):
            parse_classes(bad)
    with pytest.raises(IdlePolicyError, match="max-evictions-per-minute"):
        IdleSettings(max_evictions_per_minute=-1)


def test_the_policy_is_off_by_default_and_a_bad_flag_exits_2_naming_it(caplog: pytest.LogCaptureFixture) -> None:
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert idle_settings(p.parse_args([])) == IdleSettings()
    assert not IdleSettings().enabled
    s = idle_settings(p.parse_args(["--idle-policy", "on", "--idle-policy-classes", "gpu.partita.dev=evict",
                                    "--idle-policy-dry-run", "--idle-policy-max-evictions-per-minute", "5"]))
    assert s.enabled and s.dry_run and s.classes == {"gpu.partita.dev": "evict"} and s.max_evictions_per_minute == 5
    caplog.set_level(logging.ERROR)
    assert run_main(p.parse_args(["--idle-policy-classes", "gpu.partita.dev=nuke"])) == 2
    assert "--idle-policy-classes: 'gpu.partita.dev=nuke'" in caplog.text


# -- the controller against the API emulator ---------------------------------------------------------------
def _count(action: str, result: str) -> float:
    return metrics.IDLE_POLICY_ACTIONS.labels(action, result)._value.get()


def _ns(server, name: str, policy: str | None) -> None:  # noqa: ANN001
    server.create({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": name, "labels": {LABEL: policy} if policy else {}}})


async def _running_idle(cl, name: str, ns: str, *, priority: int = 0, idle: str = "True",  # noqa: ANN001
                        labels: dict | None = None, ago: float = 3600) -> None:
    """A pod whose claim the controller allocated, bound and running, the node having written Idle."""
    p = pod(name, [name], namespace=ns)
    p["spec"]["priority"] = priority
    p["metadata"]["labels"] = labels or {}
    cl.submit(p, claim(name, [request()], namespace=ns))
    c = await cl.allocated(name, ns)
    server = cl.server
    stored = server.get("pods", name, ns)
    stored["spec"]["nodeName"] = "node-a"
    server.update(stored)
    stored = server.get("pods", name, ns)
    stored["status"] = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
    server.update_status(stored)
    stamp = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=ago)).strftime(
        "%Y-%m-%dT%H:%M:%SZ")
    c = cl.claim(name, ns)
    c["status"]["reservedFor"] = [{"resource": "pods", "name": name, "uid": stored["metadata"]["uid"]}]
    c["status"]["devices"] = [
        {"driver": r["driver"], "pool": r["pool"], "device": r["device"],
         "conditions": [{"type": "Idle", "status": idle, "reason": "BelowThreshold", "message": "idle",
                         "lastTransitionTime": stamp, "observedGeneration": 1}]}
        for r in c["status"]["allocation"]["devices"]["results"]]
    server.update_status(c)


def _cfg(**idle) -> ControllerConfig:
    return ControllerConfig(**FAST, idle=IdleSettings(**{"enabled": True, "grace_seconds": 60,
                                                         "interval_seconds": 0.3, **idle}))


def test_annotate_marks_only_the_idle_low_priority_pod_of_the_opted_in_namespace_and_clears_it_when_active() -> None:
    async def main() -> None:
        async with cluster(_cfg()) as cl:
            cl.add_node("node-a", "H100-SXM5-80GB:8")
            _ns(cl.server, "ml", "annotate")
            _ns(cl.server, "prod", None)
            await _running_idle(cl, "nb", "ml")
            await _running_idle(cl, "vip", "ml", priority=1000)
            await _running_idle(cl, "busy", "ml", idle="False")
            await _running_idle(cl, "fresh", "ml", ago=5)             # within the grace period
            await _running_idle(cl, "other", "prod")
            nb = await cl.server.wait_for(
                lambda s: (lambda p: p if ANNOTATION_IDLE_SINCE in (p["metadata"].get("annotations") or {}) else None)(
                    s.get("pods", "nb", "ml")), 10)
            idle_at = cl.claim("nb", "ml")["status"]["devices"][0]["conditions"][0]["lastTransitionTime"]
            assert nb["metadata"]["annotations"][ANNOTATION_IDLE_SINCE] == idle_at
            await asyncio.sleep(1.0)                                   # several more evaluations
            for name, ns in (("vip", "ml"), ("busy", "ml"), ("fresh", "ml"), ("other", "prod")):
                assert ANNOTATION_IDLE_SINCE not in (cl.server.get("pods", name, ns)["metadata"].get("annotations")
                                                     or {}), name
            events = cl.server.list("events", "ml")
            assert [e["involvedObject"]["name"] for e in events if e["reason"] == REASON_IDLE] == ["nb"]
            assert cl.server.get("pods", "nb", "ml") is not None       # annotate never evicts
            # used again: the node flips the condition, the annotation goes
            c = cl.claim("nb", "ml")
            c["status"]["devices"][0]["conditions"][0].update(status="False", reason="AboveThreshold")
            cl.server.update_status(c)
            await cl.server.wait_for(lambda s: ANNOTATION_IDLE_SINCE not in (
                s.get("pods", "nb", "ml")["metadata"].get("annotations") or {}), 10)
    asyncio.run(main())


def _pdb(server, ns: str, allowed: int) -> None:  # noqa: ANN001
    server.create({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "keep", "namespace": ns},
                   "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "nb"}}},
                   "status": {"disruptionsAllowed": allowed, "currentHealthy": 1, "desiredHealthy": 1,
                              "expectedPods": 1, "observedGeneration": 1}})


def test_evict_goes_through_the_eviction_api_honours_a_budget_and_retries_after_429() -> None:
    async def main() -> None:
        async with cluster(_cfg()) as cl:
            cl.add_node("node-a", "H100-SXM5-80GB:8")
            _ns(cl.server, "ml", "evict")
            _pdb(cl.server, "ml", 0)
            blocked_before = _count("evict", "blocked")
            await _running_idle(cl, "nb", "ml", labels={"app": "nb"})
            await cl.server.wait_for(lambda s: any(e["reason"] == REASON_BLOCKED for e in s.list("events", "ml")), 10)
            assert cl.server.get("pods", "nb", "ml") is not None       # the budget held it
            assert _count("evict", "blocked") > blocked_before
            # the budget allows one disruption now: the retry (after its backoff) evicts
            pdb = cl.server.get("poddisruptionbudgets", "keep", "ml", group="policy")
            pdb["status"]["disruptionsAllowed"] = 1
            cl.server.update_status(pdb)
            await cl.server.wait_for(lambda s: s.get("pods", "nb", "ml") is None, 20)
            reasons = [e["reason"] for e in cl.server.list("events", "ml")
                       if e["involvedObject"]["name"] == "nb"]
            assert REASON_EVICTED in reasons
            pdb = cl.server.get("poddisruptionbudgets", "keep", "ml", group="policy")
            assert pdb["status"]["disruptionsAllowed"] == 0 and "nb" in pdb["status"]["disruptedPods"]
    asyncio.run(main())


def test_evictions_are_rate_limited_and_a_dry_run_writes_nothing() -> None:
    async def main() -> None:
        async with cluster(_cfg(max_evictions_per_minute=1)) as cl:
            cl.add_node("node-a", "H100-SXM5-80GB:8")
            _ns(cl.server, "ml", "evict")
            await _running_idle(cl, "a", "ml")
            await _running_idle(cl, "b", "ml")
            await cl.server.wait_for(lambda s: len([p for p in ("a", "b") if s.get("pods", p, "ml") is None]) == 1, 10)
            await asyncio.sleep(1.5)                                   # five more evaluations within the minute
            assert len([p for p in ("a", "b") if cl.server.get("pods", p, "ml") is None]) == 1
            assert cl.controller.idle.decisions  # still evaluated
    asyncio.run(main())

    async def dry() -> None:
        async with cluster(_cfg(dry_run=True)) as cl:
            cl.add_node("node-a", "H100-SXM5-80GB:8")
            _ns(cl.server, "ml", "evict")
            await _running_idle(cl, "nb", "ml")
            await cl.server.wait_for(lambda s: len([e for e in s.list("events", "ml")
                                                    if e["reason"] == REASON_DRY_RUN]) == 2, 10)
            await asyncio.sleep(1.0)
            p = cl.server.get("pods", "nb", "ml")
            assert p is not None and ANNOTATION_IDLE_SINCE not in (p["metadata"].get("annotations") or {})
            dry_events = [e["message"] for e in cl.server.list("events", "ml") if e["reason"] == REASON_DRY_RUN]
            assert len(dry_events) == 2 and any("would evict" in m for m in dry_events)   # reported once each
            assert not any(e["reason"] == REASON_EVICTED for e in cl.server.list("events", "ml"))
    asyncio.run(dry())
