"""Lifetime: views handed out stay valid, or raise, after their owner is closed or deleted.

Never a use-after-free: every view below is read and written after its owner
is gone, with the garbage collector run and memory churned in between.  Run
under the sanitizer build (.ci/sanitize.sh) this is where a dangling pointer
would be reported.  Capsules handed between the compiled modules (_kd_sink,
_kd_ring, _kd_tracker) must keep their owner alive for as long as they live.
"""
from __future__ import annotations

import errno
import gc
import weakref

import numpy as np
import pytest

from kvm_util import requires_kvm

import kvmdirty
from kvmdirty import DirtyBitmap, KvmError, _bitmap, _mmu
from kvmdirty.vm import MEM_LOG_DIRTY_PAGES as LOG


def churn():
    """Free what can be freed and reuse the memory, so a dangling pointer reads garbage."""
    gc.collect()
    junk = [np.full(1 << k, 0xA5, np.uint8) for k in range(4, 20) for _ in range(3)]
    del junk
    gc.collect()


# -- DirtyBitmap.words -------------------------------------------------------------

def test_bitmap_words_outlive_the_bitmap():
    b = DirtyBitmap(1000)
    b.set(3)
    b.set(999)
    w = b.words
    del b
    churn()
    assert _bitmap.to_gfns(w).tolist() == [3, 999]
    w[0] = 0xFF                      # still ours to write
    assert _bitmap.popcount(w) == 9


def test_bitmap_harvest_snapshot_is_independent():
    b = DirtyBitmap(128)
    b.set_many([1, 70])
    snap = b.harvest()
    del b
    churn()
    assert _bitmap.to_gfns(snap).tolist() == [1, 70]


# -- VM.memory(slot), get_dirty_log results, MemSlot arrays -----------------------

def _vm(**kw):
    vm = kvmdirty.VM(**kw)
    vm.set_user_memory_region(0, 0, 256 << 12, LOG)
    vm.set_user_memory_region(1, 1024 << 12, 64 << 12, LOG)
    return vm


@pytest.mark.parametrize("how", ["close", "del", "delete-slot", "move-slot"])
def test_memory_view_outlives_owner(how):
    vm = _vm()
    v = vm.create_vcpu(0)
    v.run([5, 1030], [11, 22])
    mem0, mem1 = vm.memory(0), vm.memory(1)
    if how == "close":
        vm.close()
        with pytest.raises(KvmError) as e:
            vm.memory(0)
        assert e.value.errno == errno.EBADF
    elif how == "del":
        del vm, v
    elif how == "delete-slot":
        vm.set_user_memory_region(0, 0, 0, 0)
        with pytest.raises(KvmError):
            vm.memory(0)
        v.run([1031], 33)            # the other slot still runs
    else:
        vm.set_user_memory_region(0, 8192 << 12, 256 << 12, LOG)
    churn()
    assert int(mem0[5]) == 11 and int(mem1[6]) in (22, 33)
    assert not mem0.flags.writeable
    with pytest.raises(ValueError):
        mem0[5] = 1


def test_dirty_log_result_outlives_vm():
    vm = _vm()
    vm.create_vcpu(0).run([7, 8], 1)
    words = vm.get_dirty_log(0)
    vm.close()
    del vm
    churn()
    assert _bitmap.to_gfns(words).tolist() == [7, 8]


def test_vcpu_of_a_closed_vm_raises():
    vm = _vm()
    v = vm.create_vcpu(0)
    vm.close()
    churn()
    with pytest.raises(KvmError) as e:
        v.run([1], 1)
    assert e.value.errno == errno.EBADF
    assert v.stats["writes"] == 0


def test_vcpu_keeps_running_after_the_vm_object_is_dropped():
    vm = _vm()
    v = vm.create_vcpu(0)
    mem = vm.memory(0)
    del vm                       # the vCPU references its VM: nothing is freed under it
    churn()
    assert v.run([9], 99).done
    assert int(mem[9]) == 99


# -- rings: DirtyRing.gfns, collect results, the VM's rings ------------------------

ring = pytest.importorskip("kvmdirty._ring")


def test_ring_gfns_outlive_close_and_delete():
    r = ring.DirtyRing(256)
    r.push(1, 5)
    g = r.gfns
    r.close()
    with pytest.raises(ValueError):
        r.gfns
    with pytest.raises(ValueError):
        r.collect()
    with pytest.raises(ValueError):
        r.push(1, 6)
    del r
    churn()
    assert int(g["flags"][0]) == 1 and int(g["offset"][0]) == 5
    g["flags"][0] = 2                       # the view is still writable memory of ours
    s, o, f = ring.collect(g, 0)            # collect over it as foreign memory
    assert len(s) == 0 and f == 0


def test_vm_ring_views_outlive_vm():
    vm = kvmdirty.VM()
    vm.enable_dirty_ring(256)
    vm.set_user_memory_region(0, 0, 64 << 12, LOG)
    v = vm.create_vcpu(0)
    v.run([1, 2, 3], 4)
    dr = v.dirty_ring
    g = dr.gfns
    s, o = dr.collect()
    vm.close()
    del vm, v
    churn()
    assert o.tolist() == [1, 2, 3]
    assert g["offset"][:3].tolist() == [1, 2, 3]
    # The ring object is still usable memory (the MMU that pushed into it is gone).
    assert dr.reset() == 3
    dr.close()
    churn()
    assert g["flags"][:3].tolist() == [0, 0, 0]


def test_ring_attached_to_a_vcpu_cannot_be_freed_under_it():
    vm = kvmdirty.VM()
    vm.enable_dirty_ring(256)
    vm.set_user_memory_region(0, 0, 64 << 12, LOG)
    v = vm.create_vcpu(0)
    dr = v.dirty_ring
    dr.close()                                # user space closes its view
    del dr
    churn()
    ex = v.run(list(range(64)), 1)            # the vCPU still pushes into live memory
    assert ex.writes == 64


# -- capsules keep their owners alive -----------------------------------------------

class _Holder:
    pass


def _capsule_keeps_owner(make_owner, attr):
    owner = make_owner()
    wr = weakref.ref(owner)
    cap = getattr(owner, attr)
    del owner
    gc.collect()
    alive = wr() is not None
    del cap
    return alive


class _Mmu(_mmu.Mmu):
    pass


def _ring_owner():
    class R(ring.DirtyRing):
        pass
    return R(256)


# Found by this file (fixed): the capsules were PyCapsule_New(&self.<struct>, NAME, NULL)
# and did not reference their owner, so a capsule that outlived it pointed into freed memory.


def test_mmu_sink_capsule_keeps_the_mmu_alive():
    """Regression: h._kd_sink = Mmu()._kd_sink; _bitmap.harvest(w, s, h) was a use-after-free."""
    assert _capsule_keeps_owner(_Mmu, "_kd_sink")


def test_ring_capsule_keeps_the_ring_alive():
    assert _capsule_keeps_owner(_ring_owner, "_kd_ring")


@pytest.mark.parametrize("which", ["indexed", "shared"])
def test_tracker_capsule_keeps_the_tracker_alive(which):
    _seeds = pytest.importorskip("kvmdirty._seeds")
    if which == "indexed":
        class S(_seeds.IndexedRingSet):
            pass
        make = lambda: S(128)  # noqa: E731
    else:
        class S(_seeds.SharedRingTracker):
            pass
        make = lambda: S(ring.DirtyRing(256))  # noqa: E731
    assert _capsule_keeps_owner(make, "_kd_tracker")


def test_sinks_in_use_keep_their_owner_alive():
    """The supported way (pass the owner itself): the harvest holds it for the whole call."""
    words = np.full(4, 0xFFFF, np.uint64)
    snap = np.zeros(4, np.uint64)
    m = _mmu.Mmu()
    pages = _bitmap.harvest(words, snap, m)
    del m
    churn()
    assert pages == 64


# -- real KVM: mappings outlive their VM -------------------------------------------

@pytest.mark.kvm
@requires_kvm
def test_kvm_memory_view_outlives_vm():
    from kvmdirty.kvm import KvmVM
    vm = KvmVM()
    vm.set_user_memory_region(0, 0, 64 << 12, LOG)
    mem = vm.memory(0)
    vm.close()
    with pytest.raises(KvmError):
        vm.memory(0)
    del vm
    churn()
    assert mem.tolist() == [0] * 64          # the mapping is unmapped only when the view dies


@pytest.mark.kvm
@requires_kvm
def test_kvm_ring_closed_with_vm_raises():
    from kvmdirty.kvm import KvmVM
    vm = KvmVM()
    vm.enable_dirty_ring(256)
    vm.set_user_memory_region(0, 0, 64 << 12, LOG)
    v = vm.create_vcpu(0)
    dr = v.dirty_ring
    vm.close()
    churn()
    with pytest.raises(KvmError) as e:
        dr.collect()
    assert e.value.errno == errno.EBADF
