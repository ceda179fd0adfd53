"""driver/plugin/checkpoint.py on its own (issue 17 item 9): the document's round trip, what older plugins
wrote is still read, and every way a checkpoint can be unreadable or unwritable is an error that names the
file and leaves it untouched."""

from __future__ import annotations

import json
import os

import pytest

from driver.plugin.checkpoint import (API_VERSION, KIND, Checkpoint, CheckpointError, CheckpointStore, MigInstance,
                                      PreparedClaim, PreparedDevice)


def _claim(uid: str = "u1", state: str = "Prepared") -> PreparedClaim:
    mig = MigInstance(gpuUUID="GPU-a", profileID=9, placementStart=4, placementSize=4, gpuInstanceID=2,
                      computeInstanceID=0, uuid="MIG-x")
    dev = PreparedDevice(requestNames=["gpu"], pool="node-a", device="gpu-0-mig-3g40gb-4",
                         cdiDeviceIDs=["k8s.gpu.partita.dev/gpu=u1-gpu-0-mig-3g40gb-4"], type="mig", gpuUUID="GPU-a",
                         mig=mig)
    return PreparedClaim(uid=uid, namespace="ns", name="c", state=state, devices=[dev], cdiSpec="/cdi/x.json")


def test_a_written_checkpoint_reads_back_the_same(tmp_path) -> None:
    store = CheckpointStore(tmp_path / "p" / "checkpoint.json")
    assert store.read() == Checkpoint()                                # none yet: empty
    cp = Checkpoint(bootID="boot-1", claims={"u1": _claim(), "u2": _claim("u2", "Preparing")})
    store.write(cp)
    assert store.read() == cp
    raw = json.loads(store.path.read_text())
    assert (raw["apiVersion"], raw["kind"], raw["bootID"]) == (API_VERSION, KIND, "boot-1")
    assert "adminAccess" not in json.dumps(raw)                       # written only when true (older readers)
    assert os.stat(store.path).st_mode & 0o777 == 0o600
    assert store.writes == 1
    assert os.stat(store.path.parent).st_mode & 0o022 == 0            # only the plugin writes there


def test_a_checkpoint_of_an_older_plugin_is_read(tmp_path) -> None:
    """No bootID, no adminAccess, no created flag: the defaults an older plugin meant."""
    path = tmp_path / "checkpoint.json"
    path.write_text(json.dumps({"apiVersion": API_VERSION, "kind": KIND, "claims": {"u1": {
        "uid": "u1", "namespace": "ns", "name": "c", "state": "Prepared", "devices": [{
            "requestNames": ["gpu"], "pool": "node-a", "device": "gpu-0-mig-1g10gb-0", "cdiDeviceIDs": ["x"],
            "type": "mig", "gpuUUID": "GPU-a",
            "mig": {"gpuUUID": "GPU-a", "profileID": 19, "placementStart": 0, "placementSize": 1}}]}}}))
    cp = CheckpointStore(path).read()
    assert cp.boot_id is None
    [dev] = cp.claims["u1"].devices
    assert dev.admin_access is None and dev.mig is not None and dev.mig.created is True
    assert cp.claims["u1"].cdi_spec == ""


@pytest.mark.parametrize("content, why", [
    (b"\xff\xfe", "not UTF-8"),
    (b"{", "not valid JSON"),
    (b"[]", "is not a PluginCheckpoint"),
    (json.dumps({"apiVersion": API_VERSION, "kind": "Other"}).encode(), "is not a PluginCheckpoint"),
    (json.dumps({"apiVersion": "gpu.partita.dev/v9", "kind": KIND}).encode(), "written by a newer Partita"),
    (json.dumps({"apiVersion": API_VERSION, "kind": KIND, "claims": {"u": {"uid": "u"}}}).encode(),
     "field claims.u.namespace"),
    (json.dumps({"apiVersion": API_VERSION, "kind": KIND, "claims": {}, "surprise": 1}).encode(), "field surprise"),
])
def test_an_unreadable_checkpoint_is_an_error_naming_it_and_is_left_untouched(tmp_path, content, why) -> None:
    path = tmp_path / "checkpoint.json"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        CheckpointStore(path).read()
    assert str(path) in str(e.value) and why in str(e.value)
    assert "no prepared state is lost" in str(e.value)
    assert path.read_bytes() == content


def test_a_link_at_the_checkpoint_path_is_never_followed(tmp_path) -> None:
    victim = tmp_path / "victim.json"
    victim.write_text(json.dumps({"apiVersion": API_VERSION, "kind": KIND}))
    path = tmp_path / "checkpoint.json"
    path.symlink_to(victim)
    with pytest.raises(CheckpointError, match="is a symlink"):
        CheckpointStore(path).read()
    store = CheckpointStore(path)
    store.write(Checkpoint(bootID="b"))                               # replaced by the rename, not written through
    assert not path.is_symlink() and json.loads(victim.read_text()) == {"apiVersion": API_VERSION, "kind": KIND}


def test_a_write_that_fails_on_fsync_keeps_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    import errno

    store = CheckpointStore(tmp_path / "p" / "checkpoint.json")
    store.write(Checkpoint(claims={"u1": _claim()}))
    before = store.path.read_bytes()

    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*Input/output error.*unchanged"):
        store.write(Checkpoint())
    monkeypatch.undo()
    assert store.path.read_bytes() == before and store.writes == 1
    assert [p.name for p in store.path.parent.iterdir()] == ["checkpoint.json"]     # no temp file left


def test_the_plugin_directory_must_be_a_real_directory(tmp_path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(CheckpointError, match="not a directory but a symlink"):
        CheckpointStore(tmp_path / "link" / "checkpoint.json").ensure_dir()
