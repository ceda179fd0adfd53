"""Shared GPUs at prepare (issue: shared time-sliced GPUs): time-slicing and MPS per GPU, one CDI device
per share, defaults restored by the last share, strategy conflicts refused, MPS daemons reconciled."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import threading
import uuid as uuidlib

import pytest

from driver.api import naming
from driver.inventory import discover
from driver.nvml import open_backend, profile_from_spec
from driver.plugin.prepare import ClaimRef, DeviceState
from tests.support.claims import allocated_claim

NODE = "node-a"
DRIVER = "gpu.partita.dev"


@pytest.fixture
def node(tmp_path):
    backend = open_backend("fake", profile=profile_from_spec("A100-SXM4-80GB:2", NODE), node_name=NODE,
                           state_dir=tmp_path / "nvml")
    backend.init()
    inv = discover(backend, NODE)
    # short plugin dir: the MPS stand-in's control socket lives below it
    plugin_dir = tmp_path / "p"

    def make_state():
        return DeviceState(driver_name=DRIVER, node_name=NODE, backend=backend, inventory=inv,
                           cdi_root=tmp_path / "cdi", plugin_dir=plugin_dir, cdi_search_dirs=[])
    state = make_state()
    yield state, backend, inv, make_state
    for uuid in state.sharing.mps.running_gpus():       # never leave a stand-in daemon behind
        state.sharing.mps.stop(uuid)


def _share_claim(name: str, gpu_index: int, inv, *, memory: str = "10Gi", sharing: dict | None = None,
                 source: str = "FromClaim") -> dict:
    shared = naming.shared_device_name(naming.gpu_device_name(inv.gpus[gpu_index].uuid))
    config = None
    if sharing is not None:
        config = [{"source": source, "requests": ["gpu"], "opaque": {"driver": DRIVER, "parameters": {
            "apiVersion": "gpu.partita.dev/v1alpha1", "kind": "GpuConfig", "sharing": sharing}}}]
    claim = allocated_claim(name, [shared], share_ids={shared: str(uuidlib.uuid4())}, config=config)
    claim["status"]["allocation"]["devices"]["results"][0]["consumedCapacity"] = {"memory": memory}
    return claim


def _ref(c: dict) -> ClaimRef:
    return ClaimRef(c["metadata"]["namespace"], c["metadata"]["name"], c["metadata"]["uid"])


def _prepare(state, *claims):
    return asyncio.run(state.prepare([(_ref(c), c) for c in claims]))


def _unprepare(state, *claims):
    return asyncio.run(state.unprepare([_ref(c) for c in claims]))


def _spec_env(state, claim) -> tuple[list[str], list[dict]]:
    entry = state.prepared_claims()[claim["metadata"]["uid"]]
    spec = json.loads(open(entry.cdi_spec).read())
    [dev] = spec["devices"]
    return dev["containerEdits"]["env"], dev["containerEdits"].get("mounts", [])


def test_time_slicing_shares_get_their_own_cdi_devices_and_the_last_restores_the_default(node) -> None:
    state, backend, inv, _ = node
    h = backend.device_by_uuid(inv.gpus[0].uuid)
    medium = {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Medium"}}
    a, b = _share_claim("nb-a", 0, inv, sharing=medium), _share_claim("nb-b", 0, inv, sharing=medium)
    res = _prepare(state, a, b)
    assert all(r.error == "" for r in res.values()), res
    ids = [res[c["metadata"]["uid"]].devices[0].cdi_device_ids[0] for c in (a, b)]
    assert len(set(ids)) == 2                      # one CDI device per share
    assert backend.time_slice(h) == "Medium"
    env, mounts = _spec_env(state, a)
    assert "PARTITA_TIME_SLICE=Medium" in env and "PARTITA_SHARED_MEMORY=10Gi" in env and mounts == []
    assert _unprepare(state, a) == {a["metadata"]["uid"]: ""}
    assert backend.time_slice(h) == "Medium"       # nb-b still runs
    _unprepare(state, b)
    assert backend.time_slice(h) == "Default"


def test_a_later_share_asking_another_interval_runs_with_the_gpus_current_one(node) -> None:
    state, backend, inv, _ = node
    a = _share_claim("a", 0, inv, sharing={"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}})
    b = _share_claim("b", 0, inv, sharing={"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Short"}})
    _prepare(state, a)
    assert _prepare(state, b)[b["metadata"]["uid"]].error == ""
    assert "PARTITA_TIME_SLICE=Long" in _spec_env(state, b)[0]
    assert backend.time_slice(backend.device_by_uuid(inv.gpus[0].uuid)) == "Long"


def test_mps_starts_one_daemon_per_gpu_limits_each_share_and_stops_with_the_last(node, cdi_validator) -> None:
    state, backend, inv, _ = node
    mps = state.sharing.mps
    gpu = inv.gpus[1].uuid
    h = backend.device_by_uuid(gpu)
    cfg = {"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": 50,
                                            "defaultPinnedDeviceMemoryLimit": "20Gi"}}
    a = _share_claim("svc-a", 1, inv, memory="10Gi", sharing=cfg, source="FromClass")
    b = _share_claim("svc-b", 1, inv, memory="30Gi", sharing=cfg, source="FromClass")
    assert _prepare(state, a)[a["metadata"]["uid"]].error == ""
    assert mps.running(gpu) and backend.compute_mode(h) == "ExclusiveProcess"
    assert mps.control(gpu, "get_default_active_thread_percentage") == "50.0"
    assert mps.control(gpu, "get_default_device_pinned_mem_limit 0") == "20480M"
    pid = mps.daemon_pid(gpu)
    assert pid is not None
    assert _prepare(state, b)[b["metadata"]["uid"]].error == ""
    assert mps.daemon_pid(gpu) == pid                  # joined, not restarted
    env_a, mounts = _spec_env(state, a)
    cdi_validator.validate(json.loads(open(state.prepared_claims()[a["metadata"]["uid"]].cdi_spec).read()))
    env_b, _ = _spec_env(state, b)
    assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=10240M" in env_a and "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=30720M" in env_b
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50" in env_a and "CUDA_MPS_PIPE_DIRECTORY=/tmp/nvidia-mps" in env_a
    # only the pipe directory reaches the workload; logs and the daemon's identity stay private
    assert {m["containerPath"]: m["hostPath"] for m in mounts} == {"/tmp/nvidia-mps": str(mps.dirs(gpu).pipe)}
    assert not any(e.startswith("CUDA_MPS_LOG_DIRECTORY=") for e in env_a)
    assert all(os.path.isdir(m["hostPath"]) for m in mounts)
    _unprepare(state, a)
    assert mps.running(gpu)
    _unprepare(state, b)
    assert not mps.running(gpu) and backend.compute_mode(h) == "Default"
    assert "Control daemon exited" in (mps.dirs(gpu).log / "control.log").read_text()


def test_time_slicing_and_mps_on_one_gpu_are_refused_naming_the_other_claim(node) -> None:
    state, backend, inv, _ = node
    ts = _share_claim("notebook", 0, inv)
    mps = _share_claim("service", 0, inv, sharing={"strategy": "MPS"})
    _prepare(state, ts)
    err = _prepare(state, mps)[mps["metadata"]["uid"]].error
    assert "shared with TimeSlicing by claim default/notebook" in err and "sharing.strategy" in err
    assert not state.sharing.mps.running(inv.gpus[0].uuid)
    assert mps["metadata"]["uid"] not in state.prepared_claims()


def test_a_malformed_config_is_refused_with_the_field_named(node) -> None:
    state, _, inv, _ = node
    bad = _share_claim("bad", 0, inv, sharing={"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": 0}})
    err = _prepare(state, bad)[bad["metadata"]["uid"]].error
    assert "mpsConfig.defaultActiveThreadPercentage" in err and "1 to 100" in err


def test_restart_reconciles_mps_daemons(node) -> None:
    state, backend, inv, make_state = node
    mps = state.sharing.mps
    gpu0, gpu1 = inv.gpus[0].uuid, inv.gpus[1].uuid
    cfg = {"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": 25}}
    keep = _share_claim("keep", 0, inv, sharing=cfg)
    _prepare(state, keep)
    # the node reboots: the daemon of the prepared share is gone
    os.kill(mps.daemon_pid(gpu0), signal.SIGKILL)
    asyncio.run(_until(lambda: not mps.running(gpu0)))
    # and a daemon nobody uses any more runs on the other GPU
    mps.start(gpu1)
    restarted = make_state()
    asyncio.run(restarted.recover())
    assert mps.running(gpu0) and mps.control(gpu0, "get_default_active_thread_percentage") == "25.0"
    assert not mps.running(gpu1)
    _unprepare(restarted, keep)
    assert not mps.running(gpu0)


async def _until(predicate, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline
        await asyncio.sleep(0.05)


def test_a_whole_gpu_claim_with_a_sharing_config_is_set_up_and_restored_like_a_share(node) -> None:
    """The fallback without consumable capacity: one claim for a whole GPU used by several pods."""
    state, backend, inv, _ = node
    gpu = inv.gpus[0]
    config = [{"source": "FromClaim", "requests": ["gpu"], "opaque": {"driver": DRIVER, "parameters": {
        "apiVersion": "gpu.partita.dev/v1alpha1", "kind": "GpuConfig",
        "sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Short"}}}}}]
    team = allocated_claim("team-gpu", [naming.gpu_device_name(gpu.uuid)], config=config)
    plain = allocated_claim("plain", [naming.gpu_device_name(inv.gpus[1].uuid)])
    res = _prepare(state, team, plain)
    assert all(r.error == "" for r in res.values())
    assert backend.time_slice(backend.device_by_uuid(gpu.uuid)) == "Short"
    assert "PARTITA_TIME_SLICE=Short" in _spec_env(state, team)[0]
    assert backend.time_slice(backend.device_by_uuid(inv.gpus[1].uuid)) == "Default"   # no config: untouched
    _unprepare(state, team)
    assert backend.time_slice(backend.device_by_uuid(gpu.uuid)) == "Default"


def _tenant_control_socket(path, stop: threading.Event) -> threading.Thread:
    """What a tenant with the pipe directory can do: answer there as if it were the daemon (and ignore quit)."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(8)
    srv.settimeout(0.1)

    def serve():
        with srv:
            while not stop.is_set():
                try:
                    conn, _ = srv.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.recv(4096)
                    conn.sendall(b"\n")
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_nothing_a_tenant_writes_in_the_pipe_directory_makes_the_plugin_signal_a_process(node) -> None:
    """The pipe directory is mounted read-write into workloads. A tenant plants the PID of an unrelated
    host process where the daemon's PID file used to be, and its own endpoint where the control socket
    used to be (one that never quits): unprepare stops the real daemon and the process survives."""
    state, backend, inv, _ = node
    mps = state.sharing.mps
    gpu = inv.gpus[0].uuid
    victim = subprocess.Popen(["sleep", "300"])
    stop = threading.Event()
    try:
        share = _share_claim("svc", 0, inv, sharing={"strategy": "MPS"})
        assert _prepare(state, share)[share["metadata"]["uid"]].error == ""
        daemon = mps.daemon_pid(gpu)
        pipe = mps.dirs(gpu).pipe
        assert daemon is not None and daemon != victim.pid
        assert os.listdir(pipe) == []                         # nothing of the plugin's lives there
        for name in ("nvidia-cuda-mps-control.pid", "daemon.pid", "pid"):
            (pipe / name).write_text(f"{victim.pid}\n")
        (pipe / "control").unlink(missing_ok=True)
        _tenant_control_socket(pipe / "control", stop)
        assert _unprepare(state, share) == {share["metadata"]["uid"]: ""}
        assert not mps.running(gpu)
        asyncio.run(_until(lambda: not os.path.exists(f"/proc/{daemon}") or _zombie(daemon)))
        assert victim.poll() is None                          # the planted PID was never signalled
        assert backend.compute_mode(backend.device_by_uuid(gpu)) == "Default"
    finally:
        stop.set()
        victim.kill()
        victim.wait()


def _zombie(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_recorded_pid_that_is_not_the_daemon_is_never_signalled(node) -> None:
    """After a crash or reboot the private PID file may name a reused PID: /proc decides, not the file."""
    state, _, inv, _ = node
    mps = state.sharing.mps
    gpu = inv.gpus[1].uuid
    victim = subprocess.Popen(["sleep", "300"])
    try:
        mps.start(gpu)
        real = mps.daemon_pid(gpu)
        assert real is not None
        mps.dirs(gpu).pid_file.write_text(f"{victim.pid}\n")
        assert mps.daemon_pid(gpu) is None                    # a sleep is not the daemon of this GPU
        mps.dirs(gpu).pid_file.write_text(f"{real}\n")
        assert mps.daemon_pid(gpu) == real
        other = inv.gpus[0].uuid                              # the daemon of one GPU is not another's
        mps.dirs(other).root.mkdir(parents=True, exist_ok=True)
        mps.dirs(other).pid_file.write_text(f"{real}\n")
        assert mps.daemon_pid(other) is None
        mps.stop(gpu)
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_the_last_share_of_a_gpu_without_mig_restores_its_time_slice(tmp_path) -> None:
    """An L4 has no MIG mode (NVML: Not Supported): restoring its defaults must not ask for it."""
    backend = open_backend("fake", profile=profile_from_spec("L4:1", NODE), node_name=NODE, state_dir=tmp_path / "n")
    backend.init()
    inv = discover(backend, NODE)
    state = DeviceState(driver_name=DRIVER, node_name=NODE, backend=backend, inventory=inv, cdi_root=tmp_path / "cdi",
                        plugin_dir=tmp_path / "p", cdi_search_dirs=[])
    share = _share_claim("ts", 0, inv, sharing={"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}})
    assert _prepare(state, share)[share["metadata"]["uid"]].error == ""
    h = backend.device_by_uuid(inv.gpus[0].uuid)
    assert backend.time_slice(h) == "Long"
    assert _unprepare(state, share) == {share["metadata"]["uid"]: ""}
    assert backend.time_slice(h) == "Default" and state.prepared_claims() == {}


def test_the_real_daemon_is_recognised_by_its_executable_and_pipe_directory(tmp_path) -> None:
    """Real nodes: ``nvidia-cuda-mps-control -d`` forks away, so the plugin finds the daemon in /proc by its
    executable and pipe directory, and signals only such a process (a stand-in binary of that name here)."""
    import shutil

    from driver.plugin.mps import MpsDaemons

    fake_binary = tmp_path / "bin" / "nvidia-cuda-mps-control"
    fake_binary.parent.mkdir()
    shutil.copy(shutil.which("sleep"), fake_binary)
    mps = MpsDaemons(tmp_path / "mps", "real")
    ours, theirs = mps.dirs("GPU-ours"), mps.dirs("GPU-theirs")
    for d in (ours, theirs):
        d.root.mkdir(parents=True)
    procs = [subprocess.Popen([str(fake_binary), "300"], env={"CUDA_MPS_PIPE_DIRECTORY": str(ours.pipe)}),
             subprocess.Popen([str(fake_binary), "300"], env={"CUDA_MPS_PIPE_DIRECTORY": "/elsewhere"}),
             subprocess.Popen(["sleep", "300"], env={"CUDA_MPS_PIPE_DIRECTORY": str(theirs.pipe)})]
    try:
        asyncio.run(_until(lambda: all(os.path.basename(os.readlink(f"/proc/{p.pid}/exe")) in
                                       ("nvidia-cuda-mps-control", "sleep") for p in procs)))
        assert mps._find_real_daemon(ours) == procs[0].pid
        assert mps._find_real_daemon(theirs) is None           # a plain sleep is no daemon, whatever its env
        ours.pid_file.write_text(f"{procs[0].pid}\n")
        theirs.pid_file.write_text(f"{procs[1].pid}\n")        # the right binary, another pipe directory
        assert mps.daemon_pid("GPU-ours") == procs[0].pid and mps.daemon_pid("GPU-theirs") is None
    finally:
        for p in procs:
            p.kill()
            p.wait()
