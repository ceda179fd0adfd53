"""The plugin's files survive failure (issue: safety): checkpoint and CDI specs are written completely or
not at all (full disk, short writes), never through planted symlinks, in directories only the plugin can
write; undecodable checkpoints are per-call errors; a failed prepare runs every undo step; a prepared
claim whose MIG instance or CDI spec vanished is re-created, never answered stale."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import uuid as uuidlib
from pathlib import Path

import pytest

from driver.api import naming
from driver.inventory import discover
from driver.nvml import NvmlError, open_backend, profile_from_spec
from driver.nvml.interface import COMPUTE_MODE_DEFAULT, Placement
from driver.plugin import durable
from driver.plugin.checkpoint import Checkpoint, CheckpointError, CheckpointStore, PreparedClaim
from driver.plugin.prepare import ClaimRef, DeviceState
from tests.support.claims import allocated_claim

NODE = "node-a"
DRIVER = "gpu.partita.dev"
SPEC_PREFIX = "k8s.gpu.partita.dev-gpu_"

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def mounts():
    """Mount tmpfs file systems (always unmounted in teardown)."""
    done: list[Path] = []

    def mount(path: Path, options: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
        done.append(path)
        return path
    yield mount
    for path in reversed(done):
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def node(tmp_path):
    """Two H100s (MIG without a reset) and an A100 80GB (shares); the MPS stand-in is stopped afterwards."""
    backend = open_backend("fake", profile=profile_from_spec("H100-SXM5-80GB:2,A100-SXM4-80GB:1", NODE),
                           node_name=NODE, state_dir=tmp_path / "nvml")
    backend.init()
    inv = discover(backend, NODE)
    states: list[DeviceState] = []

    def make_state(*, plugin_dir: Path | None = None, cdi_root: Path | None = None, boot_id_file: Path | None = None):
        boot = tmp_path / "boot_id"
        if not boot.exists():
            boot.write_text("boot-1\n")
        s = DeviceState(driver_name=DRIVER, node_name=NODE, backend=backend, inventory=inv,
                        cdi_root=cdi_root or tmp_path / "cdi", plugin_dir=plugin_dir or tmp_path / "p",
                        cdi_search_dirs=[], boot_id_file=boot_id_file or boot)
        states.append(s)
        return s
    yield backend, inv, make_state
    for s in states:
        for uuid in s.sharing.mps.running_gpus():
            s.sharing.mps.stop(uuid)


def _ref(c: dict) -> ClaimRef:
    return ClaimRef(c["metadata"]["namespace"], c["metadata"]["name"], c["metadata"]["uid"])


def _prepare(state, *claims):
    return asyncio.run(state.prepare([(_ref(c), c) for c in claims]))


def _error(state, claim) -> str:
    return _prepare(state, claim)[claim["metadata"]["uid"]].error


def _unprepare(state, *claims):
    return asyncio.run(state.unprepare([_ref(c) for c in claims]))


def _gpu(inv, i: int) -> str:
    return naming.gpu_device_name(inv.gpus[i].uuid)


def _mig(inv, i: int, profile: str, start: int) -> str:
    return naming.mig_device_name(_gpu(inv, i), profile, start)


def _mps_claim(name: str, inv, gpu_index: int = 2, extra_devices: list[str] = ()) -> dict:
    shared = naming.shared_device_name(_gpu(inv, gpu_index))
    config = [{"source": "FromClaim", "requests": ["gpu"], "opaque": {"driver": DRIVER, "parameters": {
        "apiVersion": "gpu.partita.dev/v1alpha1", "kind": "GpuConfig", "sharing": {"strategy": "MPS"}}}}]
    claim = allocated_claim(name, [*extra_devices, shared], share_ids={shared: str(uuidlib.uuid4())}, config=config)
    for r in claim["status"]["allocation"]["devices"]["results"]:
        if r["device"] == shared:
            r["consumedCapacity"] = {"memory": "10Gi"}
    return claim


def _fill(path: Path, leave_bytes: int = 0) -> Path:
    """Fill the file system of ``path`` up, then free ``leave_bytes`` (whole pages) again."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"x" * 4096) == 4096:
            pass
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    if leave_bytes:
        os.truncate(filler, max(0, filler.stat().st_size - leave_bytes))
    return filler


def _big_checkpoint(n: int) -> Checkpoint:
    return Checkpoint(claims={f"uid-{i}": PreparedClaim(uid=f"uid-{i}", namespace="default", name=f"claim-{i}",
                                                        state="Prepared", cdiSpec="/var/run/cdi/" + "x" * 200)
                              for i in range(n)})


# -- 1. complete or not at all -------------------------------------------------------------------
@root_only
def test_a_checkpoint_that_does_not_fit_the_disk_is_refused_and_the_old_one_stays(tmp_path, mounts) -> None:
    """The tester's 256 KiB tmpfs: a write with room for only one page used to leave truncated JSON."""
    d = mounts(tmp_path / "small", "size=256k")
    store = CheckpointStore(d / "checkpoint.json")
    store.write(_big_checkpoint(2))
    good = (d / "checkpoint.json").read_bytes()
    _fill(d, leave_bytes=4096)                    # room for a short write, not for the whole file
    with pytest.raises(CheckpointError) as e:
        store.write(_big_checkpoint(60))          # ~20 KiB
    assert "no space left" in str(e.value) and str(d / "checkpoint.json") in str(e.value)
    assert "previous checkpoint is unchanged" in str(e.value)
    assert (d / "checkpoint.json").read_bytes() == good
    assert sorted(p.name for p in d.iterdir()) == ["checkpoint.json", "filler"]    # no temp file left
    assert list(store.read().claims) == ["uid-0", "uid-1"]


@root_only
def test_prepare_on_a_full_disk_fails_keeps_the_checkpoint_and_works_once_space_is_freed(node, tmp_path, mounts) -> None:
    backend, inv, make_state = node
    plugin_dir = mounts(tmp_path / "p", "size=256k,mode=0750")
    state = make_state(plugin_dir=plugin_dir)
    first = allocated_claim("first", [_gpu(inv, 0)])
    assert _error(state, first) == ""
    good = (plugin_dir / "checkpoint.json").read_bytes()
    filler = _fill(plugin_dir)
    mig = allocated_claim("mig", [_mig(inv, 1, "3g.40gb", 4)])
    err = _error(state, mig)
    assert "no space left" in err and str(plugin_dir / "checkpoint.json") in err and "free space" in err
    assert (plugin_dir / "checkpoint.json").read_bytes() == good
    assert backend.gpu_instances(backend.device_by_uuid(inv.gpus[1].uuid)) == []   # nothing created
    assert not (tmp_path / "cdi" / f"{SPEC_PREFIX}{mig['metadata']['uid']}.json").exists()
    err = _unprepare(state, first)[first["metadata"]["uid"]]      # the intent cannot be recorded: nothing done
    assert "nothing was unprepared" in err and "no space left" in err
    assert (tmp_path / "cdi" / f"{SPEC_PREFIX}{first['metadata']['uid']}.json").exists()
    assert (plugin_dir / "checkpoint.json").read_bytes() == good
    filler.unlink()
    restarted = make_state(plugin_dir=plugin_dir)
    assert _error(restarted, mig) == ""
    assert _unprepare(restarted, first, mig) == {first["metadata"]["uid"]: "", mig["metadata"]["uid"]: ""}
    assert restarted.prepared_claims() == {}


def test_short_writes_are_continued_and_a_zero_write_is_an_error(tmp_path, monkeypatch) -> None:
    real_write = os.write
    monkeypatch.setattr(durable.os, "write", lambda fd, data: real_write(fd, bytes(data[:100])))
    store = CheckpointStore(tmp_path / "p" / "checkpoint.json")
    cp = _big_checkpoint(30)
    store.write(cp)
    assert store.read() == cp
    good = store.path.read_bytes()
    monkeypatch.setattr(durable.os, "write", lambda fd, data: 0)
    with pytest.raises(CheckpointError, match="no space left"):
        store.write(_big_checkpoint(3))
    assert store.path.read_bytes() == good
    assert [p.name for p in store.path.parent.iterdir()] == ["checkpoint.json"]


@pytest.mark.parametrize("content, why", [
    (b'{"apiVersion": "gpu.partita.dev/v1", "kind": "PluginCheckpoint", "claims": {"\xff\xfe": {}}}', "not UTF-8"),
    (b'{"apiVersion": "gpu.partita.dev/v1", "kind": "PluginCheckpoint", "cla', "not valid JSON"),
    (b'{"apiVersion": "gpu.partita.dev/v1", "kind": "PluginCheckpoint", "claims": {"u": {"uid": "u", '
     b'"namespace": "n", "name": "c", "state": "Bogus"}}}', "field claims.u.state"),
])
def test_an_undecodable_checkpoint_is_an_error_per_call_never_a_crash(node, tmp_path, content, why) -> None:
    _, inv, make_state = node
    path = tmp_path / "p" / "checkpoint.json"
    path.parent.mkdir(mode=0o750)
    path.write_bytes(content)
    state = make_state()
    assert asyncio.run(state.recover()) == []          # start-up does not raise
    claim = allocated_claim("c", [_gpu(inv, 0)])
    err = _error(state, claim)
    assert why in err and str(path) in err and "will not prepare or unprepare" in err
    assert why in _unprepare(state, claim)[claim["metadata"]["uid"]]
    assert path.read_bytes() == content                # untouched: nothing lost


# -- symlinks and directory ownership -------------------------------------------------------------
def test_planted_symlinks_are_never_followed(node, tmp_path) -> None:
    """Links at every path the plugin writes (final paths, the old predictable temp names, the lock file,
    the MPS marker) leave their targets untouched; final paths become the plugin's own files."""
    _, inv, make_state = node
    plugin_dir, cdi_dir = tmp_path / "p", tmp_path / "cdi"
    plugin_dir.mkdir(mode=0o750)
    cdi_dir.mkdir(mode=0o755)
    claim = _mps_claim("mps", inv, extra_devices=[_mig(inv, 0, "3g.40gb", 4)])
    uid = claim["metadata"]["uid"]
    spec = f"{SPEC_PREFIX}{uid}.json"
    mps_dir = plugin_dir / "mps" / make_state().sharing.mps.dirs(inv.gpus[2].uuid).root.name
    mps_dir.mkdir(parents=True)
    victims = {}
    for link in [plugin_dir / "checkpoint.json", plugin_dir / ".checkpoint.json.tmp", plugin_dir / "serialize.lock",
                 cdi_dir / spec, cdi_dir / f".{spec}.tmp", mps_dir / "gpu"]:
        target = tmp_path / f"victim-{link.name}"
        target.write_text("precious\n")
        link.symlink_to(target)
        victims[link] = target
    state = make_state()
    err = _error(state, claim)
    lock = plugin_dir / "serialize.lock"
    assert "lock file" in err and str(lock) in err      # refuses to open the lock through the link
    lock.unlink()
    del victims[lock]
    (plugin_dir / "checkpoint.json").unlink()           # a link there is an error too (read refuses it)
    state = make_state()
    assert _error(state, claim) == ""
    for link, target in victims.items():
        assert target.read_text() == "precious\n", f"{target} was written through {link}"
    for final in (plugin_dir / "checkpoint.json", cdi_dir / spec, mps_dir / "gpu"):
        assert final.is_file() and not final.is_symlink()
    assert _unprepare(state, claim) == {uid: ""}


def test_a_link_at_the_checkpoint_path_is_refused_not_read(node, tmp_path) -> None:
    _, inv, make_state = node
    (tmp_path / "p").mkdir(mode=0o750)
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"apiVersion": "gpu.partita.dev/v1", "kind": "PluginCheckpoint"}))
    (tmp_path / "p" / "checkpoint.json").symlink_to(elsewhere)
    err = _error(make_state(), allocated_claim("c", [_gpu(inv, 0)]))
    assert "is a symlink" in err and str(tmp_path / "p" / "checkpoint.json") in err


def test_temp_files_are_exclusive(tmp_path, monkeypatch) -> None:
    """Even a link at the exact (random) temp name is never written through: O_CREAT|O_EXCL|O_NOFOLLOW."""
    monkeypatch.setattr(durable.secrets, "token_hex", lambda n: "0" * (2 * n))
    target = tmp_path / "victim"
    target.write_text("precious\n")
    store = CheckpointStore(tmp_path / "p" / "checkpoint.json")
    store.ensure_dir()
    (tmp_path / "p" / f".checkpoint.json.{'0' * 16}.tmp").symlink_to(target)
    with pytest.raises(CheckpointError, match="cannot write checkpoint"):
        store.write(_big_checkpoint(1))
    assert target.read_text() == "precious\n" and not store.path.exists()


def test_the_plugin_directories_are_made_private(node, tmp_path) -> None:
    _, inv, make_state = node
    for d in (tmp_path / "p", tmp_path / "cdi"):
        d.mkdir()
        os.chmod(d, 0o777)
    assert _error(make_state(), allocated_claim("c", [_gpu(inv, 0)])) == ""
    assert (tmp_path / "p").stat().st_mode & 0o022 == 0
    assert (tmp_path / "cdi").stat().st_mode & 0o777 == 0o755


@root_only
def test_a_plugin_directory_owned_by_another_user_is_refused_per_call(node, tmp_path) -> None:
    _, inv, make_state = node
    (tmp_path / "p").mkdir()
    os.chown(tmp_path / "p", 12345, 12345)
    state = make_state()
    assert asyncio.run(state.recover()) == []
    err = _error(state, allocated_claim("c", [_gpu(inv, 0)]))
    assert str(tmp_path / "p") in err and "uid 12345" in err and "chown" in err
    os.chown(tmp_path / "p", 0, 0)                       # fixed: the next call works
    assert _error(state, allocated_claim("c2", [_gpu(inv, 0)])) == ""


# -- 3. a failed prepare undoes every step ----------------------------------------------------------
@root_only
def test_a_read_only_cdi_dir_fails_the_prepare_and_leaves_no_entry_and_no_mps_daemon(node, tmp_path, mounts) -> None:
    backend, inv, make_state = node
    cdi_dir = mounts(tmp_path / "cdi", "ro,size=64k,mode=0755")
    state = make_state(cdi_root=cdi_dir)
    claim = _mps_claim("mps", inv)
    err = _error(state, claim)
    assert f"in directory {cdi_dir}" in err and "read-only" in err and f"make {cdi_dir} writable" in err
    assert state.prepared_claims() == {}
    assert state.sharing.mps.running_gpus() == []
    assert backend.compute_mode(backend.device_by_uuid(inv.gpus[2].uuid)) == COMPUTE_MODE_DEFAULT


@root_only
def test_every_undo_step_runs_when_one_fails_and_the_next_call_finishes(node, tmp_path, mounts, monkeypatch) -> None:
    """MIG device + MPS share, CDI dir read-only, and destroying the MIG device fails once: the MPS daemon
    is still stopped, the error names both failures, and the entry stays for the next call to finish."""
    backend, inv, make_state = node
    cdi_dir = mounts(tmp_path / "cdi", "ro,size=64k,mode=0755")
    state = make_state(cdi_root=cdi_dir)
    claim = _mps_claim("both", inv, extra_devices=[_mig(inv, 0, "3g.40gb", 4)])
    real_destroy = backend.destroy_mig_device

    def broken(h, gi):  # noqa: ANN001
        raise NvmlError("GPU is lost (injected)")
    monkeypatch.setattr(backend, "destroy_mig_device", broken)
    err = _error(state, claim)
    assert "read-only" in err and "GPU is lost (injected)" in err
    assert state.sharing.mps.running_gpus() == []                       # the later step still ran
    h = backend.device_by_uuid(inv.gpus[0].uuid)
    assert len(backend.gpu_instances(h)) == 1
    assert state.prepared_claims()[claim["metadata"]["uid"]].state == "Preparing"
    monkeypatch.setattr(backend, "destroy_mig_device", real_destroy)
    subprocess.run(["mount", "-o", "remount,rw", str(cdi_dir)], check=True)
    other = allocated_claim("other", [_gpu(inv, 1)])
    assert _error(state, other) == ""                                  # any call finishes the undo
    assert backend.gpu_instances(h) == [] and backend.mig_mode(h).current is False
    assert list(state.prepared_claims()) == [other["metadata"]["uid"]]


# -- 2. a prepared claim is never answered stale ---------------------------------------------------
def test_a_prepared_claim_whose_mig_instance_and_spec_vanished_is_re_created(node, tmp_path) -> None:
    backend, inv, make_state = node
    state = make_state()
    claim = allocated_claim("m", [_mig(inv, 0, "3g.40gb", 4)])
    uid = claim["metadata"]["uid"]
    assert _error(state, claim) == ""
    h = backend.device_by_uuid(inv.gpus[0].uuid)
    (gi,) = backend.gpu_instances(h)
    backend.destroy_mig_device(h, gi.id)                 # what a lost unprepare or a reboot did
    backend.set_mig_mode(h, False)
    spec = tmp_path / "cdi" / f"{SPEC_PREFIX}{uid}.json"
    spec.unlink()
    res = _prepare(make_state(), claim)[uid]
    assert res.error == ""
    (mig,) = backend.mig_devices(h)
    assert (mig.profile_name, mig.placement) == ("3g.40gb", Placement(4, 4))
    assert res.devices[0].mig.uuid == mig.uuid
    assert f"NVIDIA_VISIBLE_DEVICES={mig.uuid}" in json.loads(spec.read_text())["devices"][0]["containerEdits"]["env"]
    big = allocated_claim("big", [_mig(inv, 0, "7g.80gb", 0)])
    assert "overlaps" in _error(state, big)
    assert _unprepare(state, claim) == {uid: ""} and backend.gpu_instances(h) == []


def test_a_vanished_mig_instance_that_cannot_be_re_created_is_a_clear_error(node) -> None:
    backend, inv, make_state = node
    state = make_state()
    claim = allocated_claim("m", [_mig(inv, 0, "3g.40gb", 4)])
    assert _error(state, claim) == ""
    h = backend.device_by_uuid(inv.gpus[0].uuid)
    (gi,) = backend.gpu_instances(h)
    backend.destroy_mig_device(h, gi.id)
    backend.create_gpu_instance(h, 0, Placement(0, 8))   # someone took the whole GPU meanwhile (7g.80gb)
    err = _error(state, claim)
    assert f"MIG device {_mig(inv, 0, '3g.40gb', 4)}" in err and f"no longer exists on GPU {inv.gpus[0].uuid}" in err
    assert "cannot be re-created" in err and "overlaps" in err and "delete the claim" in err


def test_a_node_reboot_restores_prepared_claims_at_start(node, tmp_path) -> None:
    """Boot id changed, MIG instances and /var/run specs gone, checkpoint kept: the start-up recovery
    re-creates the instance and the spec before any prepare asks, so the placement is not handed out."""
    backend, inv, make_state = node
    state = make_state()
    claim = allocated_claim("m", [_mig(inv, 0, "3g.40gb", 4)])
    uid = claim["metadata"]["uid"]
    assert _error(state, claim) == ""
    assert state.checkpoint.read().boot_id == "boot-1"
    h = backend.device_by_uuid(inv.gpus[0].uuid)
    for gi in backend.gpu_instances(h):
        backend.destroy_mig_device(h, gi.id)
    backend.set_mig_mode(h, False)
    for p in (tmp_path / "cdi").iterdir():
        p.unlink()
    (tmp_path / "boot_id").write_text("boot-2\n")
    restarted = make_state()
    asyncio.run(restarted.recover())
    (mig,) = backend.mig_devices(h)
    assert mig.placement == Placement(4, 4)
    assert (tmp_path / "cdi" / f"{SPEC_PREFIX}{uid}.json").exists()
    assert restarted.checkpoint.read().boot_id == "boot-2"
    assert restarted.prepared_claims()[uid].devices[0].mig.uuid == mig.uuid


def test_an_interrupted_unprepare_is_finished_by_the_next_call(node, tmp_path) -> None:
    """Unprepare records Unpreparing before destroying anything; a crash after the spec is removed used
    to leave the claim Prepared with nothing behind it, and the next prepare answered it stale."""
    backend, inv, make_state = node
    state = make_state()
    claim = allocated_claim("m", [_mig(inv, 0, "3g.40gb", 4)])
    uid = claim["metadata"]["uid"]
    assert _error(state, claim) == ""

    class Killed(BaseException):
        pass

    def crash(point: str) -> None:
        if point == "cdi-spec-removed":
            raise Killed
    state._crash = crash
    with pytest.raises(Killed):
        _unprepare(state, claim)
    assert CheckpointStore(tmp_path / "p" / "checkpoint.json").read().claims[uid].state == "Unpreparing"
    restarted = make_state()
    res = _prepare(restarted, claim)[uid]                # the kubelet prepares again: afresh, not stale
    assert res.error == ""
    h = backend.device_by_uuid(inv.gpus[0].uuid)
    (mig,) = backend.mig_devices(h)
    assert res.devices[0].mig.uuid == mig.uuid
    assert (tmp_path / "cdi" / f"{SPEC_PREFIX}{uid}.json").exists()
    assert "overlaps" in _error(restarted, allocated_claim("big", [_mig(inv, 0, "7g.80gb", 0)]))


def test_a_node_reboot_restores_the_mps_daemon_and_compute_mode_of_a_share(node, tmp_path) -> None:
    backend, inv, make_state = node
    state = make_state()
    claim = _mps_claim("mps", inv)
    assert _error(state, claim) == ""
    h = backend.device_by_uuid(inv.gpus[2].uuid)
    for uuid in state.sharing.mps.running_gpus():          # the reboot: daemons gone, GPU defaults back
        state.sharing.mps.stop(uuid)
    backend.set_compute_mode(h, COMPUTE_MODE_DEFAULT)
    (tmp_path / "boot_id").write_text("boot-2\n")
    restarted = make_state()
    asyncio.run(restarted.recover())
    assert backend.compute_mode(h) == "ExclusiveProcess"
    assert restarted.sharing.mps.running_gpus() == [inv.gpus[2].uuid]
    assert _unprepare(restarted, claim) == {claim["metadata"]["uid"]: ""}
    assert backend.compute_mode(h) == COMPUTE_MODE_DEFAULT and restarted.sharing.mps.running_gpus() == []
