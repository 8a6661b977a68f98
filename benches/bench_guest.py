"""The simulated guest write loop: TLB hits, and write-protect faults that log into a bitmap or a ring.

Run: pytest benches/bench_guest.py --benchmark-only
"""
import numpy as np

import kvmdirty
from kvmdirty.vm import MEM_LOG_DIRTY_PAGES as LOG

WRITES = 1 << 20


def test_write_loop_tlb_hits(benchmark):
    vm = kvmdirty.VM()
    vm.set_user_memory_region(0, 0, 1 << 30, LOG)
    v = vm.create_vcpu(0)
    plan = np.random.default_rng(0).integers(0, 4096, WRITES).astype(np.uint64)
    v.run(np.arange(4096, dtype=np.uint64), 0)          # fault each page in once
    before = v.stats["faults"]
    benchmark.extra_info["ops"] = WRITES
    benchmark.extra_info["unit"] = "write"
    benchmark(v.run, plan, 1)
    assert v.stats["faults"] == before                  # every write was a TLB hit


def test_write_loop_faults_into_bitmap(benchmark):
    vm = kvmdirty.VM()
    vm.set_user_memory_region(0, 0, 4 << 30, LOG)       # 1 Mi pages
    v = vm.create_vcpu(0)
    plan = np.random.default_rng(0).permutation(WRITES).astype(np.uint64)

    def reprotect():
        vm.get_dirty_log(0)                              # harvest: every page protected again
        return (plan, 1), {}

    benchmark.extra_info["ops"] = WRITES
    benchmark.extra_info["unit"] = "write"
    benchmark.pedantic(v.run, setup=reprotect, rounds=10)
    assert v.stats["faults"] >= WRITES * (10 if benchmark.stats else 1)   # one round with --benchmark-disable


RING_WRITES = 60_000               # below a 65536-entry ring's soft limit (65472)


def test_write_loop_faults_into_ring(benchmark):
    """Write faults that push to the vCPU's dirty ring (distinct random pages of a 16 GiB slot)."""
    vm = kvmdirty.VM()
    vm.enable_dirty_ring(1 << 16)
    vm.set_user_memory_region(0, 0, 16 << 30, LOG)
    v = vm.create_vcpu(0)
    plan = np.random.default_rng(0).choice(1 << 22, RING_WRITES, replace=False).astype(np.uint64)

    def reprotect():
        v.dirty_ring.collect()
        vm.reset_dirty_rings()                           # harvest: every page protected again
        return (plan, 1), {}

    benchmark.extra_info["ops"] = RING_WRITES
    benchmark.extra_info["unit"] = "write"
    exit = benchmark.pedantic(v.run, setup=reprotect, rounds=10)
    assert exit.writes == RING_WRITES and v.dirty_ring.used == RING_WRITES
