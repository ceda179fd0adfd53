"""driver/plugin/cdi.py on its own (issue 17 item 9): CDI device names and IDs, what a claim's spec holds,
the lowest cdiVersion it needs, spec files written whole and compared byte for byte, and the NVIDIA
toolkit spec lookup."""

from __future__ import annotations

import json
import os

import pytest

from driver.plugin import cdi, durable
from driver.plugin.checkpoint import MigInstance, PreparedDevice

DRIVER = "gpu.partita.dev"
UID = "0d6e9f3a-1b2c-4d5e-8f90-a1b2c3d4e5f6"
SHARE = "7a3c5e1f-2b4d-4f6a-8c0e-1a2b3c4d5e6f"


def _device(**kw) -> PreparedDevice:
    base = {"requestNames": ["gpu"], "pool": "node-a", "device": "gpu-0", "cdiDeviceIDs": [], "type": "gpu",
            "gpuUUID": "GPU-aaaa"}
    return PreparedDevice.model_validate({**base, **kw})


def test_device_names_come_from_claim_device_and_share() -> None:
    assert cdi.device_name(UID, "gpu-0") == f"{UID}-gpu-0"
    assert cdi.device_name(UID, "gpu-0-shared", SHARE) == f"{UID}-gpu-0-shared-{SHARE}"
    assert cdi.device_name(UID, "gpu-0-shared", SHARE) != cdi.device_name(UID, "gpu-0-shared", SHARE[::-1])
    assert cdi.device_id(DRIVER, cdi.device_name(UID, "gpu-0")) == f"k8s.{DRIVER}/gpu={UID}-gpu-0"


def test_spec_path_is_one_file_per_claim_named_after_its_uid(tmp_path) -> None:
    assert cdi.spec_path(tmp_path, DRIVER, UID) == tmp_path / f"k8s.{DRIVER}-gpu_{UID}.json"
    assert cdi.spec_path(tmp_path, DRIVER, UID) != cdi.spec_path(tmp_path, DRIVER, UID.replace("0", "1", 1))


def test_claim_spec_holds_each_device_its_identity_and_the_share_edits() -> None:
    whole = _device()
    mig = _device(device="gpu-1-mig-1g10gb-0", type="mig", gpuUUID="GPU-bbbb",
                  mig=MigInstance(gpuUUID="GPU-bbbb", profileID=19, placementStart=0, placementSize=1,
                                  gpuInstanceID=7, computeInstanceID=0, uuid="MIG-cccc"))
    share = _device(device="gpu-2-shared", type="shared", gpuUUID="GPU-dddd", shareID=SHARE,
                    edits={"env": ["PARTITA_SHARING_STRATEGY=MPS"],
                           "mounts": [{"hostPath": "/p/mps/x/pipe", "containerPath": "/tmp/nvidia-mps",
                                       "options": ["rw", "bind"]}]})
    admin = _device(device="gpu-3", gpuUUID="GPU-eeee", adminAccess=True)
    spec = cdi.claim_spec(DRIVER, "node-a", "ns", "c", UID, [whole, mig, share, admin]).to_json()
    assert spec["kind"] == f"k8s.{DRIVER}/gpu"
    assert spec["containerEdits"]["env"] == ["PARTITA_CLAIM=ns/c", f"PARTITA_CLAIM_UID={UID}", "PARTITA_NODE=node-a"]
    by_name = {d["name"]: d["containerEdits"] for d in spec["devices"]}
    assert list(by_name) == [f"{UID}-gpu-0", f"{UID}-gpu-1-mig-1g10gb-0", f"{UID}-gpu-2-shared-{SHARE}",
                             f"{UID}-gpu-3"]
    assert by_name[f"{UID}-gpu-0"]["env"] == ["NVIDIA_VISIBLE_DEVICES=GPU-aaaa", "PARTITA_DEVICE=gpu-0",
                                             "PARTITA_DEVICE_TYPE=gpu", "PARTITA_GPU_UUID=GPU-aaaa"]
    mig_env = by_name[f"{UID}-gpu-1-mig-1g10gb-0"]["env"]
    assert "NVIDIA_VISIBLE_DEVICES=MIG-cccc" in mig_env and "PARTITA_MIG_UUID=MIG-cccc" in mig_env
    share_edits = by_name[f"{UID}-gpu-2-shared-{SHARE}"]
    assert f"PARTITA_SHARE_ID={SHARE}" in share_edits["env"]
    assert share_edits["env"][-1] == "PARTITA_SHARING_STRATEGY=MPS"          # the set-up's edits come last
    assert share_edits["mounts"] == [{"hostPath": "/p/mps/x/pipe", "containerPath": "/tmp/nvidia-mps",
                                      "options": ["rw", "bind"]}]
    assert "PARTITA_ADMIN_ACCESS=true" in by_name[f"{UID}-gpu-3"]["env"]
    assert "PARTITA_ADMIN_ACCESS=true" not in by_name[f"{UID}-gpu-0"]["env"]


def test_the_lowest_cdi_version_the_names_need() -> None:
    """0.5.0 only when a device name starts with a digit (claim UIDs often do); podman 4.3 reads up to 0.5.0."""
    letters = cdi.claim_spec(DRIVER, "n", "ns", "c", "b" + UID[1:], [_device()])
    digits = cdi.claim_spec(DRIVER, "n", "ns", "c", UID, [_device()])
    assert (letters.cdi_version, digits.cdi_version) == ("0.3.0", "0.5.0")
    with pytest.raises(ValueError, match="at least one device"):
        cdi.build_spec(DRIVER, [])


def test_spec_files_are_written_whole_readable_and_compared_byte_for_byte(tmp_path) -> None:
    root = tmp_path / "cdi"
    cdi.ensure_dir(root)
    path = cdi.spec_path(root, DRIVER, UID)
    spec = cdi.claim_spec(DRIVER, "n", "ns", "c", UID, [_device()])
    assert not cdi.spec_is_current(path, spec)                        # missing
    cdi.write_spec(path, spec)
    assert json.loads(path.read_text()) == spec.to_json()
    assert os.stat(path).st_mode & 0o777 == 0o644                      # runtimes read it
    assert cdi.spec_is_current(path, spec)
    other = cdi.claim_spec(DRIVER, "n", "ns", "c", UID, [_device(device="gpu-1")])
    assert not cdi.spec_is_current(path, other)                       # changed
    path.write_bytes(path.read_bytes()[:-1])
    assert not cdi.spec_is_current(path, spec)                        # torn
    cdi.remove_spec(path)
    cdi.remove_spec(path)                                             # missing is fine
    assert not path.exists() and list(root.iterdir()) == []


def test_a_link_planted_at_the_spec_path_is_replaced_never_followed(tmp_path) -> None:
    root, victim = tmp_path / "cdi", tmp_path / "victim"
    cdi.ensure_dir(root)
    victim.write_text("keep")
    path = cdi.spec_path(root, DRIVER, UID)
    path.symlink_to(victim)
    spec = cdi.claim_spec(DRIVER, "n", "ns", "c", UID, [_device()])
    assert not cdi.spec_is_current(path, spec)                        # a link is never read through
    cdi.write_spec(path, spec)
    assert victim.read_text() == "keep" and not path.is_symlink() and cdi.spec_is_current(path, spec)


def test_a_spec_that_cannot_be_written_names_the_file_and_directory(tmp_path) -> None:
    root = tmp_path / "cdi"
    cdi.ensure_dir(root)
    (root / "sub").write_text("not a directory")
    path = root / "sub" / "x.json"
    with pytest.raises(durable.DurableError, match=r"cannot write CDI spec .*x\.json in directory .*sub"):
        cdi.write_spec(path, cdi.claim_spec(DRIVER, "n", "ns", "c", UID, [_device()]))


def test_the_toolkit_spec_lookup_finds_the_device_by_uuid_in_the_given_directories(tmp_path) -> None:
    etc, run = tmp_path / "etc-cdi", tmp_path / "run-cdi"
    etc.mkdir()
    run.mkdir()
    (etc / "other.yaml").write_text("cdiVersion: 0.5.0\nkind: example.com/thing\ndevices:\n- name: GPU-aaaa\n")
    (run / "nvidia.yaml").write_text("cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices:\n- name: GPU-aaaa\n")
    (run / "notes.txt").write_text("kind: nvidia.com/gpu GPU-bbbb")       # not a spec file
    assert cdi.toolkit_device_id([etc, run], "GPU-aaaa") == "nvidia.com/gpu=GPU-aaaa"
    assert cdi.toolkit_device_id([etc, run], "GPU-bbbb") is None
    assert cdi.toolkit_device_id([etc], "GPU-aaaa") is None             # another vendor's spec names it
    assert cdi.toolkit_device_id([], "GPU-aaaa") is None                # fake nodes search nothing
    assert cdi.toolkit_device_id([tmp_path / "missing"], "GPU-aaaa") is None


def test_prepare_returns_the_toolkit_device_where_the_plugin_is_told_to_look(tmp_path) -> None:
    """main.py decides where the toolkit spec is looked for (on real nodes); a prepare adds its device ID."""
    import asyncio

    from driver.api import naming
    from driver.inventory import discover
    from driver.nvml import open_backend, profile_from_spec
    from driver.plugin.prepare import ClaimRef, DeviceState
    from tests.support.claims import allocated_claim

    backend = open_backend("fake", profile=profile_from_spec("L4:1", "node-a"), node_name="node-a")
    backend.init()
    inv = discover(backend, "node-a")
    uuid = inv.gpus[0].uuid
    toolkit = tmp_path / "toolkit"
    toolkit.mkdir()
    (toolkit / "nvidia.yaml").write_text(f"cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices:\n- name: {uuid}\n")
    for dirs, expected in (([toolkit], [f"nvidia.com/gpu={uuid}"]), (None, [])):
        state = DeviceState(driver_name=DRIVER, node_name="node-a", backend=backend, inventory=inv,
                            cdi_root=tmp_path / "cdi", plugin_dir=tmp_path / "p", cdi_search_dirs=dirs)
        claim = allocated_claim("c", [naming.gpu_device_name(uuid)])
        md = claim["metadata"]
        res = asyncio.run(state.prepare([(ClaimRef(md["namespace"], md["name"], md["uid"]), claim)]))[md["uid"]]
        assert res.error == ""
        assert res.devices[0].cdi_device_ids[1:] == expected
        assert asyncio.run(state.unprepare([ClaimRef(md["namespace"], md["name"], md["uid"])])) == {md["uid"]: ""}
