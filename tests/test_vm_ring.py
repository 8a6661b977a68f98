"""The flags dirty ring through the simulated VM: soft-full exits, resume, reset, threads."""
import threading

import numpy as np
import pytest

import kvmdirty
from kvmdirty.vm import MEM_LOG_DIRTY_PAGES as LOG

MiB = 1 << 20


def ring_vm(entries=256, **kw):
    vm = kvmdirty.VM(**kw)
    vm.enable_dirty_ring(entries)
    vm.set_user_memory_region(0, 0, 16 * MiB, LOG)
    vm.set_user_memory_region(3, 64 * MiB, MiB, LOG)
    return vm


def test_soft_full_exit_keeps_exiting_until_reset_then_resumes():
    vm = ring_vm()
    v = vm.create_vcpu(0)
    ring = v.dirty_ring
    assert ring.entries == 256 and ring.soft_limit == 192
    plan = np.random.default_rng(0).permutation(4096)[:1000].astype(np.uint64)
    seen = []
    ex = v.run(plan, 1)
    while not ex.done:
        assert ex.name == "DIRTY_RING_FULL"
        assert ex.writes == 192 or ex.remaining < 192
        again = v.run()
        assert again.name == "DIRTY_RING_FULL" and again.writes == 0     # still soft-full
        slots, offsets = ring.collect()
        assert (slots == 0).all()
        seen.extend(offsets.tolist())
        assert vm.reset_dirty_rings() == len(offsets)
        ex = v.run()
    slots, offsets = ring.collect()
    seen.extend(offsets.tolist())
    assert seen == plan.tolist()                     # each page once, in write order
    assert vm.reset_dirty_rings() == len(offsets)


def test_entries_name_the_slot_and_offset():
    vm = ring_vm(entries=1024)
    v = vm.create_vcpu(0)
    v.run([5, 16384 + 7, 5], 1)
    slots, offsets = v.dirty_ring.collect()
    assert slots.tolist() == [0, 3] and offsets.tolist() == [5, 7]


def test_reset_reprotects_and_skip_reset_protect_loses_writes():
    for faults, logged_again in (((), True), (("skip-reset-protect",), False)):
        vm = ring_vm(entries=1024, faults=faults)
        v = vm.create_vcpu(0)
        v.run([9], 1)
        assert v.dirty_ring.collect()[1].tolist() == [9]
        assert vm.reset_dirty_rings() == 1
        v.run([9], 2)
        assert (v.dirty_ring.collect()[1].tolist() == [9]) is logged_again


def test_log_every_write_logs_each_write():
    vm = ring_vm(entries=1024, log_every_write=True)
    v = vm.create_vcpu(0)
    v.run([4, 4, 4, 6], 1)
    assert v.dirty_ring.collect()[1].tolist() == [4, 4, 4, 6]


def test_reset_counts_only_harvested_entries_and_needs_no_ring_twice():
    vm = ring_vm(entries=1024)
    a, b = vm.create_vcpu(0), vm.create_vcpu(1)
    a.run([1, 2, 3], 1)
    b.run([10, 11], 1)
    a.dirty_ring.collect(max_count=2)
    assert vm.reset_dirty_rings() == 2
    assert vm.reset_dirty_rings() == 0
    b.dirty_ring.collect()
    a.dirty_ring.collect()
    assert vm.reset_dirty_rings() == 3


def test_pml_reserve_changes_soft_limit_and_minimum_size():
    vm = kvmdirty.VM(pml=True)
    with pytest.raises(kvmdirty.KvmError):
        vm.enable_dirty_ring(512)                     # below 64 + 512 reserved entries
    vm.enable_dirty_ring(1024)
    assert vm.create_vcpu(0).dirty_ring.soft_limit == 1024 - 64 - 512


def test_threaded_reaper_loses_nothing():
    """2 vCPU threads; a QEMU-like reaper harvests every ring, resets, copies."""
    npages = 1 << 14
    vm = kvmdirty.VM()
    vm.enable_dirty_ring(4096)
    vm.set_user_memory_region(0, 0, npages * 4096, LOG)
    mem = vm.memory(0)
    shadow = np.zeros(npages, np.uint64)
    vcpus = [vm.create_vcpu(i) for i in range(2)]
    lock = threading.Lock()
    stop = threading.Event()

    def reap():
        with lock:
            got = [v.dirty_ring.collect()[1] for v in vcpus]
            n = sum(len(g) for g in got)
            assert vm.reset_dirty_rings() == n       # reset exactly what was harvested
            for g in got:                            # re-protected: now copy
                shadow[g] = mem[g]

    def guest(v):
        rng = np.random.default_rng(v.id)
        for c in range(30):
            gfns = rng.integers(0, npages, 20_000).astype(np.uint64)
            vals = np.arange(c * 20_000, (c + 1) * 20_000, dtype=np.uint64) + (np.uint64(v.id + 1) << np.uint64(32))
            ex = v.run(gfns, vals)
            while not ex.done:
                assert ex.name == "DIRTY_RING_FULL"
                reap()
                ex = v.run()

    def reaper():
        while not stop.is_set():
            reap()

    r = threading.Thread(target=reaper)
    r.start()
    ts = [threading.Thread(target=guest, args=(v,)) for v in vcpus]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    stop.set()
    r.join()
    reap()
    assert (shadow == mem).all()
