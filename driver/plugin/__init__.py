"""The kubelet plugin. Others use only ``main`` (the command) and ``sockets`` (where its sockets are, for
the sandbox's kubelet stand-in); the rest is its own."""

__all__ = ["main", "sockets", "telemetry"]
