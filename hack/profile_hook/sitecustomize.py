"""Profile a whole Python process, every thread, when ``PARTITA_PROFILE`` names an output file.

Put this directory on ``PYTHONPATH`` (``hack/bench_prepare.py --profile FILE`` does, for the plugin
process): the interpreter imports it at start; each thread runs under its own ``cProfile.Profile`` (the
event loop's thread and every worker thread: cProfile alone sees only the thread that enabled it), and at
exit all are merged into one ``pstats`` file (read it with ``python -m pstats FILE``).
"""

import atexit
import cProfile
import os
import threading

_OUT = os.environ.get("PARTITA_PROFILE")

if _OUT:
    _profiles: list[cProfile.Profile] = []
    _lock = threading.Lock()

    def _profiled(run):
        def wrapper(self):  # noqa: ANN001
            p = cProfile.Profile()
            with _lock:
                _profiles.append(p)
            p.enable()
            try:
                run(self)
            finally:
                p.disable()
        return wrapper

    threading.Thread.run = _profiled(threading.Thread.run)
    _main = cProfile.Profile()
    _profiles.append(_main)
    _main.enable()

    @atexit.register
    def _dump() -> None:
        import pstats

        _main.disable()
        with _lock:
            profiles = list(_profiles)
        stats = None
        for p in profiles:
            try:
                stats = pstats.Stats(p) if stats is None else stats.add(p)
            except TypeError:      # a thread that ran nothing
                continue
        if stats is not None:
            stats.dump_stats(_OUT)
