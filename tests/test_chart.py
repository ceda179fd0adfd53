"""The Helm chart (charts/partita): lint, render several value sets, validate every object against the
Kubernetes schemas of 1.34-1.37, and check what the objects promise: DeviceClasses equal to the driver's,
least-privilege RBAC, the admission policies' CEL evaluated on sample requests, schema-rejected values,
the conventional knobs platform teams set (names, images, labels, env, strategies, PDB, node selection,
webhook certificates kept across upgrades, the GPU Operator's driver root), refused vendor driver names.

Helm v4 comes from hack/install-tools.sh (.cache/tools/bin/helm), which hack/test.sh runs; without it the
tests skip, unless PARTITA_REQUIRE_TOOLS=1 (hack/test.sh sets it where the tools can be installed), then fail.
Each value set is rendered once (cached) and shared by the tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import base64
import hashlib
import json

import cel
import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml

from driver.api import constants as C
from driver.api.deviceclasses import device_classes
from driver.nvml.models import get_model, known_models
from driver.nvml.profile import ProfileError, parse_profile

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "partita"
VERSIONS = ["1.34.0", "1.35.0", "1.36.0", "1.37.0"]
#: objects of CRDs that are not part of Kubernetes: checked structurally below instead
NOT_IN_KUBERNETES = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("cert-manager.io/v1", "Issuer"),
                     ("cert-manager.io/v1", "Certificate")}

DIGEST = "sha256:" + "0123456789abcdef" * 4
#: one value of each conventional knob (VALUE_SETS["conventions"]; test_conventional_knobs_reach_the_objects)
CONVENTIONS: dict = {
    "image.digest": DIGEST,
    "controller.image": {"repository": "registry.example.com/partita-controller", "tag": "0.2.0", "pullPolicy": "Always"},
    "webhook.image": {"digest": "sha256:" + "f" * 64},
    "imagePullSecrets": [{"name": "regcred"}],
    "podLabels": {"team": "ml-platform"},
    "podAnnotations": {"example.com/owner": "ml", "example.com/scrape": "false"},
    "plugin.podLabels": {"tier": "node"},
    "plugin.podAnnotations": {"example.com/scrape": "true"},
    "serviceAccount.annotations": {"iam.example.com/role": "partita"},
    "plugin.serviceAccount.annotations": {"iam.example.com/role": "partita-plugin"},
    "plugin.extraArgs": ["--log-level=DEBUG"],
    "plugin.env": [{"name": "HTTPS_PROXY", "value": "http://proxy.example.com:3128"},
                   {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
    "controller.extraArgs": ["--log-level=WARNING"],
    "controller.env": [{"name": "TZ", "value": "UTC"}],
    "webhook.env": [{"name": "TZ", "value": "UTC"}],
    "plugin.updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%", "maxSurge": 0}},
    "controller.updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
    "webhook.updateStrategy": {"type": "Recreate"},
    "controller.priorityClassName": "system-cluster-critical",
    "webhook.enabled": True,
    "webhook.priorityClassName": "system-cluster-critical",
    "webhook.nodeSelector": {"kubernetes.io/os": "linux"},
    "webhook.tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}],
    "webhook.affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1, "podAffinityTerm": {
        "topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "webhook"}}}}]}},
    "plugin.driverRoot": "/run/nvidia/driver",
    "plugin.nodeSelector": {"nvidia.com/gpu.present": "true"},
}
GPU_NODE_AFFINITY = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
    {"matchExpressions": [{"key": "nvidia.com/gpu.present", "operator": "In", "values": ["true"]}]},
    {"matchExpressions": [{"key": "feature.node.kubernetes.io/pci-10de.present", "operator": "In", "values": ["true"]}]}]}}}

VALUE_SETS = {
    "defaults": [],
    "fake-gpus": ["--set", "fakeGpu.enabled=true"],
    "scheduler-mode": ["--set", "allocationMode=scheduler", "--set", "strategy=first-fit"],
    # KEP-5004: kube-scheduler serves nvidia.com/gpu limits from the whole-GPU class (docs/migration.md)
    "scheduler-extended": ["--set", "allocationMode=scheduler", "--set", "driverName=gpu.example.com",
                           "--set", "deviceClasses.gpu.extendedResourceName=nvidia.com/gpu"],
    "webhook": ["--set", "webhook.enabled=true"],
    "webhook-cert-manager": ["--set", "webhook.enabled=true", "--set", "webhook.certManager.enabled=true"],
    "service-monitor": ["--set", "serviceMonitor.enabled=true", "--set", "fakeGpu.enabled=true"],
    "other-driver": ["--set", "driverName=gpu.example.com", "--set", "plugin.runtimeClassName=nvidia"],
    # a driver name without the gpu. prefix, and the CDI specs written to /etc/cdi
    "plain-driver": ["--set", "driverName=nvidia.example.org", "--set", "plugin.cdiRoot=/etc/cdi"],
    # the knobs platform teams set (NVIDIA's device plugin / GPU Operator conventions), all at once
    "conventions": [f"--set-json={k}={json.dumps(v)}" for k, v in CONVENTIONS.items()],
    "renamed": ["--set", "nameOverride=gpu-dra", "--set", "fullnameOverride=acme-gpu", "--set", "webhook.enabled=true",
                "--set", "serviceMonitor.enabled=true"],
    # node selection by affinity alone (the GPU Operator's label or NFD's): no NFD nodeSelector on top
    "plugin-affinity": [f"--set-json=plugin.affinity={json.dumps(GPU_NODE_AFFINITY)}"],
    # the opt-in idle policy (docs/monitoring.md section 3) with a class action
    "idle-policy": ["--set", "idlePolicy.enabled=true", "--set", "idlePolicy.classes.shared\\.partita\\.dev=evict"],
    "cluster-issuer": ["--set", "webhook.enabled=true", "--set", "webhook.certManager.enabled=true",
                       "--set", "webhook.certManager.issuerRef.kind=ClusterIssuer",
                       "--set", "webhook.certManager.issuerRef.name=corp-ca"],
}
DRIVER_OF = {"defaults": C.DEFAULT_DRIVER_NAME, "other-driver": "gpu.example.com", "plain-driver": "nvidia.example.org"}


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
        r = helm("lint", "--strict", str(CHART), *args)       # --strict: warnings fail too
        assert "0 chart(s) failed" in r.stdout and "[WARNING]" not in r.stdout, r.stdout


def test_kubernetes_validate_has_schemas_for_every_version() -> None:
    # a missing schema version would make validate() raise, but say so plainly
    bundled = set(kubernetes_validate.utils.all_versions())
    assert set(VERSIONS) <= bundled, f"kubernetes-validate lacks {set(VERSIONS) - bundled}; upgrade it"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_rendered_object_validates_against_kubernetes(name: str, version: str) -> None:
    for obj in render(name):
        if (obj["apiVersion"], obj["kind"]) in NOT_IN_KUBERNETES:
            continue
        # strict: unknown fields fail too; a kind without a schema raises SchemaNotFoundError
        kubernetes_validate.validate(obj, version, strict=True)


#: The part of the ServiceMonitor CRD (prometheus-operator, monitoring.coreos.com/v1) the chart uses, with
#: the CRD's types, required fields and interval pattern; unknown fields fail, to catch typos.
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["endpoints", "selector"],
            "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "additionalProperties": False, "properties": {
                    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "matchExpressions": {"type": "array", "items": {
                        "type": "object", "required": ["key", "operator"], "additionalProperties": False,
                        "properties": {"key": {"type": "string"}, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                                       "values": {"type": "array", "items": {"type": "string"}}}}}}},
                "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                    "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "properties": {
                        "port": {"type": "string"}, "path": {"type": "string"}, "scheme": {"type": "string"},
                        "interval": {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
                                                                     r"(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}}}},
            },
        },
    },
}


@pytest.mark.parametrize("name", sorted(DRIVER_OF))
def test_device_classes_are_the_drivers_own(name: str) -> None:
    rendered = sorted(({"apiVersion": o["apiVersion"], "kind": o["kind"], "metadata": {"name": o["metadata"]["name"]},
                        "spec": o["spec"]} for o in objects(name, "DeviceClass")), key=lambda o: o["metadata"]["name"])
    assert rendered == sorted(device_classes(DRIVER_OF[name]), key=lambda o: o["metadata"]["name"])
    assert not any("extendedResourceName" in o["spec"] for o in rendered)   # controller mode forbids it


def test_scheduler_mode_maps_the_extended_resource_onto_the_whole_gpu_class_only() -> None:
    rendered = sorted(({"apiVersion": o["apiVersion"], "kind": o["kind"], "metadata": {"name": o["metadata"]["name"]},
                        "spec": o["spec"]} for o in objects("scheduler-extended", "DeviceClass")),
                      key=lambda o: o["metadata"]["name"])
    expected = device_classes("gpu.example.com", gpu_extended_resource_name="nvidia.com/gpu")
    assert rendered == sorted(expected, key=lambda o: o["metadata"]["name"])
    assert {o["metadata"]["name"]: o["spec"].get("extendedResourceName") for o in rendered} == {
        "gpu.example.com": "nvidia.com/gpu", "mig.example.com": None, "shared.example.com": None}
    # the default stays without it, in either mode
    assert not any("extendedResourceName" in o["spec"] for o in objects("scheduler-mode", "DeviceClass"))


@pytest.mark.parametrize("name", ["nvidia.com/gpu", "example.com/gpu-80gb", "a.b/c_d.e", "gpu", "kubernetes.io/gpu",
                                  "node.kubernetes.io/gpu", "Nvidia.com/gpu", "nvidia.com/", "nvidia.com/-gpu",
                                  "requests.nvidia.com/gpu", "nvidia.com/g pu", "nvidia.com/" + "g" * 64])
def test_chart_and_driver_agree_on_extended_resource_names(name: str) -> None:
    r = helm("template", "partita", str(CHART), "--set", "allocationMode=scheduler",
             "--set", f"deviceClasses.gpu.extendedResourceName={name}", check=False)
    try:
        device_classes(gpu_extended_resource_name=name)
        driver_ok = True
    except ValueError as e:
        assert "DeviceClass gpu.partita.dev spec.extendedResourceName" in str(e)
        driver_ok = False
    assert (r.returncode == 0) == driver_ok, r.stderr
    if not driver_ok:
        assert "extendedResourceName" in r.stderr, r.stderr


def test_plugin_daemonset_mounts_and_update_strategy() -> None:
    for name, fake in (("defaults", False), ("fake-gpus", True), ("plain-driver", False)):
        ds = one(name, "DaemonSet")
        pod = ds["spec"]["template"]["spec"]
        [c] = pod["containers"]
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert len(mounts) == len(c["volumeMounts"]), "two volumes mounted at one path"
        hostpaths = {v["name"]: (v.get("hostPath") or {}).get("path") for v in pod["volumes"]}
        cdi_root = "/etc/cdi" if name == "plain-driver" else "/var/run/cdi"
        plugin_dir = f"/var/lib/kubelet/plugins/{DRIVER_OF.get(name, C.DEFAULT_DRIVER_NAME)}"
        for path in (plugin_dir, "/var/lib/kubelet/plugins_registry", cdi_root):
            assert hostpaths[mounts[path]["name"]] == path       # same path inside and out: the kubelet dials it
            assert not mounts[path].get("readOnly")
        # only its own plugin directory: never the kubelet's whole plugins dir (other drivers' sockets)
        assert "/var/lib/kubelet/plugins" not in mounts and "/var/lib/kubelet/plugins" not in hostpaths.values()
        assert not [p for p in hostpaths.values() if p and p.startswith("/var/lib/kubelet")
                    and p not in (plugin_dir, "/var/lib/kubelet/plugins_registry")], hostpaths
        assert ("/dev" in mounts) is not fake
        # real GPUs: the toolkit's CDI spec in /etc/cdi is readable, unless /etc/cdi is the plugin's own root
        if not fake and cdi_root != "/etc/cdi":
            assert mounts["/etc/cdi"]["readOnly"] is True and hostpaths[mounts["/etc/cdi"]["name"]] == "/etc/cdi"
        elif fake:
            assert "/etc/cdi" not in mounts
        assert c["securityContext"].get("privileged") is (not fake)
        assert c["securityContext"]["runAsUser"] == 0
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["NVML_BACKEND"] == ("fake" if fake else "real")
        assert env["CDI_ROOT"] == cdi_root and env["DRIVER_NAME"] == DRIVER_OF.get(name, C.DEFAULT_DRIVER_NAME)
        assert c["env"][0] == {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}
        # metrics on the pod's own IP by default, not 0.0.0.0
        [addr] = [e for e in c["env"] if e["name"] == "METRICS_ADDRESS"]
        assert addr == {"name": "METRICS_ADDRESS", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
        assert {e["name"]: e.get("value") for e in c["env"]}["KUBELET_PLUGINS_DIRECTORY_PATH"] == \
            "/var/lib/kubelet/plugins"      # the plugin derives <this>/<driver>, the directory mounted
        # unique socket names (Kubernetes 1.34 here): the new pod starts next to the old one, none goes first
        assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate",
                                                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
        assert env["ROLLING_UPDATE"] == "auto"
        assert next(e for e in c["env"] if e["name"] == "POD_UID") == \
            {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}}
        # two pods on a node: no host network, no host ports (each pod's health and metrics ports are its own)
        assert not pod.get("hostNetwork") and not any("hostPort" in port for port in c["ports"])
        for probe in ("startupProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": 51515, "service": "liveness"}
        assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 300
        assert (pod.get("nodeSelector") is None) is fake      # real GPUs: NVIDIA nodes only
    assert {e["name"]: e.get("value") for e in one("fake-gpus", "DaemonSet")["spec"]["template"]["spec"]
            ["containers"][0]["env"]}["FAKE_GPU_PROFILE"] == "/etc/partita/fake-gpus/profile.yaml"
    cm = one("fake-gpus", "ConfigMap")
    parse_profile(yaml.safe_load(cm["data"]["profile.yaml"]), "chart")


@pytest.mark.parametrize("address", ["127.0.0.1", "0.0.0.0", "::", "10.1.2.3"])
def test_plugin_metrics_address_is_a_value(address: str) -> None:
    out = helm("template", "partita", str(CHART), "--set", f"plugin.metricsAddress={address}").stdout
    [ds] = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "DaemonSet"]
    env = ds["spec"]["template"]["spec"]["containers"][0]["env"]
    assert [e for e in env if e["name"] == "METRICS_ADDRESS"] == [{"name": "METRICS_ADDRESS", "value": address}]


def test_plugin_serves_metrics_on_the_address_it_is_given(monkeypatch) -> None:
    """The plugin's own default is loopback; the chart's env (METRICS_ADDRESS) overrides it."""
    import argparse

    from driver.plugin.main import add_arguments

    def parse(*argv: str) -> argparse.Namespace:
        p = argparse.ArgumentParser()
        add_arguments(p)
        return p.parse_args(list(argv))
    monkeypatch.delenv("METRICS_ADDRESS", raising=False)
    assert parse().metrics_address == "127.0.0.1"
    assert parse("--metrics-address", "0.0.0.0").metrics_address == "0.0.0.0"
    monkeypatch.setenv("METRICS_ADDRESS", "10.1.2.3")
    assert parse().metrics_address == "10.1.2.3"


def test_plugin_env_names_are_flags_of_partita_plugin() -> None:
    """Every variable the chart sets is one the plugin reads (driver/plugin/main.py), so a renamed flag
    cannot leave the chart setting a variable nobody reads."""
    import argparse

    from driver.plugin.main import add_arguments
    # the plugin's flags: main.py, and the modules whose flags it adds (telemetry, log format)
    source = "".join((REPO / "driver" / f).read_text() for f in ("plugin/main.py", "plugin/telemetry.py", "logfmt.py"))
    for name in ("defaults", "fake-gpus", "conventions"):      # conventions: NVIDIA_DRIVER_ROOT too
        env = {e["name"] for e in one(name, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["env"]}
        env -= {"NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES"}      # for the NVIDIA runtime
        env -= {e["name"] for e in CONVENTIONS["plugin.env"]}               # the user's own
        missing = {e for e in env if f'"{e}"' not in source}
        assert not missing, f"the chart sets {missing}, which partita plugin does not read"
    add_arguments(argparse.ArgumentParser())     # the module still defines them
    controller_source = (REPO / "controller" / "operator" / "main.py").read_text() + (REPO / "driver" / "logfmt.py").read_text()
    env = {e["name"] for e in one("defaults", "Deployment", "controller")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert not {e for e in env if f'"{e}"' not in controller_source}


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


def _grants(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {(g, res, v) for r in rules for g in r["apiGroups"] for res in r["resources"] for v in r["verbs"]}


def _expand(group: str, resources: str, verbs: str) -> set[tuple[str, str, str]]:
    return {(group, r, v) for r in resources.split() for v in verbs.split()}


def test_rbac_is_least_privilege() -> None:
    """Exactly the API calls the code makes (see the comments in the RBAC templates): a new call needs a
    deliberate change here and in the chart."""
    assert _grants(_rules("defaults", "-plugin")) == (
        _expand("resource.k8s.io", "resourceslices", "get list watch create update delete")
        | _expand("resource.k8s.io", "resourceclaims", "get")
        | _expand("resource.k8s.io", "resourceclaims/status", "update")         # status.devices (KEP-4817)
        | {("resource.k8s.io", "resourceclaims/driver", "associated-node:update")}    # the same, 1.36+
        | _expand("", "events", "create")                                       # idle claims, on their pods
        | _expand("", "nodes", "get"))
    [driver_rule] = [r for r in _rules("defaults", "-plugin") if r["resources"] == ["resourceclaims/driver"]]
    assert driver_rule["resourceNames"] == ["gpu.partita.dev"]          # its own driver's entries only
    assert _grants(_rules("defaults", "-controller")) == (
        _expand("", "pods nodes", "get list watch")
        | _expand("", "namespaces", "list watch")                                              # nodefit
        | _expand("resource.k8s.io", "resourceclaims", "get list watch update")
        | _expand("resource.k8s.io", "resourceclaims/status resourceclaims/binding", "update")   # binding: 1.36+
        | _expand("resource.k8s.io", "resourceslices deviceclasses", "get list watch")
        | _expand("resource.k8s.io", "devicetaintrules", "list watch")                         # DeviceTaintRules
        | _expand("scheduling.k8s.io", "workloads", "get")                                     # gangs
        | _expand("", "events", "create"))
    # the idle policy, only when enabled: its annotation (merge patch) and evictions (policy/v1 Eviction)
    assert _grants(_rules("idle-policy", "-controller")) - _grants(_rules("defaults", "-controller")) == (
        _expand("", "pods", "patch") | _expand("", "pods/eviction", "create"))
    env = {e["name"]: e.get("value") for e in one("idle-policy", "Deployment", "controller")["spec"]["template"]["spec"]
           ["containers"][0]["env"]}
    assert env["IDLE_POLICY"] == "on" and env["IDLE_POLICY_CLASSES"] == "shared.partita.dev=evict"
    assert {e["name"]: e.get("value") for e in one("defaults", "Deployment", "controller")["spec"]["template"]
            ["spec"]["containers"][0]["env"]}["IDLE_POLICY"] == "off"
    [role] = objects("defaults", "Role")
    assert role["metadata"]["namespace"] == "partita-system"
    assert _grants(role["rules"]) == _expand("coordination.k8s.io", "leases", "create get update")
    named = [r for r in role["rules"] if "get" in r["verbs"]]
    assert named and all(r["resourceNames"] == ["partita-controller"] for r in named)   # only its own Lease
    lease = {e["name"]: e.get("value") for e in one("defaults", "Deployment", "controller")["spec"]["template"]["spec"]
             ["containers"][0]["env"]}["LEADER_ELECTION_ID"]
    assert lease == "partita-controller"
    bindings = {b["roleRef"]["name"]: b["subjects"] for b in objects("defaults", "ClusterRoleBinding")}
    assert bindings["partita-plugin"] == [{"kind": "ServiceAccount", "name": "partita-plugin", "namespace": "partita-system"}]
    assert bindings["partita-controller"][0]["name"] == "partita-controller"
    assert one("defaults", "DaemonSet")["spec"]["template"]["spec"]["serviceAccountName"] == "partita-plugin"


def _validate(policy: dict, request: dict) -> list[str]:
    """Evaluate a ValidatingAdmissionPolicy's variables and validations like the API server would: the
    messages of the failed validations (a messageExpression evaluated, so an error in it fails the test)."""
    ctx = {"object": None, "oldObject": None, **request}
    for cond in policy["spec"].get("matchConditions", []):
        if not cel.compile(cond["expression"]).execute(cel.Context(ctx)):
            return []
    variables: dict = {}
    for v in policy["spec"].get("variables", []):
        variables[v["name"]] = cel.compile(v["expression"]).execute(cel.Context({**ctx, "variables": variables}))
    env = cel.Context({**ctx, "variables": variables})
    out = []
    for v in policy["spec"]["validations"]:
        allowed = cel.compile(v["expression"]).execute(env)
        assert isinstance(allowed, bool), (v["expression"], allowed)
        if not allowed:
            out.append(cel.compile(v["messageExpression"]).execute(env) if "messageExpression" in v else v["message"])
    return out


#: the ResourceSlice versions a plugin can write (the fields the policy reads have these names in all)
SLICE_VERSIONS = ["resource.k8s.io/v1", "resource.k8s.io/v1beta2", "resource.k8s.io/v1beta1"]


def _slice_policy(name: str = "defaults") -> dict:
    [policy] = [p for p in objects(name, "ValidatingAdmissionPolicy") if "own-node-slices" in p["metadata"]["name"]]
    return policy


def _slice_request(op: str, user_node: str | None, new: dict | None, old: dict | None,
                   user: str = "system:serviceaccount:partita-system:partita-plugin") -> dict:
    extra = {"authentication.kubernetes.io/node-name": [user_node]} if user_node else {}
    return {"request": {"operation": op, "userInfo": {"username": user, "extra": extra}}, "object": new,
            "oldObject": old}


def _slice(node: str | None = "node-a", pool: str | None = None, driver: str = C.DEFAULT_DRIVER_NAME,
           version: str = "resource.k8s.io/v1", **spec: object) -> dict:
    body: dict = {"driver": driver, "pool": {"name": pool or node or "", "generation": 1, "resourceSliceCount": 1},
                  **spec}
    if node is not None:
        body["nodeName"] = node
    if pool == "":
        del body["pool"]
    return {"apiVersion": version, "kind": "ResourceSlice", "metadata": {"name": f"{node}-gpu-x"}, "spec": body}


def test_plugins_may_write_only_their_own_nodes_slices() -> None:
    policy = _slice_policy()
    [binding] = [b for b in objects("defaults", "ValidatingAdmissionPolicyBinding")
                 if b["spec"]["policyName"] == policy["metadata"]["name"]]
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert policy["spec"]["failurePolicy"] == "Fail"
    rule = policy["spec"]["matchConstraints"]["resourceRules"][0]
    assert rule["apiVersions"] == ["*"] and set(rule["operations"]) == {"CREATE", "UPDATE", "DELETE"}

    def check(op: str, user_node: str | None, new: dict | None, old: dict | None, **kw: str) -> list[str]:
        return _validate(policy, _slice_request(op, user_node, new, old, **kw))

    for v in SLICE_VERSIONS:
        mine, theirs = _slice("node-a", version=v), _slice("node-b", version=v)
        assert check("CREATE", "node-a", mine, None) == []
        assert check("UPDATE", "node-a", mine, mine) == []
        assert check("DELETE", "node-a", None, mine) == []
        assert check("CREATE", "node-a", theirs, None) == [
            "the Partita plugin on node node-a may not write ResourceSlices of node 'node-b' (spec.nodeName, old and "
            "new, must be its own node)",
            "the Partita plugin on node node-a may not write ResourceSlices of pool 'node-b' (spec.pool.name, old and "
            "new, must be its node's name)"]
        assert len(check("DELETE", "node-a", None, theirs)) == 2
        assert len(check("UPDATE", "node-a", theirs, theirs)) == 2
        # the bypasses: moving another node's slice here (only the new object names this node) ...
        moved = check("UPDATE", "node-a", mine, theirs)
        assert len(moved) == 2 and "node 'node-b'" in moved[0] and "pool 'node-b'" in moved[1], moved
        assert len(check("UPDATE", "node-a", theirs, mine)) == 2          # ... or moving this node's away
        # ... a slice of another node's pool published with this node's name ...
        assert check("CREATE", "node-a", _slice("node-a", pool="node-b", version=v), None) == [
            "the Partita plugin on node node-a may not write ResourceSlices of pool 'node-b' (spec.pool.name, old and "
            "new, must be its node's name)"]
        assert len(check("UPDATE", "node-a", _slice("node-a", pool="node-b", version=v), mine)) == 1
        # ... a slice of another driver
        assert check("CREATE", "node-a", _slice("node-a", driver="gpu.example.com", version=v), None) == [
            "the Partita plugin may not write ResourceSlices of driver 'gpu.example.com' (spec.driver, old and new, "
            f"must be {C.DEFAULT_DRIVER_NAME})"]
        assert len(check("UPDATE", "node-a", mine, _slice("node-a", driver="gpu.example.com", version=v))) == 1
        assert len(check("DELETE", "node-a", None, _slice("node-a", driver="gpu.example.com", version=v))) == 1
        # slices that select nodes some other way, or lack a pool: not the plugin's own node's
        assert len(check("CREATE", "node-a", _slice(None, pool="node-a", allNodes=True, version=v), None)) == 1
        assert len(check("CREATE", "node-a", _slice("node-a", pool="", version=v), None)) == 1
        assert len(check("CREATE", "node-a", {"apiVersion": v, "kind": "ResourceSlice", "metadata": {}}, None)) == 3
    assert len(check("CREATE", None, _slice("node-a"), None)) == 3           # token without node info
    assert check("CREATE", None, _slice("node-b"), None, user="system:admin") == []   # not the plugin
    assert check("UPDATE", None, _slice("node-b"), _slice("node-c"), user="system:admin") == []
    # another release's driver name is the one its policy requires
    other = _slice_policy("other-driver")
    req = _slice_request("CREATE", "node-a", _slice("node-a", driver="gpu.example.com"), None)
    assert _validate(other, req) == []
    assert len(_validate(other, _slice_request("CREATE", "node-a", _slice("node-a"), None))) == 1


def test_claims_may_not_tolerate_the_managed_taint_in_controller_mode() -> None:
    policies = {p["spec"]["matchConstraints"]["resourceRules"][0]["resources"][0]: p
                for p in objects("defaults", "ValidatingAdmissionPolicy") if "no-managed-toleration" in p["metadata"]["name"]}
    assert set(policies) == {"resourceclaims", "resourceclaimtemplates"}

    for p in policies.values():
        rule = p["spec"]["matchConstraints"]["resourceRules"][0]
        assert rule["apiVersions"] == ["*"] and p["spec"]["failurePolicy"] == "Fail"   # every served version

    def claim(tolerations: list[dict] | None, shape: str = "exactly", version: str = "v1") -> dict:
        """A claim spec in ``version``'s shape: v1 and v1beta2 wrap a request in exactly or firstAvailable;
        v1beta1 has the exact request's fields on the request itself (shape "exactly" = that)."""
        req: dict = {"deviceClassName": "gpu.partita.dev"}
        if tolerations is not None:
            req["tolerations"] = tolerations
        if shape == "firstAvailable":
            # a harmless first alternative, the toleration in a later one
            request = {"name": "gpu", "firstAvailable": [{"name": "a", "deviceClassName": "gpu.partita.dev"},
                                                         {"name": "b", **req}]}
        elif version == "v1beta1":
            request = {"name": "gpu", **req, "allocationMode": "ExactCount", "count": 1}
        else:
            request = {"name": "gpu", "exactly": req}
        # the toleration in a later request than the first
        return {"apiVersion": f"resource.k8s.io/{version}", "kind": "ResourceClaim",
                "spec": {"devices": {"requests": [{"name": "other", **({"exactly": {"deviceClassName": "x"}}
                                                                        if version != "v1beta1" else
                                                                        {"deviceClassName": "x"})}, request]}}}

    def denied(c: dict) -> tuple[int, int]:
        return (len(_validate(policies["resourceclaims"], {"object": c})),
                len(_validate(policies["resourceclaimtemplates"], {"object": {"spec": c}})))
    key, value, effect = C.MANAGED_TAINT_KEY, C.MANAGED_TAINT_VALUE, C.MANAGED_TAINT_EFFECT
    ok = [None, [], [{"key": "example.com/other", "operator": "Exists"}],
          [{"operator": "Exists", "effect": "NoExecute"}],              # tolerates only NoExecute taints
          [{"key": key, "operator": "Exists", "effect": "NoExecute"}],
          [{"key": key, "operator": "Equal", "value": "other"}],        # another value
          [{"key": key, "value": "other"}]]
    bad = [[C.managed_toleration()],
           [{"key": key, "operator": "Exists"}],
           [{"key": key, "operator": "Equal", "value": value, "effect": effect}],
           [{"key": key, "value": value}],                              # operator defaults to Equal
           [{"operator": "Exists"}], [{"key": "", "operator": "Exists", "effect": effect}],
           [{"key": "example.com/other", "operator": "Exists"}, {"operator": "Exists"}]]
    for version in ("v1", "v1beta2", "v1beta1"):
        for shape in ("exactly", "firstAvailable"):
            for t in ok:
                assert denied(claim(t, shape, version)) == (0, 0), (version, shape, t)
            for t in bad:
                assert denied(claim(t, shape, version)) == (1, 1), (version, shape, t)
    # the v1beta1 bypass as found: tolerations directly on the request, no exactly/firstAvailable
    beta = {"spec": {"devices": {"requests": [{"name": "gpu", "deviceClassName": "gpu.partita.dev",
                                               "tolerations": [{"key": key, "operator": "Exists"}]}]}}}
    assert denied(beta) == (1, 1)
    # claims without devices or requests are valid API objects: no CEL error (failurePolicy Fail would deny them)
    for empty in ({"spec": {}}, {"spec": {"devices": {}}}, {"spec": {"devices": {"requests": []}}}):
        assert denied(empty) == (0, 0), empty
    assert _validate(policies["resourceclaimtemplates"], {"object": {"spec": {}}}) == []
    # scheduler mode: kube-scheduler allocates, there is no taint to protect
    assert not [p for p in objects("scheduler-mode", "ValidatingAdmissionPolicy") if "toleration" in p["metadata"]["name"]]


def test_webhook_is_wired_to_its_service_and_certificate() -> None:
    hook = one("webhook", "ValidatingWebhookConfiguration")["webhooks"][0]
    svc = next(s for s in objects("webhook", "Service") if s["metadata"]["name"] == hook["clientConfig"]["service"]["name"])
    assert hook["clientConfig"]["caBundle"] and svc["spec"]["ports"][0]["port"] == 443
    assert set(hook["rules"][0]["resources"]) == {"resourceclaims", "resourceclaimtemplates", "deviceclasses"}
    deploy = one("webhook", "Deployment", "webhook")
    pod = deploy["spec"]["template"]
    assert pod["spec"]["containers"][0]["command"] == ["partita", "webhook"]
    # a new certificate restarts the pods, which load it at start (a kept one does not: see the lookup test)
    secret = one("webhook", "Secret")
    assert pod["metadata"]["annotations"]["checksum/tls"] == \
        hashlib.sha256(base64.b64decode(secret["data"]["tls.crt"])).hexdigest()
    assert secret["data"]["ca.crt"] == hook["clientConfig"]["caBundle"]     # kept with the cert for upgrades
    assert pod["spec"]["volumes"][0]["secret"]["secretName"] == secret["metadata"]["name"]
    assert not objects("defaults", "ValidatingWebhookConfiguration")
    assert "annotations" not in one("webhook-cert-manager", "Deployment", "webhook")["spec"]["template"]["metadata"]


@pytest.mark.parametrize("args, message", [
    (["--set", "allocationMode=auto"], "/allocationMode"),
    (["--set", "strategy=best-fit"], "/strategy"),
    (["--set", "driverName=GPU_Driver"], "/driverName"),
    (["--set", "controller.leaderElection=false"], "/controller/replicas"),
    (["--set", "fakeGpu.enabled=true", "--set", "fakeGpu.profile.nodes[0].gpus[0].model=X100"], "model"),
    (["--set", "fakeGpu.enabled=true", "--set", "fakeGpu.profile.nodes[0].name=*",
      "--set", "fakeGpu.profile.nodes[0].gpus[0].model=L4", "--set", "fakeGpu.profile.nodes[0].gpus[0].count=0"],
     "/fakeGpu/profile/nodes/0/gpus/0/count"),
    (["--set", "fakeGpu.enabled=true", "--set", "fakeGpu.profile.nodes[0].name=*",
      "--set", "fakeGpu.profile.nodes[0].gpus[0].model=L4", "--set", "fakeGpu.profile.nodes[0].gpus[0].migEnabled=true"],
     "/fakeGpu/profile/nodes/0/gpus/0/migEnabled"),
    (["--set", "fakeGpu.enabled=true", "--set", "fakeGpu.profile.nodes[0].name=a",
      "--set", "fakeGpu.profile.nodes[0].gpus[0].model=L4", "--set", "fakeGpu.profile.nodes[1].name=a",
      "--set", "fakeGpu.profile.nodes[1].gpus[0].model=T4"],
     "node \"a\" is listed twice"),
    (["--set", "fakeGpu.enabled=true", "--set", "fakeGpu.profile.nodes[0].name=*",
      "--set", "fakeGpu.profile.nodes[0].gpus[0].model=L4", "--set", "fakeGpu.profile.nodes[0].gpus[0].count=2",
      "--set", "fakeGpu.profile.nodes[0].gpus[0].unhealthy[0]=2"],
     "fakeGpu.profile.nodes[0].gpus[0].unhealthy: index 2 is outside 0..1"),
    (["--set", "plugin.metricsPort=0"], "/plugin/metricsPort"),
    (["--set", "plugin.metricsAddress=all interfaces"], "/plugin/metricsAddress"),
    (["--set", "plugin.cdiRoot=var/run/cdi"], "/plugin/cdiRoot"),
    (["--set", "image.pullPolicy=Sometimes"], "/image/pullPolicy"),
    (["--set", "unknownKey=1"], "unknownKey"),
    # the conventional knobs' schema entries
    (["--set", "image.digest=latest"], "/image/digest"),
    (["--set", "plugin.image.digest=sha256:xyz"], "/plugin/image/digest"),
    (["--set", "controller.image.pullPolicy=Sometimes"], "/controller/image/pullPolicy"),
    (["--set", "plugin.updateStrategy.rollingUpdate.maxSurge=-1"], "/plugin/updateStrategy/rollingUpdate/maxSurge"),
    (["--set", "plugin.updateStrategy.rollingUpdate.maxSurge=one"], "/plugin/updateStrategy/rollingUpdate/maxSurge"),
    (["--set", "plugin.uniqueSockets=yes"], "/plugin/uniqueSockets"),
    # a second pod on a node needs unique socket names; a rollout needs to be able to replace a pod
    (["--set", "plugin.uniqueSockets=false", "--set", "plugin.updateStrategy.rollingUpdate.maxSurge=1"],
     "plugin.updateStrategy.rollingUpdate.maxSurge 1: a second plugin pod on a node needs unique socket names"),
    (["--set", "plugin.updateStrategy.rollingUpdate.maxSurge=0"],
     "maxUnavailable and maxSurge cannot both be 0"),
    (["--set", "plugin.updateStrategy.type=Recreate"], "/plugin/updateStrategy/type"),
    (["--set", "controller.updateStrategy.type=OnDelete"], "/controller/updateStrategy/type"),
    (["--set", "plugin.extraArgs[0]=debug"], "/plugin/extraArgs/0"),
    (["--set-json", 'plugin.env=[{"value": "x"}]'], "/plugin/env/0"),
    (["--set-json", 'plugin.env=[{"name": "A B", "value": "x"}]'], "/plugin/env/0/name"),
    (["--set", "plugin.driverRoot=run/nvidia/driver"], "/plugin/driverRoot"),
    (["--set", "podLabels.team=ml platform"], "/podLabels/team"),
    (["--set-json", 'podAnnotations={"a b": "x"}'], 'podAnnotations: "a b" is not a valid key'),
    (["--set-json", 'plugin.serviceAccount.annotations={"Bad_Prefix/x": "y"}'],
     'plugin.serviceAccount.annotations: "Bad_Prefix/x" is not a valid key'),
    (["--set", "controller.podDisruptionBudget.maxUnavailable=0"], "/controller/podDisruptionBudget/maxUnavailable"),
    (["--set", "webhook.certManager.issuerRef.kind=Vault"], "/webhook/certManager/issuerRef/kind"),
    (["--set", "webhook.tls.cert=not a pem"], "/webhook/tls/cert"),
    (["--set", "fullnameOverride=Partita_GPU"], "/fullnameOverride"),
    (["--set", "serviceAccount.name=x"], "/serviceAccount"),
    # what only the templates can check, with the value named and the fix
    (["--set", "plugin.podLabels.app\\.kubernetes\\.io/component=gpu"],
     'podLabels: "app.kubernetes.io/component" is the label the kubelet-plugin\'s pods are selected by'),
    (["--set-json", 'controller.env=[{"name": "DRIVER_NAME", "value": "x"}]'],
     "controller.env[0]: DRIVER_NAME is set by the chart"),
    (["--set-json", 'plugin.env=[{"name": "X", "value": "1"}, {"name": "NVML_BACKEND", "value": "fake"}]'],
     "plugin.env[1]: NVML_BACKEND is set by the chart"),
    (["--set", "webhook.enabled=true", "--set", "webhook.tls.cert=-----BEGIN CERTIFICATE-----"],
     "webhook.tls: cert, key and caCert go together"),
    (["--set", "webhook.enabled=true", "--set", "webhook.certManager.enabled=true",
      "--set", "webhook.certManager.issuerRef.kind=ClusterIssuer"], "ClusterIssuer needs issuerRef.name"),
    (["--set", "deviceClasses.gpu.extendedResourceName=nvidia.com/gpu"],
     'deviceClasses.gpu.extendedResourceName "nvidia.com/gpu" needs allocationMode=scheduler'),
    (["--set", "deviceClasses.cpu.extendedResourceName=nvidia.com/gpu"], "/deviceClasses"),
    (["--set", "webhook.certManager.issuer=a", "--set", "webhook.certManager.issuerRef.name=b"],
     'webhook.certManager.issuer "a" and webhook.certManager.issuerRef.name "b" disagree'),
])
def test_bad_values_are_rejected_naming_the_field(args: list[str], message: str) -> None:
    r = helm("template", "partita", str(CHART), *args, check=False)
    assert r.returncode != 0 and message in r.stderr, r.stderr


def _profile_schema() -> dict:
    schema = json.loads((CHART / "values.schema.json").read_text())
    return {"$schema": schema["$schema"], **schema["properties"]["fakeGpu"]["properties"]["profile"]}


def test_values_schema_knows_the_drivers_gpu_models() -> None:
    gpu = _profile_schema()["properties"]["nodes"]["items"]["properties"]["gpus"]["items"]
    assert gpu["properties"]["model"]["enum"] == list(known_models())
    assert set(gpu["if"]["properties"]["model"]["enum"]) == {m for m in known_models() if not get_model(m).mig_capable}


@pytest.mark.parametrize("nodes", [
    [{"name": "*", "gpus": [{"model": "H100-SXM5-80GB", "count": 8}]}],
    [{"name": "a", "gpus": [{"model": "A100-SXM4-80GB", "migEnabled": True}]}, {"name": "*"}],
    [{"name": "*", "gpus": [{"model": "L4", "count": 2, "unhealthy": [1]}, {"model": "T4"}]}],
    [{"name": "*", "gpus": [{"model": "L4", "load": {"smUtil": 30, "memoryUsedMiB": 1024}}]}],
    [{"name": "*", "gpus": [{"model": "L4", "load": {"smUtil": 101}}]}],
    [{"name": "*", "gpus": [{"model": "L4", "load": {"busy": True}}]}],
    [{"name": "*", "gpus": []}], [], [{"gpus": []}], [{"name": ""}], [{"name": "*", "cpus": 4}],
    [{"name": "*", "gpus": [{"model": "L4", "count": 0}]}], [{"name": "*", "gpus": [{"model": "L4", "count": 65}]}],
    [{"name": "*", "gpus": [{"model": "T4", "migEnabled": True}]}],
    [{"name": "*", "gpus": [{"model": "H100-SXM5-80GB", "mig": True}]}],
    [{"name": "*", "gpus": [{"count": 1}]}], [{"name": "*", "gpus": [{"model": "H100"}]}],
])
def test_values_schema_and_the_plugin_agree_on_fake_profiles(nodes: list[dict]) -> None:
    """values.schema.json accepts a fake-GPU profile exactly when the plugin's parser does (apart from
    what only the template checks: duplicate node names, unhealthy indexes), so a value that passes
    helm never crash-loops the plugin."""
    profile = {"apiVersion": "gpu.partita.dev/v1alpha1", "kind": "FakeGpuProfile", "nodes": nodes}
    schema_ok = jsonschema.Draft7Validator(_profile_schema()).is_valid(profile)
    try:
        parse_profile(profile, "test")
        plugin_ok = True
    except ProfileError:
        plugin_ok = False
    assert schema_ok == plugin_ok
    # the chart's default profile and the sandbox's cluster are valid too
    assert jsonschema.Draft7Validator(_profile_schema()).is_valid(
        yaml.safe_load((CHART / "values.yaml").read_text())["fakeGpu"]["profile"])


def test_kubernetes_older_than_1_34_is_refused() -> None:
    r = helm("template", "partita", str(CHART), "--kube-version", "1.33.0", check=False)
    assert r.returncode != 0 and "kubeVersion" in r.stderr


# ------------------------------------------------------------------ the conventional knobs (Day-2 operations)

def _pods(name: str) -> dict[str, dict]:
    """component -> pod template of each workload in the render."""
    return {o["metadata"]["labels"]["app.kubernetes.io/component"]: o["spec"]["template"]
            for o in render(name) if o["kind"] in ("Deployment", "DaemonSet")}


def _container(pod: dict) -> dict:
    [c] = pod["spec"]["containers"]
    return c


def test_conventional_knobs_reach_the_objects() -> None:
    pods = _pods("conventions")
    assert set(pods) == {"kubelet-plugin", "controller", "webhook"}
    plugin, controller, webhook = pods["kubelet-plugin"], pods["controller"], pods["webhook"]
    # images: the global digest pins the global repository; a component's own repository or digest wins
    assert _container(plugin)["image"] == f"ghcr.io/partita-dev/partita@{DIGEST}"
    assert _container(controller)["image"] == "registry.example.com/partita-controller:0.2.0"
    assert _container(controller)["imagePullPolicy"] == "Always"
    assert _container(plugin)["imagePullPolicy"] == "IfNotPresent"
    assert _container(webhook)["image"] == "ghcr.io/partita-dev/partita@sha256:" + "f" * 64
    for pod in pods.values():
        assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
        assert pod["metadata"]["labels"]["team"] == "ml-platform"
        assert pod["metadata"]["annotations"]["example.com/owner"] == "ml"
    # the component's labels and annotations add to and override the global ones
    assert plugin["metadata"]["labels"]["tier"] == "node" and "tier" not in controller["metadata"]["labels"]
    assert plugin["metadata"]["annotations"]["example.com/scrape"] == "true"
    assert controller["metadata"]["annotations"]["example.com/scrape"] == "false"
    # the webhook's own annotation (the certificate's checksum) is kept next to the user's
    assert "checksum/tls" in webhook["metadata"]["annotations"]
    # extra flags after the command; extra env after the chart's own, which are all still there
    assert _container(plugin)["command"] == ["partita", "plugin"] and _container(plugin)["args"] == ["--log-level=DEBUG"]
    assert _container(controller)["args"] == ["--log-level=WARNING"]
    assert "args" not in _container(webhook)
    env = _container(plugin)["env"]
    assert env[-2:] == CONVENTIONS["plugin.env"]
    defaults_env = _container(_pods("defaults")["kubelet-plugin"])["env"]
    assert {e["name"] for e in defaults_env} | {"NVIDIA_DRIVER_ROOT", "HTTPS_PROXY", "POD_NAMESPACE"} == {e["name"] for e in env}
    assert _container(controller)["env"][-1] == {"name": "TZ", "value": "UTC"}
    assert _container(webhook)["env"][-1] == {"name": "TZ", "value": "UTC"}
    # update strategies: the plugin's own maxSurge 0 and maxUnavailable 10% are kept as given
    ds, deploys = one("conventions", "DaemonSet"), {d["metadata"]["labels"]["app.kubernetes.io/component"]: d
                                                     for d in objects("conventions", "Deployment")}
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%", "maxSurge": 0}}
    assert deploys["controller"]["spec"]["strategy"] == CONVENTIONS["controller.updateStrategy"]
    assert deploys["webhook"]["spec"]["strategy"] == {"type": "Recreate"}
    assert controller["spec"]["priorityClassName"] == webhook["spec"]["priorityClassName"] == "system-cluster-critical"
    assert plugin["spec"]["priorityClassName"] == "system-node-critical"
    for key in ("nodeSelector", "tolerations", "affinity"):
        assert webhook["spec"][key] == CONVENTIONS[f"webhook.{key}"]
    # node selection: the GPU Operator's label instead of NFD's
    assert plugin["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    # service accounts: the global annotations, the plugin's own override
    sas = {sa["metadata"]["name"]: sa for sa in objects("conventions", "ServiceAccount")}
    assert sas["partita-plugin"]["metadata"]["annotations"] == {"iam.example.com/role": "partita-plugin"}
    assert sas["partita-controller"]["metadata"]["annotations"] == {"iam.example.com/role": "partita"}
    assert sas["partita-webhook"]["metadata"]["annotations"] == {"iam.example.com/role": "partita"}
    # and nothing of that without the values: the defaults render none of it
    for pod in _pods("defaults").values():
        assert "imagePullSecrets" not in pod["spec"] and "args" not in _container(pod)
        assert set(pod["metadata"]["labels"]) == {"app.kubernetes.io/name", "app.kubernetes.io/instance",
                                                  "app.kubernetes.io/version", "app.kubernetes.io/managed-by",
                                                  "helm.sh/chart", "app.kubernetes.io/component"}
    assert not [sa for sa in objects("defaults", "ServiceAccount") if "annotations" in sa["metadata"]]


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_selector_selects_its_pods(name: str) -> None:
    """Workload selectors, Services, the PodDisruptionBudget and the ServiceMonitor select the pods they
    mean, whatever the names and labels the values give (podLabels cannot replace a selector label)."""
    pods = _pods(name)

    def selects(selector: dict, labels: dict) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())
    for o in render(name):
        if o["kind"] in ("Deployment", "DaemonSet"):
            assert selects(o["spec"]["selector"]["matchLabels"], o["spec"]["template"]["metadata"]["labels"])
        elif o["kind"] in ("Service", "PodDisruptionBudget"):
            selector = o["spec"]["selector"].get("matchLabels", o["spec"]["selector"])
            matched = [c for c, pod in pods.items() if selects(selector, pod["metadata"]["labels"])]
            assert matched == [o["metadata"]["labels"].get("app.kubernetes.io/component", "webhook")], (o["metadata"]["name"], matched)
        elif o["kind"] == "ServiceMonitor":
            matched = {c for c, pod in pods.items() if selects(o["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])}
            assert matched >= {"controller", "kubelet-plugin"}


def test_name_overrides_name_every_object() -> None:
    names = {(o["kind"], o["metadata"]["name"]) for o in render("renamed") if o["kind"] != "DeviceClass"}
    assert all(n == "acme-gpu" or n.startswith("acme-gpu-") for _, n in names), sorted(names)
    for o in render("renamed"):
        assert o["metadata"]["labels"]["app.kubernetes.io/name"] == "gpu-dra"
    # the identities that name each other follow: the plugin's service account in the slice policy, the lease
    assert one("renamed", "DaemonSet")["spec"]["template"]["spec"]["serviceAccountName"] == "acme-gpu-plugin"
    policy = _slice_policy("renamed")
    assert "system:serviceaccount:partita-system:acme-gpu-plugin" in policy["spec"]["matchConditions"][0]["expression"]
    env = {e["name"]: e.get("value") for e in _container(_pods("renamed")["controller"])["env"]}
    assert env["LEADER_ELECTION_ID"] == "acme-gpu-controller"
    [role] = objects("renamed", "Role")
    assert [r["resourceNames"] for r in role["rules"] if "resourceNames" in r] == [["acme-gpu-controller"]]
    hook = one("renamed", "ValidatingWebhookConfiguration")["webhooks"][0]
    assert hook["clientConfig"]["service"]["name"] == "acme-gpu-webhook"
    # nameOverride alone: <release>-<name>
    out = helm("template", "partita", str(CHART), "--set", "nameOverride=gpu").stdout
    assert {d["metadata"]["name"] for d in yaml.safe_load_all(out) if d and d["kind"] == "DaemonSet"} == {"partita-gpu-plugin"}


def test_controller_has_a_disruption_budget_when_replicated() -> None:
    [pdb] = objects("defaults", "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["selector"]["matchLabels"] == \
        one("defaults", "Deployment", "controller")["spec"]["selector"]["matchLabels"]

    def budgets(*args: str) -> list[dict]:
        out = helm("template", "partita", str(CHART), *args).stdout
        return [d for d in yaml.safe_load_all(out) if d and d["kind"] == "PodDisruptionBudget"]
    # one replica: a budget would block every drain of its node
    assert budgets("--set", "controller.replicas=1") == []
    assert budgets("--set", "controller.podDisruptionBudget.enabled=false") == []
    [pdb] = budgets("--set", "controller.replicas=3", "--set", "controller.podDisruptionBudget.minAvailable=2")
    assert pdb["spec"]["minAvailable"] == 2 and "maxUnavailable" not in pdb["spec"]
    for version in VERSIONS:
        kubernetes_validate.validate(pdb, version, strict=True)


def test_plugin_node_selection_can_be_replaced_keeping_the_nfd_default() -> None:
    nfd = {"feature.node.kubernetes.io/pci-10de.present": "true"}
    assert one("defaults", "DaemonSet")["spec"]["template"]["spec"]["nodeSelector"] == nfd
    pod = one("plugin-affinity", "DaemonSet")["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and pod["affinity"] == GPU_NODE_AFFINITY      # affinity alone decides
    # an affinity without nodeAffinity (pod anti-affinity, say) keeps the NFD default
    out = helm("template", "partita", str(CHART), "--set-json",
               'plugin.affinity={"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}').stdout
    [ds] = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "DaemonSet"]
    assert ds["spec"]["template"]["spec"]["nodeSelector"] == nfd


@pytest.mark.parametrize(("args", "rolling_update", "pod_uid", "strategy"), [
    ([], "auto", True, {"maxUnavailable": 0, "maxSurge": 1}),
    (["--set", "plugin.uniqueSockets=true"], "on", True, {"maxUnavailable": 0, "maxSurge": 1}),
    (["--set", "plugin.uniqueSockets=false"], "off", False, {"maxUnavailable": 1, "maxSurge": 0}),
    (["--set", "plugin.updateStrategy.rollingUpdate.maxSurge=25%"], "auto", True, {"maxUnavailable": 0, "maxSurge": "25%"}),
    (["--set", "plugin.updateStrategy.rollingUpdate.maxUnavailable=2"], "auto", True, {"maxUnavailable": 2, "maxSurge": 1}),
    (["--set", "plugin.uniqueSockets=false", "--set", "plugin.updateStrategy.rollingUpdate.maxUnavailable=10%"],
     "off", False, {"maxUnavailable": "10%", "maxSurge": 0}),
])
def test_plugin_surges_only_with_unique_socket_names(args, rolling_update, pod_uid, strategy) -> None:
    """Issue: Day-2 operations. Unique socket names per pod (kubelet 1.33+) let the DaemonSet start the new
    plugin pod next to the old one (maxSurge 1, maxUnavailable 0 by default); with fixed names it keeps
    one pod per node. The plugin gets the pod's UID and the mode (ROLLING_UPDATE) to name its sockets."""
    out = helm("template", "partita", str(CHART), "--kube-version", "1.34.0", *args).stdout
    [ds] = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "DaemonSet"]
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": strategy}
    env = {e["name"]: e for e in ds["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["ROLLING_UPDATE"]["value"] == rolling_update
    assert ("POD_UID" in env) is pod_uid
    kubernetes_validate.validate(ds, VERSIONS[-1], strict=True)


def test_plugin_update_strategy_on_delete() -> None:
    out = helm("template", "partita", str(CHART), "--set", "plugin.updateStrategy.type=OnDelete").stdout
    [ds] = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "DaemonSet"]
    assert ds["spec"]["updateStrategy"] == {"type": "OnDelete"}
    kubernetes_validate.validate(ds, VERSIONS[-1], strict=True)


@pytest.mark.parametrize("driver", ["gpu.nvidia.com", "compute-domain.nvidia.com", "nvidia.com", "mig.gpu.nvidia.com",
                                    "gpu.amd.com", "amd.com", "gpu.intel.com", "xe.intel.com"])
def test_other_vendors_driver_names_are_refused(driver: str) -> None:
    r = helm("template", "partita", str(CHART), "--set", f"driverName={driver}", check=False)
    assert r.returncode != 0
    assert f'driverName "{driver}": names under' in r.stderr and "collide" in r.stderr, r.stderr


@pytest.mark.parametrize("driver", ["gpu.example.com", "gpu.mynvidia.com", "nvidia.example.org", "amd.com.example.net"])
def test_driver_names_that_only_look_like_a_vendors_are_accepted(driver: str) -> None:
    out = helm("template", "partita", str(CHART), "--set", f"driverName={driver}").stdout
    assert f"device.driver == '{driver}'" in out


# ------------------------------------------------------------------ webhook certificates

def test_cluster_issuer_signs_the_webhook_certificate() -> None:
    [cert] = [o for o in render("cluster-issuer") if o["kind"] == "Certificate"]
    assert cert["spec"]["issuerRef"] == {"kind": "ClusterIssuer", "name": "corp-ca", "group": "cert-manager.io"}
    assert not [o for o in render("cluster-issuer") if o["kind"] == "Issuer"]     # none created
    # no issuer named: the chart's self-signed Issuer, as before
    [own] = [o for o in render("webhook-cert-manager") if o["kind"] == "Issuer"]
    [cert] = [o for o in render("webhook-cert-manager") if o["kind"] == "Certificate"]
    assert cert["spec"]["issuerRef"] == {"kind": "Issuer", "name": own["metadata"]["name"], "group": "cert-manager.io"}
    # the older spelling names an Issuer
    out = helm("template", "partita", str(CHART), "--set", "webhook.enabled=true", "--set", "webhook.certManager.enabled=true",
               "--set", "webhook.certManager.issuer=team-ca").stdout
    [cert] = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "Certificate"]
    assert cert["spec"]["issuerRef"] == {"kind": "Issuer", "name": "team-ca", "group": "cert-manager.io"}
    hook = one("cluster-issuer", "ValidatingWebhookConfiguration")
    assert hook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == "partita-system/partita-webhook"


def _tls_of(objs) -> tuple[dict, str, str]:
    secret = next(o for o in objs if o["kind"] == "Secret")
    hook = next(o for o in objs if o["kind"] == "ValidatingWebhookConfiguration")["webhooks"][0]
    pod = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-webhook"))["spec"]["template"]
    return secret["data"], hook["clientConfig"]["caBundle"], pod["metadata"]["annotations"]["checksum/tls"]


def test_supplied_webhook_certificate_is_used(tmp_path: Path) -> None:
    data, ca_bundle, _ = _tls_of(render("webhook"))          # a valid set of PEMs, made by the chart itself
    pem = {k: base64.b64decode(v).decode() for k, v in data.items()}
    values = tmp_path / "tls.yaml"
    values.write_text(yaml.safe_dump({"webhook": {"enabled": True, "tls": {
        "cert": pem["tls.crt"], "key": pem["tls.key"], "caCert": pem["ca.crt"]}}}))
    objs = [d for d in yaml.safe_load_all(helm("template", "partita", str(CHART), "-n", "partita-system",
                                               "-f", str(values)).stdout) if d]
    got, got_bundle, checksum = _tls_of(objs)
    assert got == data and got_bundle == ca_bundle == data["ca.crt"]
    assert checksum == hashlib.sha256(pem["tls.crt"].encode()).hexdigest()
    for obj in objs:
        kubernetes_validate.validate(obj, VERSIONS[-1], strict=True)


class _FakeKubeApi:
    """Just enough of an API server for Helm's lookup (helm template --dry-run=server): discovery of the
    kinds the chart renders, the webhook's Secret when it exists, 404 for everything else."""
    CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "DeviceClass", "ValidatingAdmissionPolicy",
                      "ValidatingAdmissionPolicyBinding", "ValidatingWebhookConfiguration"}

    def __init__(self, kinds: set[tuple[str, str]], secret: dict | None):
        import http.server
        import threading
        groups: dict[str, set[str]] = {"v1": {"Secret"}}
        for api_version, kind in kinds:
            groups.setdefault(api_version, set()).add(kind)
        api = self
        self.requests: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?")[0]
                api.requests.append(path)
                parts = path.strip("/").split("/")
                gv = parts[1] if parts[:1] == ["api"] and len(parts) == 2 else \
                    "/".join(parts[1:3]) if parts[:1] == ["apis"] and len(parts) == 3 else None
                code, body = 200, None
                if path == "/version":
                    body = {"major": "1", "minor": "36", "gitVersion": "v1.36.0"}
                elif path == "/api":
                    body = {"kind": "APIVersions", "versions": ["v1"]}
                elif path == "/apis":
                    named = sorted(g for g in groups if "/" in g)
                    body = {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                        {"name": g.split("/")[0], "versions": [{"groupVersion": g, "version": g.split("/")[1]}],
                         "preferredVersion": {"groupVersion": g, "version": g.split("/")[1]}} for g in named]}
                elif gv in groups:
                    body = {"kind": "APIResourceList", "groupVersion": gv, "resources": [
                        {"name": k.lower() + "s", "singularName": k.lower(), "kind": k, "verbs": ["get", "list"],
                         "namespaced": k not in api.CLUSTER_SCOPED} for k in sorted(groups[gv])]}
                elif secret and path == f"/api/v1/namespaces/partita-system/secrets/{secret['metadata']['name']}":
                    body = secret
                else:
                    code, body = 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                                       "code": 404}
                raw = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _render_against(api: _FakeKubeApi, tmp_path: Path, *args: str) -> list[dict]:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": api.url}}], "users": [{"name": "fake", "user": {}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}))
    r = subprocess.run([_helm(), "template", "partita", str(CHART), "-n", "partita-system", "--dry-run=server",
                        "--disable-openapi-validation", *args], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "KUBECONFIG": str(kubeconfig), "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def test_webhook_certificate_is_kept_across_upgrades(tmp_path: Path) -> None:
    """Without cert-manager, an upgrade reuses the certificate in the cluster's Secret (Helm's lookup):
    no new CA in the webhook configuration, no changed checksum (no pod restart), no GitOps diff."""
    first = render("webhook")                          # the install (no cluster to look up: generated)
    data, ca_bundle, checksum = _tls_of(first)
    installed = next(o for o in first if o["kind"] == "Secret")
    # as Helm left it in the cluster: owned by the release
    secret = {**installed, "metadata": {**installed["metadata"], "annotations": {
        "meta.helm.sh/release-name": "partita", "meta.helm.sh/release-namespace": "partita-system"}}}
    kinds = {(o["apiVersion"], o["kind"]) for o in first}
    api = _FakeKubeApi(kinds, secret)
    try:
        for _ in range(2):
            got, got_bundle, got_checksum = _tls_of(_render_against(api, tmp_path, "--set", "webhook.enabled=true"))
            assert (got, got_bundle, got_checksum) == (data, ca_bundle, checksum)
        assert "/api/v1/namespaces/partita-system/secrets/partita-webhook-tls" in api.requests
    finally:
        api.close()
    # a Secret of an older chart without ca.crt cannot be reused (no CA for the webhook configuration): new one
    old = {**secret, "data": {k: v for k, v in data.items() if k != "ca.crt"}}
    api = _FakeKubeApi(kinds, old)
    try:
        got, got_bundle, _ = _tls_of(_render_against(api, tmp_path, "--set", "webhook.enabled=true"))
        assert got["tls.crt"] != data["tls.crt"] and got_bundle == got["ca.crt"]
    finally:
        api.close()
    # without a cluster (helm template, GitOps renderers) every render is a new certificate: documented
    assert _tls_of(render("webhook"))[0]["tls.crt"] != _tls_of(
        [d for d in yaml.safe_load_all(helm("template", "partita", str(CHART), *VALUE_SETS["webhook"]).stdout) if d])[0]["tls.crt"]


# ------------------------------------------------------------------ the driver root (GPU Operator driver container)

def test_driver_root_is_mounted_read_only_and_given_to_the_plugin() -> None:
    pod = _pods("conventions")["kubelet-plugin"]
    c = _container(pod)
    [mount] = [m for m in c["volumeMounts"] if m["mountPath"] == "/driver-root"]
    assert mount["readOnly"] is True and mount["mountPropagation"] == "HostToContainer"
    [volume] = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["hostPath"] == {"path": "/run/nvidia/driver", "type": "Directory"}
    assert {"name": "NVIDIA_DRIVER_ROOT", "value": "/driver-root"} in c["env"]
    # the default (/): the driver is on the host, NVML comes from the NVIDIA runtime as before; fake GPUs: none
    for name in ("defaults", "fake-gpus"):
        c = _container(_pods(name)["kubelet-plugin"])
        assert "/driver-root" not in {m["mountPath"] for m in c["volumeMounts"]}
        assert "NVIDIA_DRIVER_ROOT" not in {e["name"] for e in c["env"]}


def test_plugin_reads_the_driver_root_the_chart_sets(monkeypatch) -> None:
    import argparse

    from driver.plugin.main import add_arguments
    env = {e["name"]: e.get("value") for e in _container(_pods("conventions")["kubelet-plugin"])["env"]}
    monkeypatch.setenv("NVIDIA_DRIVER_ROOT", env["NVIDIA_DRIVER_ROOT"])
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args([]).nvidia_driver_root == "/driver-root"
    monkeypatch.delenv("NVIDIA_DRIVER_ROOT")
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args([]).nvidia_driver_root == ""


def _driver_tree(root: Path, libdir: str = "usr/lib/x86_64-linux-gnu", absolute_link: bool = True) -> Path:
    """A driver root as NVIDIA's driver container lays it out: libnvidia-ml.so.1 a link to the versioned
    file, here an absolute link (it names the root's own file, not this container's)."""
    d = root / libdir
    d.mkdir(parents=True)
    real = d / "libnvidia-ml.so.580.105.08"
    real.write_bytes(b"\x7fELF")
    (d / "libnvidia-ml.so.1").symlink_to(f"/{libdir}/{real.name}" if absolute_link else real.name)
    return real


def test_nvml_is_loaded_from_the_driver_root(tmp_path: Path) -> None:
    from driver.nvml import errors
    from driver.nvml.real import RealNvml, find_nvml_library
    real = _driver_tree(tmp_path)
    assert find_nvml_library(tmp_path) == real
    calls: list[str] = []
    nvml = type("Nvml", (), {"NVMLError": Exception, "nvmlInit": staticmethod(lambda: calls.append("nvmlInit"))})
    RealNvml(nvml, driver_root=str(tmp_path), load_library=calls.append).init()
    assert calls == [str(real), "nvmlInit"]                  # by its path, before pynvml opens it by name
    # without a driver root, nothing is preloaded (the container's library path, as before)
    calls.clear()
    RealNvml(nvml, load_library=calls.append).init()
    assert calls == ["nvmlInit"]
    # a root without the driver, a root that is not there, a library that does not load: clear errors
    (tmp_path / "empty").mkdir()
    for root, words in ((tmp_path / "empty", "is not under NVIDIA driver root"), (tmp_path / "missing", "is not a directory")):
        calls.clear()
        with pytest.raises(errors.LibraryNotFoundError, match=words) as e:
            RealNvml(nvml, driver_root=str(root), load_library=calls.append).init()
        assert "plugin.driverRoot" in str(e.value) and str(root) in str(e.value) and calls == []

    def broken(path: str) -> None:
        raise OSError(f"{path}: invalid ELF header")
    with pytest.raises(errors.LibraryNotFoundError, match="invalid ELF header"):
        RealNvml(nvml, driver_root=str(tmp_path), load_library=broken).init()


_STUB_NVML = r"""
#include <string.h>
int nvmlInitWithFlags(unsigned int flags) { return 0; }
int nvmlShutdown(void) { return 0; }
int nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    strncpy(version, "580.105.08-from-driver-root", length); return 0; }
"""


def test_real_pynvml_finds_nvml_under_the_driver_root(tmp_path: Path) -> None:
    """End to end with pynvml: a stand-in libnvidia-ml.so.1 (compiled here) only under the driver root.
    pynvml opens "libnvidia-ml.so.1" by name; with the driver root it gets the preloaded library."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler to build a stand-in libnvidia-ml.so.1")
    libdir = tmp_path / "root" / "usr" / "lib64"
    libdir.mkdir(parents=True)
    (tmp_path / "nvml.c").write_text(_STUB_NVML)
    subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libnvidia-ml.so.1", "-o", str(libdir / "libnvidia-ml.so.1"),
                    str(tmp_path / "nvml.c")], check=True, capture_output=True, timeout=60)
    script = ("import sys\nfrom driver.nvml.real import RealNvml\nfrom driver.nvml.errors import NvmlError\n"
              "b = RealNvml(driver_root=sys.argv[1] or None)\n"
              "try:\n    b.init()\nexcept NvmlError as e:\n    print('ERROR', e)\nelse:\n    print(b.driver_version())\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("LD_LIBRARY_PATH", None)

    def run(root: str) -> str:
        return subprocess.run([sys.executable, "-c", script, root], capture_output=True, text=True, env=env,
                              timeout=60, check=True).stdout.strip()
    assert run(str(tmp_path / "root")) == "580.105.08-from-driver-root"
    assert run("").startswith("ERROR cannot load libnvidia-ml.so.1")      # without it: not found, as before


def test_partita_device_classes_may_not_map_an_extended_resource_in_controller_mode() -> None:
    """docs/architecture.md §4: no extendedResourceName on Partita DeviceClasses in controller mode, also for
    classes edited or created by hand (the chart itself never renders one there)."""
    [policy] = [p for p in objects("defaults", "ValidatingAdmissionPolicy") if "no-extended-resource-name" in p["metadata"]["name"]]
    assert policy["spec"]["matchConstraints"]["resourceRules"][0]["resources"] == ["deviceclasses"]
    assert policy["spec"]["matchConstraints"]["resourceRules"][0]["apiVersions"] == ["*"]
    ours = device_classes(gpu_extended_resource_name="nvidia.com/gpu")
    assert [len(_validate(policy, {"object": c})) for c in ours] == [1, 0, 0]
    [message] = _validate(policy, {"object": ours[0]})
    assert "spec.extendedResourceName" in message and "allocationMode=scheduler" in message
    assert [_validate(policy, {"object": c}) for c in device_classes()] == [[], [], []]
    other = {"spec": {"selectors": [{"cel": {"expression": 'device.driver == "gpu.nvidia.com"'}}],
                      "extendedResourceName": "nvidia.com/gpu"}}
    double_quoted = {"spec": {"selectors": [{"cel": {"expression": 'device.driver == "gpu.partita.dev"'}}],
                              "extendedResourceName": "example.com/gpu"}}
    assert _validate(policy, {"object": other}) == [] and len(_validate(policy, {"object": double_quoted})) == 1
    for empty in ({"spec": {}}, {"spec": {"selectors": []}}, {"spec": {"selectors": [{}]}}, {}):
        assert _validate(policy, {"object": empty}) == [], empty
    # scheduler mode: kube-scheduler allocates anyway, and the chart sets the field itself
    assert not [p for p in objects("scheduler-extended", "ValidatingAdmissionPolicy")
                if "extended-resource" in p["metadata"]["name"]]
