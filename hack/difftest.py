#!/usr/bin/env python3
"""Differential test of Partita's allocator against upstream's (shared/oracle/draalloc) on random cases.

    .venv/bin/python hack/difftest.py --cases 100000 --seed 7 [--start 0] [--out DIR] [--time-limit 150]

Runs cases ``start .. start+cases-1`` of the seed (tests/support/diffgen.py; case i is the same
whatever the range, so a long run can be split into pieces), judges each (tests/support/difftest.py:
agree, upstream-bug,
upstream-constraint-leak, stable-vs-incubating, search-limit, unexplained, oracle-failure) and writes every
disagreement, shrunk (greedy removals that keep the same verdict), as a conformance fixture
(the conformance fixture format of controller/allocator/conformance.py, expected = draalloc's answer) into ``--out``, named
``<category>-<seed>-<index>.yaml`` with the verdict in its header. Prints one summary line per
category and exits 1 when anything is unexplained, the oracle failed, or draalloc warned about
the generated input.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.difftest import EXPLAINED, Differ, Summary, oracle_present, shrink, write_fixture  # noqa: E402
from tests.support.diffgen import cases  # noqa: E402


class _Stopped(BaseException):   # not Exception: the allocator turns those into AllocationError
    pass


def _stop(signum: int, frame: object) -> None:
    raise _Stopped()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hack/difftest.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--start", type=int, default=0, help="first case index (to run a long seed in pieces)")
    p.add_argument("--out", type=Path, default=None, help="directory for the shrunk disagreement fixtures")
    p.add_argument("--shrink-s", type=float, default=20.0, help="time budget for shrinking one disagreement")
    p.add_argument("--no-shrink", action="store_true")
    p.add_argument("--time-limit", type=float, default=0.0,
                   help="stop after this many seconds (0: none); the summary says which cases ran, so the next "
                        "piece starts at the first one that did not")
    p.add_argument("--shrink-explained-s", type=float, default=2.0,
                   help="time budget for shrinking one explained disagreement (upstream bug, search limit, ...)")
    p.add_argument("--unexplained-only", action="store_true",
                   help="write fixtures only for unexplained disagreements (explained ones are still counted)")
    args = p.parse_args(argv)
    if not oracle_present():
        print("draalloc not found under ../shared/oracle", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    summary = Summary()
    slow: list[tuple[int, float]] = []
    signal.signal(signal.SIGTERM, _stop)          # a timeout ends the run with its summary
    with Differ() as d:
        try:
            for i, inp in cases(args.seed, args.cases, args.start):
                if args.time_limit and time.monotonic() - t0 > args.time_limit:
                    break
                t = time.monotonic()
                v = d.judge(inp)
                if time.monotonic() - t > 5:
                    slow.append((i, time.monotonic() - t))
                summary.add(i, inp, v)
                if v.category in ("agree", "oracle-timeout"):       # nothing to write for a timeout
                    continue
                explained = v.category in EXPLAINED
                if args.out is None or (explained and args.unexplained_only):
                    continue
                small = inp if args.no_shrink else shrink(inp, lambda c, cat=v.category: d.judge(c).category == cat,
                                                          args.shrink_explained_s if explained else args.shrink_s)
                sv = d.judge(small)
                comment = (f"difftest seed {args.seed} case {i}: {sv.category}\n"
                           f"draalloc ({sv.oracle.get('allocator')}): {sv.oracle.get('outcome')} "
                           f"{sv.oracle.get('error', '')}\nPartita: {' '.join(sv.why.split())[:400]}")
                path = write_fixture(args.out, f"{sv.category}-{args.seed}-{i}", small, sv, comment)
                print(f"{v.category} case {i}: {path}")
        except _Stopped:
            print("stopped by SIGTERM; the case being judged did not run")
    dt = time.monotonic() - t0
    print(f"seed {args.seed} cases {args.start}..{args.start + summary.cases - 1}: {summary.cases} in {dt:.0f}s "
          f"(next: --start {args.start + summary.cases}); "
          f"upstream implementation {summary.allocators}; draalloc outcomes {summary.outcomes}")
    for cat in ("agree",) + EXPLAINED + ("unexplained", "oracle-failure"):
        print(f"  {cat}: {summary.counts.get(cat, 0)}")
    print(f"  draalloc warnings: {len(summary.warnings)}")
    if slow:
        print(f"  cases over 5 s: {', '.join(f'{i} ({t:.0f}s)' for i, t in slow)}")
    for i, w in summary.warnings[:10]:
        print(f"    case {i}: {w}")
    for i, v, _ in summary.unexplained()[:20]:
        print(f"  UNEXPLAINED case {i} (draalloc {v.oracle.get('allocator')}: {v.oracle.get('outcome')}): "
              f"{' '.join(v.why.split())[:300]}")
    return 1 if summary.unexplained() or summary.warnings else 0


if __name__ == "__main__":
    sys.exit(main())
