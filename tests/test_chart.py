"""The Helm chart (charts/partita): lint, render several value sets, validate every object against the
Kubernetes schemas of 1.34-1.37, and check what the objects promise: DeviceClasses equal to the driver's,
least-privilege RBAC, the admission policies' CEL evaluated on sample requests, schema-rejected values.

Helm v4 comes from hack/install-tools.sh (.cache/tools/bin/helm), which hack/test.sh runs; without it the
tests skip, unless PARTITA_REQUIRE_TOOLS=1 (hack/test.sh sets it where the tools can be installed), then fail.
Each value set is rendered once (cached) and shared by the tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

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

VALUE_SETS = {
    "defaults": [],
    "fake-gpus": ["--set", "fakeGpu.enabled=true"],
    "scheduler-mode": ["--set", "allocationMode=scheduler", "--set", "strategy=first-fit"],
    "webhook": ["--set", "webhook.enabled=true"],
    "webhook-cert-manager": ["--set", "webhook.enabled=true", "--set", "webhook.certManager.enabled=true"],
    "service-monitor": ["--set", "serviceMonitor.enabled=true", "--set", "fakeGpu.enabled=true"],
    "other-driver": ["--set", "driverName=gpu.example.com", "--set", "plugin.runtimeClassName=nvidia"],
    # a driver name without the gpu. prefix, and the CDI specs written to /etc/cdi
    "plain-driver": ["--set", "driverName=nvidia.example.org", "--set", "plugin.cdiRoot=/etc/cdi"],
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
        assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate",
                                                "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}
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
    source = (REPO / "driver" / "plugin" / "main.py").read_text()
    for name in ("defaults", "fake-gpus"):
        env = {e["name"] for e in one(name, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["env"]}
        env -= {"NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES"}      # for the NVIDIA runtime
        missing = {e for e in env if f'"{e}"' not in source}
        assert not missing, f"the chart sets {missing}, which partita plugin does not read"
    add_arguments(argparse.ArgumentParser())     # the module still defines them
    controller_source = (REPO / "controller" / "operator" / "main.py").read_text()
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
        | _expand("", "nodes", "get"))
    assert _grants(_rules("defaults", "-controller")) == (
        _expand("", "pods nodes", "get list watch")
        | _expand("", "namespaces", "list watch")                                              # nodefit
        | _expand("resource.k8s.io", "resourceclaims", "get list watch update")
        | _expand("resource.k8s.io", "resourceclaims/status resourceclaims/binding", "update")   # binding: 1.36+
        | _expand("resource.k8s.io", "resourceslices deviceclasses", "get list watch")
        | _expand("resource.k8s.io", "devicetaintrules", "list watch")                         # DeviceTaintRules
        | _expand("", "events", "create"))
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
    # a regenerated certificate (every helm upgrade) restarts the pods, which load it at start
    assert pod["metadata"]["annotations"]["checksum/tls"] == \
        hashlib.sha256(hook["clientConfig"]["caBundle"].encode()).hexdigest()
    secret = one("webhook", "Secret")
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
