"""What the kubelet asks the plugin and what each claim is answered: the claim it names
(:class:`ClaimRef`), the outcome of its prepare (:class:`PreparedResult`) and the error of a claim that
cannot be prepared (:class:`PrepareError`). Every plugin module that takes part in a prepare uses these."""

from __future__ import annotations

from dataclasses import dataclass, field

from driver.errors import PartitaError
from driver.plugin.checkpoint import PreparedDevice


class PrepareError(PartitaError):
    """A claim cannot be prepared; the message names the claim, the field and the fix."""


@dataclass
class ClaimRef:
    namespace: str
    name: str
    uid: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass
class PreparedResult:
    devices: list[PreparedDevice] = field(default_factory=list)
    error: str = ""


def base_request(name: str) -> str:
    """``gpu/sub`` -> ``gpu``: the kubelet matches containers' claim requests on base names."""
    return name.split("/", 1)[0]


def check_request(ref: ClaimRef) -> None:
    for fld in ("uid", "name", "namespace"):
        if not getattr(ref, fld):
            raise PrepareError(f"the kubelet sent a claim with an empty {fld} (namespace={ref.namespace!r}, "
                               f"name={ref.name!r}, uid={ref.uid!r}); this is a kubelet bug or a misbehaving "
                               "client — upgrade the kubelet or report it")
