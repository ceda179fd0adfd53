"""Our kubelet protos are wire-identical to upstream's (tests/reference/kubelet-api), and the committed stubs are
exactly what the locked grpcio-tools generates from them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

REPO = Path(__file__).resolve().parents[1]
PAIRS = {  # ours (under proto/) -> upstream's (under tests/reference/kubelet-api)
    "dra/v1/api.proto": "dra-v1.proto",
    "dra/v1beta1/api.proto": "dra-v1beta1.proto",
    "drahealth/v1/api.proto": "dra-health-v1.proto",
    "pluginregistration/v1/api.proto": "pluginregistration-v1.proto",
}


def _compile(include: Path, name: str, out: Path) -> descriptor_pb2.FileDescriptorProto:
    rc = protoc.main(["protoc", f"-I{include}", f"--descriptor_set_out={out}", str(include / name)])
    assert rc == 0, f"protoc failed on {include / name}"
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return fds.file[0]


def _wire(fd: descriptor_pb2.FileDescriptorProto) -> dict:
    """Everything that matters on the wire; comments, go_package and file names do not."""
    def fields(m):
        return sorted((f.name, f.number, f.type, f.label, f.type_name, f.proto3_optional,
                       f.HasField("oneof_index")) for f in m.field)

    def messages(ms, prefix=""):
        out = {}
        for m in ms:
            out[prefix + m.name] = {"fields": fields(m), "map_entry": m.options.map_entry}
            out.update(messages(m.nested_type, prefix + m.name + "."))
        return out

    return {
        "package": fd.package,
        "syntax": fd.syntax,
        "services": {s.name: sorted((m.name, m.input_type, m.output_type, m.client_streaming, m.server_streaming)
                                    for m in s.method) for s in fd.service},
        "messages": messages(fd.message_type),
        "enums": {e.name: sorted((v.name, v.number) for v in e.value) for e in fd.enum_type},
    }


@pytest.mark.parametrize("ours,ref", list(PAIRS.items()))
def test_proto_is_wire_identical_to_reference(ours, ref, reference_dir, tmp_path) -> None:
    mine = _wire(_compile(REPO / "proto", ours, tmp_path / "ours.pb"))
    theirs = _wire(_compile(reference_dir / "kubelet-api", ref, tmp_path / "ref.pb"))
    assert mine == theirs
    assert mine["services"], "a service must be defined"


def test_v1_has_share_id_and_v1beta1_does_not(tmp_path) -> None:
    v1 = _wire(_compile(REPO / "proto", "dra/v1/api.proto", tmp_path / "a.pb"))
    b1 = _wire(_compile(REPO / "proto", "dra/v1beta1/api.proto", tmp_path / "b.pb"))
    assert ("share_id", 5) in {(f[0], f[1]) for f in v1["messages"]["Device"]["fields"]}
    assert "share_id" not in {f[0] for f in b1["messages"]["Device"]["fields"]}


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def test_committed_stubs_match_the_protos(tmp_path) -> None:
    """Regenerates driver/kubeletapi with hack/gen-proto.sh and the locked grpcio-tools; every file byte-exact."""
    from importlib import metadata

    from test_lock import locked_version, parse_lock

    locked = locked_version(parse_lock(REPO / "requirements.lock"), "grpcio-tools")
    assert metadata.version("grpcio-tools") == locked, \
        f"this environment has grpcio-tools {metadata.version('grpcio-tools')}, the lock {locked}: run hack/setup.sh --test"
    work = tmp_path / "repo"
    (work / "hack").mkdir(parents=True)
    shutil.copy(REPO / "hack" / "gen-proto.sh", work / "hack")
    shutil.copytree(REPO / "proto", work / "proto")
    (work / "driver").mkdir()
    env = {**os.environ, "PYTHON": str(Path(os.sys.executable))}
    subprocess.run(["bash", str(work / "hack" / "gen-proto.sh")], check=True, env=env, capture_output=True)
    fresh, committed = _tree(work / "driver" / "kubeletapi"), _tree(REPO / "driver" / "kubeletapi")
    assert sorted(fresh) == sorted(committed), "driver/kubeletapi has other files than hack/gen-proto.sh makes"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert stale == [], f"driver/kubeletapi is out of date ({stale}): run hack/gen-proto.sh and commit the result"
