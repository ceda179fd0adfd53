"""The simulator's one error type: bad input, with a message naming the source, the place and the fix."""

from __future__ import annotations

from driver.errors import PartitaError


class SimulateError(PartitaError, ValueError):
    """Input the simulator cannot use (cluster spec, trace file, option); ``partita simulate`` exits 2."""
