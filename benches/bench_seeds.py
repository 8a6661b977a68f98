"""Seed-era designs: the shared cmpxchg ring against per-vCPU rings, 2 writer threads.

Run: python -m pytest benches/bench_seeds.py --benchmark-only -q
The ratio (shared ns/entry over per-vCPU ns/entry) is printed and stored in extra_info.
"""
from __future__ import annotations

import sys
import threading

import numpy as np

from kvmdirty import _seeds
from kvmdirty._ring import DirtyRing

PER_WRITER = 1 << 15
RESULTS: dict = {}


def _two_threads(fn_a, fn_b):
    ta, tb = threading.Thread(target=fn_a), threading.Thread(target=fn_b)
    ta.start()
    tb.start()
    ta.join()
    tb.join()


def _report(benchmark, key):
    if not benchmark.stats:          # --benchmark-disable: ran once, nothing timed
        return
    ns = benchmark.stats.stats.median * 1e9 / (2 * PER_WRITER)
    RESULTS[key] = ns
    benchmark.extra_info["ns_per_entry"] = round(ns, 3)
    msg = f"\n{benchmark.name}: {ns:.2f} ns/entry (2 writers)"
    if len(RESULTS) == 2:
        ratio = RESULTS["shared"] / RESULTS["per_vcpu"]
        benchmark.extra_info["shared_over_per_vcpu"] = round(ratio, 2)
        msg += f"; shared / per-vCPU time ratio = {ratio:.2f}"
    print(msg, file=sys.stderr)


def _inputs(i):
    return np.full(PER_WRITER, i, np.uint32), np.arange(PER_WRITER, dtype=np.uint64)


def test_per_vcpu_rings_two_writers(benchmark):
    rings = [DirtyRing(PER_WRITER), DirtyRing(PER_WRITER)]
    ins = [_inputs(0), _inputs(1)]

    def setup():
        for r in rings:
            r.collect()
            r.reset()

    def run():
        _two_threads(lambda: rings[0].push_many(*ins[0]), lambda: rings[1].push_many(*ins[1]))

    benchmark.pedantic(run, setup=setup, rounds=100, warmup_rounds=3)
    assert all(r.used == PER_WRITER for r in rings)
    _report(benchmark, "per_vcpu")


def test_shared_cmpxchg_ring_two_writers(benchmark):
    ring = DirtyRing(2 * PER_WRITER)
    ins = [_inputs(0), _inputs(1)]

    def setup():
        ring.collect()
        ring.reset()

    def run():
        _two_threads(lambda: _seeds.push_many_shared(ring, *ins[0]),
                     lambda: _seeds.push_many_shared(ring, *ins[1]))

    benchmark.pedantic(run, setup=setup, rounds=100, warmup_rounds=3)
    assert ring.used == 2 * PER_WRITER
    _report(benchmark, "shared")
