"""Node rules (kubernetes pkg/registry/core/node/strategy.go)."""

from __future__ import annotations

from .strategy import Strategy


class NodeStrategy(Strategy):
    #: "Nodes allow *all* fields, including status, to be set on create" (PrepareForCreate): the kubelet
    #: registers its Node with capacity and allocatable
    keeps_status_on_create = True
