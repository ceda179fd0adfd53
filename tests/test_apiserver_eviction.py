"""The emulator's ``pods/eviction`` answers as upstream's (pkg/registry/core/pod/storage/eviction.go), through
the official client: 201 and the pod deleted, 429 while a PodDisruptionBudget allows no disruption (the budget
decremented and the pod recorded when it allows one), 404 for a missing pod, 400 for a mismatched name, 500
for two budgets, and budgets ignored for pods that are not running."""

from __future__ import annotations

import json

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from controller.sandbox.apiserver import ApiServer


@pytest.fixture
def server():
    s = ApiServer(bookmark_interval=0.2)
    s.start_in_thread()
    yield s
    s.stop_in_thread()


@pytest.fixture
def apis(server):
    api = client.ApiClient(server.client_configuration())
    return client.CoreV1Api(api), client.PolicyV1Api(api)


def _pod(server, name: str, phase: str = "Running", labels: dict | None = None, ready: bool = True) -> None:  # noqa: ANN001
    server.create({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": name, "namespace": "default", "labels": labels or {"app": "nb"}},
                   "spec": {"containers": [{"name": "c", "image": "busybox"}], "nodeName": "n1"},
                   "status": {"phase": phase, "conditions": [{"type": "Ready", "status": str(ready)}]}})


def _pdb(server, name: str = "keep", allowed: int = 0, generation_seen: int = 1) -> None:  # noqa: ANN001
    server.create({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                   "metadata": {"name": name, "namespace": "default"},
                   "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "nb"}}},
                   "status": {"disruptionsAllowed": allowed, "currentHealthy": 2, "desiredHealthy": 1,
                              "expectedPods": 2, "observedGeneration": generation_seen}})


def _body(e: ApiException) -> str:
    return e.body.decode() if isinstance(e.body, bytes) else str(e.body)


def _evict(core, name: str, body_name: str | None = None, dry_run: bool = False):  # noqa: ANN001, ANN201
    body = client.V1Eviction(metadata=client.V1ObjectMeta(name=body_name or name, namespace="default"),
                             delete_options=client.V1DeleteOptions(dry_run=["All"]) if dry_run else None)
    return core.create_namespaced_pod_eviction(name, "default", body, _preload_content=False)


def test_an_eviction_without_a_budget_deletes_the_pod_with_201(server, apis) -> None:
    core, _ = apis
    _pod(server, "p")
    r = _evict(core, "p")
    assert r.status == 201 and json.loads(r.data)["status"] == "Success"
    assert server.get("pods", "p", "default") is None
    with pytest.raises(ApiException) as e:
        _evict(core, "p")
    assert e.value.status == 404


def test_a_budget_allowing_no_disruption_answers_429_and_keeps_the_pod(server, apis) -> None:
    core, _ = apis
    _pod(server, "p")
    _pdb(server, allowed=0)
    with pytest.raises(ApiException) as e:
        _evict(core, "p")
    assert e.value.status == 429
    status = json.loads(e.value.body)
    assert status["reason"] == "TooManyRequests" and "disruption budget" in status["message"]
    assert status["details"]["causes"][0]["reason"] == "DisruptionBudget"
    assert "keep needs 1 healthy pods and has 2 currently" in status["details"]["causes"][0]["message"]
    assert server.get("pods", "p", "default") is not None


def test_a_budget_allowing_one_is_decremented_and_records_the_pod(server, apis) -> None:
    core, policy = apis
    _pod(server, "p")
    _pod(server, "q")
    _pdb(server, allowed=1)
    assert _evict(core, "p", dry_run=True).status == 201          # dry run: nothing changes
    assert server.get("pods", "p", "default") is not None
    assert policy.read_namespaced_pod_disruption_budget("keep", "default").status.disruptions_allowed == 1
    assert _evict(core, "p").status == 201
    assert server.get("pods", "p", "default") is None
    pdb = policy.read_namespaced_pod_disruption_budget("keep", "default")
    assert pdb.status.disruptions_allowed == 0 and "p" in pdb.status.disrupted_pods
    with pytest.raises(ApiException) as e:                         # the budget is spent
        _evict(core, "q")
    assert e.value.status == 429


def test_a_budget_the_controller_has_not_seen_yet_answers_429(server, apis) -> None:
    core, _ = apis
    _pod(server, "p")
    _pdb(server, allowed=5, generation_seen=0)
    with pytest.raises(ApiException) as e:
        _evict(core, "p")
    assert e.value.status == 429 and "still being processed" in _body(e.value)


def test_pending_pods_and_unready_pods_with_enough_healthy_ones_ignore_the_budget(server, apis) -> None:
    core, _ = apis
    _pdb(server, allowed=0)
    _pod(server, "pending", phase="Pending")
    _pod(server, "unready", ready=False)
    assert _evict(core, "pending").status == 201 and _evict(core, "unready").status == 201
    assert server.get("pods", "pending", "default") is None and server.get("pods", "unready", "default") is None


def test_bad_evictions_name_the_problem(server, apis) -> None:
    core, _ = apis
    _pod(server, "p")
    with pytest.raises(ApiException) as e:
        _evict(core, "p", body_name="other")
    assert e.value.status == 400 and "name in URL does not match" in _body(e.value)
    _pdb(server, "one", allowed=1)
    _pdb(server, "two", allowed=1)
    with pytest.raises(ApiException) as e:
        _evict(core, "p")
    assert e.value.status == 500 and "more than one PodDisruptionBudget" in _body(e.value)
    assert server.get("pods", "p", "default") is not None
