"""Fuzzing the dirty rings (kvmdirty._ring, the seed rings) with arbitrary calls and garbage entries.

* DirtyRing: arbitrary push / push_many / collect / reset(sink) / fetch_index
  calls, and user space scribbling anything into the entries it can write
  (``DirtyRing.gfns``: flags, slot, offset of any entry, pushed or not).  The
  kernel-side invariants must hold whatever user space does: never more
  live entries than the ring has, reset follows KVM (it frees every
  RESET-flagged entry from reset_index, forged or not, at most one lap per
  call), no crash and every later call works.
* collect() over foreign memory (a real KVM mmap in production): arbitrary
  buffers (dtype, size, alignment, read-only, bytes, mmap) and arbitrary
  contents; it must harvest exactly the DIRTY run from fetch_index, mark
  those RESET and touch nothing else.
* The seed designs' rings with garbage headers and indexes.

The bugs these fuzzers found are pinned at the end as regression tests.

``KVMDIRTY_FUZZ_SCALE`` multiplies every ``max_examples``.
"""
from __future__ import annotations

import errno
import mmap
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

_ring = pytest.importorskip("kvmdirty._ring")
from kvmdirty._ring import ENTRY_DTYPE, DirtyRing, RingFullError, collect  # noqa: E402

import kvmdirty  # noqa: E402
from kvmdirty import KvmError  # noqa: E402
from kvmdirty.vm import MEM_LOG_DIRTY_PAGES as LOG  # noqa: E402

SCALE = float(os.environ.get("KVMDIRTY_FUZZ_SCALE", "0.5" if os.environ.get("KVMDIRTY_SANITIZER_RUN") else "1"))
ALLOWED = (TypeError, ValueError, IndexError, OverflowError, RingFullError)
U32, U64 = (1 << 32) - 1, (1 << 64) - 1
DIRTY, RESET = 1, 2

try:
    from kvmdirty import seeds as _seeds_mod  # noqa: F401
    HAVE_SEEDS = True
except ImportError:
    HAVE_SEEDS = False
needs_seeds = pytest.mark.skipif(not HAVE_SEEDS, reason="kvmdirty.seeds is not built yet")




def fuzz(n):
    return settings(max_examples=max(10, int(n * SCALE)), deadline=None,
                    suppress_health_check=list(HealthCheck))


garbage = st.one_of(
    st.integers(-(1 << 70), 1 << 70), st.sampled_from([U64, U32, 1 << 64, 1 << 32, -1, 0]),
    st.floats(allow_nan=True), st.none(), st.text(max_size=3), st.booleans(),
    st.just(np.uint64(3)), st.just(np.int64(-3)), st.just(object()))
u32s = st.one_of(st.sampled_from([0, 1, 2, 3, 0xFF, U32, 0x10000, 1 << 31]), st.integers(0, U32))
u64s = st.one_of(st.sampled_from([0, 1, 63, 64, U64, 1 << 63]), st.integers(0, U64))


def _signed(u32):
    return u32 - (1 << 32) if u32 >= 1 << 31 else u32


def _backlog(r):
    return _signed((r.dirty_index - r.reset_index) & U32)


def check_invariants(r):
    """What the kernel side guarantees whatever user space wrote into the entries."""
    # Never more live entries than the ring has; a forged reset may run
    # reset_index ahead of dirty_index (a negative backlog: used reads 0).
    assert 0 <= r.used <= r.entries
    assert r.used == max(_backlog(r), 0)
    assert r.soft_full == (r.used >= r.soft_limit)


ring_ops = st.lists(st.tuples(
    st.sampled_from(["push", "push", "push_many", "collect", "collect", "reset", "reset_py", "reset_mmu",
                     "fetch", "scribble_flags", "scribble_payload", "scribble_all", "stats"]),
    st.one_of(u32s, garbage), st.one_of(u64s, garbage), st.integers(0, 300)), max_size=40)


@fuzz(150)
@given(entries=st.sampled_from([128, 256, 512]), ops=ring_ops)
def test_dirty_ring_arbitrary_calls_and_garbage_entries(entries, ops):
    r = DirtyRing(entries)
    mmu = kvmdirty._mmu.Mmu()          # a sink with no slots: every batch is dropped, counted
    g = r.gfns
    pushed = 0
    for op, a, b, n in ops:
        before = (r.dirty_index, r.reset_index, r.fetch_index)
        try:
            if op == "push":
                backlog = _backlog(r)
                r.push(a, b)
                pushed += 1
                assert _backlog(r) == backlog + 1
            elif op == "push_many":
                k = r.push_many(np.full(n, a, np.uint32), np.full(n, b, np.uint64))
                assert 0 <= k <= n
                pushed += k
            elif op == "collect":
                fetch = r.fetch_index
                expect = []
                for i in range(min(n if n else entries, entries)):
                    e = g[(fetch + i) % entries]
                    if int(e["flags"]) != DIRTY:
                        break
                    expect.append((int(e["slot"]), int(e["offset"])))
                s, o = r.collect(n if n else None)
                assert list(zip(s.tolist(), o.tolist())) == expect
                assert r.fetch_index == (fetch + len(expect)) & U32
            elif op in ("reset", "reset_py", "reset_mmu"):
                backlog = _backlog(r)
                sink = {"reset": None, "reset_mmu": mmu,
                        "reset_py": lambda slot, first, mask: bool(mask & 1)}[op]
                k = r.reset(sink)
                # As KVM: every RESET-flagged entry from reset_index, pushed or
                # not; one walk cannot pass an entry it has just zeroed.
                assert 0 <= k <= entries
                assert _backlog(r) == backlog - k
            elif op == "fetch":
                r.fetch_index = a
            elif op == "scribble_flags":
                g["flags"][n % entries] = int(a) & U32 if isinstance(a, int) else 3
            elif op == "scribble_payload":
                g["slot"][n % entries] = int(a) & U32 if isinstance(a, int) else 0
                g["offset"][n % entries] = int(b) & U64 if isinstance(b, int) else 0
            elif op == "scribble_all":
                raw = g.view(np.uint8)
                raw[(n * 7) % raw.size] = n & 0xFF
            else:
                assert set(r.stats) >= {"pushes", "collected", "resets"}
        except ALLOWED:
            after = (r.dirty_index, r.reset_index, r.fetch_index)
            assert after == before, f"{op} failed but moved an index"
        check_invariants(r)
    assert r.stats["pushes"] == pushed
    # A user space that behaves again: every further push is collected and reset.
    while r.used:
        r.fetch_index = r.reset_index if r.fetch_index == r.reset_index else r.fetch_index
        g["flags"][:] = np.where(g["flags"] != 0, RESET, 0)   # mark everything harvested
        if r.reset() == 0:
            break
    r.close()
    with pytest.raises(ValueError):
        r.collect()


# -- collect() over foreign memory ------------------------------------------------------

@st.composite
def ring_memory(draw):
    n = draw(st.sampled_from([0, 1, 2, 3, 4, 8, 16, 5]))
    flags = draw(st.lists(st.sampled_from([0, DIRTY, RESET, DIRTY | RESET, 4, U32]), min_size=n, max_size=n))
    a = np.zeros(n, ENTRY_DTYPE)
    a["flags"] = flags
    a["slot"] = draw(st.lists(u32s, min_size=n, max_size=n))
    a["offset"] = draw(st.lists(u64s, min_size=n, max_size=n))
    kind = draw(st.sampled_from(["entries", "entries", "uint8", "bytearray", "mmap", "bytes", "readonly",
                                 "misaligned", "uint64", "strided", "memview-Q", "list", "none", "2d"]))
    raw = a.view(np.uint8)
    if kind == "entries":
        return a, a
    if kind == "uint8":
        return raw, a
    if kind == "bytearray":
        return bytearray(raw.tobytes()), a
    if kind == "mmap":
        m = mmap.mmap(-1, max(1, raw.size))
        m[: raw.size] = raw.tobytes()
        return m, a
    if kind == "bytes":
        return raw.tobytes(), a
    if kind == "readonly":
        a.flags.writeable = False
        return a, a
    if kind == "misaligned":
        buf = np.zeros(raw.size + 8, np.uint8)
        off = draw(st.integers(1, 7))
        buf[off:off + raw.size] = raw
        return buf[off:off + raw.size], a
    if kind == "uint64":
        return raw.view(np.uint64) if raw.size else np.zeros(0, np.uint64), a
    if kind == "strided":
        return np.repeat(raw, 2)[::2], a
    if kind == "memview-Q":
        return memoryview(bytearray(raw.tobytes())).cast("Q"), a
    if kind == "2d":
        return a.reshape(1, -1) if n else a.reshape(1, 0), a
    return (raw.tolist() if kind == "list" else None), a


def _raw(buf):
    try:
        return bytes(memoryview(buf).cast("B"))
    except TypeError:
        return np.asarray(buf).tobytes()


def _as_entries(buf):
    return np.frombuffer(memoryview(buf).cast("B"), dtype=ENTRY_DTYPE)


@fuzz(300)
@given(mem=ring_memory(), fetch=st.one_of(u32s, garbage), max_count=st.one_of(st.none(), st.integers(0, 20), garbage))
def test_collect_foreign_memory(mem, fetch, max_count):
    buf, model = mem
    model = model.copy()            # buf may be the model itself
    try:
        original = bytes(memoryview(buf).cast("B"))
    except (TypeError, ValueError):
        original = None
    try:
        slots, offs, new_fetch = collect(buf, fetch, max_count)
    except (TypeError, ValueError, OverflowError, BufferError):
        if original is not None:
            assert _raw(buf) == original, "a rejected collect wrote"
        return
    n = len(model)
    assert n and n & (n - 1) == 0
    f = int(fetch)
    cap = n if max_count is None else min(n, int(max_count))
    expect = []
    for i in range(cap):
        e = model[(f + i) % n]
        if int(e["flags"]) != DIRTY:
            break
        expect.append(((f + i) % n, int(e["slot"]), int(e["offset"])))
    assert list(zip(slots.tolist(), offs.tolist())) == [(s, o) for _i, s, o in expect]
    assert new_fetch == (f + len(expect)) & U32
    got = _as_entries(buf)
    want = model.copy()
    for i, _s, _o in expect:
        want["flags"][i] = RESET
    assert got.tobytes() == want.tobytes(), "collect touched something else than the harvested flags"


# -- the seed designs' rings --------------------------------------------------------------

@needs_seeds
@fuzz(100)
@given(ops=st.lists(st.tuples(st.sampled_from(["push", "fetch", "set_fetch", "scribble_header", "reset",
                                               "scribble_entry"]),
                              st.one_of(st.integers(0, 0xFFFF), garbage), st.integers(0, 200)), max_size=30))
def test_indexed_ring_garbage_header(ops):
    from kvmdirty import _seeds
    s = _seeds.IndexedRingSet(128)
    r = s.add_vcpu(0)
    for op, a, n in ops:
        try:
            if op == "push":
                assert r.push(n % 7, n) in (-1, 0, 1)
            elif op == "fetch":
                sl, of = r.fetch(n)
                assert len(sl) == len(of) <= min(n, r.entries)
            elif op == "set_fetch":
                r.fetch_index = a
            elif op == "scribble_header":
                # avail_index lives in user-writable memory too (entry 0's pad).
                r.gfns["pad"][0] = int(a) & U32 if isinstance(a, int) else 0
            elif op == "scribble_entry":
                r.gfns["slot"][n % r.entries] = n
                r.gfns["offset"][n % r.entries] = U64 - n
            else:
                k = s.reset(None)
                assert k >= -1
        except (TypeError, ValueError, OverflowError):
            pass
        assert 0 <= r.used <= r.entries
        assert 0 <= r.count <= 0xFFFF


# -- regression tests for bugs these fuzzers found (fixed by their owners; see docs/HARDENING.md) --

def test_bad_fetch_index_leaves_ring_usable():
    r = DirtyRing(256)
    r.push(1, 5)
    for bad in (-1, 1 << 32, "3", 1.5, None):
        with pytest.raises((TypeError, ValueError, OverflowError)):
            r.fetch_index = bad
    s, o = r.collect()
    assert s.tolist() == [1] and o.tolist() == [5]


@needs_seeds
def test_indexed_ring_unknown_vcpu_is_documented_error():
    vm = kvmdirty.VM(design="indexed-ring")
    vm.create_vcpu(0)
    for bad in (1, -1, 1 << 64, "0", None):
        with pytest.raises((KvmError, ValueError, TypeError, IndexError)):
            vm.design.ring(bad)


@needs_seeds
def test_indexed_reset_einval_changes_nothing_and_loses_nothing():
    vm = kvmdirty.VM(design="indexed-ring")
    vm.set_user_memory_region(0, 0, 128 << 12, LOG)
    v = vm.create_vcpu(0)
    d = vm.design
    v.run([5], 1)                       # page 5: fault, logged in vCPU 0's ring, cached writable
    s, o = d.ring(0).fetch()
    assert o.tolist() == [5]
    d.vm_ring.fetch_index = 7           # garbage in another ring's header
    with pytest.raises(KvmError) as e:
        d.reset_dirty_pages()
    assert e.value.errno == errno.EINVAL
    used_after_failure = d.ring(0).used
    d.vm_ring.fetch_index = 0           # user space repairs its header
    d.reset_dirty_pages()
    shadow = int(vm.memory(0)[5])       # copied after the (successful) reset, as QEMU does
    v.run([5], 2)                       # must be logged again: the page was re-protected
    h = d.harvest()
    if 5 in h.get(0, np.zeros(0)).tolist():
        shadow = int(vm.memory(0)[5])
    assert shadow == int(vm.memory(0)[5]), "a write after the reset was lost"
    assert used_after_failure == 1, "the failed KVM_RESET_DIRTY_PAGES changed ring 0"


@needs_seeds
def test_switched_bitmap_user_garbage_past_npages_loses_nothing():
    vm = kvmdirty.VM(design="switched-bitmap-user")
    vm.set_user_memory_region(0, 0, 100 << 12, LOG)       # 100 pages: the last word holds 36
    v = vm.create_vcpu(0)
    d = vm.design
    mem = vm.memory(0)
    shadow = np.array(mem)
    v.run([0], 1)
    b1 = np.zeros(2, np.uint64)
    assert d.switch(0, b1) == 1
    shadow[0] = mem[0]
    b1[1] |= np.uint64(1 << 63)         # user space scribbles into the bitmap it owns: page 127
    v.run([70], 2)                      # logged into b1 (bit 70)
    assert d.switch(0, np.zeros(2, np.uint64)) == 1
    got = d._offsets(d.retired(0), 100)
    shadow[got] = mem[got]
    v.run([70], 3)                      # page 70 must have been re-protected: logged again
    for sid, offs in d.harvest().items():
        shadow[offs] = mem[offs]
    assert np.array_equal(shadow, mem), f"lost: {np.flatnonzero(shadow != mem)}"
