"""Bad input: a clear exception, unchanged state, never a crash."""
from __future__ import annotations

import mmap

import numpy as np
import pytest

from kvmdirty import _uapi
from kvmdirty._ring import ENTRY_DTYPE, DirtyRing, RingFullError, collect


def _ring_with_entries():
    r = DirtyRing(128)
    for i in range(5):
        r.push(1, i)
    return r


def _state(r):
    return (r.dirty_index, r.reset_index, r.fetch_index, r.used, r.gfns.tobytes())


@pytest.mark.parametrize("entries, cdl, exc", [
    (0, 0, ValueError),                 # zero
    (100, 0, ValueError),               # not a power of two
    (64, 0, ValueError),                # no room above the reserve
    (512, 512, ValueError),             # PML reserve larger than the ring
    (1 << 17, 0, ValueError),           # above KVM_DIRTY_RING_MAX_ENTRIES
    (-128, 0, ValueError),              # negative
    (128.0, 0, TypeError),              # float
    ("128", 0, TypeError),              # string
    (None, 0, TypeError),
    (128, -1, ValueError),              # negative cpu_dirty_log_size
    (True, 0, TypeError),               # bool is not a size
])
def test_bad_ring_sizes(entries, cdl, exc):
    with pytest.raises(exc):
        DirtyRing(entries, cpu_dirty_log_size=cdl)


@pytest.mark.parametrize("call, exc", [
    (lambda r: r.push(-1, 0), ValueError),
    (lambda r: r.push(2**32, 0), ValueError),
    (lambda r: r.push(0, 2**64), ValueError),
    (lambda r: r.push(0, -5), ValueError),
    (lambda r: r.push(0, 1.5), TypeError),
    (lambda r: r.push("1", 0), TypeError),
    (lambda r: r.push_many(np.zeros(3, np.uint32), np.zeros(2, np.uint64)), ValueError),
    (lambda r: r.push_many(np.zeros(3, np.int64), np.zeros(3, np.uint64)), ValueError),
    (lambda r: r.push_many(np.zeros(3, np.uint32), np.zeros(3, np.float64)), ValueError),
    (lambda r: r.push_many(None, np.zeros(3, np.uint64)), TypeError),
    (lambda r: r.push_many(np.zeros((2, 2), np.uint32), np.zeros(2, np.uint64)), ValueError),
    (lambda r: r.collect(-1), ValueError),
    (lambda r: r.collect(1.0), TypeError),
    (lambda r: r.collect(None, np.zeros(4, np.uint32)), ValueError),
    (lambda r: r.collect(None, np.zeros(4, np.uint64), np.zeros(4, np.uint64)), ValueError),
    (lambda r: r.collect(None, [0] * 4, np.zeros(4, np.uint64)), TypeError),
    (lambda r: r.collect(None, np.zeros(8, np.uint32)[::2], np.zeros(4, np.uint64)), ValueError),
    (lambda r: r.reset(sink=42), TypeError),
    (lambda r: r.reset(sink="mmu"), TypeError),
    (lambda r: setattr(r, "fetch_index", -1), ValueError),
    (lambda r: setattr(r, "fetch_index", 2**32), ValueError),
    (lambda r: setattr(r, "entries", 5), AttributeError),
])
def test_bad_ring_calls_change_nothing(call, exc):
    r = _ring_with_entries()
    before = _state(r)
    with pytest.raises(exc):
        call(r)
    assert _state(r) == before


def test_read_only_out_arrays_rejected():
    r = _ring_with_entries()
    a = np.zeros(8, np.uint32)
    a.flags.writeable = False
    before = _state(r)
    with pytest.raises(ValueError):
        r.collect(None, a, np.zeros(8, np.uint64))
    assert _state(r) == before


def test_full_ring_push_raises_and_changes_nothing():
    r = DirtyRing(128)
    r.push_many(np.zeros(128, np.uint32), np.arange(128, dtype=np.uint64))
    before = _state(r)
    with pytest.raises(RingFullError):
        r.push(0, 0)
    assert _state(r) == before and issubclass(RingFullError, RuntimeError)


@pytest.mark.parametrize("garbage", [0, _uapi.DIRTY_GFN_F_DIRTY, _uapi.DIRTY_GFN_F_RESET, 3, 0xFFFFFFFF, 4])
def test_user_space_corrupting_flags_never_breaks_the_kernel_side(garbage):
    r = DirtyRing(128)
    r.push_many(np.zeros(100, np.uint32), np.arange(100, dtype=np.uint64))
    r.collect(max_count=50)
    r.gfns["flags"][:] = garbage                         # scribble over every entry
    s, o = r.collect()
    assert len(o) <= 128
    n = r.reset()
    # As KVM: every RESET-flagged entry from reset_index, pushed or not (at most
    # one lap); reset_index may pass dirty_index (a "negative" u32 used).
    assert 0 <= n <= 128 and 0 <= r.used <= 128
    while True:                                         # pushes never overwrite live entries
        try:
            r.push(2, 7)
        except RingFullError:
            break
    assert r.used == 128


def test_fetch_index_moved_anywhere_is_harmless():
    r = _ring_with_entries()
    r.fetch_index = 2**32 - 1
    s, o = r.collect()
    assert len(o) == 0 and r.fetch_index == 2**32 - 1
    r.fetch_index = 3
    assert r.collect()[1].tolist() == [3, 4]


def test_closed_ring_refuses_everything():
    r = _ring_with_entries()
    g = r.gfns
    r.close()
    for call in (lambda: r.push(0, 0), lambda: r.collect(), lambda: r.reset(),
                 lambda: r.push_many(np.zeros(1, np.uint32), np.zeros(1, np.uint64)),
                 lambda: r.gfns, lambda: r._kd_ring):
        with pytest.raises(ValueError, match="closed"):
            call()
    assert g["offset"][:5].tolist() == [0, 1, 2, 3, 4]  # views handed out stay valid
    r.close()                                            # idempotent


def test_closed_ring_attached_to_a_vcpu_keeps_its_memory():
    from kvmdirty import _mmu
    mmu = _mmu.Mmu()
    core = mmu.new_vcpu(0)
    r = DirtyRing(128)
    core.attach_ring(r)
    r.close()
    with pytest.raises(ValueError):
        r.collect()


# -- foreign buffers ---------------------------------------------------------------

@pytest.mark.parametrize("make, exc", [
    (lambda: np.zeros(63, ENTRY_DTYPE), ValueError),                 # not a power of two
    (lambda: np.zeros(0, ENTRY_DTYPE), ValueError),                  # empty
    (lambda: bytearray(64 * 16 + 8), ValueError),                    # not a multiple of 16
    (lambda: bytearray(48 * 16), ValueError),                        # 48 entries
    (lambda: np.zeros(128, np.uint64), TypeError),                   # wrong dtype
    (lambda: np.zeros(64, np.dtype([("a", "<u8"), ("b", "<u8")])), TypeError),
    (lambda: bytes(64 * 16), ValueError),                            # read-only
    (lambda: np.zeros(64, ENTRY_DTYPE)[::2], ValueError),            # not contiguous
    (lambda: memoryview(bytearray(64 * 16 + 4))[4:], ValueError),    # misaligned
    (lambda: memoryview(bytearray(64 * 16)).cast("Q"), TypeError),   # not raw bytes
    (lambda: [0] * 64, TypeError),                                   # no buffer at all
    (lambda: None, TypeError),
    (lambda: "x" * 1024, TypeError),
])
def test_bad_foreign_buffers(make, exc):
    buf = make()
    with pytest.raises(exc):
        collect(buf, 0)


def test_read_only_numpy_and_mmap_rejected():
    a = np.zeros(64, ENTRY_DTYPE)
    a["flags"][0] = 1
    a.flags.writeable = False
    with pytest.raises(ValueError):
        collect(a, 0)
    m = mmap.mmap(-1, 4096, access=mmap.ACCESS_READ)
    with pytest.raises(ValueError):
        collect(m, 0)
    m.close()


@pytest.mark.parametrize("fetch, mc, exc", [
    (-1, None, ValueError), (2**32, None, ValueError), (1.0, None, TypeError),
    ("0", None, TypeError), (0, -1, ValueError), (0, "3", TypeError),
])
def test_bad_foreign_indexes(fetch, mc, exc):
    a = np.zeros(64, ENTRY_DTYPE)
    a["flags"][:3] = 1
    before = a.copy()
    with pytest.raises(exc):
        collect(a, fetch, mc)
    assert (a == before).all()


def test_closed_mmap_cannot_be_collected_and_exported_mmap_cannot_close():
    m = mmap.mmap(-1, 4096)
    m.close()
    with pytest.raises((ValueError, TypeError)):
        collect(m, 0)
