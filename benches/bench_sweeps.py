"""Scaling sweeps through the VM API: harvest cost vs memory size and vs dirty pages, bitmap and ring.

A harvest is what a VMM does each migration iteration to learn the dirty set
and re-arm tracking:
  bitmap  vm.get_dirty_log(slot) (xchg, masked protect, flush) + to_gfns
  ring    vcpu.dirty_ring.collect() on every vCPU + vm.reset_dirty_rings()
          (rings of 65536 entries, 32768 pages per vCPU)
The guest dirties `dirty` random pages of a `gib` GiB slot (write faults)
before each round; only the harvest is timed.  The grid (size x dirty count)
gives both curves (vs size at 4096 dirty pages, vs dirty count at 16 GiB) and,
per size, the crossover dirty count below which the ring is the cheaper one
(computed by kvmdirty.benchreport from the JSON).
Groups: sweep-<kind>-<gib>g; extra_info: kind, gib, dirty, ops (pages).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

import kvmdirty
from conftest import GIB_PAGES, QUICK, dirty_pages, rounds, set_ops
from kvmdirty import _bitmap
from kvmdirty.vm import MEM_LOG_DIRTY_PAGES as LOG

SIZES_GIB = [1, 16, 64] if QUICK else [1, 2, 4, 8, 16, 32, 64]
COUNTS = [64, 1024, 4096, 65536] if QUICK else [64, 256, 1024, 4096, 16384, 65536, 262144]
FIXED_COUNT = 4096             # the "vs memory size" curve
FIXED_GIB = 16                 # the "vs dirty count" curve
RING_ENTRIES = 1 << 16
PER_VCPU = 1 << 15             # pages each vCPU dirties (well below the ring's soft limit)


@functools.lru_cache(maxsize=2)
def _vm(kind: str, gib: int):
    vm = kvmdirty.VM()
    nvcpus = 1
    if kind == "ring":
        vm.enable_dirty_ring(RING_ENTRIES)
        nvcpus = -(-max(COUNTS) // PER_VCPU)
    vm.set_user_memory_region(0, 0, gib << 30, LOG)
    return vm, [vm.create_vcpu(i) for i in range(nvcpus)]


def _dirty(kind, vcpus, plan):
    step = PER_VCPU if kind == "ring" else len(plan)
    for i, v in enumerate(vcpus):
        chunk = plan[i * step:(i + 1) * step]
        if len(chunk) == 0:
            break
        e = v.run(chunk, 1)
        assert e.remaining == 0, e


@pytest.mark.parametrize("dirty", COUNTS)
@pytest.mark.parametrize("kind", ["bitmap", "ring"])
@pytest.mark.parametrize("gib", SIZES_GIB)
def test_sweep_harvest(benchmark, gib, kind, dirty):
    npages = gib * GIB_PAGES
    vm, vcpus = _vm(kind, gib)
    plan = dirty_pages(npages, dirty, seed=7)
    plan = np.random.default_rng(7).permutation(plan)
    benchmark.group = f"sweep-{kind}-{gib}g"
    set_ops(benchmark, dirty, "page", kind=kind, gib=gib, dirty=dirty, impl="ours")
    used = vcpus[:-(-dirty // PER_VCPU)] if kind == "ring" else vcpus

    if kind == "bitmap":
        def harvest():
            return len(_bitmap.to_gfns(vm.get_dirty_log(0)))
    else:
        rings = [v.dirty_ring for v in used]

        def harvest():
            n = 0
            for r in rings:
                n += len(r.collect()[1])
            vm.reset_dirty_rings()
            return n

    r = rounds(30, 3) if dirty < 65536 else rounds(8, 2)
    got = benchmark.pedantic(harvest, setup=lambda: _dirty(kind, used, plan), rounds=r, warmup_rounds=1)
    assert got == dirty


@pytest.mark.parametrize("gib", SIZES_GIB)
def test_sweep_clean_harvest(benchmark, gib):
    """Our bitmap harvest kernel on a clean slot, by size (against real KVM's clean GET in bench_kvm.py)."""
    words, snap, writable = (np.zeros(gib * GIB_PAGES // 64, np.uint64) for _ in range(3))
    benchmark.group = "sweep-clean"
    set_ops(benchmark, 1, "call", kind="clean", gib=gib, impl="ours")
    assert benchmark(_bitmap.harvest, words, snap, writable, zeroed=True) == 0
