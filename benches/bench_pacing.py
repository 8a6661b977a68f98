"""The cost of pacing: a vCPU asked for more than the machine can do, paced vs unpaced.

Run: python -m pytest benches/bench_pacing.py --benchmark-only -q -s
One vCPU thread writes for a fixed time, once unpaced (chunks of 4096
writes back to back) and once paced by the token bucket at 1 TB/s (far
above what one core can do, so the bucket is always full and every batch
is the 4096-write cap).  The paced run's write throughput over the
unpaced one's is printed and stored in extra_info (target >= 0.90: the
bucket costs less than a tenth of the write loop).
"""
from __future__ import annotations

import sys

import pytest
from conftest import QUICK, rounds

from kvmdirty.runner import RunSpec, run
from kvmdirty.workloads import Workload

RESULTS: dict = {}


def _spec(paced: bool) -> RunSpec:
    return RunSpec(design="bitmap", memory=256 << 20, vcpus=1, mode="threads",
                   duration=0.3 if QUICK else 1.0, interval=0.01, check="none",
                   workload=Workload("uniform"), rate=4096,
                   dirty_rate=1e12 if paced else None)


@pytest.mark.parametrize("paced", [False, True], ids=["unpaced", "paced"])
def test_pacing_overhead(benchmark, paced):
    seen = []

    def once():
        r = run(_spec(paced))
        seen.append(r.writes / r.guest_s)
    benchmark.pedantic(once, rounds=rounds(3, 1), iterations=1)
    wps = sorted(seen)[len(seen) // 2]            # the median round
    benchmark.extra_info.update(paced=paced, writes_per_s=round(wps))
    RESULTS[paced] = wps
    if len(RESULTS) == 2:
        ratio = RESULTS[True] / RESULTS[False]
        benchmark.extra_info["paced_over_unpaced"] = round(ratio, 3)
        print(f"\npacing: unpaced {RESULTS[False] / 1e6:.2f} M writes/s, paced at 1 TB/s "
              f"{RESULTS[True] / 1e6:.2f} M writes/s: {ratio:.1%} (target >= 90%)", file=sys.stderr)
