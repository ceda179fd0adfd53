"""`partita inventory`: a node's GPUs and the ResourceSlices the driver would publish."""

from __future__ import annotations

import json
import subprocess
import sys

import kubernetes_validate
import yaml

from controller.cli import main


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_json_is_a_list_of_valid_resource_slices(capsys) -> None:
    rc, out, _ = _run(capsys, "inventory", "--fake", "H100-SXM5-80GB:2,L4:1", "--node-name", "gpu-7", "-o", "json")
    assert rc == 0
    doc = json.loads(out)
    assert doc["apiVersion"] == "v1" and doc["kind"] == "List"
    assert {s["spec"]["pool"]["name"] for s in doc["items"]} == {"gpu-7"}
    for s in doc["items"]:
        kubernetes_validate.validate(s, "1.36.0", strict=True)
    devices = [d for s in doc["items"] for d in s["spec"].get("devices", [])]
    assert sum(d["attributes"]["type"]["string"] == "gpu" for d in devices) == 3


def test_yaml_from_a_profile_file_in_scheduler_mode(capsys, tmp_path) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text("apiVersion: gpu.partita.dev/v1alpha1\nkind: FakeGpuProfile\n"
                       "nodes:\n- name: '*'\n  gpus:\n  - {model: T4, count: 2}\n")
    rc, out, _ = _run(capsys, "inventory", "--profile", str(profile), "--allocation-mode", "scheduler",
                      "--no-partitionable", "-o", "yaml")
    assert rc == 0
    items = yaml.safe_load(out)["items"]
    devices = [d for s in items for d in s["spec"]["devices"]]
    assert len(devices) == 2 and not any("taints" in d for d in devices)
    assert items[0]["metadata"]["labels"]["partita.dev/allocation-mode"] == "scheduler"


def test_table_lists_gpus_and_devices(capsys) -> None:
    rc, out, _ = _run(capsys, "inventory", "--fake", "H100-SXM5-80GB:1")
    assert rc == 0
    assert "NVIDIA H100 80GB HBM3" in out and "0000:1b:00.0" in out
    assert "gpu     gpu-" in out and "shared  gpu-" in out and "(25 in all)" in out


def test_bad_input_is_a_clear_error_not_a_traceback(capsys) -> None:
    rc, _, err = _run(capsys, "inventory", "--fake", "H100:1")
    assert rc == 2 and "unknown GPU model 'H100'" in err and "H100-SXM5-80GB" in err
    rc, _, err = _run(capsys, "inventory")   # no GPU and no NVIDIA driver on this machine
    assert rc == 2 and "libnvidia-ml" in err and "--fake" in err


def test_python_dash_m_driver_works() -> None:
    res = subprocess.run([sys.executable, "-m", "driver", "inventory", "--fake", "T4:1", "-o", "json"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["kind"] == "List"
