"""Real-KVM objects release every fd and mapping, and a closed object raises instead of crashing."""
from __future__ import annotations

import errno
import gc
import os
import threading
import time

import numpy as np
import pytest

from kvm_util import fd_count, map_count, requires_kvm, ring_capable

pytestmark = [pytest.mark.kvm, requires_kvm]

from kvmdirty import _kvm, _uapi  # noqa: E402
from kvmdirty.errors import KvmError  # noqa: E402
from kvmdirty.kvm import KvmVM  # noqa: E402

LOG = _uapi.MEM_LOG_DIRTY_PAGES
MB = 1 << 20


def _ring() -> bool:
    return ring_capable() is None


def _full_vm(ring: bool) -> KvmVM:
    """A VM with two slots and a vCPU (with a ring when available) that ran a few writes."""
    vm = KvmVM()
    if ring:
        vm.enable_dirty_ring(256)
    vm.set_user_memory_region(0, 0, MB, LOG)
    vm.set_user_memory_region(1, 4 * MB, 2 * MB, 0)
    v = vm.create_vcpu(0)
    v.run(np.array([1, 2, 1024]), 1)
    if ring:
        v.dirty_ring.collect()
        vm.reset_dirty_rings()
    return vm


def _counts():
    """Open fds and memory mappings.  Under the sanitizer build ASan's allocator
    maps and unmaps memory of its own, so only fds are compared there."""
    gc.collect()
    return fd_count(), (None if os.environ.get("KVMDIRTY_SANITIZER_RUN") else map_count())


def test_200_create_destroy_cycles_leak_nothing():
    ring = _ring()
    for _ in range(3):                                   # warm up lazy imports and caches
        _full_vm(ring).close()
    before = _counts()
    for _ in range(200):
        vm = _full_vm(ring)
        vm.memory(0)                                     # a view dropped at once
        vm.close()
    assert _counts() == before


def test_context_manager_closes():
    before = _counts()
    with KvmVM() as vm:
        vm.set_user_memory_region(0, 0, MB, LOG)
        vm.create_vcpu(0)
        assert _counts()[0] != before[0]
    assert vm.closed
    assert _counts() == before


def test_garbage_collection_cleans_up_unclosed_vms():
    ring = _ring()
    _full_vm(ring).close()
    before = _counts()
    for _ in range(20):
        vm = _full_vm(ring)
        v = vm.create_vcpu(1)
        del vm, v                                        # never closed
    assert _counts() == before


def test_vcpu_outliving_its_vm_raises():
    vm = _full_vm(_ring())
    v = vm.create_vcpu(1)
    del vm
    gc.collect()
    with pytest.raises(KvmError) as e:
        v.run(np.array([1]), 1)
    assert e.value.errno == errno.EBADF


def test_closed_vm_raises_ebadf_everywhere():
    ring = _ring()
    vm = _full_vm(ring)
    v = vm._vcpus[0]
    vm.close()
    vm.close()                                           # idempotent
    calls = [
        lambda: vm.check_extension(_uapi.CAP_NR_MEMSLOTS),
        lambda: vm.enable_cap(_uapi.CAP_MANUAL_DIRTY_LOG_PROTECT2, 1),
        lambda: vm.enable_dirty_ring(256),
        lambda: vm.enable_manual_protect(),
        lambda: vm.set_user_memory_region(2, 8 * MB, MB, 0),
        lambda: vm.create_vcpu(3),
        lambda: vm.get_dirty_log(0),
        lambda: vm.clear_dirty_log(0, 0, 64, np.zeros(1, np.uint64)),
        lambda: vm.reset_dirty_rings(),
        lambda: vm.memory(0),
        lambda: v.run(np.array([1]), 1),
        lambda: v.run(),
        lambda: v.exit_info(),
    ]
    if ring:
        calls.append(lambda: v.dirty_ring.collect())
    for call in calls:
        with pytest.raises(KvmError) as e:
            call()
        assert e.value.errno == errno.EBADF


def test_memory_view_outlives_close_without_crashing():
    before = _counts()
    vm = KvmVM()
    vm.set_user_memory_region(0, 0, MB, LOG)
    vm.create_vcpu(0).run(np.array([5]), 77)
    mem = vm.memory(0)
    vm.close()
    assert mem[5] == 77                                  # still mapped while the view lives
    del mem
    assert _counts() == before                           # ...and unmapped after


def test_ring_view_outlives_close_without_crashing():
    if not _ring():
        pytest.skip(ring_capable())
    before = _counts()
    vm = _full_vm(True)
    ring = vm._vcpus[0].dirty_ring
    raw = ring.entries_view()
    vm.close()
    assert raw.shape == (256,)
    with pytest.raises(KvmError):
        ring.collect()
    del raw, ring
    assert _counts() == before


def test_close_while_a_vcpu_runs_in_another_thread():
    vm = KvmVM()
    vm.set_user_memory_region(0, 0, 16 * MB, LOG)
    v = vm.create_vcpu(0)
    plan = np.tile(np.arange(4096, dtype=np.uint64), 2)  # ~tens of ms of guest time
    out = []

    def runner():
        try:
            out.append(v.run(plan, 1))
        except (KvmError, ValueError) as e:              # any clean error is fine; a crash is not
            out.append(e)

    t = threading.Thread(target=runner)
    t.start()
    time.sleep(0.01)                                     # let KVM_RUN start (usually)
    vm.close()
    t.join(30)
    assert not t.is_alive() and len(out) == 1
    with pytest.raises(KvmError):
        v.run()


def test_low_level_closed_objects_raise():
    kvm = _kvm.Kvm()
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    for fd in (vcpu, vm, kvm):
        fd.close()
        fd.close()
        assert fd.closed
        with pytest.raises(ValueError):
            fd.fileno()
    for call in (kvm.api_version, lambda: kvm.check_extension(1), lambda: vm.get_dirty_log(0),
                 vm.reset_dirty_rings, lambda: vm.create_vcpu(1), vcpu.run, vcpu.get_regs,
                 vcpu.get_sregs, lambda: vcpu.set_regs({"rax": 1}), vcpu.exit_info,
                 lambda: vcpu.map_dirty_ring(4096)):
        with pytest.raises(KvmError) as e:
            call()
        assert e.value.errno == errno.EBADF


def test_low_level_bad_input():
    with pytest.raises(TypeError):
        _kvm.Vm()
    with pytest.raises(TypeError):
        _kvm.Vcpu()
    with pytest.raises(TypeError):
        _kvm.Kvm(b"/dev/kvm")
    with pytest.raises(ValueError):
        _kvm.Kvm("/dev/kvm\0x")
    with pytest.raises(ValueError):
        _kvm.Mapping(0)
    with pytest.raises(ValueError):
        _kvm.Mapping(-1)
    m = _kvm.Mapping(4096)
    m.close()
    with pytest.raises(ValueError):
        memoryview(m)
    kvm = _kvm.Kvm()
    vm = kvm.create_vm()
    small = _kvm.Mapping(4096)
    with pytest.raises(ValueError):                      # no memory for a non-empty slot
        vm.set_user_memory_region(0, 0, 0, 4096, None)
    with pytest.raises(ValueError):                      # slot larger than its memory
        vm.set_user_memory_region(0, 0, 0, 8192, small)
    with pytest.raises(TypeError):
        vm.set_user_memory_region(0, 0, 0, 4096, bytearray(4096))
    with pytest.raises(ValueError):
        vm.enable_cap(1, (1, 2, 3, 4, 5))
    v = vm.create_vcpu(0)
    regs = v.get_regs()
    with pytest.raises(ValueError):
        v.set_regs({"eax": 1})
    with pytest.raises(ValueError):
        v.set_regs({"rax": -1})
    sregs = v.get_sregs()
    with pytest.raises(ValueError):
        v.set_sregs({"cs": {"selector": 1 << 16}})
    with pytest.raises(ValueError):
        v.set_sregs({"cs": {"bogus": 1}})
    with pytest.raises(TypeError):
        v.set_sregs({"cr0": "x"})
    with pytest.raises(ValueError):
        v.map_dirty_ring(100)
    assert v.get_regs() == regs and v.get_sregs() == sregs   # nothing changed
    v.close()
    vm.close()
    kvm.close()
    small.close()


def _libc_mmap_noreplace(addr: int, size: int) -> int:
    """mmap(addr, MAP_FIXED_NOREPLACE): the address, or -errno if the range is taken."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    map_fixed_noreplace, map_private, map_anon = 0x100000, 0x02, 0x20
    p = libc.mmap(addr, size, 3, map_private | map_anon | map_fixed_noreplace, -1, 0)
    if p is None or p == ctypes.c_void_p(-1).value:
        return -ctypes.get_errno()
    return p


def _libc_munmap(addr: int, size: int) -> None:
    import ctypes
    libc = ctypes.CDLL(None)
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.munmap(addr, size)


def test_close_keeps_guest_memory_mapped_while_a_vcpu_is_in_kvm_run():
    """Issue 10 item 10: close() with a vCPU inside KVM_RUN must not unmap guest memory.

    Before the fix the range was unmapped at once, a new mmap could take it
    (here: MAP_FIXED_NOREPLACE at the same address) and the still-running
    guest wrote into that unrelated memory.
    """
    import ctypes
    vm = KvmVM()
    size = 16 * MB
    vm.set_user_memory_region(0, 0, size, LOG)
    v = vm.create_vcpu(0)
    addr = vm._slots[0].mapping.address
    plan = np.tile(np.arange(4096, dtype=np.uint64), 8)   # one 8192-write burst: ~100+ ms guest time
    out = []
    t = threading.Thread(target=lambda: out.append(_swallow(v.run, plan, 7)))
    t.start()
    first = ctypes.c_uint64.from_address(addr)             # page 0: the plan's first write
    deadline = time.monotonic() + 30
    while first.value != 7 and time.monotonic() < deadline:
        time.sleep(0.0005)
    del first
    assert t.is_alive(), "the guest finished before close(): plan too short for this host"
    vm.close()
    got = _libc_mmap_noreplace(addr, size)
    t.join(60)
    assert not t.is_alive()
    if got > 0:
        try:
            fresh = np.ctypeslib.as_array((ctypes.c_uint64 * (size // 8)).from_address(got))
            written = int(np.count_nonzero(fresh[::512]))
        finally:
            _libc_munmap(got, size)
        assert written == 0, f"the closed VM's guest wrote {written} pages of a later mmap"
    else:
        assert got == -errno.EEXIST                        # still mapped: nobody can reuse it
    # Once the vCPU has left KVM_RUN its fd closes, the kernel VM dies, and the range is freed.
    gc.collect()
    again = _libc_mmap_noreplace(addr, size)
    assert again == addr, f"guest memory is still mapped after the vCPU left ({again})"
    _libc_munmap(again, size)


def _swallow(f, *a):
    try:
        return f(*a)
    except (KvmError, ValueError) as e:
        return e


_CALLS = {
    "Mapping": [("close", ()), ("__repr__", ()), ("address", None), ("size", None), ("closed", None)],
    "_Fd": [("fileno", ()), ("close", ()), ("closed", None)],
    "Kvm": [("api_version", ()), ("check_extension", (1,)), ("vcpu_mmap_size", ()),
            ("supported_cpuid", ()), ("create_vm", ())],
    "Vm": [("check_extension", (1,)), ("enable_cap", (1, (0,))),
           ("set_user_memory_region", (0, 0, 0, 0, None)), ("get_dirty_log", (0,)),
           ("clear_dirty_log", (0, 0, 64, np.zeros(1, np.uint64))), ("reset_dirty_rings", ()),
           ("create_vcpu", (0,))],
    "Vcpu": [("run", ()), ("exit_info", ()), ("get_regs", ()), ("set_regs", ({"rax": 1},)),
             ("get_sregs", ()), ("set_sregs", ({"cr0": 1},)), ("map_dirty_ring", (4096,)),
             ("set_cpuid", (np.zeros(1, _kvm.CPUID_ENTRY),))],
}


@pytest.mark.parametrize("name", sorted(_CALLS))
def test_objects_built_without_init_raise_instead_of_crashing(name):
    """Issue 10 item 2: cls.__new__(cls) gives an object every method of which
    raises cleanly (EBADF for fds), never a NULL/closed-fd crash."""
    cls = getattr(_kvm, name)
    for _ in range(2):                                  # and again after close()
        obj = cls.__new__(cls)
        for meth, args in _CALLS[name]:
            if args is None:
                getattr(obj, meth)                       # properties answer
                continue
            try:
                getattr(obj, meth)(*args)
            except (OSError, ValueError, TypeError) as e:
                if isinstance(e, OSError) and name != "Mapping":
                    assert e.errno == errno.EBADF, (meth, e)
        with pytest.raises(ValueError):
            memoryview(obj) if name == "Mapping" else obj.fileno()


def test_kvm_cannot_be_initialized_twice():
    k = _kvm.Kvm()
    before = fd_count()
    with pytest.raises(TypeError):
        k.__init__("/dev/kvm")
    assert fd_count() == before and k.api_version() == 12
    k.close()


def _mapped(addr: int) -> bool:
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                return True
    return False


@pytest.mark.parametrize("end", ["delete-slot", "close-vm"])
def test_a_registered_mapping_stays_mapped_until_its_slot_is_gone(end):
    """Mapping.close() on memory a memslot uses only marks it: unmapped when the
    slot is deleted, or the VM fd (with no vCPU fd left) is closed."""
    k = _kvm.Kvm()
    vm = k.create_vm()
    m = _kvm.Mapping(MB)
    vm.set_user_memory_region(0, 0, 0, MB, m)
    addr = m.address
    m.close()
    assert m.closed and _mapped(addr)
    with pytest.raises(ValueError):                         # a closed mapping is never registered
        vm.set_user_memory_region(1, 0, 16 * MB, MB, m)
    v = vm.create_vcpu(0)
    if end == "delete-slot":
        vm.set_user_memory_region(0, 0, 0, 0, None)
        assert not _mapped(addr)
    else:
        vm.close()
        assert _mapped(addr)                                # the vCPU fd keeps the kernel VM
        v.close()
        assert not _mapped(addr)
    vm.close()
    k.close()
