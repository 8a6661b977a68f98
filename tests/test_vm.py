"""The simulated VM's bitmap path, TLB behaviour and memslot rules."""
import numpy as np
import pytest

import kvmdirty
from kvmdirty import KvmError, _bitmap, _uapi
from kvmdirty.vm import MEM_LOG_DIRTY_PAGES as LOG

MiB = 1 << 20


def dirty(vm, slot=0):
    return _bitmap.to_gfns(vm.get_dirty_log(slot)).tolist()


@pytest.fixture
def vm():
    with kvmdirty.VM() as vm:
        vm.set_user_memory_region(0, 0, 4 * MiB, LOG)
        yield vm


def test_first_write_faults_and_is_logged_once(vm):
    v = vm.create_vcpu(0)
    ex = v.run([5, 5, 6, 5], 1)
    assert ex.done and ex.writes == 4 and ex.name == "HLT"
    assert v.stats["faults"] == 2 and v.stats["tlb_hits"] == 2
    assert dirty(vm) == [5, 6]
    assert dirty(vm) == []
    v.run([5, 7], 2)                        # 5 was re-protected by the harvest
    assert dirty(vm) == [5, 7]
    assert list(vm.memory(0)[[5, 6, 7]]) == [2, 1, 2]


def test_harvest_flushes_other_vcpus_tlbs(vm):
    a, b = vm.create_vcpu(0), vm.create_vcpu(1)
    a.run([10], 1)
    b.run([10], 1)                          # b: SPTE writable, fills its TLB, no fault
    assert b.stats["faults"] == 0
    assert dirty(vm) == [10]
    b.run([10], 2)                          # b's TLB was flushed: faults again, logged
    assert b.stats["faults"] == 1 and dirty(vm) == [10]


def test_skip_flush_fault_loses_a_write():
    with kvmdirty.VM(faults=["skip-flush"]) as vm:
        vm.set_user_memory_region(0, 0, MiB, LOG)
        v = vm.create_vcpu(0)
        v.run([3], 1)
        assert dirty(vm) == [3]
        v.run([3], 2)                       # stale TLB entry: written, never logged
        assert dirty(vm) == [] and vm.memory(0)[3] == 2


def test_values_per_write_and_plan_resume_by_budget(vm):
    v = vm.create_vcpu(0)
    ex = v.run(np.arange(10), np.arange(100, 110), max_writes=4)
    assert ex.name == "BUDGET" and ex.writes == 4 and ex.remaining == 6
    ex = v.run()
    assert ex.done and ex.writes == 6
    assert list(vm.memory(0)[:10]) == list(range(100, 110))


def test_write_outside_slots_exits_mmio_and_resumes(vm):
    v = vm.create_vcpu(0)
    ex = v.run([1, 5000, 2], 9)
    # The MMIO write went to user space and is retired with the exit (as KVM does).
    assert ex.name == "MMIO" and ex.writes == 2 and ex.remaining == 1
    vm.set_user_memory_region(1, 16 * MiB, 4 * MiB, 0)    # map gfns 4096.., then resume
    assert v.run().done
    assert vm.memory(1)[5000 - 4096] == 0 and vm.memory(0)[2] == 9


def test_readonly_slot_exits_mmio(vm):
    vm.set_user_memory_region(1, 8 * MiB, MiB, _uapi.MEM_READONLY)
    ex = vm.create_vcpu(0).run([2048], 1)
    assert ex.name == "MMIO" and ex.writes == 1 and vm.memory(1)[0] == 0


def test_logging_toggle_and_move_keep_memory(vm):
    v = vm.create_vcpu(0)
    v.run([1, 2], 5)
    vm.set_user_memory_region(0, 0, 4 * MiB, 0)            # logging off: bitmap dropped
    with pytest.raises(KvmError) as e:
        vm.get_dirty_log(0)
    assert e.value.errno == 2
    v.run([3], 6)
    vm.set_user_memory_region(0, 0, 4 * MiB, LOG)          # on: whole slot write-protected
    v.run([1, 4], 7)
    assert dirty(vm) == [1, 4]
    vm.set_user_memory_region(0, 64 * MiB, 4 * MiB, LOG)   # move: same memory, SPTEs zapped
    assert vm.memory(0)[1] == 7 and vm.memory(0)[3] == 6
    v.run([16384 + 1], 8)
    assert dirty(vm) == [1]


def test_manual_protect_initially_set_get_then_clear(vm):
    vm.enable_manual_protect(initially_set=True)
    vm.set_user_memory_region(1, 8 * MiB, 130 * 4096, LOG)
    assert len(dirty(vm, 1)) == 130                         # every page starts dirty
    assert len(dirty(vm, 1)) == 130                         # GET does not clear
    v = vm.create_vcpu(0)
    v.run([2048 + 3], 1)                                    # nothing protected yet: no fault
    assert v.stats["faults"] == 1                           # (first touch of an absent SPTE)
    allw = np.full(3, ~np.uint64(0))
    assert vm.clear_dirty_log(1, 0, 130, allw) == 130
    assert dirty(vm, 1) == []
    v.run([2048 + 3, 2048 + 129], 2)
    assert dirty(vm, 1) == [3, 129]
    assert vm.clear_dirty_log(1, 0, 64, np.array([1 << 3], np.uint64)) == 1
    assert dirty(vm, 1) == [129]
    assert vm.clear_dirty_log(1, 128, 2, np.array([3], np.uint64)) == 1


def test_host_write_logs_into_bitmap(vm):
    assert vm.write_guest([7, 8, 9999], 4) == 2
    assert dirty(vm) == [7, 8]


def test_check_extension_values():
    vm = kvmdirty.VM()
    assert vm.check_extension(_uapi.CAP_DIRTY_LOG_RING) == 65536 * 16
    assert vm.check_extension(_uapi.CAP_DIRTY_LOG_RING_ACQ_REL) == 65536 * 16
    assert vm.check_extension(_uapi.CAP_MANUAL_DIRTY_LOG_PROTECT2) == 3
    assert vm.check_extension(_uapi.CAP_NR_MEMSLOTS) == 32764
    assert vm.check_extension(9999) == 0


def test_vm_close_keeps_views_valid():
    vm = kvmdirty.VM()
    vm.set_user_memory_region(0, 0, MiB, LOG)
    vm.create_vcpu(0).run([1], 3)
    mem = vm.memory(0)
    vm.close()
    assert mem[1] == 3
    with pytest.raises(KvmError) as e:
        vm.get_dirty_log(0)
    assert e.value.errno == 9
