"""The benchmarks' C baseline does the same job as the kernels it is compared with.

(It is not an API: only benches/bench_cbase.py and benches/callgrind.py use it.
A baseline that computed something else would make every ratio meaningless.)
"""
from __future__ import annotations

import numpy as np
import pytest

from kvmdirty import _bitmap, _mmu, _uapi
from kvmdirty._ring import ENTRY_DTYPE, DirtyRing

_cbase = pytest.importorskip("kvmdirty._cbase")

NPAGES = 64 * 100 + 17


def _dirty(seed, n):
    rng = np.random.default_rng(seed)
    pages = np.unique(rng.integers(0, NPAGES, n)).astype(np.uint64)
    w = np.zeros((NPAGES + 63) // 64, np.uint64)
    _bitmap.set_bits(w, pages)
    return w, pages


@pytest.mark.parametrize("n", [0, 1, 50, 3000])
def test_bitmap_baseline_matches_ours(n):
    w, pages = _dirty(n, n)
    w2 = w.copy()
    wp, wp2 = (np.full(len(w), ~np.uint64(0)) for _ in range(2))
    snap, snap2 = np.zeros(len(w), np.uint64), np.zeros(len(w), np.uint64)
    assert _cbase.harvest(w, snap, wp) == _bitmap.harvest(w2, snap2, wp2, zeroed=True) == len(pages)
    np.testing.assert_array_equal(snap, snap2)
    np.testing.assert_array_equal(wp, wp2)
    assert not w.any()
    out = np.empty(len(pages), np.uint64)
    assert _cbase.to_gfns(snap, out) == len(pages)
    np.testing.assert_array_equal(out, pages)
    w, _ = _dirty(n, n)
    snap = np.full(len(w), 7, np.uint64)             # a reused snapshot: every word rewritten
    for s in (snap, None):
        w, _ = _dirty(n, n)
        assert _cbase.harvest_list(w, s, np.full(len(w), ~np.uint64(0)), out) == len(pages)
        np.testing.assert_array_equal(out, pages)
    np.testing.assert_array_equal(snap, _dirty(n, n)[0])
    if len(pages) > 1:
        with pytest.raises(ValueError):
            _cbase.to_gfns(snap, np.empty(1, np.uint64))


@pytest.mark.parametrize("pattern", ["consecutive", "random"])
def test_ring_baseline_matches_ours(pattern):
    n, pages = 4096, 1 << 16
    offs = (np.arange(n) if pattern == "consecutive" else
            np.random.default_rng(3).integers(0, pages, n)).astype(np.uint64)
    e = np.zeros(n, ENTRY_DTYPE)
    e["flags"], e["slot"], e["offset"] = 1, 1, offs
    bs, bo = np.empty(n, np.uint32), np.empty(n, np.uint64)
    assert _cbase.collect(e.view(np.uint8), 0, bs, bo) == n
    np.testing.assert_array_equal(bo, offs)
    assert (e["flags"] == 2).all()
    wp = np.full(pages // 64, ~np.uint64(0))
    assert _cbase.reset(e.view(np.uint8), 0, wp, pages) == n and not e["flags"].any()
    # ours: the same entries through DirtyRing and the MMU's masked protect
    ring = DirtyRing(n)
    ring.push_many(np.ones(n, np.uint32), offs)
    ring.collect()
    mmu = _mmu.Mmu()
    wp2 = np.full(pages // 64, ~np.uint64(0))
    mmu.set_slots([(1, 0, pages, _uapi.MEM_LOG_DIRTY_PAGES, wp2, np.zeros(pages, np.uint64), None)])
    assert ring.reset(mmu) == n
    np.testing.assert_array_equal(wp, wp2)
