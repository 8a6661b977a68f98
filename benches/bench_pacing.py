"""The cost of pacing: a vCPU asked for more than the machine can do, paced vs unpaced.

Run: python -m pytest benches/bench_pacing.py --benchmark-only -q -s
One vCPU thread writes for a fixed time, unpaced (chunks of 4096 writes
back to back), then paced by the token bucket at 1 TB/s (far above what one
core can do, so the bucket is always full and every batch is the 4096-write
cap); the two alternate, a pair per round, so a busy host slows both alike.
The median over the pairs of paced / unpaced write throughput is printed
and stored in extra_info (target >= 0.90: the bucket costs less than a tenth
of the write loop).
"""
from __future__ import annotations

import statistics
import sys

from conftest import QUICK, rounds

from kvmdirty.runner import RunSpec, run
from kvmdirty.workloads import Workload


def _spec(paced: bool) -> RunSpec:
    return RunSpec(design="bitmap", memory=256 << 20, vcpus=1, mode="threads",
                   duration=0.2 if QUICK else 0.5, interval=0.01, check="none",
                   workload=Workload("uniform"), rate=4096,
                   dirty_rate=1e12 if paced else None)


def _writes_per_s(paced: bool) -> float:
    r = run(_spec(paced))
    return r.writes / r.guest_s


def test_pacing_overhead(benchmark):
    pairs = []

    def pair():
        pairs.append((_writes_per_s(False), _writes_per_s(True)))
    benchmark.pedantic(pair, rounds=rounds(5, 1), iterations=1)
    ratio = statistics.median(p / u for u, p in pairs)
    unpaced = statistics.median(u for u, _p in pairs)
    paced = statistics.median(p for _u, p in pairs)
    benchmark.extra_info.update(unpaced_writes_per_s=round(unpaced), paced_writes_per_s=round(paced),
                                paced_over_unpaced=round(ratio, 3), pairs=len(pairs))
    print(f"\npacing: unpaced {unpaced / 1e6:.2f} M writes/s, paced at 1 TB/s {paced / 1e6:.2f} M "
          f"writes/s; paced / unpaced, median of {len(pairs)} pairs: {ratio:.1%} (target >= 90%)",
          file=sys.stderr)
