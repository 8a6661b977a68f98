"""Differential tests: the same seeded plans and the same misuse on the simulator and on /dev/kvm.

The simulator is built with this host's limits (kvmdirty.info.host_vm_options)
so that both answer as the same kernel would.  Where /dev/kvm is missing or
unusable these skip, saying why.
"""
from __future__ import annotations

import errno

import numpy as np
import pytest

from kvm_util import requires_kvm
from test_kvm_backend import ERRNO_CASES, OK_CASES

import kvmdirty
from kvmdirty import KvmError, _bitmap
from kvmdirty.info import host_vm_options
from kvmdirty.vm import MEM_LOG_DIRTY_PAGES as LOG

pytestmark = requires_kvm

MB = 1 << 20
SLOT0_PAGES = 1024                  # 4 MiB at gfn 0
SLOT1 = (1, 16 * MB, 130 * 4096)    # 130 pages: not a multiple of 64


def both(**sim_kw):
    """A simulated VM with this host's limits, and a real one."""
    return (kvmdirty.open_vm("sim", **host_vm_options(), **sim_kw), kvmdirty.open_vm("kvm"))


def plan(seed: int, n: int = 600) -> np.ndarray:
    rng = np.random.default_rng(seed)
    in0 = rng.integers(0, SLOT0_PAGES, n)
    in1 = rng.integers(0, SLOT1[2] // 4096, n // 4) + SLOT1[1] // 4096
    return rng.permutation(np.concatenate([in0, in1])).astype(np.uint64)


def add_slots(vm, flags=LOG):
    vm.set_user_memory_region(0, 0, SLOT0_PAGES * 4096, flags)
    vm.set_user_memory_region(SLOT1[0], SLOT1[1], SLOT1[2], flags)


def outcome(call, vm):
    try:
        call(vm)
        return 0
    except KvmError as e:
        return e.errno


CASES = [(n, s, c, e) for n, s, c, e in ERRNO_CASES] + [(n, s, c, 0) for n, s, c in OK_CASES]


@pytest.mark.parametrize("name,setup,call,err", CASES, ids=[c[0] for c in CASES])
def test_same_errno_for_the_same_call(name, setup, call, err):
    got = []
    for vm in both():
        with vm:
            if setup is not None:
                setup(vm)
            got.append(outcome(call, vm))
    assert got == [err, err], f"{name}: sim {got[0]}, kvm {got[1]}, expected {err}"


def test_bitmap_get_gives_the_same_dirty_pages():
    sim, kvm = both()
    with sim, kvm:
        for vm in (sim, kvm):
            add_slots(vm)
        vs, vk = sim.create_vcpu(0), kvm.create_vcpu(0)
        for it in range(1, 4):
            p = plan(it)
            assert vs.run(p, it).done and vk.run(p, it).done
            for slot in (0, SLOT1[0]):
                ws, wk = sim.get_dirty_log(slot), kvm.get_dirty_log(slot)
                assert (ws == wk).all(), f"iteration {it}, slot {slot}"
                assert (sim.memory(slot) == kvm.memory(slot)).all()


def test_manual_protect_initially_set_get_then_clear_agree():
    sim, kvm = both()
    with sim, kvm:
        for vm in (sim, kvm):
            vm.enable_manual_protect(initially_set=True)
            add_slots(vm)
        vs, vk = sim.create_vcpu(0), kvm.create_vcpu(0)
        for it in range(1, 4):
            p = plan(10 + it)
            assert vs.run(p, it).done and vk.run(p, it).done
            for slot, npages in ((0, SLOT0_PAGES), (SLOT1[0], SLOT1[2] // 4096)):
                ws, wk = sim.get_dirty_log(slot), kvm.get_dirty_log(slot)
                assert (ws == wk).all(), f"iteration {it}, slot {slot}"
                # Clear the first half (whole words), then everything left.
                half = (npages // 2) & ~63
                for vm in (sim, kvm):
                    vm.clear_dirty_log(slot, 0, half, ws[: half // 64])
                assert (sim.get_dirty_log(slot) == kvm.get_dirty_log(slot)).all()
                for vm in (sim, kvm):
                    vm.clear_dirty_log(slot, half, npages - half, ws[half // 64:])
                assert not sim.get_dirty_log(slot).any() and not kvm.get_dirty_log(slot).any()


def _ring_run(vm, p, value, entries):
    """Run a plan to the end, harvesting and resetting at every DIRTY_RING_FULL.

    Returns (entries in order, exits as (reason, writes))."""
    v = vm.vcpus[0]
    seen, exits = [], []
    ex = v.run(p, value)
    while True:
        exits.append((ex.name, ex.writes))
        slots, offsets = v.dirty_ring.collect()
        seen.extend(zip(slots.tolist(), offsets.tolist()))
        assert vm.reset_dirty_rings() == len(offsets)
        if ex.done:
            return seen, exits
        assert ex.name == "DIRTY_RING_FULL"
        ex = v.run()


@pytest.mark.parametrize("entries", [256, 4096])
def test_ring_entries_agree(entries):
    """Dirty sets always agree.  This host logs every emulated write: with the
    simulator's log_every_write the exact (slot, offset) sequence and the
    ring-full exits agree too; a hardware-assisted host matches the default
    simulator's once-per-protect-cycle sequence instead."""
    every, kvm = both(log_every_write=True)
    once = kvmdirty.open_vm("sim", **host_vm_options())
    with every, kvm, once:
        for vm in (every, kvm, once):
            vm.enable_dirty_ring(entries)
            add_slots(vm)
            vm.create_vcpu(0)
        runs = {}
        for name, vm in (("every", every), ("kvm", kvm), ("once", once)):
            runs[name] = [_ring_run(vm, plan(20 + it), it, entries) for it in range(1, 3)]
            for slot in (0, SLOT1[0]):
                assert (vm.memory(slot) == every.memory(slot)).all()
        for it in range(2):
            assert set(runs["kvm"][it][0]) == set(runs["once"][it][0]) == set(runs["every"][it][0])
        assert runs["kvm"] in (runs["every"], runs["once"]), "neither logging model matches the kernel"


def test_ring_only_vm_rejects_bitmap_calls_alike():
    got = []
    for vm in both():
        with vm:
            vm.enable_dirty_ring(256)
            add_slots(vm)
            got.append((outcome(lambda v: v.get_dirty_log(0), vm),
                        outcome(lambda v: v.clear_dirty_log(0, 0, 64, np.zeros(1, np.uint64)), vm)))
    assert got == [(errno.ENXIO, errno.ENXIO)] * 2


def test_mmio_write_exits_alike():
    got = []
    for vm in both():
        with vm:
            add_slots(vm)
            v = vm.create_vcpu(0)
            ex = v.run(np.array([3, 4000, 5], np.uint64), 9)
            got.append((ex.name, ex.writes, ex.remaining, v.run().done,
                        _bitmap.to_gfns(vm.get_dirty_log(0)).tolist()))
    assert got[0] == got[1]
