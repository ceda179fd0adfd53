"""The controller honours health taints like any other (issue 13 item 3): its allocator never hands out a
device whose health taint the request does not tolerate, Partita's own toleration never covers it, and
``partita explain`` names it instead of advising to tolerate a failing GPU."""

from __future__ import annotations

from controller.allocator.explain import Explainer, render
from controller.allocator.search import tolerates
from driver.api import constants as C
from driver.api import naming
from driver.api.deviceclasses import device_classes
from driver.inventory import discover
from driver.nvml import open_backend, profile_from_spec
from driver.slices import HealthTaint, HealthTaints, build_slices

CLASSES = {c["metadata"]["name"]: c for c in device_classes()}


def _inv():
    b = open_backend("fake", profile=profile_from_spec("H100-SXM5-80GB:2", "node-a"), node_name="node-a")
    b.init()
    return discover(b, "node-a")


def _claim(cls: str = C.DEVICE_CLASS_GPU, tolerations: list | None = None) -> dict:
    exactly: dict = {"deviceClassName": cls, "count": 1}
    if tolerations:
        exactly["tolerations"] = tolerations
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim", "metadata": {"name": "c", "namespace": "default"},
            "spec": {"devices": {"requests": [{"name": "gpu", "exactly": exactly}]}}}


def _health(inv, *gpus: int, state: str = "lost", effect: str = "NoExecute") -> HealthTaints:
    return HealthTaints(gpus={inv.gpus[i].uuid: HealthTaint(state, effect, "2026-12-07T15:00:00Z") for i in gpus})


def test_the_managed_toleration_never_covers_a_health_taint() -> None:
    for effect in ("NoSchedule", "NoExecute"):
        assert not tolerates(C.managed_toleration(), C.health_taint("lost", effect, "2026-12-07T15:00:00Z"))


def test_allocation_avoids_the_unhealthy_gpu_and_its_mig_and_shared_devices() -> None:
    inv = _inv()
    healthy = naming.gpu_device_name(inv.gpus[1].uuid)
    slices = build_slices(inv, health=_health(inv, 0))
    for cls, expect in ((C.DEVICE_CLASS_GPU, healthy), (C.DEVICE_CLASS_SHARED, naming.shared_device_name(healthy)),
                        (C.DEVICE_CLASS_MIG, healthy + "-mig-")):
        e = Explainer(slices, CLASSES).explain(_claim(cls))
        assert e.fits and e.devices[0].split("/")[1].startswith(expect), (cls, e.devices)


def test_degraded_noschedule_and_lost_noexecute_both_keep_new_claims_away_and_explain_names_them() -> None:
    inv = _inv()
    h = HealthTaints(gpus={inv.gpus[0].uuid: HealthTaint("degraded", "NoSchedule", "2026-12-07T15:00:00Z"),
                           inv.gpus[1].uuid: HealthTaint("lost", "NoExecute", "2026-12-07T15:00:00Z")})
    e = Explainer(build_slices(inv, health=h), CLASSES).explain(_claim())
    assert not e.fits
    assert e.fix is None                       # never "tolerate the failing GPU"
    text = render(e)
    assert "health taint gpu.partita.dev/unhealthy=degraded:NoSchedule" in text
    assert "health taint gpu.partita.dev/unhealthy=lost:NoExecute" in text
    # a request that tolerates it on purpose (a diagnostics job) gets the device, as upstream's allocator allows
    tol = [{"key": C.HEALTH_TAINT_KEY, "operator": "Exists"}]
    assert Explainer(build_slices(inv, health=h), CLASSES).explain(_claim(tolerations=tol)).fits


def test_recovered_gpu_is_allocatable_again() -> None:
    inv = _inv()
    assert not Explainer(build_slices(inv, health=_health(inv, 0, 1)), CLASSES).explain(_claim()).fits
    assert Explainer(build_slices(inv, health=_health(inv, 1)), CLASSES).explain(_claim()).fits
