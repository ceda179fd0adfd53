"""``partita sandbox``: a simulated cluster on one machine. Others use ``main`` (the command) and
``apiserver`` (the API server emulator); the tests use the rest."""

__all__ = ["apiserver", "main"]
