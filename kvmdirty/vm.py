"""VM, Vcpu: the KVM-shaped API over the simulated kernel.

Each method is one KVM ioctl with the kernel's rules and errno precedence
(see KVM_SEMANTICS.md); the work is done by the compiled core: kvmdirty._mmu
(page tables, guest write loop, TLB flush), kvmdirty._bitmap (harvest/clear
kernels) and kvmdirty._ring (dirty rings).

Failure and concurrency rules (DESIGN.md "Errors"):
- Arguments go through kvmdirty.validate first; then every check that
  depends on VM state runs under the lock KVM takes for it (``_kvm_lock``
  = kvm->lock: vCPU creation, ring enabling; ``_slots_mutex`` =
  kvm->slots_lock: memslot changes, dirty-log ioctls, ring resets), and the
  change itself is ONE compiled call (Mmu.set_slot / delete_slot /
  add_vcpu / VcpuCore.run) that allocates first and then swaps.  So a
  MemoryError, a concurrent caller or a KeyboardInterrupt arriving between
  any two Python lines leaves the VM as it was or fully changed.
- After fork() the child's copy of a VM answers every call with EIO, as
  KVM does for a VM used from another mm; close() works and never waits.
"""
from __future__ import annotations

import errno
import os
import threading
import types
from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np

from . import _bitmap, _mmu, _uapi, validate
from .api import PAGE_SHIFT, PAGE_SIZE, Exit
from .errors import KvmError
from .limits import (ADDRESS_SPACES, DIRTY_GFN_SIZE, DIRTY_RING_MAX_ENTRIES,
                     DIRTY_RING_RSVD_ENTRIES, MAX_VCPU_IDS, MAX_VCPUS,
                     PML_LOG_SIZE, USER_MEM_SLOTS)
from .slotlock import SlotLock

MEM_LOG_DIRTY_PAGES = _uapi.MEM_LOG_DIRTY_PAGES
MANUAL_PROTECT_ENABLE = _uapi.DIRTY_LOG_MANUAL_PROTECT_ENABLE
INITIALLY_SET = _uapi.DIRTY_LOG_INITIALLY_SET
MANUAL_CAPS = MANUAL_PROTECT_ENABLE | INITIALLY_SET
RING_CAPS = (_uapi.CAP_DIRTY_LOG_RING, _uapi.CAP_DIRTY_LOG_RING_ACQ_REL)
_LOG_NONE, _LOG_HARVEST, _LOG_COPY = _mmu.GET_LOG_NONE, _mmu.GET_LOG_HARVEST, _mmu.GET_LOG_COPY

#: Faults that can be switched on in the simulated kernel (see kvmdirty._mmu).
FAULTS = {
    "skip-flush": _mmu.FAULT_SKIP_FLUSH,
    "flush-before-protect": _mmu.FAULT_FLUSH_BEFORE_PROTECT,
    "no-flush-wait": _mmu.FAULT_NO_FLUSH_WAIT,
    "unlogged-fault": _mmu.FAULT_UNLOGGED_FAULT,
    "skip-reset-protect": _mmu.FAULT_SKIP_RESET_PROTECT,
}


@dataclass(frozen=True)
class MemSlot:
    """One memslot: KVM's struct kvm_memory_slot, plus the memory we model (read-only record)."""

    slot: int                      # (address space << 16) | id
    base_gfn: int
    npages: int
    flags: int
    writable: np.ndarray           # SPTE W bits
    values: np.ndarray             # guest memory: a uint64 per page
    dirty: Optional[np.ndarray]    # dirty bitmap, None when not logging / ring only

    @property
    def nwords(self) -> int:
        return (self.npages + 63) >> 6

    @property
    def logging(self) -> bool:
        return bool(self.flags & MEM_LOG_DIRTY_PAGES)

    def row(self) -> tuple:
        return (self.slot, self.base_gfn, self.npages, self.flags,
                self.writable, self.values, self.dirty)


class Vcpu:
    """A simulated vCPU: runs write plans (guest programs) in the write loop."""

    def __init__(self, vm: "VM", vcpu_id: int, core, ring=None) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.core = core
        self._ring = ring

    @property
    def dirty_ring(self):
        """The user view of this vCPU's dirty ring (a kvmdirty._ring.DirtyRing), or None."""
        return self._ring

    @property
    def remaining(self) -> int:
        """Writes of the current plan not done yet (kept by the core, exact even after an interrupt)."""
        return self.core.remaining

    def run(self, gfns=None, value=None, *, max_writes: Optional[int] = None) -> Exit:
        """KVM_RUN: execute a write plan (or resume the current one).

        ``gfns``: guest frame numbers to write, in order; ``value``: the u64 to
        write (one int, or one per write).  ``max_writes`` bounds this call
        (deterministic schedules); the exit is then EXIT_BUDGET.  A run that
        stops early (DIRTY_RING_FULL, budget) resumes with ``run()``.
        Every argument is checked before the new plan is installed.
        """
        self.vm._check_open("KVM_RUN")
        budget = validate.budget(max_writes)
        if gfns is not None:
            plan = validate.plan(gfns)
            vals = validate.values(0 if value is None else value, len(plan))
        elif value is not None:
            raise ValueError("value given without gfns")
        else:
            plan = vals = None
        reason, done, remaining = self.core.run(plan, vals, budget)
        return Exit(reason, done, remaining)

    @property
    def stats(self) -> dict:
        return self.core.stats

    def close(self) -> None:
        """vCPUs live as long as their VM (as in KVM); nothing to do here."""

    def __repr__(self) -> str:
        return f"Vcpu(id={self.id}, remaining={self.remaining})"


class VM:
    """A simulated KVM virtual machine (x86-64, 4 KiB pages).

    design:          "kvm" (upstream bitmap / flags ring) or a seed-era design
                     from kvmdirty.seeds.DESIGNS.
    log_every_write: log every write to a logged page, as KVM does for writes
                     it emulates (this repository's nested host does it for all).
    protect:         "exact" (x86: bit-exact masked write-protect) or "range"
                     (seed 004: first to last set bit of each mask).
    pml:             model Intel PML (cpu_dirty_log_size 512: bigger ring reserve).
    faults:          deliberate ordering bugs, names from FAULTS (for verifier tests).
    design_options:  keyword arguments of the seed design (e.g. {"entries": 1024}).
    address_spaces, max_vcpus, max_vcpu_ids: the host's limits (x86 defaults;
                     kvmdirty.info.host_vm_options() reads them off /dev/kvm so
                     that the simulator answers as this host's kernel does).
    """

    def __init__(self, *, design: str = "kvm", design_options: Optional[dict] = None,
                 log_every_write: bool = False, protect: str = "exact", pml: bool = False,
                 faults=(), address_spaces: int = ADDRESS_SPACES, max_vcpus: int = MAX_VCPUS,
                 max_vcpu_ids: int = MAX_VCPU_IDS) -> None:
        for name, v, lo, hi in (("address_spaces", address_spaces, 1, 2),
                                ("max_vcpus", max_vcpus, 1, 1 << 16),
                                ("max_vcpu_ids", max_vcpu_ids, 1, 1 << 20)):
            v = validate.count(v, name, minimum=lo, maximum=hi)
        self.address_spaces, self.max_vcpus, self.max_vcpu_ids = \
            int(address_spaces), int(max_vcpus), int(max_vcpu_ids)
        if protect not in ("exact", "range"):
            raise ValueError(f"protect must be 'exact' or 'range', got {protect!r}")
        bits = 0
        for f in faults:
            if f not in FAULTS:
                raise ValueError(f"unknown fault {f!r}; known: {sorted(FAULTS)}")
            bits |= FAULTS[f]
        self.mmu = _mmu.Mmu()
        self.mmu.log_every_write = bool(log_every_write)
        self.mmu.protect_range = protect == "range"
        self.mmu.faults = bits
        self.faults = frozenset(faults)
        self.cpu_dirty_log_size = PML_LOG_SIZE if pml else 0
        self._vcpus: dict = {}
        self.dirty_ring_size = 0          # bytes, 0 = no ring
        self.dirty_ring_acq_rel = False
        self.manual_protect = 0           # KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 flags
        self._kvm_lock = threading.Lock()       # kvm->lock
        self._slots_mutex = threading.Lock()    # kvm->slots_lock (not the SRCU-like SlotLock)
        self.design_name = design
        self.design = None
        if design != "kvm":
            from .seeds import create_design
            self.design = create_design(design, self, **(design_options or {}))
        elif design_options:
            raise ValueError("design_options are for the seed-era designs only")

    # -- lifetime -------------------------------------------------------
    def _check_open(self, ioctl: str) -> None:
        if self.mmu.forked:
            raise KvmError(errno.EIO, ioctl, "the VM belongs to the parent process (fork)")
        if self.mmu.closed:
            raise KvmError(errno.EBADF, ioctl, "the VM is closed")

    def close(self) -> None:
        """Destroy the VM; later calls fail with EBADF.  Views handed out stay valid.

        Waits for running vCPUs and harvests to leave (never in a forked child).
        """
        self.mmu.close()

    @property
    def slots(self) -> Mapping[int, MemSlot]:
        """The memslots by (address space << 16) | id (read-only)."""
        return types.MappingProxyType(self.mmu.slots)

    @property
    def vcpus(self) -> Mapping[int, Vcpu]:
        """The vCPUs by id (read-only)."""
        return types.MappingProxyType(self._vcpus)

    @property
    def slots_lock(self) -> SlotLock:
        """Readers (runs, harvests) vs writers (memslot / vCPU changes); see slotlock.py."""
        return self.mmu.slots_lock

    @property
    def _slots_lock(self) -> SlotLock:
        return self.mmu.slots_lock

    @property
    def closed(self) -> bool:
        return self.mmu.closed

    def __enter__(self) -> "VM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- capabilities ---------------------------------------------------
    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd: 0 = unsupported, else a cap-specific value."""
        self._check_open("KVM_CHECK_EXTENSION")
        cap = validate.u64(cap, "cap")
        if cap in RING_CAPS:
            return DIRTY_RING_MAX_ENTRIES * DIRTY_GFN_SIZE
        return {
            _uapi.CAP_MANUAL_DIRTY_LOG_PROTECT2: MANUAL_CAPS,
            _uapi.CAP_NR_MEMSLOTS: USER_MEM_SLOTS,
            _uapi.CAP_MAX_VCPUS: self.max_vcpus,
            _uapi.CAP_NR_VCPUS: min(os.cpu_count() or 1, self.max_vcpus),
            _uapi.CAP_MULTI_ADDRESS_SPACE: self.address_spaces,
        }.get(cap, 0)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP: the dirty-ring caps (args[0] = bytes) and MANUAL_DIRTY_LOG_PROTECT2."""
        self._check_open("KVM_ENABLE_CAP")
        cap = validate.u64(cap, "cap")
        if len(args) > 4:
            raise ValueError("kvm_enable_cap has 4 args")
        argv = [validate.u64(a, "arg") for a in args] + [0] * (4 - len(args))
        flags = validate.u32(flags, "flags")
        if cap in RING_CAPS:
            # kvm_vm_ioctl_enable_dirty_log_ring(struct kvm *, u32 size): args[0] is truncated.
            self._enable_ring(cap, argv[0] & validate.U32_MAX)
        elif cap == _uapi.CAP_MANUAL_DIRTY_LOG_PROTECT2:
            allowed = MANUAL_CAPS if argv[0] & MANUAL_PROTECT_ENABLE else MANUAL_PROTECT_ENABLE
            if flags or argv[0] & ~allowed:
                raise KvmError(errno.EINVAL, "KVM_ENABLE_CAP", f"bad manual-protect flags {argv[0]:#x}")
            self.manual_protect = argv[0]
        else:
            raise KvmError(errno.EINVAL, "KVM_ENABLE_CAP", f"capability {cap} cannot be enabled")

    def _enable_ring(self, cap: int, size: int) -> None:
        # kvm_vm_ioctl_enable_dirty_log_ring, in the kernel's order.
        rsvd = DIRTY_RING_RSVD_ENTRIES + self.cpu_dirty_log_size
        if size == 0 or size & (size - 1):
            raise KvmError(errno.EINVAL, "KVM_ENABLE_CAP", f"ring size {size} is not a power of two")
        if size < rsvd * DIRTY_GFN_SIZE or size < PAGE_SIZE:
            raise KvmError(errno.EINVAL, "KVM_ENABLE_CAP", f"ring size {size} below the reserve or a page")
        if size > DIRTY_RING_MAX_ENTRIES * DIRTY_GFN_SIZE:
            raise KvmError(errno.E2BIG, "KVM_ENABLE_CAP", f"ring size {size} above 1 MiB")
        if self.design is not None:
            raise KvmError(errno.EINVAL, "KVM_ENABLE_CAP",
                           f"design {self.design_name!r} has its own dirty log")
        with self._kvm_lock:
            # Checked and set under kvm->lock, so no vCPU is created meanwhile.
            if self.dirty_ring_size:
                raise KvmError(errno.EINVAL, "KVM_ENABLE_CAP", "the dirty ring is already enabled")
            if self._vcpus:
                raise KvmError(errno.EINVAL, "KVM_ENABLE_CAP", "vCPUs already exist")
            # One step.  Slots created from now on get no bitmap (kvm_use_dirty_bitmap()
            # is false); vCPU writes go to the rings (mark_page_dirty_in_slot).
            self.dirty_ring_size, self.dirty_ring_acq_rel = size, cap == _uapi.CAP_DIRTY_LOG_RING_ACQ_REL

    def enable_dirty_ring(self, entries: int, *, acq_rel: bool = True) -> None:
        """Enable per-vCPU dirty rings of ``entries`` entries (KVM_CAP_DIRTY_LOG_RING[_ACQ_REL])."""
        entries = validate.u64(entries, "entries")
        cap = _uapi.CAP_DIRTY_LOG_RING_ACQ_REL if acq_rel else _uapi.CAP_DIRTY_LOG_RING
        self.enable_cap(cap, min(entries * DIRTY_GFN_SIZE, validate.U64_MAX))

    def enable_manual_protect(self, initially_set: bool = False) -> None:
        """KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with ENABLE (and INITIALLY_SET)."""
        self.enable_cap(_uapi.CAP_MANUAL_DIRTY_LOG_PROTECT2,
                        MANUAL_PROTECT_ENABLE | (INITIALLY_SET if initially_set else 0))

    @property
    def uses_bitmap(self) -> bool:
        """kvm_use_dirty_bitmap(): false for a ring-only VM."""
        return self.dirty_ring_size == 0

    # -- memslots ---------------------------------------------------------
    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               flags: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION: create, move, change flags, or delete (size 0) a slot.

        The simulator allocates the slot's memory itself (no userspace_addr);
        a moved or re-flagged slot keeps its memory, as the same mapping would.
        """
        ioctl = "KVM_SET_USER_MEMORY_REGION"
        self._check_open(ioctl)
        slot, gpa, size, flags, npages = validate.memory_region(
            slot, guest_phys_addr, memory_size, flags, self.address_spaces, ioctl)
        base = gpa >> PAGE_SHIFT
        with self._slots_mutex:
            # kvm->slots_lock: the checks below and the change are one critical section.
            old = self.mmu.slots.get(slot)
            if size == 0:
                if old is None:
                    raise KvmError(errno.EINVAL, ioctl, f"slot {slot:#x} does not exist")
                self._commit(lambda: self.mmu.delete_slot(slot))
                return
            if old is not None:
                if npages != old.npages or (flags ^ old.flags) & _uapi.MEM_READONLY:
                    raise KvmError(errno.EINVAL, ioctl, "an existing slot can only move or change flags")
                if base == old.base_gfn and flags == old.flags:
                    return
            moved = old is not None and base != old.base_gfn
            if (old is None or moved) and self.mmu.overlaps(slot, base, npages):
                raise KvmError(errno.EEXIST, ioctl, "the range overlaps another slot")
            if old is None:
                writable = np.zeros(max(1, (npages + 63) >> 6), np.uint64)
                values = np.zeros(max(1, npages), np.uint64)
            else:
                writable, values = old.writable, old.values
            logging = bool(flags & MEM_LOG_DIRTY_PAGES)
            new = MemSlot(slot, base, npages, flags, writable, values,
                          self._dirty_log_for(npages, logging, old))
            # kvm_mmu_slot_apply_flags: logging turned on write-protects the slot
            # (not with INITIALLY_SET: every bit starts set, nothing is protected yet).
            protect = logging and not (old is not None and old.logging) and not self._initially_set()
            self._commit(lambda: self.mmu.set_slot(new, protect, moved))

    def _commit(self, change) -> None:
        # The compiled change, with the design told under the same write lock.
        if self.design is None:
            change()
            return
        with self.mmu.slots_lock.write():
            change()
            self.design.slots_changed()

    def _initially_set(self) -> bool:
        return self.manual_protect & MANUAL_CAPS == MANUAL_CAPS

    def _dirty_log_for(self, npages: int, logging: bool, old: Optional[MemSlot]) -> Optional[np.ndarray]:
        # kvm_prepare_memory_region: keep, allocate or drop the dirty bitmap.
        if not logging:
            return None
        if old is not None and old.dirty is not None:
            return old.dirty
        if not self.uses_bitmap:
            return None
        dirty = np.zeros((npages + 63) >> 6, np.uint64)
        if self._initially_set():
            dirty[:] = ~np.uint64(0)
            if npages & 63:
                dirty[-1] = np.uint64((1 << (npages & 63)) - 1)
        return dirty

    def slot_info(self, slot: int) -> MemSlot:
        s = self.mmu.slots.get(validate.u32(slot, "slot"))
        if s is None:
            raise KvmError(errno.ENOENT, "slot_info", f"slot {slot:#x} does not exist")
        return s

    def memory(self, slot: int) -> np.ndarray:
        """Read-only view of the slot's guest memory: the u64 value of each page."""
        self._check_open("memory")
        s = self.slot_info(validate.u32(slot, "slot"))
        view = s.values[: s.npages].view()
        view.flags.writeable = False
        return view

    def gfn_of(self, slot: int, offset: int) -> int:
        return self.slot_info(validate.u32(slot, "slot")).base_gfn + validate.u64(offset, "offset")

    # -- vCPUs ------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """KVM_CREATE_VCPU."""
        ioctl = "KVM_CREATE_VCPU"
        self._check_open(ioctl)
        vcpu_id = validate.u32(vcpu_id, "vcpu_id")
        with self._kvm_lock:
            # kvm->lock: the id and count checks, the ring decision and the creation are one step.
            if vcpu_id >= self.max_vcpu_ids:
                raise KvmError(errno.EINVAL, ioctl, f"vcpu id {vcpu_id} >= {self.max_vcpu_ids}")
            if len(self._vcpus) >= self.max_vcpus:
                raise KvmError(errno.EINVAL, ioctl, "too many vCPUs")
            if vcpu_id in self._vcpus:
                raise KvmError(errno.EEXIST, ioctl, f"vcpu {vcpu_id} exists")
            ring = None
            if self.dirty_ring_size:
                from ._ring import DirtyRing
                ring = DirtyRing(self.dirty_ring_size // DIRTY_GFN_SIZE,
                                 cpu_dirty_log_size=self.cpu_dirty_log_size)
            vcpu = self.mmu.add_vcpu(vcpu_id, ring, self._vcpus,
                                     lambda core: Vcpu(self, vcpu_id, core, ring))
            if self.design is not None:
                self.design.vcpu_created(vcpu_id)
        return vcpu

    # -- the bitmap ioctls ----------------------------------------------
    def _logged_slot(self, slot: int, ioctl: str, first_page: Optional[int] = None) -> MemSlot:
        if not self.uses_bitmap or self.design is not None:
            raise KvmError(errno.ENXIO, ioctl, "this VM does not log into KVM's dirty bitmaps")
        validate.split_slot(slot, ioctl, self.address_spaces)
        if first_page is not None and first_page & 63:
            raise KvmError(errno.EINVAL, ioctl, "first_page is not a multiple of 64")
        s = self.mmu.slots.get(slot)
        if s is None or s.dirty is None:
            raise KvmError(errno.ENOENT, ioctl, f"slot {slot:#x} does not exist or is not logging")
        return s

    def get_dirty_log(self, slot: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        """KVM_GET_DIRTY_LOG: the slot's dirty bitmap (uint64 words).

        Without manual protect the bitmap is harvested: each dirty word is
        exchanged with 0, its pages write-protected, TLBs flushed if any.
        With manual protect the live bitmap is copied unchanged.

        ``out``: as KVM writes into the buffer its caller passes, a
        caller-owned uint64 array (1-D, C-contiguous, writable) to fill and
        return instead of a new array; reuse it from call to call.  Its type
        is checked before anything else (TypeError / ValueError); one shorter
        than the slot's ceil(npages / 64) words fails with EFAULT after the
        kernel's own checks, taking nothing.  A longer one gets the bitmap in
        its first words and the view of them is returned.

        The whole call is compiled (checks, locks, harvest, flush); once a
        bit is taken nothing can fail.
        """
        mode = (_LOG_NONE if self.dirty_ring_size or self.design is not None
                else _LOG_COPY if self.manual_protect else _LOG_HARVEST)
        return self.mmu.get_dirty_log(slot, out, mode, self.address_spaces, self._slots_mutex)

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap) -> int:
        """KVM_CLEAR_DIRTY_LOG: clear and re-protect the pages set in ``bitmap``.

        ``bitmap`` holds ceil(num_pages / 64) uint64 words for pages from
        first_page on.  Returns the number of pages really cleared (the kernel
        returns 0; this is extra information).
        """
        ioctl = "KVM_CLEAR_DIRTY_LOG"
        self._check_open(ioctl)
        slot = validate.u32(slot, "slot")
        first_page = validate.u64(first_page, "first_page")
        num_pages = validate.u32(num_pages, "num_pages")
        words = validate.bitmap_words(bitmap)
        with self._slots_mutex, self.mmu.slots_lock.read():
            cleared = self._clear_dirty_log_locked(slot, first_page, num_pages, words, ioctl)
        return cleared

    def _clear_dirty_log_locked(self, slot: int, first_page: int, num_pages: int,
                                words: np.ndarray, ioctl: str) -> int:
        s = self._logged_slot(slot, ioctl, first_page)
        rest = s.npages - first_page
        if first_page > s.npages or num_pages > rest or (num_pages < rest and num_pages & 63):
            raise KvmError(errno.EINVAL, ioctl, "the range is not inside the slot")
        n = (num_pages + 63) >> 6
        if len(words) < n:
            raise KvmError(errno.EFAULT, ioctl, f"bitmap has {len(words)} words, {n} needed")
        if n == 0:
            return 0
        if _mmu.FAULT_FLUSH_BEFORE_PROTECT & self.mmu.faults:
            self.mmu.flush_remote_tlbs()
            return _bitmap.clear_masked(s.dirty, words[:n], first_page >> 6, None,
                                        self.mmu, slot=slot)
        try:
            cleared = _bitmap.clear_masked(s.dirty, words[:n], first_page >> 6, None,
                                           self.mmu, slot=slot)
        finally:
            # A clear that re-protected anything flushes, even if it then failed.
            self.mmu.flush_remote_tlbs()
        return cleared

    # -- the ring ioctl -------------------------------------------------
    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: re-protect and free every harvested ring entry; returns the count.

        Serialised under kvm->slots_lock as in KVM.  If a ring fails part-way
        (closed by the user, reset by another thread through its own API), the
        TLBs are still flushed before the error propagates: entries reset
        before it were re-protected, and a stale writable TLB entry would
        let the next write to such a page go unlogged.
        """
        ioctl = "KVM_RESET_DIRTY_RINGS"
        self._check_open(ioctl)
        if not self.dirty_ring_size:
            raise KvmError(errno.EINVAL, ioctl, "no dirty ring")
        sink = None if _mmu.FAULT_SKIP_RESET_PROTECT & self.mmu.faults else self.mmu
        with self._slots_mutex, self.mmu.slots_lock.read():
            cleared = self._reset_rings_locked(sink)
        return cleared

    def _reset_rings_locked(self, sink) -> int:
        cleared = 0
        failed = True
        try:
            for v in tuple(self._vcpus.values()):
                cleared += v._ring.reset(sink)
            failed = False
        finally:
            if cleared or failed:
                self.mmu.flush_remote_tlbs()
        return cleared

    # -- host-side writes ---------------------------------------------
    def write_guest(self, gfns, value: int) -> int:
        """Write guest memory from the host (kvm_write_guest): no vCPU is running.

        Logged through the slot's bitmap (or the design's per-VM log); a
        ring-only VM cannot log them.  Returns the number of pages written.
        """
        self._check_open("write_guest")
        plan = validate.plan(gfns)
        value = validate.u64(value, "value")
        return self.mmu.host_write(plan, value)

    @property
    def stats(self) -> dict:
        """MMU and summed vCPU counters, read in one compiled step (safe while vCPUs are created)."""
        return self.mmu.stats

    def __repr__(self) -> str:
        mode = "ring" if self.dirty_ring_size else "bitmap"
        return (f"VM(design={self.design_name!r}, mode={mode}, slots={len(self.mmu.slots)}, "
                f"vcpus={len(self._vcpus)}{', closed' if self.closed else ''})")
