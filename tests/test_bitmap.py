"""Unit and property tests of the bitmap word kernels and DirtyBitmap."""
import mmap

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvmdirty import DirtyBitmap, _bitmap as b


def naive_gfns(words, base=0):
    return [base + i * 64 + j for i, w in enumerate(words) for j in range(64) if int(w) >> j & 1]


words_st = st.lists(st.one_of(st.just(0), st.integers(0, 2**64 - 1)), max_size=70).map(
    lambda l: np.array(l, dtype=np.uint64))


@given(words_st, st.integers(0, 2**40))
def test_to_gfns_matches_naive(words, base):
    assert b.to_gfns(words, base).tolist() == naive_gfns(words, base)
    assert b.popcount(words) == len(naive_gfns(words))


@given(words_st, st.booleans())
def test_harvest_takes_everything_and_protects_exactly(words, zeroed):
    live = words.copy()
    snap = np.zeros_like(live) if zeroed else np.full_like(live, 0xDEAD)
    writable = np.full_like(live, ~np.uint64(0))
    pages = b.harvest(live, snap, writable, zeroed=zeroed)
    assert (snap == words).all()
    assert not live.any()
    assert pages == len(naive_gfns(words))
    assert (writable == ~words).all()


@given(words_st)
def test_harvest_gfns_equals_harvest_then_to_gfns(words):
    a, c = words.copy(), words.copy()
    snap = np.zeros_like(a)
    wa, wc = np.full_like(a, ~np.uint64(0)), np.full_like(a, ~np.uint64(0))
    b.harvest(a, snap, wa)
    assert b.harvest_gfns(c, wc, 5).tolist() == naive_gfns(snap, 5)
    assert (wa == wc).all() and not c.any()


@given(words_st, st.data())
def test_clear_masked_reports_only_bits_really_set(words, data):
    n = len(words)
    first = data.draw(st.integers(0, n))
    masks = np.array(data.draw(st.lists(st.integers(0, 2**64 - 1), max_size=n - first)), dtype=np.uint64)
    live = words.copy()
    out = np.zeros(len(masks), np.uint64)
    writable = np.full_like(live, ~np.uint64(0))
    pages = b.clear_masked(live, masks, first, out, writable)
    really = words[first:first + len(masks)] & masks
    assert (out == really).all()
    assert pages == len(naive_gfns(really))
    assert (live[first:first + len(masks)] == words[first:first + len(masks)] & ~masks).all()
    assert (writable[first:first + len(masks)] == ~really).all()


def test_sinks_callable_and_capsule():
    words = np.array([0, 5, 0, 1 << 63], np.uint64)
    seen = []
    b.harvest(words.copy(), np.zeros(4, np.uint64), lambda i, m: seen.append((i, m)))
    assert seen == [(1, 5), (3, 1 << 63)]
    seen.clear()
    b.clear_masked(words.copy(), np.array([1, 4], np.uint64), 1, sink=lambda i, m: seen.append((i, m)))
    assert seen == [(1, 1)]
    assert b.harvest_gfns(words.copy(), lambda i, m: seen.append((i, m))).tolist() == [64, 66, 255]


def test_set_and_test_bits():
    w = np.zeros(3, np.uint64)
    assert b.set_bit(w, 130) is False
    assert b.set_bit(w, 130) is True
    assert b.test_bit(w, 130) and not b.test_bit(w, 129)
    assert b.set_bits(w, np.array([0, 1, 130, 191], np.uint64)) == 3
    with pytest.raises(IndexError):
        b.set_bit(w, 192)
    with pytest.raises(IndexError):
        b.set_bits(w, np.array([5, 192], np.uint64))
    assert b.popcount(w) == 4           # the failed batch changed nothing


def test_foreign_buffers_mmap_and_memoryview():
    mm = mmap.mmap(-1, 4096)
    view = memoryview(mm).cast("Q")
    b.set_bit(view, 77)
    snap = np.zeros(512, np.uint64)
    assert b.harvest(view, snap) == 1
    assert b.to_gfns(snap).tolist() == [77]
    assert bytes(mm[:16]) == bytes(16)
    del view
    mm.close()


def test_bad_buffers():
    w = np.zeros(4, np.uint64)
    with pytest.raises(ValueError):
        b.harvest(w, np.zeros(3, np.uint64))
    with pytest.raises(ValueError):                   # misaligned for atomics
        b.harvest(np.zeros(5, np.uint64).view(np.uint8)[4:36].view(np.uint64), np.zeros(4, np.uint64))
    with pytest.raises((ValueError, TypeError)):      # wrong dtype
        b.popcount(np.zeros(4, np.uint32))
    with pytest.raises(ValueError):                   # read-only live words
        ro = np.zeros(4, np.uint64)
        ro.flags.writeable = False
        b.harvest(ro, np.zeros(4, np.uint64))
    with pytest.raises(TypeError):
        b.harvest(w, np.zeros(4, np.uint64), sink="nope")
    with pytest.raises(ValueError):
        b.harvest(w, np.zeros(4, np.uint64), sink=np.zeros(2, np.uint64))
    with pytest.raises(ValueError):
        b.clear_masked(w, np.zeros(3, np.uint64), 2)
    with pytest.raises(ValueError):                   # non-contiguous
        b.popcount(np.zeros(8, np.uint64)[::2])


def test_dirty_bitmap_class():
    bm = DirtyBitmap(100)
    assert len(bm) == 100 and bm.nwords == 2
    assert bm.set(99) is False and bm.test(99)
    assert bm.set_many([1, 2, 2, 99]) == 2
    words = bm.words
    assert words[1] == 1 << 35                        # zero-copy view of the live bits
    wr = np.full(2, ~np.uint64(0))
    snap = bm.harvest(wr)
    assert b.to_gfns(snap).tolist() == [1, 2, 99] and bm.popcount() == 0
    assert wr[0] == ~np.uint64(6)
    bm.set_many([3, 4])
    assert bm.clear(0, [1 << 3 | 1 << 5]) == 1 and bm.to_gfns().tolist() == [4]
    for bad in (-1, 100, 2**70):
        with pytest.raises((IndexError, OverflowError)):
            bm.set(bad)
    with pytest.raises(IndexError):
        bm.set_many([5, 100])
    assert bm.to_gfns().tolist() == [4]
    with pytest.raises(ValueError):
        bm.clear(3, [1])
    with pytest.raises(ValueError):
        DirtyBitmap(-1)


@settings(max_examples=30)
@given(st.integers(0, 6000), st.integers(0, 2**32))
def test_large_sparse_bitmap_round_trip(ndirty, seed):
    rng = np.random.default_rng(seed)
    bm = DirtyBitmap(1 << 20)
    pages = np.unique(rng.integers(0, 1 << 20, ndirty, dtype=np.uint64))
    bm.set_many(pages)
    assert (b.to_gfns(bm.harvest()) == pages).all()


def test_copy_live_copies_exactly_and_rejects_misaligned():
    w = np.random.default_rng(1).integers(0, 2**63, 1000, dtype=np.uint64)
    c = b.copy_live(w)
    assert (c == w).all() and c.ctypes.data != w.ctypes.data
    assert b.copy_live(np.zeros(0, np.uint64)).size == 0
    raw = np.zeros(8 * 9, np.uint8)
    with pytest.raises(ValueError):
        b.copy_live(raw[1:65].view(np.uint64))
