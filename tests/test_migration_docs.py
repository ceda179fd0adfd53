"""docs/migration.md (moving from the NVIDIA device plugin): linked from the README and install.md, its
before/after manifests valid for 1.34-1.37, the before one flagged by the controller's check and the after
one not, the after one the shipped example plus a selector, and the chart values it names real."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from controller.operator.extendedresources import ExtendedResourceAdvisor
from driver.api import constants as C
from driver.api.deviceclasses import device_classes

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "migration.md"
VERSIONS = ["1.34.0", "1.35.0", "1.36.0", "1.37.0"]


def blocks() -> list[list[dict]]:
    return [[d for d in yaml.safe_load_all(b) if d] for b in re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S)]


def pod_of(docs: list[dict]) -> dict:
    [dep] = [d for d in docs if d["kind"] == "Deployment"]
    return {"metadata": {"uid": "u"}, "spec": dep["spec"]["template"]["spec"]}


def test_migration_doc_is_linked_from_readme_and_install() -> None:
    assert "](docs/migration.md)" in (REPO / "README.md").read_text()
    assert "](migration.md)" in (REPO / "docs" / "install.md").read_text()


@pytest.mark.parametrize("version", VERSIONS)
def test_before_and_after_manifests_are_valid(version: str) -> None:
    found = blocks()
    assert len(found) == 2
    for docs in found:
        for d in docs:
            kubernetes_validate.validate(d, version, strict=True)


def test_before_is_flagged_and_after_is_the_example_and_is_not() -> None:
    before, after = blocks()
    adv = ExtendedResourceAdvisor(C.DEFAULT_DRIVER_NAME, C.ALLOCATION_MODE_CONTROLLER)
    partita = {c["metadata"]["name"] for c in device_classes()}
    assert adv.unserved(pod_of(before), [], {}, partita) == ["nvidia.com/gpu"]
    assert adv.unserved(pod_of(after), [], {}, partita) == []
    example = [d for d in yaml.safe_load_all((REPO / "examples" / "migrate-from-device-plugin.yaml").read_text()) if d]
    doc_template = next(d for d in after if d["kind"] == "ResourceClaimTemplate")
    ex_template = next(d for d in example if d["kind"] == "ResourceClaimTemplate")
    doc_req = dict(doc_template["spec"]["spec"]["devices"]["requests"][0]["exactly"])
    assert doc_req.pop("selectors")      # the doc adds the model selector; the rest is the example's
    assert doc_req == ex_template["spec"]["spec"]["devices"]["requests"][0]["exactly"]
    assert doc_req["deviceClassName"] in partita


def test_chart_values_and_versions_it_names() -> None:
    values = yaml.safe_load((REPO / "charts" / "partita" / "values.yaml").read_text())
    assert values["deviceClasses"]["gpu"]["extendedResourceName"] == ""
    assert values["plugin"]["nodeSelector"] == {}
    text = DOC.read_text()
    for fact in ("deviceClasses.gpu.extendedResourceName=nvidia.com/gpu", "plugin.nodeSelector", "DRAExtendedResource",
                 "| 1.34, 1.35 | alpha", "| 1.36 | beta", "| 1.37 | GA", "nvidia.com/gpu.deploy.device-plugin=false"):
        assert fact in text, fact
