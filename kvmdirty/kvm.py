"""KvmVM / KvmVcpu: the KVM-shaped API of kvmdirty over the real /dev/kvm.

Same methods, arguments, exits and errno as the simulated `vm.VM` / `vm.Vcpu`
(see api.VMProtocol), so user code, the runner and the verifier work on
either. Guest memory of every slot is an anonymous MAP_NORESERVE mapping owned
by the VM. The vCPU runs the tiny program of `guest.py` from a private,
never-logged memslot (slot `KvmVM.private_slot` at guest.PRIVATE_GPA, in the
PCI hole below 4 GiB; the user may not use that slot id nor overlap that
range). Each vCPU has its own plan area there (guest.plan_offset), so vCPUs
stopped and resumed in any order never run each other's plans.

Concurrency: the VM ioctls whose checks KVM makes under kvm->lock or
slots_lock (creating vCPUs, enabling the ring, changing memslots) run under
`KvmVM._lock` here together with the bookkeeping they check and update.
"""
from __future__ import annotations

import errno
import threading
import weakref
from typing import Any, Dict, Optional, Tuple

import numpy as np

from . import _kvm, _uapi, guest, validate
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
    return validate.budget(max_writes)      # the shared validator: same errors as the simulator


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
        # Collectors are serialised: two reading from one fetch_index would
        # both take (and report) the same entries.
        self._collect_lock = threading.Lock()

    def collect(self, max_count: Optional[int] = None, out_slots: Optional[np.ndarray] = None,
                out_offsets: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Harvest in order while flags == DIRTY, marking each RESET; (slots u32, offsets u64).

        ``out_slots`` / ``out_offsets``: caller-owned arrays to fill (both or
        neither), as the simulator's DirtyRing.collect takes them.
        Safe from several threads: each entry goes to exactly one caller.
        """
        from ._ring import collect
        with self._collect_lock:
            buf = self._buf
            if buf is None:
                raise KvmError(errno.EBADF, "collect", "the vCPU is closed")
            slots, offsets, self.fetch_index = collect(buf, self.fetch_index, max_count,
                                                       out_slots, out_offsets)
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

    def __init__(self, vm: "KvmVM", vcpu_id: int, fd: _kvm.Vcpu, area: int, ring_bytes: int) -> None:
        """Set up the kernel vCPU `fd`; on failure nothing is left behind but `fd`
        itself (the caller keeps it for a retry: the kernel cannot destroy it)."""
        self.id = vcpu_id
        self._fd = fd
        # A weak reference: the VM owns its vCPUs; no cycle, so dropping the VM frees it.
        self._vm = weakref.ref(vm)
        #: This vCPU's own plan area (guest.plan_offset(area) in the private slot).
        self._area = area
        self._plan_area = np.frombuffer(vm._private, dtype=np.uint64, count=guest.PLAN_CAPACITY,
                                        offset=guest.plan_offset(area))
        self._gfn_limit = vm.guest_phys_limit >> PAGE_SHIFT
        # Kernel state first: repeating these on a retry is harmless.
        fd.set_cpuid(vm._cpuid)
        fd.set_sregs(guest.long_mode_sregs(guest.PRIVATE_GPA + guest.PML4_OFFSET))
        self._ring: Optional[KvmDirtyRing] = None
        if ring_bytes:
            mapping = fd.map_dirty_ring(ring_bytes)
            try:
                self._ring = KvmDirtyRing(mapping, ring_bytes // 16)
            except BaseException:
                mapping.close()
                raise
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
            try:
                reason = self._fd.run()
            except BaseException:
                # Ctrl-C (or a close) between KVM_RUN retries: keep the
                # position, so `remaining` is right and run() resumes there.
                try:
                    regs = self._fd.get_regs()
                    self._done = self._burst_start + guest.writes_done(regs["rip"], regs["rcx"],
                                                                       self._burst_len)
                except BaseException:
                    pass
                raise
            regs = self._fd.get_regs()
            self._done = self._burst_start + guest.writes_done(regs["rip"], regs["rcx"], self._burst_len)
            if reason == EXIT_HLT and self._done == self._burst_start + self._burst_len:
                self._burst_len = 0
                continue
            return Exit(reason, self._done - start, self._plan.size - self._done)

    def _set_plan(self, plan: np.ndarray, value: int) -> None:
        if plan.size:
            if int(plan.max()) >= self._gfn_limit:
                raise ValueError(f"gfns must be below {self._gfn_limit:#x} (what this guest can address)")
            if ((plan >= guest.PRIVATE_GFN_FIRST) & (plan < guest.PRIVATE_GFN_END)).any():
                raise ValueError("gfns must not name the guest program's private memory")
        # One dict update (no Python code runs inside it): a Ctrl-C cannot
        # leave a new plan with the old plan's position.
        self.__dict__.update(_plan=plan, _value=value, _chunk_start=0, _chunk_len=0, _done=0,
                             _burst_start=0, _burst_len=0)

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
        self._fd.set_regs(guest.start_regs(guest.PRIVATE_GPA, done - self._chunk_start, n, self._value,
                                           self._area))
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
        # Kernel vCPUs whose set-up failed: (fd, plan area), returned by a retry.
        self._pending: Dict[int, Tuple[_kvm.Vcpu, int]] = {}
        self._areas_used = 0
        self._ring_bytes = 0
        self._closed = False
        self._lock = threading.RLock()
        self._sys = _kvm.Kvm(path)
        try:
            self._vm = self._sys.create_vm(vm_type)
            self.private_slot = self._sys.check_extension(_uapi.CAP_NR_MEMSLOTS) - 1
            self._cpuid = self._sys.supported_cpuid()
            #: Guest physical addresses below this are reachable by the guest program.
            self.guest_phys_limit = min(guest.GUEST_PHYS_LIMIT, 1 << _maxphyaddr(self._cpuid))
            self._max_areas = min(self._vm.check_extension(_uapi.CAP_MAX_VCPUS), guest.MAX_PLAN_AREAS)
            self._private = _kvm.Mapping(guest.private_size(self._max_areas))
            guest.write_image(np.frombuffer(self._private, dtype=np.uint8))
            self._vm.set_user_memory_region(self.private_slot, 0, guest.PRIVATE_GPA,
                                            self._private.size, self._private)
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
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for v in self._vcpus.values():
                v.close()
            self._vcpus.clear()
            for fd, _area in self._pending.values():
                fd.close()
            self._pending.clear()
            for attr in ("_vm", "_sys"):
                fd = getattr(self, attr, None)
                if fd is not None:
                    fd.close()
            # Unmapped only once no vCPU can reach them any more: a vCPU still
            # inside KVM_RUN in another thread keeps its fd (and the kernel VM)
            # open until it returns; _kvm pins slot memory until then.
            for s in self._slots.values():
                s.mapping.close()
            self._slots.clear()
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
        """KVM_ENABLE_CAP; arguments go to the kernel unchanged.

        Runs under the VM lock with create_vcpu: KVM refuses the ring once a
        vCPU exists (checked under kvm->lock), and every vCPU created after
        it must map the ring of the size the kernel took.
        """
        with self._lock:
            self._fd("KVM_ENABLE_CAP").enable_cap(cap, args, flags)
            if cap in (_uapi.CAP_DIRTY_LOG_RING, _uapi.CAP_DIRTY_LOG_RING_ACQ_REL):
                # The kernel takes the ring size as a u32 (kvm_vm_ioctl_enable_dirty_log_ring).
                self._ring_bytes = int(args[0]) & 0xFFFFFFFF

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
        with self._lock:
            self._set_region(slot, gpa, size, flags)

    def _set_region(self, slot: int, gpa: int, size: int, flags: int) -> None:
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
        """KVM_CREATE_VCPU and its set-up; a failed call changes nothing visible.

        The kernel cannot destroy a vCPU, so when the set-up fails after
        KVM_CREATE_VCPU the kernel vCPU is kept (not in `vcpus`) and a retry
        with the same id finishes the set-up instead of failing EEXIST.
        """
        vcpu_id = _int(vcpu_id, "vcpu_id", 32)
        with self._lock:
            vm = self._fd("KVM_CREATE_VCPU")
            pending = self._pending.get(vcpu_id)
            if pending is None:
                if vcpu_id not in self._vcpus and self._areas_used >= self._max_areas:
                    raise KvmError(errno.EINVAL, "KVM_CREATE_VCPU",
                                   f"at most {self._max_areas} vCPUs per VM")
                fd = vm.create_vcpu(vcpu_id)
                pending = self._pending[vcpu_id] = (fd, self._areas_used)
                self._areas_used += 1
            fd, area = pending
            v = KvmVcpu(self, vcpu_id, fd, area, self._ring_bytes)
            del self._pending[vcpu_id]
            self._vcpus[vcpu_id] = v
            return v

    # -- dirty logging ------------------------------------------------------
    def get_dirty_log(self, slot: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        """KVM_GET_DIRTY_LOG: ceil(npages/64) uint64 words.

        ``out``: a caller-owned uint64 array the kernel writes into (and that
        is returned), as vm.VM.get_dirty_log takes it; its type is checked
        first, and one shorter than the bitmap fails with EFAULT, taking
        nothing (the kernel would harvest first and then fail its copy).
        """
        ioctl = "KVM_GET_DIRTY_LOG"
        fd = self._fd(ioctl)
        if out is not None:
            validate.out_words(out)
            sid = _int(slot, "slot", 32)
            s = self._slots.get(sid)
            need = (s.size // PAGE_SIZE + 63) // 64 if s is not None else 0
            if len(out) < need:
                if self._ring_bytes or not s.flags & _uapi.MEM_LOG_DIRTY_PAGES:
                    # The kernel fails before copying (ENXIO / ENOENT, in its
                    # order): let it answer, into a buffer of its own.
                    fd.get_dirty_log(sid)
                raise KvmError(errno.EFAULT, ioctl, f"out has {len(out)} words, {need} needed")
            got = fd.get_dirty_log(sid, out)
            return got if len(got) == need else got[:need]
        return fd.get_dirty_log(slot)

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int,
                        bitmap: np.ndarray) -> None:
        self._fd("KVM_CLEAR_DIRTY_LOG").clear_dirty_log(slot, first_page, num_pages, bitmap)

    def reset_dirty_rings(self) -> int:
        return self._fd("KVM_RESET_DIRTY_RINGS").reset_dirty_rings()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._slots)} slots, {len(self._vcpus)} vCPUs"
        return f"<KvmVM {state}>"


def _maxphyaddr(cpuid: np.ndarray) -> int:
    """The guest's MAXPHYADDR from CPUID leaf 0x80000008 (36 without it, as on x86)."""
    leaf = cpuid[cpuid["function"] == 0x80000008]
    return int(leaf["eax"][0]) & 0xFF if len(leaf) else 36


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
