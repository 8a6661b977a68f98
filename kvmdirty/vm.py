"""VM, Vcpu: the KVM-shaped API over the simulated kernel.

Each method is one KVM ioctl with the kernel's rules and errno precedence
(see KVM_SEMANTICS.md); the work is done by the compiled core: kvmdirty._mmu
(page tables, guest write loop, TLB flush), kvmdirty._bitmap (harvest/clear
kernels) and kvmdirty._ring (dirty rings).  Every check runs before any state
changes, so a failed call leaves the VM as it was.
"""
from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

from . import _bitmap, _mmu, _uapi
from .api import PAGE_SHIFT, PAGE_SIZE, Exit, as_plan
from .errors import KvmError
from .limits import (ADDRESS_SPACES, DIRTY_GFN_SIZE, DIRTY_RING_MAX_ENTRIES,
                     DIRTY_RING_RSVD_ENTRIES, MAX_VCPU_IDS, MAX_VCPUS, MEM_MAX_NR_PAGES,
                     PML_LOG_SIZE, USER_MEM_SLOTS, split_slot, u64)
from .slotlock import SlotLock

MEM_LOG_DIRTY_PAGES = _uapi.MEM_LOG_DIRTY_PAGES
MANUAL_PROTECT_ENABLE = _uapi.DIRTY_LOG_MANUAL_PROTECT_ENABLE
INITIALLY_SET = _uapi.DIRTY_LOG_INITIALLY_SET
MANUAL_CAPS = MANUAL_PROTECT_ENABLE | INITIALLY_SET
RING_CAPS = (_uapi.CAP_DIRTY_LOG_RING, _uapi.CAP_DIRTY_LOG_RING_ACQ_REL)

#: Faults that can be switched on in the simulated kernel (see kvmdirty._mmu).
FAULTS = {
    "skip-flush": _mmu.FAULT_SKIP_FLUSH,
    "flush-before-protect": _mmu.FAULT_FLUSH_BEFORE_PROTECT,
    "no-flush-wait": _mmu.FAULT_NO_FLUSH_WAIT,
    "unlogged-fault": _mmu.FAULT_UNLOGGED_FAULT,
    "skip-reset-protect": _mmu.FAULT_SKIP_RESET_PROTECT,
}


@dataclass
class MemSlot:
    """One memslot: KVM's struct kvm_memory_slot, plus the memory we model."""

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




def _values(value, n: int):
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return u64(int(value), "value")
    a = np.asarray(value)
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"value must be an int or a 1-D array of {n} values")
    if a.size and a.dtype.kind not in "ui":
        raise TypeError(f"values must be integers, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.uint64)


class Vcpu:
    """A simulated vCPU: runs write plans (guest programs) in the write loop."""

    def __init__(self, vm: "VM", vcpu_id: int, core) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.core = core
        self._ring = None
        self._gfns: Optional[np.ndarray] = None
        self._vals = 0
        self._pos = 0
        self._lock = threading.Lock()

    @property
    def dirty_ring(self):
        """The user view of this vCPU's dirty ring (a kvmdirty._ring.DirtyRing), or None."""
        return self._ring

    @property
    def remaining(self) -> int:
        return 0 if self._gfns is None else len(self._gfns) - self._pos

    def run(self, gfns=None, value=None, *, max_writes: Optional[int] = None) -> Exit:
        """KVM_RUN: execute a write plan (or resume the current one).

        ``gfns``: guest frame numbers to write, in order; ``value``: the u64 to
        write (one int, or one per write).  ``max_writes`` bounds this call
        (deterministic schedules); the exit is then EXIT_BUDGET.  A run that
        stops early (DIRTY_RING_FULL, budget) resumes with ``run()``.
        """
        self.vm._check_open("KVM_RUN")
        if gfns is not None:
            plan = as_plan(gfns)
            vals = _values(0 if value is None else value, len(plan))
        elif value is not None:
            raise ValueError("value given without gfns")
        budget = 0
        if max_writes is not None:
            if not isinstance(max_writes, (int, np.integer)) or max_writes < 1:
                raise ValueError("max_writes must be a positive int")
            budget = int(max_writes)
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(f"vCPU {self.id} is already running in another thread")
        try:
            if gfns is not None:
                self._gfns, self._vals, self._pos = plan, vals, 0
            if self._gfns is None:
                self._gfns, self._vals, self._pos = np.zeros(0, np.uint64), 0, 0
            with self.vm._slots_lock.read():
                reason, done = self.core.run(self._gfns, self._vals, self._pos, budget)
            self._pos += done
            return Exit(reason, done, len(self._gfns) - self._pos)
        finally:
            self._lock.release()

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
            if not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {v!r}")
        self.address_spaces, self.max_vcpus, self.max_vcpu_ids = address_spaces, max_vcpus, max_vcpu_ids
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
        self.slots: Dict[int, MemSlot] = {}
        self.vcpus: Dict[int, Vcpu] = {}
        self.dirty_ring_size = 0          # bytes, 0 = no ring
        self.dirty_ring_acq_rel = False
        self.manual_protect = 0           # KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 flags
        self._slots_lock = SlotLock()
        self._closed = False
        self.design_name = design
        self.design = None
        if design != "kvm":
            from .seeds import create_design
            self.design = create_design(design, self, **(design_options or {}))
        elif design_options:
            raise ValueError("design_options are for the seed-era designs only")

    # -- lifetime -------------------------------------------------------
    def _check_open(self, ioctl: str) -> None:
        if self._closed:
            raise KvmError(errno.EBADF, ioctl, "the VM is closed")

    def close(self) -> None:
        """Destroy the VM; later calls fail with EBADF.  Views handed out stay valid."""
        if self._closed:
            return
        with self._slots_lock.write():
            self._closed = True

    @property
    def slots_lock(self) -> SlotLock:
        """Readers (runs, harvests) vs writers (memslot / vCPU changes); see slotlock.py."""
        return self._slots_lock

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "VM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- capabilities ---------------------------------------------------
    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd: 0 = unsupported, else a cap-specific value."""
        self._check_open("KVM_CHECK_EXTENSION")
        cap = u64(cap, "cap")
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
        cap = u64(cap, "cap")
        if len(args) > 4:
            raise ValueError("kvm_enable_cap has 4 args")
        argv = [u64(a, "arg") for a in args] + [0] * (4 - len(args))
        flags = u64(flags, "flags")
        if cap in RING_CAPS:
            self._enable_ring(cap, argv[0])
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
        if self.dirty_ring_size:
            raise KvmError(errno.EINVAL, "KVM_ENABLE_CAP", "the dirty ring is already enabled")
        if self.vcpus:
            raise KvmError(errno.EINVAL, "KVM_ENABLE_CAP", "vCPUs already exist")
        if self.design is not None:
            raise KvmError(errno.EINVAL, "KVM_ENABLE_CAP",
                           f"design {self.design_name!r} has its own dirty log")
        self.dirty_ring_size = size
        self.dirty_ring_acq_rel = cap == _uapi.CAP_DIRTY_LOG_RING_ACQ_REL
        with self._slots_lock.write():
            # Ring-only VMs keep no bitmaps (kvm_use_dirty_bitmap() is false).
            for s in self.slots.values():
                s.dirty = None
            self._install_slots()

    def enable_dirty_ring(self, entries: int, *, acq_rel: bool = True) -> None:
        """Enable per-vCPU dirty rings of ``entries`` entries (KVM_CAP_DIRTY_LOG_RING[_ACQ_REL])."""
        entries = u64(entries, "entries")
        cap = _uapi.CAP_DIRTY_LOG_RING_ACQ_REL if acq_rel else _uapi.CAP_DIRTY_LOG_RING
        self.enable_cap(cap, min(entries * DIRTY_GFN_SIZE, (1 << 64) - 1))

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
        slot = u64(slot, "slot")
        gpa = u64(guest_phys_addr, "guest_phys_addr")
        size = u64(memory_size, "memory_size")
        flags = u64(flags, "flags")
        if slot > 0xFFFFFFFF:
            raise ValueError(f"slot {slot} does not fit in a u32")
        if flags > 0xFFFFFFFF:
            raise ValueError(f"flags {flags:#x} do not fit in a u32")
        # kvm_vm_ioctl_set_memory_region, then __kvm_set_memory_region, in order.
        if (slot & 0xFFFF) >= USER_MEM_SLOTS:
            raise KvmError(errno.EINVAL, ioctl, f"slot id {slot & 0xFFFF} >= {USER_MEM_SLOTS}")
        if flags & ~(MEM_LOG_DIRTY_PAGES | _uapi.MEM_READONLY):
            raise KvmError(errno.EINVAL, ioctl, f"unsupported flags {flags:#x}")
        if size & (PAGE_SIZE - 1):
            raise KvmError(errno.EINVAL, ioctl, "memory_size is not page aligned")
        if gpa & (PAGE_SIZE - 1):
            raise KvmError(errno.EINVAL, ioctl, "guest_phys_addr is not page aligned")
        if (slot >> 16) >= self.address_spaces:
            raise KvmError(errno.EINVAL, ioctl, f"address space {slot >> 16} out of range")
        if gpa + size >= 1 << 64:
            raise KvmError(errno.EINVAL, ioctl, "guest_phys_addr + memory_size overflows")
        npages = size >> PAGE_SHIFT
        if npages > MEM_MAX_NR_PAGES:
            raise KvmError(errno.EINVAL, ioctl, f"{npages} pages is more than a slot may have")
        old = self.slots.get(slot)
        base = gpa >> PAGE_SHIFT
        if size == 0:
            if old is None:
                raise KvmError(errno.EINVAL, ioctl, f"slot {slot:#x} does not exist")
            with self._slots_lock.write():
                del self.slots[slot]
                self._install_slots()
            return
        if old is not None:
            if npages != old.npages or (flags ^ old.flags) & _uapi.MEM_READONLY:
                raise KvmError(errno.EINVAL, ioctl, "an existing slot can only move or change flags")
            if base == old.base_gfn and flags == old.flags:
                return
        if (old is None or base != old.base_gfn) and self._overlaps(slot, base, npages):
            raise KvmError(errno.EEXIST, ioctl, "the range overlaps another slot")
        with self._slots_lock.write():
            if old is None:
                new = MemSlot(slot, base, npages, flags,
                              np.zeros(max(1, (npages + 63) >> 6), np.uint64),
                              np.zeros(max(1, npages), np.uint64), None)
            else:
                new = MemSlot(slot, base, npages, flags, old.writable, old.values, old.dirty)
                if base != old.base_gfn:
                    new.writable[:] = 0     # MOVE zaps the old SPTEs
            self._prepare_dirty_log(new, old)
            self.slots[slot] = new
            self._install_slots()
            if new.logging and not (old is not None and old.logging) and not self._initially_set():
                # kvm_mmu_slot_apply_flags: logging on write-protects the slot.
                self.mmu.write_protect_slot(slot)

    def _initially_set(self) -> bool:
        return self.manual_protect & MANUAL_CAPS == MANUAL_CAPS

    def _prepare_dirty_log(self, new: MemSlot, old: Optional[MemSlot]) -> None:
        # kvm_prepare_memory_region: keep, allocate or drop the dirty bitmap.
        if not new.logging:
            new.dirty = None
        elif old is not None and old.dirty is not None:
            new.dirty = old.dirty
        elif self.uses_bitmap:
            new.dirty = np.zeros(new.nwords, np.uint64)
            if self._initially_set():
                new.dirty[:] = ~np.uint64(0)
                if new.npages & 63:
                    new.dirty[-1] = np.uint64((1 << (new.npages & 63)) - 1)
        else:
            new.dirty = None

    def _overlaps(self, slot: int, base: int, npages: int) -> bool:
        for s in self.slots.values():
            if s.slot != slot and s.slot >> 16 == slot >> 16 and \
                    base < s.base_gfn + s.npages and s.base_gfn < base + npages:
                return True
        return False

    def _install_slots(self) -> None:
        # The simulated guest never runs in SMM: address space 1 slots are
        # logged and harvested like any other, but no guest write reaches them.
        rows = [s.row() for s in self.slots.values()]
        self.mmu.set_slots(rows)
        if self.design is not None:
            self.design.slots_changed()

    def slot_info(self, slot: int) -> MemSlot:
        s = self.slots.get(slot)
        if s is None:
            raise KvmError(errno.ENOENT, "slot_info", f"slot {slot:#x} does not exist")
        return s

    def memory(self, slot: int) -> np.ndarray:
        """Read-only view of the slot's guest memory: the u64 value of each page."""
        self._check_open("memory")
        s = self.slot_info(slot)
        view = s.values[: s.npages].view()
        view.flags.writeable = False
        return view

    def gfn_of(self, slot: int, offset: int) -> int:
        return self.slot_info(slot).base_gfn + offset

    # -- vCPUs ------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """KVM_CREATE_VCPU."""
        ioctl = "KVM_CREATE_VCPU"
        self._check_open(ioctl)
        vcpu_id = u64(vcpu_id, "vcpu_id")
        if vcpu_id >= self.max_vcpu_ids:
            raise KvmError(errno.EINVAL, ioctl, f"vcpu id {vcpu_id} >= {self.max_vcpu_ids}")
        if len(self.vcpus) >= self.max_vcpus:
            raise KvmError(errno.EINVAL, ioctl, "too many vCPUs")
        if vcpu_id in self.vcpus:
            raise KvmError(errno.EEXIST, ioctl, f"vcpu {vcpu_id} exists")
        ring = None
        if self.dirty_ring_size:
            from ._ring import DirtyRing
            ring = DirtyRing(self.dirty_ring_size // DIRTY_GFN_SIZE,
                             cpu_dirty_log_size=self.cpu_dirty_log_size)
        with self._slots_lock.write():
            core = self.mmu.new_vcpu(vcpu_id)
            vcpu = Vcpu(self, vcpu_id, core)
            if ring is not None:
                core.attach_ring(ring)
                vcpu._ring = ring
            self.vcpus[vcpu_id] = vcpu
        if self.design is not None:
            self.design.vcpu_created(vcpu_id)
        return vcpu

    # -- the bitmap ioctls ----------------------------------------------
    def _logged_slot(self, slot: int, ioctl: str, first_page: Optional[int] = None) -> MemSlot:
        if not self.uses_bitmap or self.design is not None:
            raise KvmError(errno.ENXIO, ioctl, "this VM does not log into KVM's dirty bitmaps")
        split_slot(slot, ioctl, self.address_spaces)
        if first_page is not None and first_page & 63:
            raise KvmError(errno.EINVAL, ioctl, "first_page is not a multiple of 64")
        s = self.slots.get(slot)
        if s is None or s.dirty is None:
            raise KvmError(errno.ENOENT, ioctl, f"slot {slot:#x} does not exist or is not logging")
        return s

    def get_dirty_log(self, slot: int) -> np.ndarray:
        """KVM_GET_DIRTY_LOG: the slot's dirty bitmap (uint64 words).

        Without manual protect the bitmap is harvested: each dirty word is
        exchanged with 0, its pages write-protected, TLBs flushed if any.
        With manual protect the live bitmap is copied unchanged.
        """
        ioctl = "KVM_GET_DIRTY_LOG"
        self._check_open(ioctl)
        with self._slots_lock.read():
            s = self._logged_slot(slot, ioctl)
            if self.manual_protect:
                return _bitmap.copy_live(s.dirty[: s.nwords])
            snap = np.zeros(s.nwords, np.uint64)
            if s.nwords == 0:
                return snap
            if _mmu.FAULT_FLUSH_BEFORE_PROTECT & self.mmu.faults:
                self.mmu.flush_remote_tlbs()
                _bitmap.harvest(s.dirty, snap, self.mmu, zeroed=True, slot=slot)
            elif _bitmap.harvest(s.dirty, snap, self.mmu, zeroed=True, slot=slot):
                self.mmu.flush_remote_tlbs()
            return snap

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap) -> int:
        """KVM_CLEAR_DIRTY_LOG: clear and re-protect the pages set in ``bitmap``.

        ``bitmap`` holds ceil(num_pages / 64) uint64 words for pages from
        first_page on.  Returns the number of pages really cleared (the kernel
        returns 0; this is extra information).
        """
        ioctl = "KVM_CLEAR_DIRTY_LOG"
        self._check_open(ioctl)
        first_page = u64(first_page, "first_page")
        num_pages = u64(num_pages, "num_pages")
        if num_pages > 0xFFFFFFFF:
            raise ValueError("num_pages does not fit in a u32")
        words = np.asarray(bitmap)
        if words.size and words.dtype.kind not in "ui":
            raise TypeError(f"bitmap must hold uint64 words, got dtype {words.dtype}")
        if words.ndim != 1:
            raise ValueError("bitmap must be one-dimensional")
        words = np.ascontiguousarray(words, dtype=np.uint64)
        with self._slots_lock.read():
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
            cleared = _bitmap.clear_masked(s.dirty, words[:n], first_page >> 6, None,
                                           self.mmu, slot=slot)
            if cleared:
                self.mmu.flush_remote_tlbs()
            return cleared

    # -- the ring ioctl -------------------------------------------------
    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: re-protect and free every harvested ring entry; returns the count."""
        ioctl = "KVM_RESET_DIRTY_RINGS"
        self._check_open(ioctl)
        if not self.dirty_ring_size:
            raise KvmError(errno.EINVAL, ioctl, "no dirty ring")
        sink = None if _mmu.FAULT_SKIP_RESET_PROTECT & self.mmu.faults else self.mmu
        with self._slots_lock.read():
            cleared = 0
            for v in self.vcpus.values():
                cleared += v._ring.reset(sink)
            if cleared:
                self.mmu.flush_remote_tlbs()
        return cleared

    # -- host-side writes ---------------------------------------------
    def write_guest(self, gfns, value: int) -> int:
        """Write guest memory from the host (kvm_write_guest): no vCPU is running.

        Logged through the slot's bitmap (or the design's per-VM log); a
        ring-only VM cannot log them.  Returns the number of pages written.
        """
        self._check_open("write_guest")
        plan = as_plan(gfns)
        value = u64(int(value), "value")
        with self._slots_lock.read():
            return self.mmu.host_write(plan, value)

    @property
    def stats(self) -> dict:
        out = dict(self.mmu.stats)
        for v in self.vcpus.values():
            for k, n in v.core.stats.items():
                out[k] = out.get(k, 0) + n
        return out

    def __repr__(self) -> str:
        mode = "ring" if self.dirty_ring_size else "bitmap"
        return (f"VM(design={self.design_name!r}, mode={mode}, slots={len(self.slots)}, "
                f"vcpus={len(self.vcpus)}{', closed' if self._closed else ''})")
