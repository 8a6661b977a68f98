"""open_vm("host"): the KVM-shaped API over the host kernel's write tracking.

Errno parity with the real kernel's cases (test_kvm_backend's tables): the
host backend fails exactly as KVM where KVM's rules apply, and refuses the
dirty ring (and INITIALLY_SET) with EINVAL, as a kernel without them does.
"""
from __future__ import annotations

import errno

import numpy as np
import pytest

from host_util import requires_host
from test_kvm_backend import ERRNO_CASES, OK_CASES

import kvmdirty
from kvmdirty import KvmError, _bitmap, _uapi
from kvmdirty.info import host_vm_options
from kvmdirty.api import EXIT_BUDGET, EXIT_HLT
from kvmdirty.vm import MEM_LOG_DIRTY_PAGES as LOG

pytestmark = requires_host

MB = 1 << 20
#: Cases that need a dirty ring or INITIALLY_SET: the host has neither.
NEEDS_RING = {"ring of 65536 entries", "ring after a slot exists", "manual protect and ring together",
              "reset with a ring and no vCPU", "manual protect twice", "get: ring-only VM"}


@pytest.fixture
def vm():
    v = kvmdirty.open_vm("host", **host_vm_options())     # this host's limits, as KVM has them
    yield v
    v.close()


def _errno(fn, vm):
    try:
        fn(vm)
        return 0
    except KvmError as e:
        return e.errno


@pytest.mark.parametrize("name,setup,call,err", ERRNO_CASES, ids=[c[0] for c in ERRNO_CASES])
def test_same_errno_as_the_kernel(vm, name, setup, call, err):
    if setup is not None and _errno(setup, vm):
        assert "ring" in name and _errno(setup, vm) == errno.EINVAL, name
        return
    got = _errno(call, vm)
    if "ring" in name and got == errno.EINVAL:
        return      # every ring request is EINVAL here, whatever KVM would have said
    assert got == err, name


@pytest.mark.parametrize("name,setup,call", OK_CASES, ids=[c[0] for c in OK_CASES])
def test_accepts_what_the_kernel_accepts(vm, name, setup, call):
    failed = (setup is not None and _errno(setup, vm)) or _errno(call, vm)
    if name in NEEDS_RING:
        assert failed == errno.EINVAL, name
    else:
        assert failed == 0, name


def test_no_ring(vm):
    assert vm.check_extension(_uapi.CAP_DIRTY_LOG_RING) == 0
    assert vm.check_extension(_uapi.CAP_DIRTY_LOG_RING_ACQ_REL) == 0
    with pytest.raises(KvmError) as e:
        vm.enable_dirty_ring(4096)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(KvmError) as e:
        vm.reset_dirty_rings()
    assert e.value.errno == errno.EINVAL
    assert vm.create_vcpu(0).dirty_ring is None


def test_writes_harvest_and_reprotect(vm):
    vm.set_user_memory_region(0, 0, 2 * MB, LOG)
    v = vm.create_vcpu(0)
    assert v.run([1, 2, 2, 511], 9).done
    assert _bitmap.to_gfns(vm.get_dirty_log(0)).tolist() == [1, 2, 511]
    assert _bitmap.to_gfns(vm.get_dirty_log(0)).tolist() == []
    assert vm.memory(0)[[1, 2, 511, 3]].tolist() == [9, 9, 9, 0]


def test_mmio_exit_and_budget(vm):
    vm.set_user_memory_region(0, 0, MB, LOG)
    vm.set_user_memory_region(1, MB, MB, LOG | _uapi.MEM_READONLY)
    v = vm.create_vcpu(0)
    e = v.run([1, 300, 2, 3, 4], 5)                 # 300 is in the read-only slot
    assert (e.reason, e.writes, e.remaining) == (_uapi.EXIT_MMIO, 2, 3)
    e = v.run(max_writes=2)
    assert (e.reason, e.writes, e.remaining) == (EXIT_BUDGET, 2, 1)
    e = v.run()
    assert (e.reason, e.writes, e.remaining) == (EXIT_HLT, 1, 0)
    assert _bitmap.to_gfns(vm.get_dirty_log(0)).tolist() == [1, 2, 3, 4]
    assert _bitmap.to_gfns(vm.get_dirty_log(1)).tolist() == []


def test_manual_protect_keeps_pages_until_cleared(vm):
    vm.enable_manual_protect()
    vm.set_user_memory_region(0, 0, MB, LOG)
    v = vm.create_vcpu(0)
    v.run([3, 70, 200], 1)
    assert _bitmap.to_gfns(vm.get_dirty_log(0)).tolist() == [3, 70, 200]
    assert _bitmap.to_gfns(vm.get_dirty_log(0)).tolist() == [3, 70, 200]
    vm.clear_dirty_log(0, 64, 64, np.array([1 << 6], np.uint64))       # page 70
    assert _bitmap.to_gfns(vm.get_dirty_log(0)).tolist() == [3, 200]


def test_logging_toggles_and_moves(vm):
    vm.set_user_memory_region(0, 0, MB, 0)
    v = vm.create_vcpu(0)
    v.run([1], 1)
    vm.set_user_memory_region(0, 0, MB, LOG)        # logging on: protected from here
    v.run([2], 2)
    assert _bitmap.to_gfns(vm.get_dirty_log(0)).tolist() == [2]
    vm.set_user_memory_region(0, 4 * MB, MB, LOG)    # move: memory and log kept
    v.run([1024 + 5], 3)
    assert _bitmap.to_gfns(vm.get_dirty_log(0)).tolist() == [5]
    assert vm.memory(0)[[1, 2, 5]].tolist() == [1, 2, 3]
    vm.set_user_memory_region(0, 4 * MB, 0, 0)
    assert v.run([5], 1).reason == _uapi.EXIT_MMIO


def test_closed_vm(vm):
    vm.set_user_memory_region(0, 0, MB, LOG)
    v = vm.create_vcpu(0)
    mem = vm.memory(0)
    vm.close()
    for call in (lambda: vm.get_dirty_log(0), lambda: v.run([1]), lambda: vm.create_vcpu(1)):
        with pytest.raises(KvmError) as e:
            call()
        assert e.value.errno == errno.EBADF
    assert int(mem[0]) == 0                         # a view outlives the VM


def test_bad_plans_raise_before_running(vm):
    vm.set_user_memory_region(0, 0, MB, LOG)
    v = vm.create_vcpu(0)
    with pytest.raises(TypeError):
        v.run(np.array([1.5]))
    with pytest.raises(ValueError):
        v.run(np.array([-1]))
    with pytest.raises(ValueError):
        v.run([1, 2], np.array([1], np.uint64))
    assert _bitmap.to_gfns(vm.get_dirty_log(0)).tolist() == []


def test_satisfies_the_shared_protocols(vm):
    from kvmdirty.api import VcpuProtocol, VMProtocol
    assert isinstance(vm, VMProtocol)
    assert isinstance(vm.create_vcpu(0), VcpuProtocol)


def test_open_vm_names_every_backend():
    with pytest.raises(ValueError, match="'host'"):
        kvmdirty.open_vm("nope")
