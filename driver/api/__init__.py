"""Kubernetes API types and the client, shared by the driver and the controller (one module per concern):
``config`` (GpuConfig and its resolution), ``constants`` (the device model's names), ``deviceclasses``,
``kube`` (the JSON client, API paths, the one connection set-up), ``messages`` (bounded messages),
``naming`` (DNS names), ``nodeselector`` (node selector matching), ``objects`` (read-only views of API
objects), ``quantity`` (resource quantities)."""

__all__ = ["config", "constants", "deviceclasses", "kube", "messages", "naming", "nodeselector", "objects",
           "quantity"]
