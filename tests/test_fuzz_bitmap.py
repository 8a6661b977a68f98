"""Fuzzing the bitmap word kernels (kvmdirty._bitmap) and DirtyBitmap with arbitrary arguments.

Every call gets arbitrary buffers (wrong dtypes, read-only, misaligned,
non-contiguous, 2-D, bytes/bytearray/memoryview/array/mmap, non-buffers),
indexes (huge, negative, floats, strings) and sinks.  Only the documented
exceptions may come out; when a call succeeds its result must match a numpy
model of the same operation; user space may scribble anything into the words
of a DirtyBitmap it owns and the bitmap keeps working.

Time-bounded: ``KVMDIRTY_FUZZ_SCALE`` (float, default 1; the sanitizer run
uses less, a long local run more) multiplies every ``max_examples``.
"""
from __future__ import annotations

import array
import mmap
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmdirty import DirtyBitmap, _bitmap

SCALE = float(os.environ.get("KVMDIRTY_FUZZ_SCALE", "0.5" if os.environ.get("KVMDIRTY_SANITIZER_RUN") else "1"))
# The exceptions a kernel call may raise on bad arguments (see the module docstrings).
ALLOWED = (TypeError, ValueError, IndexError, OverflowError, BufferError)


def fuzz(n):
    return settings(max_examples=max(10, int(n * SCALE)), deadline=None, derandomize=False,
                    suppress_health_check=list(HealthCheck))


U64 = (1 << 64) - 1
words_values = st.lists(
    st.one_of(st.just(0), st.just(U64), st.integers(0, U64), st.sampled_from([1, 1 << 63, 0xFF00])),
    min_size=0, max_size=40)


@st.composite
def good_words(draw, min_size=0):
    vals = draw(words_values)
    if len(vals) < min_size:
        vals += [0] * (min_size - len(vals))
    return np.array(vals, dtype=np.uint64)


def _misaligned(vals, off):
    raw = bytearray(8 * len(vals) + 8)
    a = np.frombuffer(raw, dtype=np.uint64, count=len(vals), offset=off)
    a[:] = vals
    return a


@st.composite
def any_buffer(draw):
    """A uint64-ish buffer of any kind: good, or wrong in one (or more) ways."""
    vals = draw(good_words())
    kind = draw(st.sampled_from([
        "good", "good", "good", "readonly", "misaligned", "strided", "2d", "int64", "uint32",
        "uint8", "float64", "bool", "object", "bytes", "bytearray", "memview", "array",
        "mmap", "list", "none", "int", "str", "structured", "fortran", "zero-strided", ">u8"]))
    if kind == "good":
        return vals
    if kind == "readonly":
        vals.flags.writeable = False
        return vals
    if kind == "misaligned":
        return _misaligned(vals, draw(st.integers(1, 7)))
    if kind == "strided":
        return np.repeat(vals, 2)[::2]
    if kind == "2d":
        return np.resize(vals, (2, max(1, len(vals))))
    if kind == "fortran":
        return np.asfortranarray(np.resize(vals, (2, max(1, len(vals)))))
    if kind == "zero-strided":
        return np.lib.stride_tricks.as_strided(np.zeros(1, np.uint64), (max(1, len(vals)),), (0,))
    if kind in ("int64", "uint32", "uint8", "float64", "bool", "object", ">u8"):
        return vals.astype(kind)
    if kind == "structured":
        return np.zeros(len(vals), dtype=[("a", "<u4"), ("b", "<u4")])
    if kind == "bytes":
        return vals.tobytes()
    if kind == "bytearray":
        return bytearray(vals.tobytes())
    if kind == "memview":
        return memoryview(bytearray(vals.tobytes())).cast("Q")
    if kind == "array":
        return array.array("Q", vals.tolist())
    if kind == "mmap":
        m = mmap.mmap(-1, max(8, 8 * len(vals)))
        m[: 8 * len(vals)] = vals.tobytes()
        return m
    if kind == "list":
        return vals.tolist()
    if kind == "none":
        return None
    if kind == "int":
        return 5
    return "words"


big_ints = st.one_of(st.integers(-(1 << 70), 1 << 70), st.integers(0, 200), st.sampled_from([U64, 1 << 64, -1]))
any_index = st.one_of(big_ints, st.floats(allow_nan=True), st.just(None), st.text(max_size=3),
                      st.just(True), st.builds(np.uint64, st.integers(0, U64)),
                      st.builds(np.int64, st.integers(-(1 << 63), (1 << 63) - 1)))


def _u64_view(a, writable=True):
    """A numpy view of ``a`` if the kernels must accept it as a (writable) uint64 buffer, else None."""
    try:
        mv = memoryview(a)
    except TypeError:
        return None
    if mv.format not in ("Q", "L", "=Q", "<Q", "@Q", "=L", "<L") or mv.itemsize != 8 or mv.ndim != 1:
        return None
    if not mv.c_contiguous or (writable and mv.readonly):
        return None
    v = np.asarray(mv)
    if v.size and v.ctypes.data % 8:
        return None
    return v


def _is_good(a):
    return _u64_view(a) is not None


def _bits(words):
    return np.unpackbits(np.asarray(words, dtype="<u8").view(np.uint8), bitorder="little")


def _snapshot(a):
    try:
        return np.frombuffer(memoryview(a).tobytes(), dtype=np.uint8).copy()
    except (TypeError, ValueError, BufferError):
        return None


# -- the word kernels ------------------------------------------------------------

@fuzz(300)
@given(words=any_buffer(), snap=any_buffer(), sink_kind=st.sampled_from(["none", "words", "py", "bad", "raise"]),
       zeroed=st.booleans(), slot=st.one_of(st.integers(-1, 1 << 33), st.just("x")))
def test_harvest(words, snap, sink_kind, zeroed, slot):
    view = _u64_view(words)
    before = None if view is None else view.copy()
    seen = []
    if sink_kind == "words":
        sink = np.full(len(before) if before is not None else 3, U64, np.uint64)
    elif sink_kind == "py":
        sink = lambda i, m: seen.append((i, m))  # noqa: E731
    elif sink_kind == "raise":
        def sink(i, m):
            raise KeyError("sink failed")
    elif sink_kind == "bad":
        sink = 42
    else:
        sink = None
    try:
        pages = _bitmap.harvest(words, snap, sink, zeroed=zeroed, slot=slot)
    except ALLOWED:
        return
    except KeyError:
        assert sink_kind == "raise"
        return
    # Success: only with good buffers of matching length.
    sv = _u64_view(snap)
    assert before is not None and sv is not None and len(sv) == len(before)
    assert pages == int(_bits(before).sum())
    np.testing.assert_array_equal(view, 0)
    if not zeroed:
        np.testing.assert_array_equal(sv, before)
    else:
        nz = before != 0
        np.testing.assert_array_equal(sv[nz], before[nz])
    if sink_kind == "words":
        np.testing.assert_array_equal(sink, ~before)
    if sink_kind == "py":
        assert seen == [(i, int(m)) for i, m in enumerate(before) if m]


@fuzz(300)
@given(words=any_buffer(), masks=any_buffer(), first=any_index, out=st.one_of(st.none(), any_buffer()),
       use_sink=st.booleans())
def test_clear_masked(words, masks, first, out, use_sink):
    view = _u64_view(words)
    before = None if view is None else view.copy()
    mv = _u64_view(masks, writable=False)
    mcopy = None if mv is None else mv.copy()
    sink = np.full(len(before), U64, np.uint64) if use_sink and before is not None else None
    try:
        pages = _bitmap.clear_masked(words, masks, first, out, sink)
    except ALLOWED:
        if before is not None:
            np.testing.assert_array_equal(view, before)      # nothing changed
        return
    assert before is not None and mcopy is not None
    f = int(first)
    expect = before.copy()
    cleared = before[f:f + len(mcopy)] & mcopy
    expect[f:f + len(mcopy)] &= ~mcopy
    np.testing.assert_array_equal(view, expect)
    assert pages == int(_bits(cleared).sum())
    if out is not None:
        np.testing.assert_array_equal(np.asarray(memoryview(out))[: len(mcopy)], cleared)
    if sink is not None:
        exp_sink = np.full(len(before), U64, np.uint64)
        exp_sink[f:f + len(mcopy)] &= ~cleared
        np.testing.assert_array_equal(sink, exp_sink)


@fuzz(300)
@given(words=any_buffer(), base=any_index)
def test_read_kernels(words, base):
    """popcount / to_gfns accept read-only buffers and must never write or crash."""
    snap = _snapshot(words)
    for call in (lambda: _bitmap.popcount(words), lambda: _bitmap.to_gfns(words, base),
                 lambda: _bitmap.to_gfns(words)):
        try:
            r = call()
        except ALLOWED:
            continue
        w = np.frombuffer(memoryview(words).tobytes(), dtype=np.uint64)
        if isinstance(r, np.ndarray):
            assert r.dtype == np.uint64 and len(r) == int(_bits(w).sum())
        else:
            assert r == int(_bits(w).sum())
    if snap is not None:
        assert np.array_equal(_snapshot(words), snap), "a read-only kernel wrote"


@fuzz(200)
@given(vals=good_words(), base=st.integers(0, U64))
def test_to_gfns_model(vals, base):
    r = _bitmap.to_gfns(vals, base)
    expect = [(base + int(i)) & U64 for i in np.flatnonzero(_bits(vals))]
    assert r.tolist() == expect


@fuzz(300)
@given(words=any_buffer(), base=any_index, sink_kind=st.sampled_from(["none", "words", "py", "raise"]))
def test_harvest_gfns(words, base, sink_kind):
    view = _u64_view(words)
    before = None if view is None else view.copy()
    sink = None
    if sink_kind == "words" and before is not None:
        sink = np.full(len(before), U64, np.uint64)
    elif sink_kind == "py":
        sink = lambda i, m: None  # noqa: E731
    elif sink_kind == "raise":
        def sink(i, m):
            raise KeyError("sink failed")
    try:
        r = _bitmap.harvest_gfns(words, sink, base)
    except ALLOWED:
        if before is not None:
            np.testing.assert_array_equal(view, before)
        return
    except KeyError:
        assert sink_kind == "raise"
        return
    assert before is not None
    b = int(base)
    assert r.tolist() == [(b + int(i)) & U64 for i in np.flatnonzero(_bits(before))]
    np.testing.assert_array_equal(view, 0)


@fuzz(300)
@given(words=any_buffer(), nr=any_index, nrs=st.one_of(any_buffer(), st.lists(big_ints, max_size=5)))
def test_bit_ops(words, nr, nrs):
    view = _u64_view(words)
    before = None if view is None else view.copy()
    try:
        was = _bitmap.set_bit(words, nr)
    except ALLOWED:
        if before is not None:
            np.testing.assert_array_equal(view, before)
    else:
        assert before is not None
        assert was == bool(_bits(before)[int(nr)])
        assert _bitmap.test_bit(words, nr)
    try:
        _bitmap.test_bit(words, nr)
    except ALLOWED:
        pass
    snap = None if view is None else view.copy()
    try:
        fresh = _bitmap.set_bits(words, nrs)
    except ALLOWED:
        if snap is not None:
            np.testing.assert_array_equal(view, snap)      # validated before any bit is set
        return
    assert snap is not None
    got = _bits(view).astype(bool)
    old = _bits(snap).astype(bool)
    idx = np.array(memoryview(nrs) if not isinstance(nrs, list) else nrs, dtype=np.uint64).astype(np.int64)
    assert got[idx].all()
    assert fresh == int((got & ~old).sum())


# -- DirtyBitmap ------------------------------------------------------------------

# Under ASan a 2**40-page bitmap (128 GiB, lazily zeroed without it) has its 16 GiB
# of shadow memory written when allocated: the OOM killer ends the run.
_HUGE = [(1 << 40) + 1, 1 << 64] if os.environ.get("KVMDIRTY_SANITIZER_RUN") else [1 << 40, (1 << 40) + 1, 1 << 64]


@fuzz(150)
@given(npages=st.one_of(st.integers(-5, 300), st.sampled_from(_HUGE + [-1]),
                        st.floats(allow_nan=True), st.text(max_size=2), st.just(None)))
def test_dirty_bitmap_sizes(npages, ):
    try:
        b = DirtyBitmap(npages)
    except (TypeError, ValueError, OverflowError, MemoryError):
        return
    assert len(b) == int(npages)
    assert b.nwords == (int(npages) + 63) // 64


ops = st.lists(st.tuples(
    st.sampled_from(["set", "test", "set_many", "harvest", "clear", "to_gfns", "popcount", "scribble", "sink"]),
    any_index, st.one_of(st.lists(big_ints, max_size=6), any_buffer())), max_size=12)


@fuzz(200)
@given(npages=st.integers(0, 300), ops=ops, garbage=words_values)
def test_dirty_bitmap_ops_scribbled(npages, ops, garbage):
    """Arbitrary calls, and user space writing anything into ``words``: no crash, exact results.

    The model is the words themselves: user space owns them and any bit it
    writes (even past npages, in the last word) is "dirty" for the kernels.
    """
    b = DirtyBitmap(npages)
    w = b.words
    g = iter(garbage)
    for op, arg, arr in ops:
        before = w.copy()
        try:
            if op == "set":
                was = b.set(arg)
                assert was == bool(_bits(before)[int(arg)])
                assert b.test(arg)
            elif op == "test":
                assert b.test(arg) == bool(_bits(before)[int(arg)])
            elif op == "set_many":
                b.set_many(arr)
            elif op == "harvest":
                snap = b.harvest()
                np.testing.assert_array_equal(snap, before)
                np.testing.assert_array_equal(w, 0)
            elif op == "sink":
                sink = np.full(len(w), U64, np.uint64)
                b.harvest(sink, slot=3)
                np.testing.assert_array_equal(sink, ~before)
            elif op == "clear":
                n = b.clear(arg, arr)
                assert n >= 0
            elif op == "to_gfns":
                assert b.to_gfns().tolist() == np.flatnonzero(_bits(before)).tolist()
            elif op == "popcount":
                assert b.popcount() == int(_bits(before).sum())
            elif op == "scribble" and len(w):
                i = int(abs(int(arg)) if isinstance(arg, int) and not isinstance(arg, bool) else 0) % len(w)
                w[i] = next(g, U64)
        except ALLOWED:
            np.testing.assert_array_equal(w, before)
    assert repr(b).startswith("DirtyBitmap(")
    assert b.words is w          # the view handed out is still the live bitmap


def test_every_kernel_rejects_misaligned_buffers():
    """A misaligned uint64 buffer anywhere is a ValueError, never a misaligned access (UB)."""
    def mis():
        a = np.frombuffer(bytearray(40), np.uint64, count=4, offset=3)
        a[:] = 1
        return a

    def good():
        return np.ones(4, np.uint64)

    for call in (lambda: _bitmap.popcount(mis()), lambda: _bitmap.to_gfns(mis()),
                 lambda: _bitmap.harvest(good(), mis()),
                 lambda: _bitmap.clear_masked(good(), mis()),
                 lambda: _bitmap.clear_masked(good(), good(), 0, mis()),
                 lambda: _bitmap.set_bits(good(), mis())):
        with pytest.raises(ValueError):
            call()
