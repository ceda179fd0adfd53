"""The chart's monitoring (issue 14 item 6): the Grafana dashboard ConfigMap and the PrometheusRule.

Rendered with helm and validated: the ConfigMap against the Kubernetes schemas (kubernetes-validate), the
dashboard JSON against a schema of the fields Grafana requires, the PrometheusRule against the part of its CRD
the chart uses; every PromQL expression (alerts, panel targets) parsed by promql_parser, and every metric they
read exported by our code: the names are collected from the plugin's and the controller's metric modules.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

import controller.operator.metrics as controller_metrics
import driver.plugin.metrics as plugin_metrics
import tests.test_chart as chart_tests

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "partita"
DASHBOARD = CHART / "dashboards" / "partita.json"
ON = ["--set", "grafanaDashboard.enabled=true", "--set", "prometheusRule.enabled=true",
      "--set", "serviceMonitor.enabled=true"]
VALUE_SETS = {
    "monitoring": ON,
    "monitoring-custom": ON + ["--set", "grafanaDashboard.namespace=monitoring",
                               "--set-json", 'grafanaDashboard.annotations={"grafana_folder":"GPUs"}',
                               "--set-json", 'prometheusRule.labels={"release":"kube-prometheus-stack"}',
                               "--set", "prometheusRule.pendingFor=30m", "--set", "fullnameOverride=acme-gpu"],
}

#: Series Prometheus itself writes for every target (not exported by any code of ours): ``up``.
PROMETHEUS_SERIES = {"up"}
#: Grafana's built-in variables in queries, with a value of the right kind for parsing.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}

# The fields Grafana requires of a dashboard and the panels in it, from Grafana's own schema: the npm package
# @grafana/schema 13.2.3, dist/types/raw/dashboard/x/types.gen.d.ts (generated from Grafana's CUE schema
# kinds/dashboard/dashboard_kind.cue): interfaces Dashboard (schemaVersion required; title, uid, panels,
# templating.list, time{from,to}, annotations.list, graphTooltip 0|1|2), Panel (type required; gridPos, targets,
# datasource), RowPanel (type 'row', collapsed, id, panels required), GridPos (h, w, x, y required),
# DataSourceRef (type, uid), VariableModel (name and type required; type one of VariableType), AnnotationQuery
# (datasource, enable, iconColor, name required). Types as there; the grid is 24 columns wide.
_DATASOURCE = {"type": "object", "properties": {"type": {"type": "string"}, "uid": {"type": "string"}},
               "additionalProperties": False}
_GRID = {"type": "object", "required": ["h", "w", "x", "y"],
         "properties": {"h": {"type": "integer", "minimum": 1}, "w": {"type": "integer", "minimum": 1, "maximum": 24},
                        "x": {"type": "integer", "minimum": 0, "maximum": 23}, "y": {"type": "integer", "minimum": 0},
                        "static": {"type": "boolean"}}, "additionalProperties": False}
_PANEL = {"type": "object", "required": ["type"], "properties": {
    "type": {"type": "string", "not": {"const": "row"}}, "id": {"type": "integer"}, "title": {"type": "string"},
    "description": {"type": "string"}, "datasource": _DATASOURCE, "gridPos": _GRID,
    "targets": {"type": "array", "items": {"type": "object"}}, "options": {"type": "object"},
    "fieldConfig": {"type": "object", "properties": {"defaults": {"type": "object"},
                                                     "overrides": {"type": "array"}}},
    "interval": {"type": "string"}, "transparent": {"type": "boolean"}, "repeat": {"type": "string"},
    "transformations": {"type": "array", "items": {"type": "object", "required": ["id", "options"]}}}}
_ROW = {"type": "object", "required": ["type", "collapsed", "id", "panels"], "properties": {
    "type": {"const": "row"}, "collapsed": {"type": "boolean"}, "id": {"type": "integer"},
    "panels": {"type": "array", "items": _PANEL}, "title": {"type": "string"}, "gridPos": _GRID,
    "datasource": _DATASOURCE, "repeat": {"type": "string"}}, "additionalProperties": False}
_VARIABLE_TYPES = ["query", "adhoc", "groupby", "constant", "datasource", "interval", "textbox", "custom", "system",
                   "snapshot", "switch"]
DASHBOARD_SCHEMA = {
    "type": "object",
    "required": ["schemaVersion"],
    "properties": {
        "schemaVersion": {"type": "integer"}, "title": {"type": "string"}, "uid": {"type": "string", "maxLength": 40},
        "description": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
        "editable": {"type": "boolean"}, "graphTooltip": {"enum": [0, 1, 2]}, "version": {"type": "integer"},
        "refresh": {"type": "string"}, "timezone": {"type": "string"},
        "time": {"type": "object", "required": ["from", "to"],
                 "properties": {"from": {"type": "string"}, "to": {"type": "string"}}},
        "panels": {"type": "array", "items": {"oneOf": [_PANEL, _ROW]}},
        "templating": {"type": "object", "properties": {"list": {"type": "array", "items": {
            "type": "object", "required": ["name", "type"],
            "properties": {"name": {"type": "string"}, "type": {"enum": _VARIABLE_TYPES},
                           "datasource": _DATASOURCE, "multi": {"type": "boolean"}, "includeAll": {"type": "boolean"},
                           "refresh": {"enum": [0, 1, 2]}, "hide": {"enum": [0, 1, 2]}}}}}},
        "annotations": {"type": "object", "properties": {"list": {"type": "array", "items": {
            "type": "object", "required": ["datasource", "enable", "iconColor", "name"]}}}},
    },
}

#: The part of the PrometheusRule CRD (prometheus-operator, monitoring.coreos.com/v1,
#: example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml) the chart uses: groups need a
#: name and rules, a rule an expr and an alert or record name, ``for`` the CRD's Duration pattern.
_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
PROMETHEUS_RULE_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"},
        "spec": {"type": "object", "additionalProperties": False, "properties": {"groups": {
            "type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["name", "rules"], "additionalProperties": False,
                "properties": {"name": {"type": "string", "minLength": 1}, "interval": {"type": "string", "pattern": _DURATION},
                               "rules": {"type": "array", "minItems": 1, "items": {
                                   "type": "object", "required": ["expr"], "additionalProperties": False,
                                   "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                   "properties": {"alert": {"type": "string"}, "record": {"type": "string"},
                                                  "expr": {"type": "string", "minLength": 1},
                                                  "for": {"type": "string", "pattern": _DURATION},
                                                  "keep_firing_for": {"type": "string", "pattern": _DURATION},
                                                  "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                                  "annotations": {"type": "object",
                                                                  "additionalProperties": {"type": "string"}}}}}}}}}},
    },
}


@lru_cache(maxsize=None)
def render(name: str) -> tuple[dict, ...]:
    out = chart_tests.helm("template", "partita", str(CHART), "--namespace", "partita-system", *VALUE_SETS[name]).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def one(name: str, kind: str) -> dict:
    [obj] = [o for o in render(name) if o["kind"] == kind]
    return obj


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def exported_metric_names(*modules: ModuleType) -> set[str]:
    """The series names the metrics declared in these modules expose (a counter's ``_total``, a histogram's
    ``_bucket``/``_sum``/``_count``, ...), read from the metric objects themselves."""
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("_sum", "_count", "_created"), "info": ("_info",)}
    names = set()
    for module in modules:
        for obj in vars(module).values():
            if isinstance(obj, MetricWrapperBase):
                for fam in obj.describe():
                    names |= {fam.name + s for s in suffixes.get(fam.type, ("",))}
    return names


EXPORTED = exported_metric_names(plugin_metrics, controller_metrics)


def metric_names(expr: str) -> set[str]:
    """Every metric an expression selects (promql_parser's AST; a ``{__name__="..."}`` matcher counts)."""
    tree = promql_parser.parse(expr)
    found: set[str] = set()

    def visit(node: object) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                found.add(node.name)
            found.update(m.value for m in node.matchers.matchers if m.name == "__name__")
        return True

    promql_parser.walk(tree, visit)
    return found


def grafana_to_promql(expr: str) -> str:
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    return expr


def dashboard_queries(d: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target, rows' panels included."""
    out = []
    for p in d["panels"]:
        for q in [p] + p.get("panels", []):
            for t in q.get("targets") or []:
                out.append((f"panel {q.get('title')!r} target {t.get('refId')}", grafana_to_promql(t["expr"])))
    return out


def variable_metrics(d: dict) -> list[str]:
    """Metrics the template variables' ``label_values(METRIC, LABEL)`` queries read."""
    out = []
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\(\s*([^,]+?)\s*,\s*\w+\s*\)", q)
            assert m, f"variable {v['name']}: {q!r} is not label_values(METRIC, LABEL)"
            out.append(m.group(1))
    return out


def alert_rules(name: str = "monitoring") -> list[dict]:
    return [r for g in one(name, "PrometheusRule")["spec"]["groups"] for r in g["rules"]]


# -- the chart ------------------------------------------------------------------------------------------
def test_lint_passes_with_monitoring_on() -> None:
    for args in VALUE_SETS.values():
        r = chart_tests.helm("lint", "--strict", str(CHART), *args)
        assert "0 chart(s) failed" in r.stdout and "[WARNING]" not in r.stdout, r.stdout


def test_off_by_default() -> None:
    kinds = {o["kind"] for o in chart_tests.render("defaults")}
    assert "PrometheusRule" not in kinds
    assert not [o for o in chart_tests.render("defaults") if o["kind"] == "ConfigMap"
                and "grafana_dashboard" in o["metadata"].get("labels", {})]


@pytest.mark.parametrize("version", chart_tests.VERSIONS)
@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rendered_objects_validate_against_kubernetes(name: str, version: str) -> None:
    for obj in render(name):
        if (obj["apiVersion"], obj["kind"]) in chart_tests.NOT_IN_KUBERNETES | {("monitoring.coreos.com/v1",
                                                                               "PrometheusRule")}:
            continue
        kubernetes_validate.validate(obj, version, strict=True)


def test_dashboard_configmap_is_for_the_grafana_sidecar() -> None:
    cm = one("monitoring", "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"          # kube-prometheus-stack's sidecar label
    assert cm["metadata"]["namespace"] == "partita-system"
    assert json.loads(cm["data"]["partita.json"]) == dashboard()       # the file, unchanged
    custom = one("monitoring-custom", "ConfigMap")
    assert custom["metadata"]["namespace"] == "monitoring"
    assert custom["metadata"]["annotations"] == {"grafana_folder": "GPUs"}


def test_prometheus_rule_matches_its_crd_and_the_values() -> None:
    for name in VALUE_SETS:
        jsonschema.validate(one(name, "PrometheusRule"), PROMETHEUS_RULE_SCHEMA)
    rule = one("monitoring-custom", "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    by_name = {r["alert"]: r for r in alert_rules("monitoring-custom")}
    assert by_name["PartitaClaimsPendingWhileCapacityFree"]["for"] == "30m"
    # the jobs are the metrics Services' names (the Prometheus Operator's job label for a ServiceMonitor)
    services = {o["metadata"]["name"] for o in render("monitoring-custom") if o["kind"] == "Service"}
    jobs = {m for r in by_name.values() for m in re.findall(r'job="([^"]+)"', r["expr"])}
    assert jobs and jobs <= services, (jobs, services)


def test_alerts_cover_what_the_issue_asks() -> None:
    exprs = {r["alert"]: r["expr"] for r in alert_rules()}
    assert set(exprs) >= {"PartitaGpuUnhealthy", "PartitaClaimsPendingWhileCapacityFree", "PartitaPluginDown",
                          "PartitaAllocationErrors", "PartitaClaimIdle"}
    assert "partita_device_health" in exprs["PartitaGpuUnhealthy"]
    assert {"partita_pending_claims_by_reason", "partita_capacity_memory_bytes"} <= \
        metric_names(exprs["PartitaClaimsPendingWhileCapacityFree"])
    assert "partita_claim_idle" in exprs["PartitaClaimIdle"]
    for r in alert_rules():
        assert r["labels"]["severity"] in ("critical", "warning", "info")
        assert r["annotations"]["summary"] and r["annotations"]["description"]


@pytest.mark.parametrize("bad", ["prometheusRule.pendingFor=soon", "grafanaDashboard.namespace=Not_A_Namespace",
                                 "prometheusRule.typo=1"])
def test_values_schema_refuses_bad_monitoring_values(bad: str) -> None:
    r = chart_tests.helm("template", "partita", str(CHART), "--set", bad, check=False)
    assert r.returncode != 0 and "values don't meet the specifications of the schema" in r.stderr, r.stderr


# -- the dashboard and the queries ----------------------------------------------------------------------
def test_dashboard_validates_against_grafanas_required_fields() -> None:
    d = dashboard()
    jsonschema.validate(d, DASHBOARD_SCHEMA)
    panels = [q for p in d["panels"] for q in [p] + p.get("panels", [])]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in d["templating"]["list"]}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, f"panel {p['title']!r} is wider than the grid"
        if p["type"] != "row":
            assert p["datasource"]["uid"].strip("${}") in variables
            assert p["targets"], f"panel {p['title']!r} has no query"
            assert all(t.get("refId") and t.get("expr") for t in p["targets"])
    # no two panels overlap on the grid
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_the_schema_check_catches_what_grafana_refuses() -> None:
    d = dashboard()
    broken = json.loads(json.dumps(d))
    del broken["schemaVersion"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, DASHBOARD_SCHEMA)
    broken = json.loads(json.dumps(d))
    next(p for p in broken["panels"] if p["type"] != "row")["gridPos"] = {"w": 6, "h": 4}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, DASHBOARD_SCHEMA)


def test_dashboard_covers_capacity_utilization_idle_pending_and_health() -> None:
    used = set()
    for _, expr in dashboard_queries(dashboard()):
        used |= metric_names(expr)
    assert {"partita_capacity_gpus", "partita_capacity_memory_bytes", "partita_capacity_fragmented_memory_bytes",
            "partita_gpu_utilization_ratio", "partita_gpu_memory_used_bytes", "partita_claim_idle",
            "partita_pending_claims_by_reason", "partita_device_health"} <= used
    exprs = [e for _, e in dashboard_queries(dashboard())]
    assert any("by (pod_namespace)" in e and "partita_gpu_utilization_ratio" in e for e in exprs)
    assert any("pod_name" in e and "partita_gpu_utilization_ratio" in e for e in exprs)


def test_every_query_parses_and_reads_only_metrics_we_export() -> None:
    queries = dashboard_queries(dashboard()) + [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
    assert len(queries) > 20
    for where, expr in queries:
        try:
            names = metric_names(expr)
        except ValueError as e:
            pytest.fail(f"{where}: {expr!r} does not parse: {e}")
        assert names, f"{where}: reads no metric"
        unknown = names - EXPORTED - PROMETHEUS_SERIES
        assert not unknown, f"{where}: {sorted(unknown)} not exported by driver/plugin/metrics.py or " \
                            "controller/operator/metrics.py"
    for metric in variable_metrics(dashboard()):
        assert metric in EXPORTED, f"dashboard variable reads {metric}, which we do not export"


def test_the_metric_checks_catch_a_wrong_name_and_bad_promql() -> None:
    assert "partita_capacity_gpus" in EXPORTED and "partita_controller_allocations_total" in EXPORTED
    assert "partita_plugin_prepare_seconds_bucket" in EXPORTED and "partita_capacity_gpu" not in EXPORTED
    assert metric_names('sum(rate(partita_typo_total[5m])) / on() {__name__="partita_x"}') == \
        {"partita_typo_total", "partita_x"}
    with pytest.raises(ValueError):
        metric_names("sum(rate(partita_capacity_gpus[5m])")



def test_the_monitoring_notes_list_every_metric_we_export() -> None:
    notes = "\n".join(p.read_text() for p in sorted((REPO / "docs").glob("monitoring*.md")))
    families = {fam.name for module in (plugin_metrics, controller_metrics) for obj in vars(module).values()
                if isinstance(obj, MetricWrapperBase) for fam in obj.describe()}
    listed = {f for f in families if re.search(rf"`{re.escape(f)}(_total)?`", notes)}
    assert families - listed == set(), "add these metrics to docs/monitoring-cluster.md (or the node-side note)"
