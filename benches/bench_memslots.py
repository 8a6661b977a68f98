"""Memslot table changes and TLB flush cost in the simulator.

- creating N one-page slots in a VM with 4 vCPUs (KVM allows 32,764): each
  creation is an incremental insert into the sorted table (O(log n) lookup,
  one pointer move), not a rebuild of every slot and every vCPU's TLB;
- a harvest's TLB flush with 8 vCPUs on a 1 TiB slot: its cost follows the
  TLB chunks the vCPUs cached (64 pages each here), not the slot's size.
"""
from __future__ import annotations

import numpy as np
import pytest

import kvmdirty
from conftest import rounds, set_ops
from kvmdirty.vm import MEM_LOG_DIRTY_PAGES as LOG


def _create_slots(n: int) -> kvmdirty.VM:
    vm = kvmdirty.VM()
    for i in range(4):
        vm.create_vcpu(i)
    for i in range(n):
        vm.set_user_memory_region(i, i * 8192, 4096, LOG if i & 1 else 0)
    return vm


@pytest.mark.benchmark(group="vm-memslots")
@pytest.mark.parametrize("n", [1000, 4000, 32764])
def test_create_slots_4_vcpus(benchmark, n):
    set_ops(benchmark, n, "slot", vcpus=4)
    vm = benchmark.pedantic(_create_slots, args=(n,), rounds=rounds(3, 1), iterations=1)
    assert len(vm.slots) == n


@pytest.mark.benchmark(group="vm-tlb-flush")
def test_harvest_flush_1t_slot_8_vcpus(benchmark):
    vm = kvmdirty.VM()
    vm.set_user_memory_region(0, 0, 1 << 40, LOG)
    vcpus = [vm.create_vcpu(i) for i in range(8)]
    plan = np.arange(64, dtype=np.uint64) * np.uint64(1 << 22)

    def cycle():
        for v in vcpus:
            v.run(plan, 1)             # refill: 64 TLB chunks per vCPU, honours the last flush
        vm.get_dirty_log(0)            # harvest, protect, flush

    set_ops(benchmark, 8 * 64, "page", vcpus=8, slot_bytes=1 << 40)
    benchmark.pedantic(cycle, rounds=rounds(20, 3), iterations=1)
