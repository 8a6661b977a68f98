"""DirtyRing: push / collect / reset semantics, reset coalescing, foreign-buffer collect."""
from __future__ import annotations

import mmap

import numpy as np
import pytest

from kvmdirty import _uapi
from kvmdirty._ring import ENTRY_DTYPE, DirtyRing, RingFullError, collect
from ring_model import make_mmu

DIRTY, RESET = _uapi.DIRTY_GFN_F_DIRTY, _uapi.DIRTY_GFN_F_RESET


def test_entry_layout_matches_kernel_header():
    assert ENTRY_DTYPE.itemsize == _uapi.SIZEOF_DIRTY_GFN == 16
    assert {k: ENTRY_DTYPE.fields[k][1] for k in ENTRY_DTYPE.names} == _uapi.OFFSETOF_DIRTY_GFN


def test_new_ring_is_zeroed_page_aligned_and_sized():
    r = DirtyRing(256)
    assert r.entries == 256 and r.soft_limit == 192 and r.used == 0
    assert r.gfns.ctypes.data % 4096 == 0
    assert r.gfns.dtype == ENTRY_DTYPE and not r.gfns.tobytes().strip(b"\0")
    assert DirtyRing(1024, cpu_dirty_log_size=512).soft_limit == 1024 - 64 - 512


def test_push_collect_reset_life_cycle():
    r = DirtyRing(128)
    assert r.push(7, 100) is False
    e = r.gfns[0]
    assert (e["flags"], e["slot"], e["offset"]) == (DIRTY, 7, 100)
    slots, offs = r.collect()
    assert slots.tolist() == [7] and offs.tolist() == [100]
    assert slots.dtype == np.uint32 and offs.dtype == np.uint64
    assert r.gfns[0]["flags"] == RESET and r.fetch_index == 1
    assert r.collect()[0].size == 0          # nothing new
    assert r.used == 1
    assert r.reset() == 1
    assert r.gfns[0]["flags"] == 0 and r.used == 0 and r.reset_index == 1
    assert r.stats["pushes"] == 1 and r.stats["collected"] == 1 and r.stats["resets"] == 1


def test_soft_full_reported_at_soft_limit():
    r = DirtyRing(128)                    # soft limit 64
    flags = [r.push(1, i) for i in range(64)]
    assert flags[:63] == [False] * 63 and flags[63] is True and r.soft_full


def test_push_never_overwrites_a_live_entry():
    r = DirtyRing(64 * 2)
    for i in range(128):
        r.push(1, i)
    before = r.gfns.copy()
    with pytest.raises(RingFullError):
        r.push(1, 999)
    assert (r.gfns == before).all() and r.used == 128 and r.dirty_index == 128
    assert r.push_many(np.zeros(5, np.uint32), np.arange(5, dtype=np.uint64)) == 0


def test_push_many_stops_when_full_and_wraps():
    r = DirtyRing(128)
    assert r.push_many(np.ones(200, np.uint32), np.arange(200, dtype=np.uint64)) == 128
    s, o = r.collect(max_count=100)
    assert o.tolist() == list(range(100))
    assert r.reset() == 100
    assert r.push_many(np.full(150, 2, np.uint32), np.arange(150, dtype=np.uint64)) == 100
    s, o = r.collect()
    assert o.tolist() == list(range(100, 128)) + list(range(100))
    assert s.tolist() == [1] * 28 + [2] * 100


def test_collect_into_caller_arrays_returns_views():
    r = DirtyRing(128)
    r.push_many(np.arange(10, dtype=np.uint32), np.arange(10, dtype=np.uint64) * 5)
    bs, bo = np.zeros(4, np.uint32), np.zeros(8, np.uint64)
    s, o = r.collect(out_slots=bs, out_offsets=bo)
    assert s.base is bs and o.base is bo and s.tolist() == [0, 1, 2, 3] and o.tolist() == [0, 5, 10, 15]
    s, o = r.collect(max_count=2, out_slots=bs, out_offsets=bo)
    assert s.tolist() == [4, 5]
    assert r.fetch_index == 6


def test_indexes_wrap_at_u32():
    r = DirtyRing(128)
    # Run the free-running indexes through 2**32 by pushing/collecting/resetting many laps.
    for lap in range(3):
        r.push_many(np.zeros(128, np.uint32), np.arange(128, dtype=np.uint64))
        assert r.collect()[1].size == 128
        assert r.reset() == 128
    assert r.dirty_index == r.reset_index == r.fetch_index == 384


def test_collect_stops_at_entry_not_yet_published():
    r = DirtyRing(128)
    for i in range(5):
        r.push(1, i)
    r.gfns["flags"][2] = 0                 # user space scribbles
    assert r.collect()[1].tolist() == [0, 1]
    assert r.fetch_index == 2


def test_reset_stops_at_first_entry_without_reset_and_ignores_dirty_bit():
    r = DirtyRing(128)
    for i in range(6):
        r.push(1, i)
    r.collect(max_count=4)
    g = r.gfns
    g["flags"][1] = DIRTY | RESET          # bit 0 ignored: still reset
    g["flags"][3] = DIRTY                  # no RESET bit: reset stops here
    assert r.reset() == 3
    assert r.reset_index == 3 and list(g["flags"][:4]) == [0, 0, 0, DIRTY]


def test_reset_walks_reset_flags_forged_on_never_pushed_entries_as_kvm_does():
    r = DirtyRing(128)
    r.push(1, 0)
    r.collect()
    r.gfns["flags"][1:10] = RESET          # user space forges harvested entries
    # KVM resets them too: reset_index runs 9 entries past dirty_index.
    assert r.reset() == 10 and r.reset_index == 10 and r.dirty_index == 1
    assert r.used == 0 and not r.soft_full  # as /dev/kvm: no soft-full exit
    # The entries from dirty_index on were reset: KVM pushes there.
    assert r.push(1, 5) is False
    assert r.gfns[1]["flags"] == DIRTY and r.gfns[1]["offset"] == 5 and r.used == 0


# -- reset coalescing: every branch of kvm_dirty_ring_reset -----------------

def _batches(pushes, sink_result=None):
    r = DirtyRing(256)
    for s, o in pushes:
        r.push(s, o)
    r.collect()
    seen = []

    def sink(slot, first, mask):
        seen.append((slot, first, mask))
        return sink_result(slot, first, mask) if sink_result else None

    n = r.reset(sink)
    assert n == len(pushes)
    return seen, r.stats


def test_coalesce_upward_within_64():
    seen, st = _batches([(1, 10), (1, 12), (1, 73), (1, 10)])
    assert seen == [(1, 10, (1 << 0) | (1 << 2) | (1 << 63))]
    assert st["batches"] == 1


def test_coalesce_upward_at_64_starts_a_new_batch():
    seen, _ = _batches([(1, 10), (1, 74)])
    assert seen == [(1, 10, 1), (1, 74, 1)]


def test_coalesce_downward_shift_keeping_bits():
    seen, _ = _batches([(1, 100), (1, 105), (1, 90)])
    # base moves to 90: bit 0 (90), bit 10 (100), bit 15 (105)
    assert seen == [(1, 90, 1 | (1 << 10) | (1 << 15))]


def test_coalesce_downward_by_63_with_single_bit():
    seen, _ = _batches([(1, 100), (1, 37)])
    assert seen == [(1, 37, 1 | (1 << 63))]


def test_coalesce_downward_that_would_drop_bits_starts_a_new_batch():
    seen, _ = _batches([(1, 100), (1, 160), (1, 97)])
    assert seen == [(1, 97, (1 << 3) | (1 << 63) | 1)]      # shift by 3 keeps bit 60 -> 63
    seen, _ = _batches([(1, 100), (1, 161), (1, 97)])
    assert seen == [(1, 100, 1 | (1 << 61)), (1, 97, 1)]     # bit 61 would fall off


def test_coalesce_downward_by_64_starts_a_new_batch():
    seen, _ = _batches([(1, 100), (1, 36)])
    assert seen == [(1, 100, 1), (1, 36, 1)]


def test_coalesce_slot_change_starts_a_new_batch():
    seen, _ = _batches([(1, 5), (2, 5), (2, 6), (1, 7)])
    assert seen == [(1, 5, 1), (2, 5, 3), (1, 7, 1)]


def test_coalesce_offset_far_away():
    seen, _ = _batches([(1, 5), (1, 1 << 40), (1, 6)])
    assert seen == [(1, 5, 1), (1, 1 << 40, 1), (1, 6, 1)]


def test_coalesce_u64_wraparound_is_kernel_arithmetic():
    top = (1 << 64) - 1
    seen, _ = _batches([(1, top), (1, 0)])    # delta (s64) = +1
    assert seen == [(1, top, 0b11)]


def test_python_sink_dropped_batches_are_counted():
    seen, st = _batches([(1, 0), (2, 0), (3, 0)], sink_result=lambda s, f, m: s != 2)
    assert len(seen) == 3 and st["batches"] == 3 and st["dropped"] == 1 and st["resets"] == 3


def test_reset_through_mmu_protects_exact_mask():
    mmu, w = make_mmu(slot_id=1, npages=256)
    r = DirtyRing(128)
    for off in (3, 5, 64, 70):           # 3..66 is one batch, 70 the next
        r.push(1, off)
    r.collect()
    assert r.reset(mmu) == 4
    protected = ~w[:4]
    assert protected[0] == (1 << 3) | (1 << 5) and protected[1] == 1 | (1 << 6)
    assert not protected[2:].any()
    assert r.stats["batches"] == 2 and mmu.stats["protects"] == 2


def test_reset_through_mmu_unaligned_base_spans_two_words():
    mmu, w = make_mmu(slot_id=1, npages=256)
    r = DirtyRing(128)
    for off in (60, 61, 70):
        r.push(1, off)
    r.collect()
    r.reset(mmu)
    assert ~w[0] == (1 << 60) | (1 << 61) and ~w[1] == 1 << 6


def test_reset_bad_slot_dropped_but_counted():
    mmu, w = make_mmu(slot_id=1, npages=256)
    r = DirtyRing(128)
    r.push(9, 0)          # no such slot
    r.push(1, 1)
    r.collect()
    assert r.reset(mmu) == 2
    assert r.stats["batches"] == 2 and r.stats["dropped"] == 1
    assert mmu.stats["protect_dropped"] == 1 and ~w[0] == 2


def test_reset_past_slot_end_dropped_but_counted():
    mmu, w = make_mmu(slot_id=1, npages=100)
    r = DirtyRing(128)
    r.push(1, 90)
    r.push(1, 100)        # page 100 is past the end: the whole batch is dropped (kvm_reset_dirty_gfn)
    r.push(1, 1 << 50)
    r.collect()
    assert r.reset(mmu) == 3
    assert r.stats["batches"] == 2 and r.stats["dropped"] == 2
    assert (w == np.uint64(~np.uint64(0))).all()


def test_reset_without_sink_counts_batches_only():
    r = DirtyRing(128)
    for off in (1, 2, 500):
        r.push(1, off)
    r.collect()
    assert r.reset() == 3 and r.stats["batches"] == 2


# -- foreign memory ------------------------------------------------------------

def _fill(buf_entries, start, items):
    n = len(buf_entries)
    for i, (s, o) in enumerate(items):
        e = buf_entries[(start + i) % n]
        e["slot"], e["offset"], e["flags"] = s, o, DIRTY


def test_collect_foreign_numpy_array():
    a = np.zeros(64, ENTRY_DTYPE)
    _fill(a, 62, [(1, 10), (1, 11), (2, 12)])
    s, o, f = collect(a, 62)
    assert s.tolist() == [1, 1, 2] and o.tolist() == [10, 11, 12] and f == 65
    assert list(a["flags"][[62, 63, 0]]) == [RESET] * 3 and a["flags"][1] == 0
    assert collect(a, f)[2] == f


def test_collect_foreign_mmap_bytes_with_fetch_index_wrapping_u32():
    m = mmap.mmap(-1, 64 * 16)
    a = np.frombuffer(m, ENTRY_DTYPE)
    _fill(a, (2**32 - 1) % 64, [(3, 7), (3, 8)])
    s, o, f = collect(m, 2**32 - 1)
    assert o.tolist() == [7, 8] and f == 1
    s, o, f = collect(memoryview(m), 1)
    assert o.size == 0 and f == 1
    del a, s, o
    m.close()


def test_collect_foreign_max_count_and_bytearray():
    b = bytearray(128 * 16)
    a = np.frombuffer(b, ENTRY_DTYPE)
    _fill(a, 0, [(1, i) for i in range(10)])
    s, o, f = collect(b, 0, max_count=4)
    assert o.tolist() == [0, 1, 2, 3] and f == 4
    s, o, f = collect(np.frombuffer(b, np.uint8), f)
    assert o.tolist() == list(range(4, 10)) and f == 10


def test_collect_foreign_matches_dirty_ring_gfns():
    r = DirtyRing(128)
    r.push_many(np.full(20, 4, np.uint32), np.arange(20, dtype=np.uint64))
    s, o, f = collect(r.gfns, 0)
    assert o.tolist() == list(range(20)) and f == 20
    r.fetch_index = f
    assert r.reset() == 20


def test_fault_knobs_default_off_and_keep_single_thread_semantics():
    r = DirtyRing(128)
    assert r.publish_early is False and r.relaxed_collect is False
    r.publish_early = True
    r.relaxed_collect = True
    r.push(3, 9)
    r.push_many(np.full(3, 3, np.uint32), np.arange(10, 13, dtype=np.uint64))
    # The bugs are ordering bugs: only a concurrent reader can see them.
    assert r.collect()[1].tolist() == [9, 10, 11, 12] and r.reset() == 4
    r.publish_early = False
    assert r.publish_early is False
