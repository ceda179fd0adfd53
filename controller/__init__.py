"""Partita's cluster side: the allocator library, the operator, the sandbox, the simulator, the webhook
and the ``partita`` command."""

__all__ = ["allocator", "cli", "operator", "sandbox", "simulate", "webhook"]
