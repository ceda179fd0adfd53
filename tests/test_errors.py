"""One error hierarchy (driver/errors.py): every exception the project defines is a PartitaError, the API
client raises a class per refusal, a deleted claim is told apart by its type (never by its message), and
failures passed on as values are Results."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import pkgutil
from dataclasses import dataclass

import pytest

import controller
import driver
from controller.sandbox.apiserver import ApiServer
from driver.api.kube import NODES, Kube, KubeConflict, KubeError, KubeInvalid, KubeNotFound, node_path
from driver.errors import PartitaError, Result
from driver.plugin.claims import ClaimGone
from driver.plugin.main import cleanup_stale_claims
from driver.plugin.prepare import PrepareError


def _modules():
    for pkg in (driver, controller):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if info.name.endswith("__main__") or ".kubeletapi." in info.name:
                continue
            yield importlib.import_module(info.name)


def test_every_exception_the_project_defines_is_a_partita_error() -> None:
    defined, outside = [], []
    for mod in _modules():
        for name, cls in vars(mod).items():
            if inspect.isclass(cls) and issubclass(cls, BaseException) and cls.__module__ == mod.__name__ \
                    and not name.startswith("_"):
                defined.append(cls)
                if not issubclass(cls, PartitaError):
                    outside.append(f"{mod.__name__}.{name}")
    assert outside == []
    # the walk saw the classes the issue names (so an empty ``outside`` is not an empty walk)
    names = {c.__name__ for c in defined}
    assert {"AllocationError", "AdmissionError", "NvmlError", "KubeError", "PrepareError", "ClaimGone",
            "ConfigError", "CheckpointError", "ApiError"} <= names


def test_the_base_keeps_each_class_what_it_was() -> None:
    from driver.api.config import ConfigError
    from driver.plugin.durable import DurableError

    assert issubclass(ConfigError, ValueError)          # callers catching ValueError still catch it
    e = DurableError(28, "No space left on device")
    assert isinstance(e, OSError) and e.errno == 28


@pytest.fixture
def server():
    s = ApiServer(bookmark_interval=0.2)
    s.start_in_thread()
    yield s
    s.stop_in_thread()


def _node(name: str, rv: str | None = None) -> dict:
    md = {"name": name, **({"resourceVersion": rv} if rv else {})}
    return {"apiVersion": "v1", "kind": "Node", "metadata": md}


def test_the_api_client_raises_a_class_per_refusal_beside_the_flags(server) -> None:
    async def go() -> list[KubeError]:
        got = []
        async with await Kube.connect(server.url) as kube:
            for call in (kube.get(node_path("absent")),
                         kube.create(NODES, _node("n1")),                        # the second create: 409
                         kube.replace(node_path("n1"), _node("n1", rv="1")),    # stale resourceVersion: 409
                         kube.create(NODES, {"apiVersion": "v1", "kind": "Node", "metadata": {}})):   # 422
                try:
                    await call
                except KubeError as e:
                    got.append(e)
        return got

    server.create(_node("n1"))
    notfound, exists, stale, invalid = asyncio.run(go())
    assert type(notfound) is KubeNotFound and notfound.not_found and notfound.status == 404
    assert type(exists) is KubeConflict and exists.conflict and exists.reason == "AlreadyExists"
    assert type(stale) is KubeConflict and stale.conflict and stale.reason == "Conflict"
    assert type(invalid) is KubeInvalid and invalid.invalid
    assert all(isinstance(e, PartitaError) for e in (notfound, exists, stale, invalid))
    assert type(KubeError.of(500, "InternalError", "boom")) is KubeError


@dataclass
class _Entry:
    namespace: str
    name: str


class _State:
    """What cleanup_stale_claims uses of DeviceState: the checkpoint's claims and unprepare."""

    def __init__(self, **claims: _Entry):
        self.claims = claims
        self.released: list[str] = []

    def prepared_claims(self) -> dict[str, _Entry]:
        return dict(self.claims)

    async def unprepare(self, refs) -> dict[str, str]:  # noqa: ANN001
        self.released += [r.uid for r in refs]
        return {}


class _Claims:
    def __init__(self, errors: dict[str, Exception]):
        self.errors = errors

    async def get(self, ref):  # noqa: ANN001
        raise self.errors[ref.uid]


def test_a_deleted_claim_is_told_apart_by_its_type_not_its_message() -> None:
    state = _State(gone=_Entry("default", "a"), unreadable=_Entry("default", "b"))
    claims = _Claims({
        "gone": ClaimGone("claim default/a (uid gone) is deleted"),
        # a read that failed for another reason, whose message happens to say "does not exist": kept
        "unreadable": PrepareError("reading claim default/b failed: the namespace does not exist yet"),
    })
    asyncio.run(cleanup_stale_claims(state, claims))   # type: ignore[arg-type]
    assert state.released == ["gone"]
    assert issubclass(ClaimGone, PrepareError)           # Prepare reports it as any unreadable claim


def test_a_result_is_a_value_or_the_message_why_not() -> None:
    assert Result.ok({"a": 1}).value == {"a": 1} and Result.ok({}).error is None
    failed = Result.failed("claim default/a: gone")
    assert failed.value is None and failed.error == "claim default/a: gone"
    with pytest.raises(ValueError, match="needs the message"):
        Result.failed("")
