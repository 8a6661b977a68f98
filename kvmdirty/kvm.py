"""KvmVM / KvmVcpu: the KVM-shaped API of kvmdirty over the real /dev/kvm.

Same methods, arguments, exits and errno as the simulated `vm.VM` / `vm.Vcpu`
(see api.VMProtocol), so user code, the runner and the verifier work on
either. Guest memory of every slot is an anonymous MAP_NORESERVE mapping owned
by the VM. The vCPU runs the tiny program of `guest.py` from a private,
never-logged memslot (slot `KvmVM.private_slot` at guest.PRIVATE_GPA; the
user may not use that slot id nor overlap that range).
"""
from __future__ import annotations

import errno
import threading
import weakref
from typing import Any, Dict, Optional, Tuple

import numpy as np

from . import _kvm, _uapi, guest
from .api import EXIT_BUDGET, EXIT_HLT, PAGE_SHIFT, PAGE_SIZE, Exit, as_plan
from .errors import KvmError

__all__ = ["KvmVM", "KvmVcpu", "KvmDirtyRing", "open_vm"]

_SLOT_IOCTL = "KVM_SET_USER_MEMORY_REGION"
_MAX_SLOT_BYTES = ((1 << 31) - 1) << PAGE_SHIFT   # KVM_MEM_MAX_NR_PAGES pages


def _int(v: Any, what: str, bits: int = 64) -> int:
    """v as an int in [0, 2**bits): TypeError for non-integers, ValueError for range."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{what} must be an int, not {type(v).__name__}")
    v = int(v)
    if not 0 <= v < (1 << bits):
        raise ValueError(f"{what} must be in [0, 2**{bits}), got {v}")
    return v




def _budget(max_writes: Any) -> int:
    if isinstance(max_writes, bool) or not isinstance(max_writes, (int, np.integer)) or max_writes < 1:
        raise ValueError("max_writes must be a positive int")
    return int(max_writes)


class _Slot:
    __slots__ = ("gpa", "size", "flags", "mapping")

    def __init__(self, gpa: int, size: int, flags: int, mapping: _kvm.Mapping) -> None:
        self.gpa, self.size, self.flags, self.mapping = gpa, size, flags, mapping


class KvmDirtyRing:
    """User space's side of one real vCPU dirty ring (an mmap of the vCPU fd)."""

    def __init__(self, mapping: _kvm.Mapping, entries: int) -> None:
        self._mapping = mapping
        self._buf: Optional[memoryview] = memoryview(mapping)
        self.entries = entries
        #: Free-running index of the next entry to harvest (as in the kernel selftest).
        self.fetch_index = 0

    def collect(self, max_count: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Harvest in order while flags == DIRTY, marking each RESET; (slots u32, offsets u64)."""
        if self._buf is None:
            raise KvmError(errno.EBADF, "collect", "the vCPU is closed")
        from ._ring import collect
        slots, offsets, self.fetch_index = collect(self._buf, self.fetch_index, max_count)
        return slots, offsets

    def entries_view(self) -> np.ndarray:
        """The raw ring as a read-only struct kvm_dirty_gfn array (for inspection and tests)."""
        if self._buf is None:
            raise KvmError(errno.EBADF, "entries_view", "the vCPU is closed")
        dt = np.dtype([("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")])
        view = np.frombuffer(self._buf, dtype=dt, count=self.entries)
        view.flags.writeable = False
        return view

    @property
    def used(self) -> int:
        """Entries pushed and not yet reset: those whose flags are not 0."""
        return int(np.count_nonzero(self.entries_view()["flags"]))

    def close(self) -> None:
        if self._buf is not None:
            buf, self._buf = self._buf, None
            try:
                buf.release()
            except BufferError:      # a collect in another thread still holds it
                pass
            self._mapping.close()    # unmapped once the last export is released


class KvmVcpu:
    """A real vCPU running kvmdirty's write-plan guest."""

    def __init__(self, vm: "KvmVM", vcpu_id: int, fd: _kvm.Vcpu, ring_bytes: int) -> None:
        self.id = vcpu_id
        self._fd = fd
        # A weak reference: the VM owns its vCPUs; no cycle, so dropping the VM frees it.
        self._vm = weakref.ref(vm)
        self._plan_area = vm._plan_area
        self._ring: Optional[KvmDirtyRing] = None
        if ring_bytes:
            self._ring = KvmDirtyRing(fd.map_dirty_ring(ring_bytes), ring_bytes // 16)
        fd.set_sregs(guest.long_mode_sregs(guest.PRIVATE_GPA + guest.PML4_OFFSET))
        self._plan = np.zeros(0, dtype=np.uint64)
        self._value = 0
        self._chunk_start = 0     # plan index of the chunk held in guest memory
        self._chunk_len = 0
        self._burst_start = 0     # plan index where the current KVM_RUN burst began
        self._burst_len = 0       # 0: no burst in flight
        self._done = 0            # writes of the plan completed so far
        self._lock = threading.Lock()

    @property
    def dirty_ring(self) -> Optional[KvmDirtyRing]:
        return self._ring

    @property
    def closed(self) -> bool:
        return self._fd.closed

    def _check_open(self, what: str) -> None:
        vm = self._vm()
        if self._fd.closed or vm is None or vm.closed:
            raise KvmError(errno.EBADF, what, "the vCPU or its VM is closed")

    @property
    def remaining(self) -> int:
        """Writes of the current plan not yet done."""
        return self._plan.size - self._done

    def run(self, gfns: Optional[np.ndarray] = None, value: Optional[int] = None, *,
            max_writes: Optional[int] = None) -> Exit:
        """KVM_RUN: execute the plan `gfns` (absolute gfns) writing `value`, or resume the current one.

        Returns Exit(EXIT_HLT, writes, 0) when the plan is done. On any other
        exit (DIRTY_RING_FULL, MMIO for a gfn outside every slot, ...) it
        reports the writes done by this call and those remaining, and `run()`
        resumes exactly there. `max_writes` bounds this call (EXIT_BUDGET), as
        in the simulator.
        """
        self._check_open("KVM_RUN")
        if gfns is not None:
            plan = as_plan(gfns)
            if isinstance(value, (np.ndarray, list, tuple)):
                raise TypeError("the real-KVM guest writes one value per plan, not one per write")
            v = _int(0 if value is None else value, "value")
        elif value is not None:
            raise ValueError("value given without gfns")
        budget = None if max_writes is None else _budget(max_writes)
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(f"vCPU {self.id} is already running in another thread")
        try:
            if gfns is not None:
                self._set_plan(plan, v)
            return self._run(budget)
        finally:
            self._lock.release()

    def _run(self, budget: Optional[int]) -> Exit:
        start = self._done
        while True:
            if self._burst_len == 0:
                if self._done == self._plan.size:
                    return Exit(EXIT_HLT, self._done - start, 0)
                if budget is not None and self._done - start >= budget:
                    return Exit(EXIT_BUDGET, self._done - start, self._plan.size - self._done)
                self._start_burst(None if budget is None else budget - (self._done - start))
            reason = self._fd.run()
            regs = self._fd.get_regs()
            self._done = self._burst_start + guest.writes_done(regs["rip"], regs["rcx"], self._burst_len)
            if reason == EXIT_HLT and self._done == self._burst_start + self._burst_len:
                self._burst_len = 0
                continue
            return Exit(reason, self._done - start, self._plan.size - self._done)

    def _set_plan(self, plan: np.ndarray, value: int) -> None:
        if plan.size:
            if int(plan.max()) >= guest.GUEST_GFN_LIMIT:
                raise ValueError(f"gfns must be below {guest.GUEST_GFN_LIMIT:#x} (36-bit guest physical addresses)")
            if ((plan >= guest.PRIVATE_GFN_FIRST) & (plan < guest.PRIVATE_GFN_END)).any():
                raise ValueError("gfns must not name the guest program's private memory")
        self._plan, self._value = plan, value
        self._chunk_start = self._chunk_len = self._done = 0
        self._burst_start = self._burst_len = 0

    def _start_burst(self, budget: Optional[int]) -> None:
        """Point the registers at the next burst of the plan (loading its chunk first).

        With a dirty ring a burst is at most guest.RING_BURST writes: KVM checks
        the soft-full request only on guest entry, and a vCPU that is never
        re-entered was seen here to run past the ring's end and overwrite
        entries. Entering at most RING_BURST writes apart keeps it within
        the ring's reserve of 64 entries.
        """
        done = self._done
        if not self._chunk_start <= done < self._chunk_start + self._chunk_len:
            n = min(guest.PLAN_CAPACITY, self._plan.size - done)
            self._plan_area[:n] = self._plan[done:done + n]
            self._chunk_start, self._chunk_len = done, n
        left = self._chunk_start + self._chunk_len - done
        n = min(left, guest.RING_BURST) if self._ring is not None else left
        if budget is not None:
            n = min(n, budget)
        self._fd.set_regs(guest.start_regs(guest.PRIVATE_GPA, done - self._chunk_start, n, self._value))
        self._burst_start, self._burst_len = done, n

    def exit_info(self) -> Dict[str, Any]:
        """Details of the last exit (e.g. the MMIO address) as kvm_run reports them."""
        self._check_open("exit_info")
        return self._fd.exit_info()

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()
        self._fd.close()

    def __repr__(self) -> str:
        return f"<KvmVcpu {self.id}{' closed' if self.closed else ''}>"


class KvmVM:
    """A real KVM VM with the kvmdirty API (see api.VMProtocol)."""

    def __init__(self, *, path: str = "/dev/kvm", vm_type: int = 0) -> None:
        self._slots: Dict[int, _Slot] = {}
        self._vcpus: Dict[int, KvmVcpu] = {}
        self._ring_bytes = 0
        self._closed = False
        self._sys = _kvm.Kvm(path)
        try:
            self._vm = self._sys.create_vm(vm_type)
            self.private_slot = self._sys.check_extension(_uapi.CAP_NR_MEMSLOTS) - 1
            self._private = _kvm.Mapping(guest.PRIVATE_SIZE)
            guest.write_image(np.frombuffer(self._private, dtype=np.uint8))
            self._plan_area = np.frombuffer(self._private, dtype=np.uint64,
                                            offset=guest.PLAN_OFFSET)
            self._vm.set_user_memory_region(self.private_slot, 0, guest.PRIVATE_GPA,
                                            guest.PRIVATE_SIZE, self._private)
        except BaseException:
            self.close()
            raise

    # -- life cycle ---------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def vcpus(self) -> Dict[int, "KvmVcpu"]:
        """The vCPUs by id (as vm.VM.vcpus)."""
        return dict(self._vcpus)

    def close(self) -> None:
        """Close vCPUs, the VM and /dev/kvm; unmap guest memory (views keep theirs alive)."""
        if self._closed:
            return
        self._closed = True
        for v in self._vcpus.values():
            v.close()
        self._vcpus.clear()
        for attr in ("_vm", "_sys"):
            fd = getattr(self, attr, None)
            if fd is not None:
                fd.close()
        for s in self._slots.values():
            s.mapping.close()
        self._slots.clear()
        self._plan_area = None
        if getattr(self, "_private", None) is not None:
            self._private.close()

    def __enter__(self) -> "KvmVM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _fd(self, what: str) -> _kvm.Vm:
        if self._closed:
            raise KvmError(errno.EBADF, what, "the VM is closed")
        return self._vm

    # -- capabilities -------------------------------------------------------
    def check_extension(self, cap: int) -> int:
        return self._fd("KVM_CHECK_EXTENSION").check_extension(cap)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        self._fd("KVM_ENABLE_CAP").enable_cap(cap, args, flags)
        if cap in (_uapi.CAP_DIRTY_LOG_RING, _uapi.CAP_DIRTY_LOG_RING_ACQ_REL):
            self._ring_bytes = args[0]

    def enable_dirty_ring(self, entries: int, *, acq_rel: bool = True) -> None:
        """Enable a dirty ring of `entries` 16-byte entries per vCPU (before any vCPU)."""
        n = _int(entries, "entries", 60)
        cap = _uapi.CAP_DIRTY_LOG_RING
        if acq_rel and self.check_extension(_uapi.CAP_DIRTY_LOG_RING_ACQ_REL):
            cap = _uapi.CAP_DIRTY_LOG_RING_ACQ_REL
        self.enable_cap(cap, n * _uapi.SIZEOF_DIRTY_GFN)

    def enable_manual_protect(self, initially_set: bool = False) -> None:
        flags = _uapi.DIRTY_LOG_MANUAL_PROTECT_ENABLE
        if initially_set:
            flags |= _uapi.DIRTY_LOG_INITIALLY_SET
        self.enable_cap(_uapi.CAP_MANUAL_DIRTY_LOG_PROTECT2, flags)

    # -- memory -------------------------------------------------------------
    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               flags: int = 0) -> None:
        """Create, move, re-flag or (size 0) delete a slot, as KVM does; owns its memory."""
        slot = _int(slot, "slot", 32)
        gpa = _int(guest_phys_addr, "guest_phys_addr")
        size = _int(memory_size, "memory_size")
        flags = _int(flags, "flags", 32)
        vm = self._fd(_SLOT_IOCTL)
        if slot == self.private_slot:
            raise KvmError(errno.EINVAL, _SLOT_IOCTL, f"slot {slot} is reserved for kvmdirty's guest program")
        old = self._slots.get(slot)
        if size == 0:
            vm.set_user_memory_region(slot, flags, gpa, 0, None)
            if old is not None:
                old.mapping.close()
                del self._slots[slot]
            return
        if old is not None and size <= old.mapping.size:
            mapping, fresh = old.mapping, False
        else:
            # Every check the kernel makes before it would look at such a size fails with EINVAL.
            if size > _MAX_SLOT_BYTES:
                raise KvmError(errno.EINVAL, _SLOT_IOCTL, f"memory_size {size:#x} is too large")
            mapping, fresh = _kvm.Mapping(size), True
        try:
            vm.set_user_memory_region(slot, flags, gpa, size, mapping)
        except BaseException:
            if fresh:
                mapping.close()
            raise
        if old is not None and old.mapping is not mapping:
            old.mapping.close()   # unreachable: the kernel refuses a new address for a live slot
        self._slots[slot] = _Slot(gpa, size, flags, mapping)

    def memory(self, slot: int) -> np.ndarray:
        """Read-only uint64 view: the value of each page of the slot (its first 8 bytes)."""
        slot = _int(slot, "slot", 32)
        self._fd("memory")
        s = self._slots.get(slot)
        if s is None:
            raise KvmError(errno.ENOENT, "memory", f"no slot {slot}")
        words = np.frombuffer(s.mapping, dtype=np.uint64, count=s.size // 8)
        view = words[::PAGE_SIZE // 8]
        view.flags.writeable = False
        return view

    # -- vCPUs --------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int) -> KvmVcpu:
        vcpu_id = _int(vcpu_id, "vcpu_id", 32)
        fd = self._fd("KVM_CREATE_VCPU").create_vcpu(vcpu_id)
        try:
            v = KvmVcpu(self, vcpu_id, fd, self._ring_bytes)
        except BaseException:
            fd.close()
            raise
        self._vcpus[vcpu_id] = v
        return v

    # -- dirty logging ------------------------------------------------------
    def get_dirty_log(self, slot: int) -> np.ndarray:
        """KVM_GET_DIRTY_LOG: ceil(npages/64) uint64 words."""
        return self._fd("KVM_GET_DIRTY_LOG").get_dirty_log(slot)

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int,
                        bitmap: np.ndarray) -> None:
        self._fd("KVM_CLEAR_DIRTY_LOG").clear_dirty_log(slot, first_page, num_pages, bitmap)

    def reset_dirty_rings(self) -> int:
        return self._fd("KVM_RESET_DIRTY_RINGS").reset_dirty_rings()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._slots)} slots, {len(self._vcpus)} vCPUs"
        return f"<KvmVM {state}>"


def open_vm(backend: str = "sim", **kw: Any) -> Any:
    """A VM of any backend: "sim" (vm.VM, the simulator), "kvm" (KvmVM, /dev/kvm) or
    "host" (host.backend.HostVM, the host kernel's userfaultfd-wp + PAGEMAP_SCAN)."""
    if backend == "kvm":
        return KvmVM(**kw)
    if backend == "sim":
        from .vm import VM
        return VM(**kw)
    if backend == "host":
        from .host.backend import HostVM
        return HostVM(**kw)
    raise ValueError(f"backend must be 'sim', 'kvm' or 'host', not {backend!r}")
