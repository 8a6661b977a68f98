"""Threads: 2 vCPUs write while a collector harvests with KVM_GET_DIRTY_LOG.

A shadow copy of guest memory is updated only from harvested pages (after the
harvest has re-protected them, as QEMU copies them); once the vCPUs stop, a
final harvest and copy must leave the shadow equal to guest memory.
"""
import threading

import numpy as np
import pytest

import kvmdirty
from kvmdirty import _bitmap
from kvmdirty.vm import MEM_LOG_DIRTY_PAGES as LOG

NPAGES = 1 << 16
CHUNK = 20_000
CHUNKS = 40


def run_migration(faults=()):
    vm = kvmdirty.VM(faults=faults)
    vm.set_user_memory_region(0, 0, NPAGES * 4096, LOG)
    mem = vm.memory(0)
    shadow = np.zeros(NPAGES, np.uint64)
    vcpus = [vm.create_vcpu(i) for i in range(2)]
    done = threading.Event()
    harvests = [0]

    def guest(v, seed):
        rng = np.random.default_rng(seed)
        hot = rng.integers(0, NPAGES, 512)          # a hot set keeps TLB entries live
        for c in range(CHUNKS):
            gfns = np.where(rng.random(CHUNK) < 0.5, rng.choice(hot, CHUNK),
                            rng.integers(0, NPAGES, CHUNK)).astype(np.uint64)
            vals = (np.uint64(v.id + 1) << np.uint64(40)) + np.arange(c * CHUNK, (c + 1) * CHUNK, dtype=np.uint64)
            assert v.run(gfns, vals).done

    def harvest():
        pages = _bitmap.to_gfns(vm.get_dirty_log(0))
        shadow[pages] = mem[pages]
        harvests[0] += 1

    def collector():
        while not done.is_set():
            harvest()

    threads = [threading.Thread(target=guest, args=(v, 100 + v.id)) for v in vcpus]
    col = threading.Thread(target=collector)
    col.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    col.join()
    harvest()                                       # stop-and-copy with the vCPUs stopped
    lost = np.flatnonzero(shadow != mem)
    return lost, harvests[0], vm.stats


def test_threaded_harvest_loses_nothing():
    lost, harvests, stats = run_migration()
    assert harvests > 5
    assert stats["writes"] == 2 * CHUNK * CHUNKS
    assert lost.size == 0, f"lost writes to pages {lost[:10]}"


@pytest.mark.parametrize("fault", ["skip-flush", "unlogged-fault"])
def test_threaded_harvest_catches_injected_bug(fault):
    lost, _, _ = run_migration(faults=[fault])
    assert lost.size > 0
