"""The KVM-shaped API of the simulator: the ioctls as a VMM calls them, and their Python overhead.

- get_dirty_log on a clean 24 GiB slot and with 0.1% of it dirty (harvest:
  xchg, masked protect, TLB flush), and followed by to_gfns (what a VMM does next);
- clear_dirty_log (manual protect) of 0.1% of a 24 GiB slot;
- reset_dirty_rings after a harvest of RING_DIRTY (4096) entries, consecutive and random
  pages, and the whole ring harvest (collect + reset) through the VM;
- Python call overhead: collect of one entry (vcpu.dirty_ring.collect(1)) and
  get_dirty_log of a clean 1-page slot (target <= 1 us each).

The same sizes and dirty counts are used by bench_kvm.py on the real /dev/kvm.
"""
from __future__ import annotations

import numpy as np
import pytest

import kvmdirty
from conftest import (DIRTY_24G, PAGES_24G, RING_DIRTY, RING_ENTRIES, RING_SLOT_PAGES, dirty_pages,
                      ring_plan, rounds, set_ops)
from kvmdirty import _bitmap
from kvmdirty.vm import MEM_LOG_DIRTY_PAGES as LOG

SLOT_BYTES = PAGES_24G << 12
DIRTY = DIRTY_24G                   # 0.1% of 24 GiB: 6291 pages


def _bitmap_vm(manual=False, size=SLOT_BYTES):
    vm = kvmdirty.VM()
    if manual:
        vm.enable_manual_protect()
    vm.set_user_memory_region(0, 0, size, LOG)
    return vm, vm.create_vcpu(0)


@pytest.mark.benchmark(group="vm-get-dirty-log")
def test_get_dirty_log_clean_24g(benchmark):
    vm, _ = _bitmap_vm()
    set_ops(benchmark, 1, "call", pages=PAGES_24G, dirty=0)
    snap = benchmark(vm.get_dirty_log, 0)
    assert not snap.any()


@pytest.mark.benchmark(group="vm-get-dirty-log")
def test_get_dirty_log_clean_24g_into(benchmark):
    """The same into a caller-owned bitmap reused from call to call (out=)."""
    vm, _ = _bitmap_vm()
    out = np.empty(PAGES_24G // 64, np.uint64)
    set_ops(benchmark, 1, "call", pages=PAGES_24G, dirty=0)
    snap = benchmark(vm.get_dirty_log, 0, out)
    assert snap is out and not snap.any()


@pytest.mark.benchmark(group="vm-get-dirty-log")
def test_get_dirty_log_dirty_24g(benchmark):
    """0.1% dirtied by the guest (write faults) before each call."""
    vm, v = _bitmap_vm()
    plan = dirty_pages(PAGES_24G, DIRTY)
    set_ops(benchmark, 1, "call", pages=PAGES_24G, dirty=DIRTY)
    benchmark.pedantic(vm.get_dirty_log, args=(0,), setup=lambda: v.run(plan, 1) and None,
                       rounds=rounds(100, 10), warmup_rounds=1)
    v.run(plan, 2)
    assert _bitmap.popcount(vm.get_dirty_log(0)) == DIRTY


@pytest.mark.benchmark(group="vm-get-dirty-log")
def test_get_dirty_log_to_gfns_24g(benchmark):
    """What a VMM does: harvest, then list the dirty pages (per dirty page)."""
    vm, v = _bitmap_vm()
    plans = [dirty_pages(PAGES_24G, DIRTY, seed=s) for s in (1, 2)]     # in turn, as the _into case
    turn = [0]
    set_ops(benchmark, DIRTY, "page", pages=PAGES_24G, dirty=DIRTY)

    def setup():
        turn[0] ^= 1
        v.run(plans[turn[0]], 1)

    got = benchmark.pedantic(lambda: _bitmap.to_gfns(vm.get_dirty_log(0)),
                             setup=setup, rounds=rounds(100, 10), warmup_rounds=1)
    assert np.array_equal(got, plans[turn[0]])


@pytest.mark.benchmark(group="vm-get-dirty-log")
def test_get_dirty_log_to_gfns_24g_into(benchmark):
    """The same through the public API into caller-owned buffers, reused (out= on both):
    what the C baseline's exchange-scan-list does (bench_cbase.py)."""
    vm, v = _bitmap_vm()
    # Two dirty sets in turn: the reused snapshot holds the other one's words,
    # which get_dirty_log must clear (as a real harvest loop's would).
    plans = [dirty_pages(PAGES_24G, DIRTY, seed=s) for s in (1, 2)]
    turn = [0]
    snap = np.empty(PAGES_24G // 64, np.uint64)
    gfns = np.empty(DIRTY, np.uint64)
    set_ops(benchmark, DIRTY, "page", pages=PAGES_24G, dirty=DIRTY)

    def setup():
        turn[0] ^= 1
        v.run(plans[turn[0]], 1)

    got = benchmark.pedantic(lambda: _bitmap.to_gfns(vm.get_dirty_log(0, snap), 0, gfns),
                             setup=setup, rounds=rounds(100, 10), warmup_rounds=1)
    assert np.array_equal(got, plans[turn[0]])


@pytest.mark.benchmark(group="vm-clear-dirty-log")
def test_clear_dirty_log_24g(benchmark):
    """Manual protect: clear (and re-protect) exactly the 0.1% that are dirty."""
    vm, v = _bitmap_vm(manual=True)
    plan = dirty_pages(PAGES_24G, DIRTY)
    mask = np.zeros(PAGES_24G // 64, np.uint64)
    _bitmap.set_bits(mask, plan)
    set_ops(benchmark, 1, "call", pages=PAGES_24G, dirty=DIRTY)
    cleared = benchmark.pedantic(vm.clear_dirty_log, args=(0, 0, PAGES_24G, mask),
                                 setup=lambda: v.run(plan, 1) and None, rounds=rounds(100, 10), warmup_rounds=1)
    assert cleared == DIRTY


@pytest.mark.benchmark(group="vm-clear-dirty-log")
def test_clear_dirty_log_clean_24g(benchmark):
    """Manual protect: a whole-slot clear when nothing is dirty (the walk of the user's mask)."""
    vm, _ = _bitmap_vm(manual=True)
    mask = np.full(PAGES_24G // 64, ~np.uint64(0))
    set_ops(benchmark, 1, "call", pages=PAGES_24G, dirty=0)
    assert benchmark(vm.clear_dirty_log, 0, 0, PAGES_24G, mask) == 0


def _ring_vm(pattern: str):
    vm = kvmdirty.VM()
    vm.enable_dirty_ring(RING_ENTRIES)
    vm.set_user_memory_region(0, 0, RING_SLOT_PAGES << 12, LOG)
    v = vm.create_vcpu(0)
    return vm, v, ring_plan(pattern)


@pytest.mark.parametrize("pattern", ["consecutive", "random"])
def test_reset_dirty_rings(benchmark, pattern):
    """KVM_RESET_DIRTY_RINGS after a harvest of RING_DIRTY (4096) entries (coalesce, protect, flush)."""
    vm, v, plan = _ring_vm(pattern)
    ring = v.dirty_ring
    benchmark.group = f"vm-reset-dirty-rings-{pattern}"
    set_ops(benchmark, RING_DIRTY, "entry", pattern=pattern)

    def setup():
        v.run(plan, 1)
        ring.collect()

    got = benchmark.pedantic(vm.reset_dirty_rings, setup=setup, rounds=rounds(100, 10), warmup_rounds=1)
    assert got == RING_DIRTY


@pytest.mark.parametrize("pattern", ["consecutive", "random"])
def test_ring_harvest(benchmark, pattern):
    """A whole ring harvest as QEMU does it: collect every entry, then KVM_RESET_DIRTY_RINGS."""
    vm, v, plan = _ring_vm(pattern)
    ring = v.dirty_ring
    benchmark.group = f"vm-ring-harvest-{pattern}"
    set_ops(benchmark, RING_DIRTY, "entry", pattern=pattern)

    def harvest():
        _, offsets = ring.collect()
        vm.reset_dirty_rings()
        return offsets

    got = benchmark.pedantic(harvest, setup=lambda: v.run(plan, 1) and None, rounds=rounds(100, 10),
                             warmup_rounds=1)
    assert len(got) == RING_DIRTY


@pytest.mark.parametrize("pattern", ["consecutive", "random"])
def test_ring_harvest_into(benchmark, pattern):
    """The same, collecting into caller-owned arrays reused from harvest to harvest."""
    vm, v, plan = _ring_vm(pattern)
    ring = v.dirty_ring
    bs, bo = np.empty(RING_ENTRIES, np.uint32), np.empty(RING_ENTRIES, np.uint64)
    benchmark.group = f"vm-ring-harvest-{pattern}"
    set_ops(benchmark, RING_DIRTY, "entry", pattern=pattern)

    def harvest():
        _, offsets = ring.collect(None, bs, bo)
        vm.reset_dirty_rings()
        return offsets

    got = benchmark.pedantic(harvest, setup=lambda: v.run(plan, 1) and None, rounds=rounds(100, 10),
                             warmup_rounds=1)
    assert len(got) == RING_DIRTY


# -- Python call overhead ---------------------------------------------------------
OVERHEAD_CALLS = 500


@pytest.mark.benchmark(group="vm-overhead")
def test_overhead_collect_one(benchmark):
    """vcpu.dirty_ring.collect(1): one entry per call, from a ring the guest filled."""
    vm = kvmdirty.VM()
    vm.enable_dirty_ring(RING_ENTRIES)
    vm.set_user_memory_region(0, 0, 1 << 30, LOG)
    v = vm.create_vcpu(0)
    r = rounds(100, 20)
    n = r * OVERHEAD_CALLS + 2 * OVERHEAD_CALLS               # + warmup
    assert v.run(np.arange(n, dtype=np.uint64), 1).writes == n
    ring = v.dirty_ring
    set_ops(benchmark, 1, "call")
    s, o = benchmark.pedantic(ring.collect, args=(1,), rounds=r, iterations=OVERHEAD_CALLS, warmup_rounds=1)
    assert len(o) == 1


@pytest.mark.benchmark(group="vm-overhead")
def test_overhead_collect_one_into(benchmark):
    """collect into caller-provided 1-entry arrays (no allocation per call)."""
    vm = kvmdirty.VM()
    vm.enable_dirty_ring(RING_ENTRIES)
    vm.set_user_memory_region(0, 0, 1 << 30, LOG)
    v = vm.create_vcpu(0)
    r = rounds(100, 20)
    n = r * OVERHEAD_CALLS + 2 * OVERHEAD_CALLS
    v.run(np.arange(n, dtype=np.uint64), 1)
    ring = v.dirty_ring
    bs, bo = np.empty(1, np.uint32), np.empty(1, np.uint64)
    set_ops(benchmark, 1, "call")
    s, o = benchmark.pedantic(ring.collect, args=(None, bs, bo), rounds=r, iterations=OVERHEAD_CALLS,
                              warmup_rounds=1)
    assert len(o) == 1


@pytest.mark.benchmark(group="vm-overhead")
def test_overhead_collect_empty(benchmark):
    """collect() of an empty ring (default arguments): the bare call."""
    vm = kvmdirty.VM()
    vm.enable_dirty_ring(4096)
    vm.set_user_memory_region(0, 0, 1 << 20, LOG)
    ring = vm.create_vcpu(0).dirty_ring
    set_ops(benchmark, 1, "call")
    s, o = benchmark(ring.collect)
    assert len(o) == 0


@pytest.mark.benchmark(group="vm-overhead")
def test_overhead_get_dirty_log_1page(benchmark):
    """vm.get_dirty_log on a clean 1-page slot."""
    vm, _ = _bitmap_vm(size=4096)
    set_ops(benchmark, 1, "call")
    assert len(benchmark(vm.get_dirty_log, 0)) == 1


@pytest.mark.benchmark(group="vm-overhead")
def test_overhead_get_dirty_log_1page_into(benchmark):
    """vm.get_dirty_log on a clean 1-page slot into a caller-owned 1-word array."""
    vm, _ = _bitmap_vm(size=4096)
    out = np.empty(1, np.uint64)
    set_ops(benchmark, 1, "call")
    assert benchmark(vm.get_dirty_log, 0, out) is out
