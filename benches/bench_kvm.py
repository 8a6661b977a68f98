"""The real /dev/kvm, on the same slot sizes and dirty counts as the simulator (bench_vm.py).

- KVM_GET_DIRTY_LOG of a clean 24 GiB slot, and of one with 0.1% dirty;
  clean GET at 1..32 GiB (its cost per GiB);
- KVM_CLEAR_DIRTY_LOG (manual protect) of 0.1% of 24 GiB, and of a clean slot;
- ring: our collect over the vCPU fd's mmap of RING_DIRTY entries, then
  KVM_RESET_DIRTY_RINGS (consecutive and random pages), and the reset alone.

Pages are dirtied by kvmdirty's tiny guest program before each round. The
guest here runs nested (~4 us per instruction), so that setup takes about
10-40 ms per round (more for 0.1% of 24 GiB) and round counts are small; only the ioctls are timed.
Skipped, with the reason, where /dev/kvm is missing or unusable.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import (DIRTY_24G, GIB_PAGES, PAGES_24G, QUICK, RING_DIRTY, RING_ENTRIES, RING_SLOT_PAGES,
                      dirty_pages, kvm_unusable, ring_plan, rounds, set_ops)
from kvmdirty import _bitmap
from kvmdirty.vm import MEM_LOG_DIRTY_PAGES as LOG

_why = kvm_unusable()
pytestmark = [pytest.mark.kvm, pytest.mark.skipif(_why is not None, reason=f"real KVM: {_why}")]


@pytest.fixture
def kvm_vm():
    from kvmdirty.kvm import KvmVM
    vm = KvmVM()
    yield vm
    vm.close()


# The slots start at 4 GiB, above the x86 hole that holds KvmVM's private slot
# (as a QEMU guest's RAM above 4 GiB does); plans name pages of the slot.
BASE_GFN = 1 << 20


def _bitmap_vm(vm, npages=PAGES_24G, manual=False):
    if manual:
        vm.enable_manual_protect()
    vm.set_user_memory_region(0, BASE_GFN << 12, npages << 12, LOG)
    return vm.create_vcpu(0)


def _dirty(v, plan):
    e = v.run(np.asarray(plan, np.uint64) + np.uint64(BASE_GFN), 1)
    assert e.remaining == 0, e


@pytest.mark.benchmark(group="vm-get-dirty-log")
def test_kvm_get_dirty_log_clean_24g(benchmark, kvm_vm):
    _bitmap_vm(kvm_vm)
    set_ops(benchmark, 1, "call", pages=PAGES_24G, dirty=0, impl="kvm")
    assert not benchmark(kvm_vm.get_dirty_log, 0).any()


@pytest.mark.benchmark(group="vm-get-dirty-log")
def test_kvm_get_dirty_log_dirty_24g(benchmark, kvm_vm):
    v = _bitmap_vm(kvm_vm)
    plan = dirty_pages(PAGES_24G, DIRTY_24G)
    set_ops(benchmark, 1, "call", pages=PAGES_24G, dirty=DIRTY_24G, impl="kvm")
    snap = benchmark.pedantic(kvm_vm.get_dirty_log, args=(0,), setup=lambda: _dirty(v, plan),
                              rounds=rounds(20, 3))
    assert np.array_equal(_bitmap.to_gfns(snap), plan)


@pytest.mark.parametrize("gib", [1, 4] if QUICK else [1, 2, 4, 8, 16, 32])
def test_kvm_get_dirty_log_clean_sweep(benchmark, kvm_vm, gib):
    """Clean GET by slot size (the guest's 36-bit physical space holds at most 63 GiB)."""
    _bitmap_vm(kvm_vm, gib * GIB_PAGES)
    benchmark.group = "sweep-kvm-get-clean"
    set_ops(benchmark, 1, "call", gib=gib, pages=gib * GIB_PAGES, impl="kvm")
    assert not benchmark(kvm_vm.get_dirty_log, 0).any()


@pytest.mark.benchmark(group="vm-clear-dirty-log")
def test_kvm_clear_dirty_log_24g(benchmark, kvm_vm):
    v = _bitmap_vm(kvm_vm, manual=True)
    plan = dirty_pages(PAGES_24G, DIRTY_24G)
    mask = np.zeros(PAGES_24G // 64, np.uint64)
    _bitmap.set_bits(mask, plan)
    set_ops(benchmark, 1, "call", pages=PAGES_24G, dirty=DIRTY_24G, impl="kvm")
    benchmark.pedantic(kvm_vm.clear_dirty_log, args=(0, 0, PAGES_24G, mask), setup=lambda: _dirty(v, plan),
                       rounds=rounds(20, 3))
    assert not kvm_vm.get_dirty_log(0).any()          # manual protect: GET copies the live bitmap


@pytest.mark.benchmark(group="vm-clear-dirty-log")
def test_kvm_clear_dirty_log_clean_24g(benchmark, kvm_vm):
    _bitmap_vm(kvm_vm, manual=True)
    mask = np.full(PAGES_24G // 64, ~np.uint64(0))
    set_ops(benchmark, 1, "call", pages=PAGES_24G, dirty=0, impl="kvm")
    benchmark(kvm_vm.clear_dirty_log, 0, 0, PAGES_24G, mask)


def _ring_vm(vm, pattern):
    vm.enable_dirty_ring(RING_ENTRIES)
    vm.set_user_memory_region(0, BASE_GFN << 12, RING_SLOT_PAGES << 12, LOG)
    v = vm.create_vcpu(0)
    return v, ring_plan(pattern)


@pytest.mark.parametrize("pattern", ["consecutive", "random"])
def test_kvm_reset_dirty_rings(benchmark, kvm_vm, pattern):
    v, plan = _ring_vm(kvm_vm, pattern)
    ring = v.dirty_ring
    benchmark.group = f"vm-reset-dirty-rings-{pattern}"
    set_ops(benchmark, RING_DIRTY, "entry", pattern=pattern, impl="kvm")

    def setup():
        _dirty(v, plan)
        _, offsets = ring.collect()
        assert len(offsets) == RING_DIRTY, len(offsets)   # this host logs each emulated write once here

    got = benchmark.pedantic(kvm_vm.reset_dirty_rings, setup=setup, rounds=rounds(20, 3))
    assert got == RING_DIRTY


@pytest.mark.parametrize("pattern", ["consecutive", "random"])
def test_kvm_ring_harvest(benchmark, kvm_vm, pattern):
    """Our collect over the real ring's mmap, then KVM_RESET_DIRTY_RINGS."""
    v, plan = _ring_vm(kvm_vm, pattern)
    ring = v.dirty_ring
    benchmark.group = f"vm-ring-harvest-{pattern}"
    set_ops(benchmark, RING_DIRTY, "entry", pattern=pattern, impl="kvm")

    def harvest():
        _, offsets = ring.collect()
        kvm_vm.reset_dirty_rings()
        return offsets

    got = benchmark.pedantic(harvest, setup=lambda: _dirty(v, plan), rounds=rounds(20, 3))
    assert np.array_equal(np.sort(got), np.sort(plan))
