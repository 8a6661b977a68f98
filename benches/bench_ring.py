"""DirtyRing microbenchmarks: ns per entry for push (batched), collect, reset.

Run: python -m pytest benches/bench_ring.py --benchmark-only -q
Each benchmark stores ``ns_per_entry`` in extra_info (median time / entries: the mean is noisy on a shared machine).
"""
from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import rounds, set_ops
from kvmdirty import _mmu, _uapi
from kvmdirty._ring import DirtyRing

N = 65536                      # KVM_DIRTY_RING_MAX_ENTRIES
SLOT = 1
SLOT_PAGES = 1 << 22           # 16 GiB slot: random offsets spread over 512 KiB of W bits


def _mmu_one_slot():
    mmu = _mmu.Mmu()
    w = np.full(SLOT_PAGES >> 6, ~np.uint64(0), np.uint64)
    vals = np.zeros(SLOT_PAGES, np.uint64)
    mmu.set_slots([(SLOT, 0, SLOT_PAGES, _uapi.MEM_LOG_DIRTY_PAGES, w, vals, None)])
    return mmu


def _per_entry(benchmark, n):
    set_ops(benchmark, n, "entry")
    if not benchmark.stats:          # --benchmark-disable: ran once, nothing timed
        return
    ns = benchmark.stats.stats.median * 1e9 / n
    benchmark.extra_info["ns_per_entry"] = round(ns, 3)
    print(f"\n{benchmark.name}: {ns:.2f} ns/entry", file=sys.stderr)


def _drain(ring):
    ring.collect()
    ring.reset()


def test_push_batched(benchmark):
    ring = DirtyRing(N)
    slots = np.full(N, SLOT, np.uint32)
    offs = np.arange(N, dtype=np.uint64)
    benchmark.pedantic(ring.push_many, args=(slots, offs), setup=lambda: _drain(ring),
                       rounds=rounds(200, 20), warmup_rounds=5)
    assert ring.used == N
    _per_entry(benchmark, N)


def test_collect(benchmark):
    ring = DirtyRing(N)
    slots = np.full(N, SLOT, np.uint32)
    offs = np.arange(N, dtype=np.uint64)
    bs, bo = np.empty(N, np.uint32), np.empty(N, np.uint64)

    def setup():
        ring.reset()
        ring.push_many(slots, offs)

    benchmark.pedantic(ring.collect, args=(None, bs, bo), setup=setup, rounds=rounds(200, 20), warmup_rounds=5)
    assert ring.stats["collected"] >= N
    _per_entry(benchmark, N)


def test_collect_fresh(benchmark):
    """collect() into new arrays (sized for the whole ring) on every call."""
    ring = DirtyRing(N)
    slots = np.full(N, SLOT, np.uint32)
    offs = np.arange(N, dtype=np.uint64)

    def setup():
        ring.reset()
        ring.push_many(slots, offs)

    benchmark.pedantic(ring.collect, setup=setup, rounds=rounds(200, 20), warmup_rounds=5)
    assert ring.stats["collected"] >= N
    _per_entry(benchmark, N)


@pytest.mark.parametrize("pattern", ["consecutive", "random"])
def test_reset_with_masked_protect(benchmark, pattern):
    mmu = _mmu_one_slot()
    ring = DirtyRing(N)
    slots = np.full(N, SLOT, np.uint32)
    if pattern == "consecutive":
        offs = np.arange(N, dtype=np.uint64)
    else:
        offs = np.random.default_rng(0).integers(0, SLOT_PAGES, N).astype(np.uint64)

    def setup():
        ring.push_many(slots, offs)
        ring.collect()

    benchmark.pedantic(ring.reset, args=(mmu,), setup=setup, rounds=rounds(200, 20), warmup_rounds=5)
    assert ring.used == 0 and ring.stats["dropped"] == 0
    _per_entry(benchmark, N)
