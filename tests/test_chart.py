"""The Helm chart (charts/partita): lint, render several value sets, validate every object against the
Kubernetes schemas of 1.34-1.37, and check what the objects promise: DeviceClasses equal to the driver's,
least-privilege RBAC, the admission policies' CEL evaluated on sample requests, schema-rejected values.

Helm v4 comes from hack/install-tools.sh (.cache/tools/bin/helm), which hack/test.sh runs; without it the
tests skip, unless PARTITA_REQUIRE_TOOLS=1 (hack/test.sh sets it when it could install tools), then fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import cel
import kubernetes_validate
import pytest
import yaml

from driver.api import constants as C
from driver.api.deviceclasses import device_classes

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "partita"
VERSIONS = ["1.34.0", "1.35.0", "1.36.0", "1.37.0"]
#: objects of CRDs that are not part of Kubernetes: checked structurally below instead
NOT_IN_KUBERNETES = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("cert-manager.io/v1", "Issuer"),
                     ("cert-manager.io/v1", "Certificate")}

VALUE_SETS = {
    "defaults": [],
    "fake-gpus": ["--set", "fakeGpu.enabled=true"],
    "scheduler-mode": ["--set", "allocationMode=scheduler", "--set", "strategy=first-fit"],
    "webhook": ["--set", "webhook.enabled=true"],
    "webhook-cert-manager": ["--set", "webhook.enabled=true", "--set", "webhook.certManager.enabled=true"],
    "service-monitor": ["--set", "serviceMonitor.enabled=true", "--set", "fakeGpu.enabled=true"],
    "other-driver": ["--set", "driverName=gpu.example.com", "--set", "plugin.runtimeClassName=nvidia"],
}


def _helm() -> str:
    for candidate in (REPO / ".cache" / "tools" / "bin" / "helm", shutil.which("helm")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    if os.environ.get("PARTITA_REQUIRE_TOOLS") == "1":
        pytest.fail("helm is missing although PARTITA_REQUIRE_TOOLS=1: run hack/install-tools.sh")
    pytest.skip("helm not installed (hack/install-tools.sh installs it)")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([_helm(), *args], capture_output=True, text=True, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
    return r


@lru_cache(maxsize=None)
def render(name: str) -> tuple[dict, ...]:
    out = helm("template", "partita", str(CHART), "--namespace", "partita-system", "--kube-version", "1.34.0",
               *VALUE_SETS[name]).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def objects(name: str, kind: str) -> list[dict]:
    return [o for o in render(name) if o["kind"] == kind]


def one(name: str, kind: str, component: str | None = None) -> dict:
    found = [o for o in objects(name, kind)
             if component is None or o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component]
    assert len(found) == 1, [o["metadata"]["name"] for o in found]
    return found[0]


def test_lint_passes_for_every_value_set() -> None:
    for args in VALUE_SETS.values():
        r = helm("lint", str(CHART), *args)
        assert "0 chart(s) failed" in r.stdout, r.stdout


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_rendered_object_validates_against_kubernetes(name: str, version: str) -> None:
    for obj in render(name):
        if (obj["apiVersion"], obj["kind"]) in NOT_IN_KUBERNETES:
            continue
        kubernetes_validate.validate(obj, version, strict=True)


def test_crd_objects_are_well_formed() -> None:
    [sm] = objects("service-monitor", "ServiceMonitor")
    services = {s["metadata"]["name"]: s for s in objects("service-monitor", "Service")}
    selected = [s for s in services.values()
                if all(s["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
                and s["metadata"]["labels"].get("app.kubernetes.io/component") in
                sm["spec"]["selector"]["matchExpressions"][0]["values"]]
    assert len(selected) == 2 and all(any(p["name"] == "metrics" for p in s["spec"]["ports"]) for s in selected)
    cert = one("webhook-cert-manager", "Certificate")
    webhook_deploy = one("webhook-cert-manager", "Deployment", "webhook")
    assert webhook_deploy["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"] == cert["spec"]["secretName"]


@pytest.mark.parametrize("driver", [C.DEFAULT_DRIVER_NAME, "gpu.example.com"])
def test_device_classes_are_the_drivers_own(driver: str) -> None:
    name = "defaults" if driver == C.DEFAULT_DRIVER_NAME else "other-driver"
    rendered = sorted(({"apiVersion": o["apiVersion"], "kind": o["kind"], "metadata": {"name": o["metadata"]["name"]},
                        "spec": o["spec"]} for o in objects(name, "DeviceClass")), key=lambda o: o["metadata"]["name"])
    assert rendered == sorted(device_classes(driver), key=lambda o: o["metadata"]["name"])


def test_plugin_daemonset_mounts_and_update_strategy() -> None:
    for name, fake in (("defaults", False), ("fake-gpus", True)):
        ds = one(name, "DaemonSet")
        pod = ds["spec"]["template"]["spec"]
        [c] = pod["containers"]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        hostpaths = {v["name"]: (v.get("hostPath") or {}).get("path") for v in pod["volumes"]}
        for path in ("/var/lib/kubelet/plugins", "/var/lib/kubelet/plugins_registry", "/var/run/cdi"):
            assert hostpaths[mounts[path]] == path       # same path inside and out: the kubelet dials it
        assert ("/dev" in mounts) is not fake
        assert c["securityContext"].get("privileged") is (not fake)
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["NVML_BACKEND"] == ("fake" if fake else "real")
        assert ds["spec"]["updateStrategy"]["rollingUpdate"] == {"maxUnavailable": 1, "maxSurge": 0}
        assert c["livenessProbe"]["grpc"]["service"] == "liveness"
        assert (pod.get("nodeSelector") is None) is fake      # real GPUs: NVIDIA nodes only
    cm = one("fake-gpus", "ConfigMap")
    from driver.nvml.profile import parse_profile
    parse_profile(yaml.safe_load(cm["data"]["profile.yaml"]), "chart")


def test_controller_is_replicated_non_root_read_only_and_probed() -> None:
    d = one("defaults", "Deployment", "controller")
    assert d["spec"]["replicas"] == 2
    pod = d["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" and c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["LEADER_ELECT"] == "true" and env["ALLOCATION_MODE"] == "controller"
    assert {e["name"]: e.get("value") for e in one("scheduler-mode", "Deployment", "controller")["spec"]["template"]
            ["spec"]["containers"][0]["env"]}["ALLOCATION_MODE"] == "scheduler"


def _rules(name: str, role: str) -> list[dict]:
    return next(r for r in objects(name, "ClusterRole") if r["metadata"]["name"].endswith(role))["rules"]


def _allowed(rules: list[dict], group: str, resource: str, verb: str) -> bool:
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)


def test_rbac_is_least_privilege() -> None:
    plugin, controller = _rules("defaults", "-plugin"), _rules("defaults", "-controller")
    assert _allowed(plugin, "resource.k8s.io", "resourceslices", "create")
    assert _allowed(plugin, "resource.k8s.io", "resourceclaims", "get")
    assert not _allowed(plugin, "resource.k8s.io", "resourceclaims", "update")
    assert not _allowed(plugin, "resource.k8s.io", "resourceclaims/status", "update")
    assert _allowed(controller, "resource.k8s.io", "resourceclaims/status", "update")
    assert _allowed(controller, "resource.k8s.io", "resourceclaims/binding", "update")      # 1.36+
    assert not _allowed(controller, "resource.k8s.io", "resourceslices", "create")
    assert not any("*" in r["verbs"] or "*" in r["resources"] for r in plugin + controller)
    [role] = objects("defaults", "Role")
    assert {v for r in role["rules"] for v in r["verbs"]} == {"create", "get", "update"}
    assert all(r["resources"] == ["leases"] for r in role["rules"])


def _validate(policy: dict, request: dict) -> list[str]:
    """Evaluate a ValidatingAdmissionPolicy's variables and validations like the API server would."""
    ctx = dict(request)
    variables = {}
    for v in policy["spec"].get("variables", []):
        variables[v["name"]] = cel.compile(v["expression"]).execute(cel.Context({**ctx, "variables": variables}))
    for cond in policy["spec"].get("matchConditions", []):
        if not cel.compile(cond["expression"]).execute(cel.Context(ctx)):
            return []
    return [v.get("message") or v["messageExpression"] for v in policy["spec"]["validations"]
            if not cel.compile(v["expression"]).execute(cel.Context({**ctx, "variables": variables}))]


def test_plugins_may_write_only_their_own_nodes_slices() -> None:
    [policy] = [p for p in objects("defaults", "ValidatingAdmissionPolicy") if "own-node-slices" in p["metadata"]["name"]]
    [binding] = [b for b in objects("defaults", "ValidatingAdmissionPolicyBinding")
                 if b["spec"]["policyName"] == policy["metadata"]["name"]]
    assert binding["spec"]["validationActions"] == ["Deny"]
    sa = "system:serviceaccount:partita-system:partita-plugin"

    def req(op: str, user_node: str | None, slice_node: str, user: str = sa) -> dict:
        extra = {"authentication.kubernetes.io/node-name": [user_node]} if user_node else {}
        obj = {"spec": {"nodeName": slice_node, "driver": C.DEFAULT_DRIVER_NAME}}
        return {"request": {"operation": op, "userInfo": {"username": user, "extra": extra}},
                "object": None if op == "DELETE" else obj, "oldObject": obj if op != "CREATE" else None}
    assert _validate(policy, req("CREATE", "node-a", "node-a")) == []
    assert _validate(policy, req("DELETE", "node-a", "node-a")) == []
    assert len(_validate(policy, req("CREATE", "node-a", "node-b"))) == 1
    assert len(_validate(policy, req("DELETE", "node-a", "node-b"))) == 1
    assert len(_validate(policy, req("CREATE", None, "node-a"))) == 2          # token without node info
    assert _validate(policy, req("CREATE", None, "node-b", user="system:admin")) == []   # not the plugin


def test_claims_may_not_tolerate_the_managed_taint_in_controller_mode() -> None:
    policies = {p["spec"]["matchConstraints"]["resourceRules"][0]["resources"][0]: p
                for p in objects("defaults", "ValidatingAdmissionPolicy") if "no-managed-toleration" in p["metadata"]["name"]}
    assert set(policies) == {"resourceclaims", "resourceclaimtemplates"}

    def claim(tolerations: list[dict] | None, first_available: bool = False) -> dict:
        req: dict = {"deviceClassName": "gpu.partita.dev"}
        if tolerations is not None:
            req["tolerations"] = tolerations
        request = {"name": "gpu", "firstAvailable": [{"name": "a", **req}]} if first_available else \
            {"name": "gpu", "exactly": req}
        return {"spec": {"devices": {"requests": [request]}}}
    ok = [None, [], [{"key": "example.com/other", "operator": "Exists"}]]
    bad = [[{"key": C.MANAGED_TAINT_KEY, "operator": "Exists"}],
           [{"key": C.MANAGED_TAINT_KEY, "operator": "Equal", "value": "controller", "effect": "NoSchedule"}],
           [{"operator": "Exists"}]]
    for fa in (False, True):
        for t in ok:
            assert _validate(policies["resourceclaims"], {"object": claim(t, fa)}) == [], t
            assert _validate(policies["resourceclaimtemplates"], {"object": {"spec": claim(t, fa)}}) == [], t
        for t in bad:
            assert len(_validate(policies["resourceclaims"], {"object": claim(t, fa)})) == 1, t
            assert len(_validate(policies["resourceclaimtemplates"], {"object": {"spec": claim(t, fa)}})) == 1, t
    # scheduler mode: kube-scheduler allocates, there is no taint to protect
    assert not [p for p in objects("scheduler-mode", "ValidatingAdmissionPolicy") if "toleration" in p["metadata"]["name"]]


def test_webhook_is_wired_to_its_service_and_certificate() -> None:
    hook = one("webhook", "ValidatingWebhookConfiguration")["webhooks"][0]
    svc = next(s for s in objects("webhook", "Service") if s["metadata"]["name"] == hook["clientConfig"]["service"]["name"])
    assert hook["clientConfig"]["caBundle"] and svc["spec"]["ports"][0]["port"] == 443
    assert set(hook["rules"][0]["resources"]) == {"resourceclaims", "resourceclaimtemplates", "deviceclasses"}
    deploy = one("webhook", "Deployment", "webhook")
    assert deploy["spec"]["template"]["spec"]["containers"][0]["command"] == ["partita", "webhook"]
    assert not objects("defaults", "ValidatingWebhookConfiguration")


@pytest.mark.parametrize("args, message", [
    (["--set", "allocationMode=auto"], "/allocationMode"),
    (["--set", "driverName=GPU_Driver"], "/driverName"),
    (["--set", "controller.leaderElection=false"], "/controller/replicas"),
    (["--set", "fakeGpu.enabled=true", "--set", "fakeGpu.profile.nodes[0].gpus[0].model=X100"], "model"),
    (["--set", "plugin.metricsPort=0"], "/plugin/metricsPort"),
    (["--set", "unknownKey=1"], "unknownKey"),
])
def test_bad_values_are_rejected_naming_the_field(args: list[str], message: str) -> None:
    r = helm("template", "partita", str(CHART), *args, check=False)
    assert r.returncode != 0 and message in r.stderr, r.stderr


def test_kubernetes_older_than_1_34_is_refused() -> None:
    r = helm("template", "partita", str(CHART), "--kube-version", "1.33.0", check=False)
    assert r.returncode != 0 and "kubeVersion" in r.stderr
