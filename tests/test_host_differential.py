"""The same plans give the same dirty sets on the simulator, the host backend and real KVM.

Each test builds its own slots through the VM API (no harness layout), runs
the same seeded plans on every backend usable here, and compares what each
harvest reports and what guest memory holds.  Real KVM joins where
kvmdirty.info.kvm_unusable() says it can (plans stay at a few thousand writes:
nested KVM emulates every guest instruction).
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from host_util import requires_host

import kvmdirty
from kvmdirty import _bitmap
from kvmdirty.info import host_vm_options, kvm_unusable
from kvmdirty.vm import MEM_LOG_DIRTY_PAGES as LOG

pytestmark = requires_host

MB = 1 << 20
SLOTS = [(0, 0, 1024 * 4096), (1, 16 * MB, 130 * 4096), (2, 64 * MB, 64 * 4096)]
KVM_WHY = kvm_unusable()


def backends():
    names = ["sim", "host"] + ([] if KVM_WHY else ["kvm"])
    opts = host_vm_options()
    return {n: kvmdirty.open_vm(n, **(opts if n != "kvm" else {})) for n in names}


def plan(seed: int, n: int = 700) -> np.ndarray:
    rng = np.random.default_rng(seed)
    parts = [rng.integers(0, npages := size // 4096, max(1, n * npages // 1300)) + gpa // 4096
             for _, gpa, size in SLOTS]
    return rng.permutation(np.concatenate(parts)).astype(np.uint64)


def dirty_sets(vm):
    return {slot: _bitmap.to_gfns(vm.get_dirty_log(slot)).tolist() for slot, _, _ in SLOTS}


def test_kvm_joins_where_usable():
    if KVM_WHY:
        pytest.skip(f"real KVM unusable here: {KVM_WHY} (sim and host still compared)")
    assert "kvm" in backends()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_same_dirty_sets_every_round(seed):
    vms = backends()
    try:
        for vm in vms.values():
            for slot, gpa, size in SLOTS:
                vm.set_user_memory_region(slot, gpa, size, LOG)
        vcpus = {n: [vm.create_vcpu(i) for i in range(2)] for n, vm in vms.items()}
        for rnd in range(1, 4):
            seen = {}
            for n, vm in vms.items():
                for i, v in enumerate(vcpus[n]):
                    assert v.run(plan(seed * 100 + rnd * 10 + i), rnd * 10 + i).done
                seen[n] = dirty_sets(vm)
            expected = {slot: sorted(set(int(g) - gpa // 4096 for i in range(2)
                                         for g in plan(seed * 100 + rnd * 10 + i)
                                         if gpa // 4096 <= g < (gpa + size) // 4096))
                        for slot, gpa, size in SLOTS}
            for n in vms:
                assert seen[n] == expected, f"{n}, round {rnd}"
            mem = {n: [vm.memory(s).copy() for s, _, _ in SLOTS] for n, vm in vms.items()}
            for n in vms:
                for a, b in zip(mem["sim"], mem[n]):
                    np.testing.assert_array_equal(a, b)
    finally:
        for vm in vms.values():
            vm.close()


def test_same_manual_protect_sequence():
    vms = backends()
    try:
        out = {}
        for n, vm in vms.items():
            vm.enable_manual_protect()
            slot, gpa, size = SLOTS[1]
            vm.set_user_memory_region(slot, gpa, size, LOG)
            v = vm.create_vcpu(0)
            base = gpa // 4096
            v.run(np.array([1, 5, 64, 100, 129]) + base, 1)
            first = _bitmap.to_gfns(vm.get_dirty_log(slot)).tolist()
            vm.clear_dirty_log(slot, 64, 66, np.array([~np.uint64(0), 0], np.uint64))
            after_clear = _bitmap.to_gfns(vm.get_dirty_log(slot)).tolist()
            v.run(np.array([100, 2]) + base, 2)
            again = _bitmap.to_gfns(vm.get_dirty_log(slot)).tolist()
            out[n] = (first, after_clear, again)
        assert out["host"] == out["sim"] == ([1, 5, 64, 100, 129], [1, 5, 129], [1, 2, 5, 100, 129])
        if "kvm" in out:
            assert out["kvm"] == out["sim"]
    finally:
        for vm in vms.values():
            vm.close()


def race(vm, nvcpus: int, writes: int, seed: int, *, drop_one: bool = False) -> list:
    """vCPU threads store sequence numbers while a harvester copies what each harvest reports.

    Returns the pages whose destination copy differs from guest memory after
    the stop-and-copy (lost writes).  ``drop_one`` makes every harvest forget
    its first reported page (a tracker losing writes): the check must notice.
    """
    npages = 4096
    vm.set_user_memory_region(0, 0, npages * 4096, LOG)
    shadow = vm.memory(0).copy()
    rng = np.random.default_rng(seed)
    plans = [rng.integers(0, npages, writes).astype(np.uint64) for _ in range(nvcpus)]
    vals = [np.arange(1, writes + 1, dtype=np.uint64) * 64 + i for i in range(nvcpus)]
    vcpus = [vm.create_vcpu(i) for i in range(nvcpus)]
    stop = threading.Event()

    def copy(words):
        gfns = _bitmap.to_gfns(words)
        if drop_one:
            gfns = gfns[1:]
        shadow[gfns] = vm.memory(0)[gfns]       # read after the harvest re-protected them

    busy = []

    def harvester():
        while not stop.is_set():
            words = vm.get_dirty_log(0)
            busy.append(any(v.remaining for v in vcpus) and bool(words.any()))
            copy(words)

    def vcpu(i):
        for chunk in range(0, writes, 997):     # many runs: harvests land between and inside
            vcpus[i].run(plans[i][chunk:chunk + 997], vals[i][chunk:chunk + 997])

    h = threading.Thread(target=harvester)
    threads = [threading.Thread(target=vcpu, args=(i,)) for i in range(nvcpus)]
    h.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    h.join()
    copy(vm.get_dirty_log(0))                   # stop-and-copy
    assert sum(busy) >= 2, "no harvest overlapped the vCPUs: nothing raced"
    return np.flatnonzero(shadow != vm.memory(0)).tolist()


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_threads_racing_a_harvester_lose_no_write(seed):
    vm = kvmdirty.open_vm("host")
    try:
        assert race(vm, 3, 60_000, seed) == []
    finally:
        vm.close()


def test_the_race_check_has_teeth():
    vm = kvmdirty.open_vm("host")
    try:
        assert len(race(vm, 2, 20_000, 1, drop_one=True)) >= 1
    finally:
        vm.close()
