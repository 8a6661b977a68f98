"""Misuse of the simulated KVM API: the kernel's errno (or a clear Python error), and no state change."""
import errno

import numpy as np
import pytest

import kvmdirty
from kvmdirty import KvmError, _uapi
from kvmdirty.vm import MEM_LOG_DIRTY_PAGES as LOG

MiB = 1 << 20
RING = _uapi.CAP_DIRTY_LOG_RING_ACQ_REL
MANUAL = _uapi.CAP_MANUAL_DIRTY_LOG_PROTECT2


def make_vm():
    vm = kvmdirty.VM()
    vm.set_user_memory_region(0, 0, 4 * MiB, LOG)
    vm.set_user_memory_region(1, 16 * MiB, MiB, 0)
    vm.set_user_memory_region(2, 32 * MiB, 130 * 4096, LOG)
    v = vm.create_vcpu(0)
    v.run([1, 2, 3, 4096 + 5, 8192 + 129], 7)
    return vm


def state(vm):
    """Everything a failed call must leave alone."""
    return (
        sorted((s.slot, s.base_gfn, s.npages, s.flags,
                None if s.dirty is None else s.dirty.tobytes(),
                s.values.tobytes(), s.writable.tobytes()) for s in vm.slots.values()),
        vm.manual_protect, vm.dirty_ring_size, sorted(vm.vcpus), vm.stats,
    )


def ring_vm():
    vm = kvmdirty.VM()
    vm.enable_dirty_ring(4096)
    vm.set_user_memory_region(0, 0, MiB, LOG)
    return vm


E = errno
CASES = [
    # (name, vm factory, call, expected errno or exception type)
    ("get: slot id out of range", make_vm, lambda vm: vm.get_dirty_log(32764), E.EINVAL),
    ("get: address space out of range", make_vm, lambda vm: vm.get_dirty_log(2 << 16), E.EINVAL),
    ("get: no such slot", make_vm, lambda vm: vm.get_dirty_log(9), E.ENOENT),
    ("get: slot not logging", make_vm, lambda vm: vm.get_dirty_log(1), E.ENOENT),
    ("get: ring-only VM", ring_vm, lambda vm: vm.get_dirty_log(0), E.ENXIO),
    ("get: slot not a u32", make_vm, lambda vm: vm.get_dirty_log(-1), ValueError),
    ("get: slot not an int", make_vm, lambda vm: vm.get_dirty_log("0"), TypeError),
    ("clear: ring-only VM before anything else", ring_vm,
     lambda vm: vm.clear_dirty_log(77, 3, 1, np.zeros(1, np.uint64)), E.ENXIO),
    ("clear: bad slot id before alignment", make_vm,
     lambda vm: vm.clear_dirty_log(40000, 3, 64, np.zeros(1, np.uint64)), E.EINVAL),
    ("clear: first_page not a multiple of 64, before the slot lookup", make_vm,
     lambda vm: vm.clear_dirty_log(9, 3, 64, np.zeros(1, np.uint64)), E.EINVAL),
    ("clear: no such slot", make_vm, lambda vm: vm.clear_dirty_log(9, 0, 64, np.zeros(1, np.uint64)), E.ENOENT),
    ("clear: first_page past the end", make_vm,
     lambda vm: vm.clear_dirty_log(2, 192, 0, np.zeros(1, np.uint64)), E.EINVAL),
    ("clear: range past the end", make_vm,
     lambda vm: vm.clear_dirty_log(2, 64, 67, np.zeros(2, np.uint64)), E.EINVAL),
    ("clear: num_pages not a multiple of 64 short of the end", make_vm,
     lambda vm: vm.clear_dirty_log(2, 0, 65, np.full(2, ~np.uint64(0))), E.EINVAL),
    ("clear: bitmap shorter than num_pages (EFAULT)", make_vm,
     lambda vm: vm.clear_dirty_log(2, 0, 130, np.full(2, ~np.uint64(0))), E.EFAULT),
    ("clear: float bitmap", make_vm, lambda vm: vm.clear_dirty_log(2, 0, 64, np.ones(1)), TypeError),
    ("clear: 2-D bitmap", make_vm, lambda vm: vm.clear_dirty_log(2, 0, 64, np.ones((1, 1), np.uint64)), ValueError),
    ("region: slot id too big", make_vm, lambda vm: vm.set_user_memory_region(32764, 0, MiB, 0), E.EINVAL),
    ("region: unknown flag", make_vm, lambda vm: vm.set_user_memory_region(5, 64 * MiB, MiB, 8), E.EINVAL),
    ("region: size not page aligned", make_vm, lambda vm: vm.set_user_memory_region(5, 64 * MiB, 100, 0), E.EINVAL),
    ("region: gpa not page aligned", make_vm, lambda vm: vm.set_user_memory_region(5, 4097, MiB, 0), E.EINVAL),
    ("region: address space 2", make_vm, lambda vm: vm.set_user_memory_region(2 << 16, 0, MiB, 0), E.EINVAL),
    ("region: wraps around", make_vm,
     lambda vm: vm.set_user_memory_region(5, (1 << 64) - 4096, 8192, 0), E.EINVAL),
    ("region: too many pages", make_vm,
     lambda vm: vm.set_user_memory_region(5, 0, 1 << 43, 0), E.EINVAL),
    ("region: overlap", make_vm, lambda vm: vm.set_user_memory_region(5, 2 * MiB, MiB, 0), E.EEXIST),
    ("region: move onto another slot", make_vm, lambda vm: vm.set_user_memory_region(1, 0, MiB, 0), E.EEXIST),
    ("region: resize", make_vm, lambda vm: vm.set_user_memory_region(1, 16 * MiB, 2 * MiB, 0), E.EINVAL),
    ("region: toggle READONLY", make_vm,
     lambda vm: vm.set_user_memory_region(1, 16 * MiB, MiB, _uapi.MEM_READONLY), E.EINVAL),
    ("region: delete a missing slot", make_vm, lambda vm: vm.set_user_memory_region(5, 0, 0, 0), E.EINVAL),
    ("region: negative size", make_vm, lambda vm: vm.set_user_memory_region(5, 0, -4096, 0), ValueError),
    ("ring: size 0", make_vm, lambda vm: vm.enable_cap(RING, 0), E.EINVAL),
    ("ring: not a power of two", make_vm, lambda vm: vm.enable_cap(RING, 3 * 4096), E.EINVAL),
    ("ring: smaller than a page", make_vm, lambda vm: vm.enable_cap(RING, 2048), E.EINVAL),
    ("ring: above 1 MiB", make_vm, lambda vm: vm.enable_cap(RING, 2 * MiB), E.E2BIG),
    ("ring: after a vCPU exists", make_vm, lambda vm: vm.enable_cap(RING, 65536), E.EINVAL),
    ("ring: twice", ring_vm, lambda vm: vm.enable_cap(RING, 65536), E.EINVAL),
    ("manual: INITIALLY_SET without ENABLE", make_vm, lambda vm: vm.enable_cap(MANUAL, 2), E.EINVAL),
    ("manual: unknown bit", make_vm, lambda vm: vm.enable_cap(MANUAL, 5), E.EINVAL),
    ("manual: flags field", make_vm, lambda vm: vm.enable_cap(MANUAL, 1, flags=1), E.EINVAL),
    ("enable_cap: unknown capability", make_vm, lambda vm: vm.enable_cap(12345, 1), E.EINVAL),
    ("reset rings without a ring", make_vm, lambda vm: vm.reset_dirty_rings(), E.EINVAL),
    ("vcpu: duplicate id", make_vm, lambda vm: vm.create_vcpu(0), E.EEXIST),
    ("vcpu: id too big", make_vm, lambda vm: vm.create_vcpu(1 << 20), E.EINVAL),
    ("run: 2-D plan", make_vm, lambda vm: vm.vcpus[0].run(np.zeros((2, 2), np.uint64), 1), ValueError),
    ("run: float plan", make_vm, lambda vm: vm.vcpus[0].run(np.ones(3), 1), TypeError),
    ("run: negative gfn", make_vm, lambda vm: vm.vcpus[0].run([1, -5], 1), ValueError),
    ("run: value too big", make_vm, lambda vm: vm.vcpus[0].run([1], 1 << 64), ValueError),
    ("run: values of the wrong length", make_vm, lambda vm: vm.vcpus[0].run([1, 2], [1]), ValueError),
    ("run: zero budget", make_vm, lambda vm: vm.vcpus[0].run([1], 1, max_writes=0), ValueError),
    ("memory: missing slot", make_vm, lambda vm: vm.memory(9), E.ENOENT),
    ("VM: unknown fault", None, lambda vm: kvmdirty.VM(faults=["nope"]), ValueError),
    ("VM: unknown protect mode", None, lambda vm: kvmdirty.VM(protect="half"), ValueError),
]


@pytest.mark.parametrize("name,factory,call,expected", CASES, ids=[c[0] for c in CASES])
def test_misuse(name, factory, call, expected):
    vm = factory() if factory else None
    before = state(vm) if vm else None
    if isinstance(expected, int):
        with pytest.raises(KvmError) as e:
            call(vm)
        assert e.value.errno == expected, e.value
    else:
        with pytest.raises(expected):
            call(vm)
    if vm:
        assert state(vm) == before


def test_memory_view_is_read_only():
    vm = make_vm()
    with pytest.raises(ValueError):
        vm.memory(0)[1] = 5


def test_closed_vm_raises_ebadf_everywhere():
    vm = make_vm()
    v = vm.vcpus[0]
    vm.close()
    for call in (lambda: vm.get_dirty_log(0), lambda: v.run([1], 1),
                 lambda: vm.set_user_memory_region(7, 64 * MiB, MiB, 0),
                 lambda: vm.create_vcpu(3), lambda: vm.enable_manual_protect(),
                 lambda: vm.check_extension(1), lambda: vm.reset_dirty_rings()):
        with pytest.raises(KvmError) as e:
            call()
        assert e.value.errno == errno.EBADF
