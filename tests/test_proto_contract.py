"""Our kubelet protos are wire-identical to the references, and the committed stubs match them."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

REPO = Path(__file__).resolve().parents[1]
PAIRS = {  # ours (under proto/) -> reference (under shared/reference/kubelet-api)
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
def test_proto_is_wire_identical_to_reference(ours, ref, shared_dir, tmp_path) -> None:
    mine = _wire(_compile(REPO / "proto", ours, tmp_path / "ours.pb"))
    theirs = _wire(_compile(shared_dir / "reference" / "kubelet-api", ref, tmp_path / "ref.pb"))
    assert mine == theirs
    assert mine["services"], "a service must be defined"


def test_v1_has_share_id_and_v1beta1_does_not(tmp_path) -> None:
    v1 = _wire(_compile(REPO / "proto", "dra/v1/api.proto", tmp_path / "a.pb"))
    b1 = _wire(_compile(REPO / "proto", "dra/v1beta1/api.proto", tmp_path / "b.pb"))
    assert ("share_id", 5) in {(f[0], f[1]) for f in v1["messages"]["Device"]["fields"]}
    assert "share_id" not in {f[0] for f in b1["messages"]["Device"]["fields"]}


def test_committed_stubs_match_the_protos(tmp_path) -> None:
    work = tmp_path / "repo"
    (work / "hack").mkdir(parents=True)
    shutil.copy(REPO / "hack" / "gen-proto.sh", work / "hack")
    shutil.copytree(REPO / "proto", work / "proto")
    (work / "driver").mkdir()
    env = {**os.environ, "PYTHON": str(Path(os.sys.executable))}
    subprocess.run(["bash", str(work / "hack" / "gen-proto.sh")], check=True, env=env, capture_output=True)
    cmp = filecmp.dircmp(work / "driver" / "kubeletapi", REPO / "driver" / "kubeletapi", ignore=["__pycache__"])

    def diffs(c: filecmp.dircmp) -> list[str]:
        out = [f"{c.left}/{n}" for n in c.diff_files + c.left_only + c.right_only]
        for sub in c.subdirs.values():
            out += diffs(sub)
        return out

    assert diffs(cmp) == [], "driver/kubeletapi is out of date: run hack/gen-proto.sh and commit the result"
