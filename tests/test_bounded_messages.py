"""Error messages stay about 1 KiB whatever their input (driver/api/messages.py), wherever they are
reported: config errors (plugin, controller, webhook), API errors, the controller's Events."""

from __future__ import annotations

import asyncio

import pytest

from controller.operator.events import EventRecorder
from controller.webhook import review
from driver.api.config import ConfigError, parse_gpu_config
from driver.api.kube import KubeError
from driver.api.messages import MAX_MESSAGE, bound, bound_list, brief

HUGE = "x" * 3_000_000


def _size(s: str) -> int:
    return len(s.encode())


def test_bound_keeps_short_text_and_cuts_long_text_saying_so() -> None:
    assert bound("short") == "short"
    assert bound("a" * MAX_MESSAGE) == "a" * MAX_MESSAGE
    cut = bound(HUGE)
    assert _size(cut) <= MAX_MESSAGE and cut.startswith("xxxx") and "3,000,000 bytes in all" in cut
    # multi-byte characters are never split, and the limit counts bytes
    wide = bound("é" * 5000, 300)
    assert _size(wide) <= 300 and wide.startswith("éé")
    wide.encode("utf-8", "strict")


def test_bound_list_says_how_many_more() -> None:
    assert bound_list([]) == "" and bound_list(["a", "b"]) == "a; b"
    items = [f"spec.devices.config[{i}]: unknown field; remove it" for i in range(5000)]
    text = bound_list(items)
    assert _size(text) <= MAX_MESSAGE and text.startswith(items[0] + "; " + items[1])
    shown = text.count("unknown field")
    assert text.endswith(f"; ... and {5000 - shown:,} more")
    # the first item always shows, cut when it alone is too long
    first = bound_list([HUGE, "second"])
    assert _size(first) <= MAX_MESSAGE and first.startswith("xxx") and first.endswith("; ... and 1 more")
    assert bound_list(["a", "b"], sep=", ") == "a, b"


def test_brief_quotes_a_value_without_echoing_it() -> None:
    assert brief("node-a") == "'node-a'" and brief(5) == "5" and brief(None) == "None"
    assert brief(HUGE) == repr("x" * 80) + "… (3,000,000 characters)"
    assert _size(brief(list(range(100_000)))) <= 80


def test_config_errors_are_bounded_and_name_the_field() -> None:
    with pytest.raises(ConfigError) as e:
        parse_gpu_config({"apiVersion": HUGE, "kind": "GpuConfig"}, "claim ns/c config[0].opaque.parameters")
    msg = str(e.value)
    assert _size(msg) <= MAX_MESSAGE
    assert msg.startswith("claim ns/c config[0].opaque.parameters.apiVersion: must be 'gpu.partita.dev/v1alpha1', "
                          "got 'xxx") and "(3,000,000 characters)" in msg
    many = {"apiVersion": "gpu.partita.dev/v1alpha1", "kind": "GpuConfig", **{f"f{i}": i for i in range(20_000)}}
    with pytest.raises(ConfigError) as e:
        parse_gpu_config(many, "p")
    msg = str(e.value)
    assert _size(msg) <= MAX_MESSAGE and msg.startswith("p.f0: unknown field; remove it; p.f1: unknown field")
    assert msg.endswith(" more") and "... and 19," in msg


def test_webhook_denial_message_is_bounded() -> None:
    claim = {"kind": "ResourceClaim", "metadata": {"namespace": "ns", "name": "c"}, "spec": {"devices": {"config": [
        {"opaque": {"driver": "gpu.partita.dev", "parameters": {"apiVersion": HUGE, "kind": "GpuConfig"}}}] * 50}}}
    resp = review({"request": {"uid": "u", "kind": {"kind": "ResourceClaim"}, "object": claim}}, "gpu.partita.dev")
    message = resp["response"]["status"]["message"]
    assert resp["response"]["allowed"] is False and _size(message) <= MAX_MESSAGE
    assert message.startswith("ResourceClaim ns/c: spec.devices.config[0].opaque.parameters.apiVersion") and \
        message.endswith(" more")


def test_api_errors_and_events_are_bounded() -> None:
    e = KubeError(422, "Invalid", HUGE, "PUT", "/apis/resource.k8s.io/v1/resourceslices/s")
    assert _size(str(e)) <= MAX_MESSAGE and _size(e.message) <= MAX_MESSAGE
    assert str(e).startswith("PUT /apis/resource.k8s.io/v1/resourceslices/s: 422 Invalid: xxx")

    class Kube:
        def __init__(self) -> None:
            self.created: list[tuple[str, dict]] = []

        async def create(self, path: str, body: dict) -> dict:
            self.created.append((path, body))
            return body

    kube = Kube()
    pod = {"kind": "Pod", "apiVersion": "v1", "metadata": {"namespace": "team-a", "name": "p", "uid": "u"}}
    asyncio.run(EventRecorder(kube).post(pod, "Warning", "PartitaInvalidConfig", "é" * 1_000_000))
    [(path, body)] = kube.created
    assert path == "/api/v1/namespaces/team-a/events"
    assert _size(body["message"]) <= MAX_MESSAGE and body["message"].startswith("éé")
