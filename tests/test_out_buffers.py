"""Caller-owned output buffers (issue #16): get_dirty_log(out=), collect(out_*), to_gfns(out=),
harvest_gfns(out=), copy_live(out=), DirtyBitmap.harvest(out=).

The same contract on every backend usable here (simulator, host, real KVM):
the buffer is filled and returned (a view of its first words when longer),
its type is checked before anything changes (TypeError / ValueError from
kvmdirty.validate.out_words), one shorter than the bitmap fails with EFAULT
taking nothing, and the content equals what a new array would have held.
"""
from __future__ import annotations

import errno

import numpy as np
import pytest

from host_util import HOST_UNUSABLE
from kvm_util import KVM_UNUSABLE

import kvmdirty
from kvmdirty import KvmError, _bitmap
from kvmdirty._ring import DirtyRing, collect as ring_collect
from kvmdirty.vm import MEM_LOG_DIRTY_PAGES as LOG

NPAGES = 200                      # 4 words, the last one partial
NWORDS = (NPAGES + 63) // 64


def _backend_params():
    out = [pytest.param("sim", id="sim")]
    out.append(pytest.param("host", id="host", marks=pytest.mark.skipif(
        HOST_UNUSABLE is not None, reason=f"host write tracking unusable here: {HOST_UNUSABLE}")))
    out.append(pytest.param("kvm", id="kvm", marks=pytest.mark.skipif(
        KVM_UNUSABLE is not None, reason=f"real KVM unusable here: {KVM_UNUSABLE}")))
    return out


@pytest.fixture(params=_backend_params())
def vm(request):
    from kvmdirty.info import host_vm_options
    opts = host_vm_options() if request.param != "kvm" else {}
    v = kvmdirty.open_vm(request.param, **opts)
    try:
        v.set_user_memory_region(0, 0, NPAGES * 4096, LOG)
        v.set_user_memory_region(1, 1 << 24, 64 * 4096, 0)      # not logging
        v.vcpu = v.create_vcpu(0)
        yield v
    finally:
        v.close()


PLAN = np.array([0, 5, 63, 64, 130, 199, 5], np.uint64)
PAGES = sorted(set(PLAN.tolist()))


def test_get_dirty_log_into_out_reused(vm):
    out = np.full(NWORDS, 0xDEAD, np.uint64)           # garbage: must be overwritten
    for rnd in range(3):
        assert vm.vcpu.run(PLAN, rnd + 1).done
        got = vm.get_dirty_log(0, out)
        assert got is out
        assert _bitmap.to_gfns(got).tolist() == PAGES
    # clean now: every word of the reused buffer is 0 again
    assert not vm.get_dirty_log(0, out).any()


def test_get_dirty_log_longer_out_is_a_view(vm):
    vm.vcpu.run(PLAN, 1)
    out = np.full(NWORDS + 3, 7, np.uint64)
    got = vm.get_dirty_log(0, out)
    assert len(got) == NWORDS and np.shares_memory(got, out)
    assert _bitmap.to_gfns(got).tolist() == PAGES
    assert (out[NWORDS:] == 7).all()                     # past the bitmap: untouched


def test_get_dirty_log_short_out_is_efault_and_takes_nothing(vm):
    vm.vcpu.run(PLAN, 1)
    with pytest.raises(KvmError) as e:
        vm.get_dirty_log(0, np.zeros(NWORDS - 1, np.uint64))
    assert e.value.errno == errno.EFAULT
    assert _bitmap.to_gfns(vm.get_dirty_log(0)).tolist() == PAGES     # nothing was taken


def test_get_dirty_log_out_errno_order(vm):
    short = np.zeros(0, np.uint64)
    with pytest.raises(KvmError) as e:                   # ENOENT (not logging) before EFAULT
        vm.get_dirty_log(1, short)
    assert e.value.errno == errno.ENOENT
    with pytest.raises(KvmError) as e:                   # no such slot
        vm.get_dirty_log(7, short)
    assert e.value.errno == errno.ENOENT


@pytest.mark.parametrize("bad, exc", [
    ([0, 0, 0, 0], TypeError),
    (np.zeros(NWORDS, np.int64), ValueError),
    (np.zeros(NWORDS, np.uint32), ValueError),
    (np.zeros((NWORDS, 1), np.uint64), ValueError),
    (np.zeros(2 * NWORDS, np.uint64)[::2], ValueError),
    (np.zeros(NWORDS, ">u8"), ValueError),
])
def test_get_dirty_log_bad_out_changes_nothing(vm, bad, exc):
    vm.vcpu.run(PLAN, 1)
    with pytest.raises(exc):
        vm.get_dirty_log(0, bad)
    assert _bitmap.to_gfns(vm.get_dirty_log(0)).tolist() == PAGES


def test_get_dirty_log_read_only_out(vm):
    ro = np.zeros(NWORDS, np.uint64)
    ro.flags.writeable = False
    with pytest.raises(ValueError):
        vm.get_dirty_log(0, ro)


def test_get_dirty_log_out_manual_protect():
    vm = kvmdirty.VM()
    vm.enable_manual_protect(initially_set=True)
    vm.set_user_memory_region(0, 0, NPAGES * 4096, LOG)
    out = np.zeros(NWORDS, np.uint64)
    got = vm.get_dirty_log(0, out)
    assert got is out and _bitmap.popcount(out) == NPAGES
    assert _bitmap.popcount(vm.get_dirty_log(0)) == NPAGES           # a copy: nothing cleared


def test_get_dirty_log_out_ring_vm_is_enxio():
    vm = kvmdirty.VM()
    vm.enable_dirty_ring(4096)
    vm.set_user_memory_region(0, 0, NPAGES * 4096, LOG)
    with pytest.raises(KvmError) as e:
        vm.get_dirty_log(0, np.zeros(0, np.uint64))
    assert e.value.errno == errno.ENXIO


def test_get_dirty_log_slot_checks_unchanged():
    vm = kvmdirty.VM()
    vm.set_user_memory_region(0, 0, NPAGES * 4096, LOG)
    for bad, exc in ((True, TypeError), (-1, ValueError), (1 << 32, ValueError), (1.0, TypeError)):
        with pytest.raises(exc):
            vm.get_dirty_log(bad)
    with pytest.raises(KvmError) as e:
        vm.get_dirty_log(2 << 16)
    assert e.value.errno == errno.EINVAL
    assert vm.get_dirty_log(np.uint32(0)).shape == (NWORDS,)
    vm.close()
    with pytest.raises(KvmError) as e:
        vm.get_dirty_log(0, np.zeros(NWORDS, np.uint64))
    assert e.value.errno == errno.EBADF


# -- the kernels -----------------------------------------------------------------------
def _words(pages, n=NWORDS):
    w = np.zeros(n, np.uint64)
    _bitmap.set_bits(w, np.array(pages, np.uint64))
    return w


def test_to_gfns_out():
    w = _words(PAGES)
    out = np.full(10, 9, np.uint64)
    got = _bitmap.to_gfns(w, 1000, out)
    assert got.tolist() == [p + 1000 for p in PAGES] and np.shares_memory(got, out)
    with pytest.raises(ValueError, match="room for 2 pages, 6 are set"):
        _bitmap.to_gfns(w, 0, np.zeros(2, np.uint64))
    with pytest.raises(TypeError):
        _bitmap.to_gfns(w, 0, [0] * 10)
    assert _bitmap.to_gfns(np.zeros(3, np.uint64), 0, np.zeros(0, np.uint64)).tolist() == []


@pytest.mark.parametrize("sink", ["none", "words", "python"])
def test_harvest_gfns_out_and_put_back(sink):
    w = _words(PAGES)
    wp = np.full(NWORDS, ~np.uint64(0))
    s = {"none": None, "words": wp, "python": lambda i, m: None}[sink]
    out = np.empty(len(PAGES), np.uint64)
    assert _bitmap.harvest_gfns(w, s, out=out).tolist() == PAGES
    assert not w.any()
    # too short: everything taken goes back
    w = _words(PAGES)
    before = w.copy()
    with pytest.raises(ValueError):
        _bitmap.harvest_gfns(w, s, out=np.empty(3, np.uint64))
    np.testing.assert_array_equal(w, before)


def test_harvest_reused_snapshot_and_dirtybitmap_out():
    w = _words(PAGES)
    snap = np.full(NWORDS, 0xFFFF, np.uint64)             # garbage
    assert _bitmap.harvest(w, snap) == len(PAGES)
    np.testing.assert_array_equal(snap, _words(PAGES))
    assert _bitmap.harvest(w, snap) == 0 and not snap.any()
    db = _bitmap.DirtyBitmap(NPAGES)
    db.set_many(PAGES)
    out = np.full(NWORDS + 1, 3, np.uint64)
    got = db.harvest(out=out)
    assert _bitmap.to_gfns(got).tolist() == PAGES and len(got) == NWORDS and out[-1] == 3
    assert db.popcount() == 0
    db.set_many(PAGES)
    with pytest.raises(ValueError):
        db.harvest(out=np.zeros(1, np.uint64))
    assert db.popcount() == len(PAGES)
    seen = []
    assert _bitmap.to_gfns(db.harvest(lambda i, m: seen.append(i), out=out)).tolist() == PAGES
    assert seen == sorted({p // 64 for p in PAGES})
    assert db.to_gfns(0, np.empty(4, np.uint64)).tolist() == []


def test_copy_live_out():
    w = _words(PAGES)
    out = np.empty(NWORDS + 2, np.uint64)
    got = _bitmap.copy_live(w, out)
    np.testing.assert_array_equal(got, w)
    assert len(got) == NWORDS
    with pytest.raises(ValueError):
        _bitmap.copy_live(w, np.empty(1, np.uint64))


def test_ring_collect_out_and_foreign_collect_out():
    r = DirtyRing(4096)
    for i in range(5):
        r.push(1, 100 + i)
    bs, bo = np.empty(8, np.uint32), np.empty(8, np.uint64)
    s, o = r.collect(None, bs, bo)
    assert o.tolist() == [100, 101, 102, 103, 104] and np.shares_memory(o, bo)
    r.push(1, 7)
    s, o = r.collect(None, bs[:1], bo[:1])             # exactly full: the arrays themselves
    assert o.tolist() == [7] and s.tolist() == [1]
    with pytest.raises(ValueError):
        r.collect(None, np.empty(2, np.int32), np.empty(2, np.uint64))
    with pytest.raises(TypeError):
        r.collect(None, [0], np.empty(2, np.uint64))
    with pytest.raises(ValueError):
        r.collect(None, bs)
    e = np.zeros(256, r.gfns.dtype)
    e["flags"][:3] = 1
    e["offset"][:3] = [4, 5, 6]
    s, o, f = ring_collect(e, 0, None, bs, bo)
    assert o.tolist() == [4, 5, 6] and f == 3 and (e["flags"][:3] == 2).all()
    with pytest.raises(ValueError):
        ring_collect(e, 0, None, bs)


def test_collectors_reuse_their_buffers():
    from kvmdirty.collectors import make_collector
    for design in ("bitmap", "clear-log", "ring"):
        c = make_collector(design)
        vm = kvmdirty.VM(**c.vm_options())
        c.configure(vm)
        vm.set_user_memory_region(0, 0, NPAGES * 4096, LOG)
        v = vm.create_vcpu(0)
        c.attach(vm, [(0, 0, NPAGES)], [v])
        c.harvest()                    # clear-log starts with every bit set (INITIALLY_SET)
        got = []
        for rnd in range(3):
            v.run(PLAN, rnd + 1)
            h = c.harvest()
            got.append(h)
        for h in got:                  # earlier harvests were not overwritten by later ones
            assert sorted(h[0].tolist()) == PAGES, design
