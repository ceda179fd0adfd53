"""``partita simulate``: churn simulation of the allocator's strategies on a simulated cluster.

Requests arrive (a seeded Poisson stream from a built-in mix, or a trace file of past pods), run for
their lifetime and release; pending requests are retried in arrival order every tick. The same arrivals
go through each strategy side by side, each with its own :class:`~controller.allocator.Allocator` and
:class:`~controller.allocator.AllocatedState`, over the ResourceSlices the driver's real slice builder
publishes for fake GPUs. No API server is involved.

One module per concern: :mod:`.cluster` (cluster spec -> slices), :mod:`.shapes` (request shapes and
their claims), :mod:`.workload` (built-in mixes, seeded arrivals), :mod:`.trace` (trace files),
:mod:`.strategies` (what is compared, and the queue-policy extension point), :mod:`.engine` (the event
loop), :mod:`.metrics` (figures), :mod:`.report` (table/JSON), :mod:`.plot` (PNG), :mod:`.main` (the command).
See docs/simulate.md.
"""

from .errors import SimulateError

__all__ = ["SimulateError", "main"]
