"""The C baseline: each operation done the plain way in C, on the same data, in the same run.

kvmdirty._cbase (src/_cbase.h, built by setup.py with the core's compiler
flags) holds the loops a C programmer writes for each job: scan/exchange a
bitmap, exchange-scan-list into caller buffers, list the set bits, collect and
reset a ring (one atomic and-not per entry).  ``kvmdirty bench`` divides each
kernel and API row by its baseline here (kvmdirty/benchreport.py, C_PAIRS):
the targets are those ratios.

Every case mirrors one of ours: same sizes, same dirty pages, same buffers
reused, the same rounds.  Group: cbase-<case>; extra_info impl="c".
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import (DIRTY_24G, PAGES_24G, RING_DIRTY, RING_ENTRIES, RING_SLOT_PAGES, dirty_pages,
                      dirty_words, ring_plan, rounds, set_ops)
from kvmdirty import _bitmap
from kvmdirty._ring import ENTRY_DTYPE

_cbase = pytest.importorskip("kvmdirty._cbase", reason="the C baseline is not built (setup.py build_ext)")

WORDS = PAGES_24G // 64
DENSITIES = {"0.01%": 1e-4, "0.1%": 1e-3, "1%": 1e-2, "10%": 0.1, "50%": 0.5}
RING_N = 65536                    # bench_ring.py's ring
RING_SLOT = 1
RING_PAGES = 1 << 22              # bench_ring.py's 16 GiB slot
DIRTY, RESET = 1, 2


def _c(benchmark, case, ops, unit, **info):
    benchmark.group = f"cbase-{case}"
    set_ops(benchmark, ops, unit, impl="c", **info)


# -- bitmap ----------------------------------------------------------------------
def test_c_harvest_clean_24g(benchmark):
    """KVM_GET_DIRTY_LOG's loop on a clean 24 GiB slot (a plain scan of 768 KiB)."""
    words, snap, writable = (np.zeros(WORDS, np.uint64) for _ in range(3))
    _c(benchmark, "harvest-clean-24g", 1, "call", pages=PAGES_24G)
    assert benchmark(_cbase.harvest, words, snap, writable) == 0


@pytest.mark.parametrize("snapshot", ["snapshot", "fused"])
def test_c_harvest_list_sparse(benchmark, snapshot):
    """0.1% of 24 GiB dirty: exchange, protect and list in one loop, into reused buffers
    ("snapshot": every word of a reused snapshot written too, as get_dirty_log + to_gfns
    must leave it; "fused": no snapshot, as harvest_gfns)."""
    # Two dirty sets in turn, as every 0.1% case of ours (a fixed set would let
    # the branch predictor learn where the dirty words are).
    sets = [dirty_pages(PAGES_24G, DIRTY_24G, seed=s) for s in (1, 2)]
    turn = [0]
    words = np.zeros(WORDS, np.uint64)
    writable = np.full(WORDS, ~np.uint64(0))
    snap = np.empty(WORDS, np.uint64) if snapshot == "snapshot" else None
    out = np.empty(DIRTY_24G, np.uint64)
    _c(benchmark, f"harvest-list-{snapshot}", DIRTY_24G, "page", dirty=DIRTY_24G)

    def setup():
        turn[0] ^= 1
        _bitmap.set_bits(words, sets[turn[0]])

    got = benchmark.pedantic(_cbase.harvest_list, args=(words, snap, writable, out), setup=setup,
                             rounds=rounds(100, 10), warmup_rounds=1)
    assert got == DIRTY_24G and np.array_equal(out, sets[turn[0]])


@pytest.mark.parametrize("density", list(DENSITIES))
def test_c_to_gfns(benchmark, density):
    """The set bits as page numbers into a reused array (the plain ctz loop)."""
    n = int(PAGES_24G * DENSITIES[density])
    words, pages = dirty_words(PAGES_24G, n), dirty_pages(PAGES_24G, n)
    out = np.empty(n, np.uint64)
    _c(benchmark, f"gfns-{density}", n, "page", density=density, dirty=n)
    r = max(3, rounds(200, 20) // (1 + n // 200_000))
    assert benchmark.pedantic(_cbase.to_gfns, args=(words, out), rounds=r, warmup_rounds=1) == n
    assert np.array_equal(out, pages)


# -- ring --------------------------------------------------------------------------
def _entries(n: int) -> np.ndarray:
    return np.zeros(n, ENTRY_DTYPE)


def test_c_collect(benchmark):
    """bench_ring.py::test_collect's job: 65,536 DIRTY entries collected into reused arrays."""
    e = _entries(RING_N)
    e["slot"] = RING_SLOT
    e["offset"] = np.arange(RING_N, dtype=np.uint64)
    raw = e.view(np.uint8)
    bs, bo = np.empty(RING_N, np.uint32), np.empty(RING_N, np.uint64)
    _c(benchmark, "ring-collect", RING_N, "entry")

    def setup():
        e["flags"] = DIRTY

    got = benchmark.pedantic(_cbase.collect, args=(raw, 0, bs, bo), setup=setup, rounds=rounds(200, 20),
                             warmup_rounds=5)
    assert got == RING_N and bo[-1] == RING_N - 1


@pytest.mark.parametrize("pattern", ["consecutive", "random"])
def test_c_reset(benchmark, pattern):
    """bench_ring.py::test_reset_with_masked_protect's job: free 65,536 RESET entries,
    one atomic and-not of the page's W bit each (no coalescing)."""
    e = _entries(RING_N)
    e["slot"] = RING_SLOT
    if pattern == "consecutive":
        e["offset"] = np.arange(RING_N, dtype=np.uint64)
    else:
        e["offset"] = np.random.default_rng(0).integers(0, RING_PAGES, RING_N).astype(np.uint64)
    raw = e.view(np.uint8)
    writable = np.full(RING_PAGES >> 6, ~np.uint64(0), np.uint64)
    _c(benchmark, f"ring-reset-{pattern}", RING_N, "entry", pattern=pattern)

    def setup():
        e["flags"] = RESET

    got = benchmark.pedantic(_cbase.reset, args=(raw, 0, writable, RING_PAGES), setup=setup,
                             rounds=rounds(200, 20), warmup_rounds=5)
    assert got == RING_N


@pytest.mark.parametrize("pattern", ["consecutive", "random"])
def test_c_ring_harvest(benchmark, pattern):
    """bench_vm.py::test_ring_harvest's job: collect RING_DIRTY entries of a 65,536-entry
    ring into reused arrays, then reset them (one and-not each)."""
    plan = ring_plan(pattern)
    e = _entries(RING_ENTRIES)
    e["offset"][:RING_DIRTY] = plan
    raw = e.view(np.uint8)
    writable = np.full(RING_SLOT_PAGES >> 6, ~np.uint64(0), np.uint64)
    bs, bo = np.empty(RING_ENTRIES, np.uint32), np.empty(RING_ENTRIES, np.uint64)
    _c(benchmark, f"ring-harvest-{pattern}", RING_DIRTY, "entry", pattern=pattern)

    def setup():
        e["flags"][:RING_DIRTY] = DIRTY

    def harvest():
        n = _cbase.collect(raw, 0, bs, bo)
        return n, _cbase.reset(raw, 0, writable, RING_SLOT_PAGES)

    got = benchmark.pedantic(harvest, setup=setup, rounds=rounds(100, 10), warmup_rounds=1)
    assert got == (RING_DIRTY, RING_DIRTY)
