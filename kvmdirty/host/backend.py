"""HostVM / HostVcpu: the KVM-shaped API over the host kernel's own write tracking.

Guest memory is a real anonymous mapping in this process; a vCPU is the
calling thread storing into it from a C loop with the GIL released (so vCPUs
in threads run truly in parallel); ``get_dirty_log`` is the host kernel's
harvest (kvmdirty.host.tracker: PAGEMAP_SCAN re-protecting in the same walk).
Same methods, exits and errno as the simulator (kvmdirty.VM) and real KVM:
errors are checked in the simulator's order, before anything changes.

What the host kernel has no equivalent for is absent and refused as a kernel
without it refuses it: there is no dirty ring (``check_extension`` answers 0;
enabling it fails with EINVAL, as KVM_ENABLE_CAP does for a ring the kernel
cannot give; KVM_RESET_DIRTY_RINGS fails with EINVAL as on a VM without a
ring), and manual protect is offered without INITIALLY_SET (a write-protect
log cannot start with every page reported).
"""
from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

from .. import _host, _kvm, _mmu, _uapi, validate
from ..api import EXIT_BUDGET, EXIT_HLT, PAGE_SHIFT, PAGE_SIZE, Exit
from ..errors import KvmError
from ..limits import ADDRESS_SPACES, MAX_VCPU_IDS, MAX_VCPUS, USER_MEM_SLOTS
from ..validate import split_slot, u64
from .tracker import Tracker, require_host

LOG = _uapi.MEM_LOG_DIRTY_PAGES
READONLY = _uapi.MEM_READONLY
MANUAL_PROTECT_ENABLE = _uapi.DIRTY_LOG_MANUAL_PROTECT_ENABLE
RING_CAPS = (_uapi.CAP_DIRTY_LOG_RING, _uapi.CAP_DIRTY_LOG_RING_ACQ_REL)
_REASONS = {0: EXIT_HLT, 1: _uapi.EXIT_MMIO, 2: EXIT_BUDGET}


@dataclass
class HostSlot:
    """One memslot: its place in guest-physical space, its memory, its write log."""

    slot: int
    base_gfn: int
    npages: int
    flags: int
    mapping: _kvm.Mapping
    tracker: Optional[Tracker]      # None when not logging

    @property
    def nwords(self) -> int:
        return (self.npages + 63) >> 6


class HostVcpu:
    """A host vCPU: the calling thread, storing the plan's values into guest memory."""

    def __init__(self, vm: "HostVM", vcpu_id: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self._gfns: Optional[np.ndarray] = None
        self._vals = 0
        self._pos = 0
        self._lock = threading.Lock()

    @property
    def dirty_ring(self) -> None:
        """Always None: the host kernel has no dirty ring."""
        return None

    @property
    def remaining(self) -> int:
        return 0 if self._gfns is None else len(self._gfns) - self._pos

    def run(self, gfns=None, value=None, *, max_writes: Optional[int] = None) -> Exit:
        """KVM_RUN: store ``value`` (one int, or one per write) to each page of ``gfns``, in order.

        A gfn outside every slot, or in a read-only slot, exits with
        EXIT_MMIO (the write is retired with the exit); ``max_writes`` bounds
        the call (EXIT_BUDGET); ``run()`` resumes where it stopped.
        """
        self.vm._check_open("KVM_RUN")
        if gfns is not None:
            plan = validate.plan(gfns)
            vals = validate.values(0 if value is None else value, len(plan))
        elif value is not None:
            raise ValueError("value given without gfns")
        budget = validate.budget(max_writes)
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(f"vCPU {self.id} is already running in another thread")
        try:
            if gfns is not None:
                self._gfns, self._vals, self._pos = plan, vals, 0
            if self._gfns is None:
                self._gfns, self._vals, self._pos = np.zeros(0, np.uint64), 0, 0
            with self.vm._slots_lock.read():
                self.vm._check_open("KVM_RUN")
                t = self.vm._table
                reason, done = _host.store_loop(t[0], t[1], t[2], t[3], self._gfns, self._vals,
                                                self._pos, budget)
            self._pos += done
            return Exit(_REASONS[reason], done, len(self._gfns) - self._pos)
        finally:
            self._lock.release()

    def close(self) -> None:
        """vCPUs live as long as their VM (as in KVM); nothing to do here."""

    def __repr__(self) -> str:
        return f"HostVcpu(id={self.id}, remaining={self.remaining})"


class HostVM:
    """A VM whose dirty log is kept by the host kernel (see the module docstring).

    Raises kvmdirty.host.HostTrackingUnsupported (one line saying why) where
    userfaultfd-wp + PAGEMAP_SCAN cannot be used.
    """

    def __init__(self, *, address_spaces: int = ADDRESS_SPACES, max_vcpus: int = MAX_VCPUS,
                 max_vcpu_ids: int = MAX_VCPU_IDS) -> None:
        require_host()
        for name, v, lo, hi in (("address_spaces", address_spaces, 1, 2),
                                ("max_vcpus", max_vcpus, 1, 1 << 16),
                                ("max_vcpu_ids", max_vcpu_ids, 1, 1 << 20)):
            if not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {v!r}")
        self.address_spaces, self.max_vcpus, self.max_vcpu_ids = address_spaces, max_vcpus, max_vcpu_ids
        self.slots: Dict[int, HostSlot] = {}
        self.vcpus: Dict[int, HostVcpu] = {}
        self.manual_protect = 0
        # The compiled, interrupt-safe memslot lock lives in an Mmu (its page
        # tables stay empty here: the host kernel keeps the real ones).
        self._lock_owner = _mmu.Mmu()
        self._slots_lock = self._lock_owner.slots_lock
        self._closed = False
        self._table = self._build_table()

    # -- lifetime -------------------------------------------------------
    def _check_open(self, ioctl: str) -> None:
        if self._closed:
            raise KvmError(errno.EBADF, ioctl, "the VM is closed")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Destroy the VM: trackers closed, memory unmapped once no view of it remains."""
        if self._closed:
            return
        with self._slots_lock.write():
            self._closed = True
            for s in self.slots.values():
                self._release(s)
            self.slots.clear()
            self._table = self._build_table()

    @staticmethod
    def _release(s: HostSlot) -> None:
        if s.tracker is not None:
            s.tracker.close()
        s.mapping.close()

    def __enter__(self) -> "HostVM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- capabilities -----------------------------------------------------
    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: no dirty ring; manual protect without INITIALLY_SET."""
        self._check_open("KVM_CHECK_EXTENSION")
        cap = u64(cap, "cap")
        return {
            _uapi.CAP_MANUAL_DIRTY_LOG_PROTECT2: MANUAL_PROTECT_ENABLE,
            _uapi.CAP_NR_MEMSLOTS: USER_MEM_SLOTS,
            _uapi.CAP_MAX_VCPUS: self.max_vcpus,
            _uapi.CAP_NR_VCPUS: min(os.cpu_count() or 1, self.max_vcpus),
            _uapi.CAP_MULTI_ADDRESS_SPACE: self.address_spaces,
        }.get(cap, 0)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP: MANUAL_DIRTY_LOG_PROTECT2 (ENABLE only); anything else is EINVAL."""
        self._check_open("KVM_ENABLE_CAP")
        cap = u64(cap, "cap")
        if len(args) > 4:
            raise ValueError("kvm_enable_cap has 4 args")
        argv = [u64(a, "arg") for a in args] + [0] * (4 - len(args))
        flags = u64(flags, "flags")
        if cap in RING_CAPS:
            raise KvmError(errno.EINVAL, "KVM_ENABLE_CAP", "the host kernel keeps no dirty ring")
        if cap == _uapi.CAP_MANUAL_DIRTY_LOG_PROTECT2:
            if flags or argv[0] & ~MANUAL_PROTECT_ENABLE:
                raise KvmError(errno.EINVAL, "KVM_ENABLE_CAP", f"unsupported manual-protect flags {argv[0]:#x}")
            self.manual_protect = argv[0]
            return
        raise KvmError(errno.EINVAL, "KVM_ENABLE_CAP", f"capability {cap} cannot be enabled")

    def enable_dirty_ring(self, entries: int, *, acq_rel: bool = True) -> None:
        """Refused with EINVAL: the host kernel has no dirty ring (check_extension says 0)."""
        entries = u64(entries, "entries")
        cap = _uapi.CAP_DIRTY_LOG_RING_ACQ_REL if acq_rel else _uapi.CAP_DIRTY_LOG_RING
        self.enable_cap(cap, min(entries * 16, (1 << 64) - 1))

    def enable_manual_protect(self, initially_set: bool = False) -> None:
        """KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2; INITIALLY_SET is not offered (EINVAL)."""
        self.enable_cap(_uapi.CAP_MANUAL_DIRTY_LOG_PROTECT2,
                        MANUAL_PROTECT_ENABLE | (_uapi.DIRTY_LOG_INITIALLY_SET if initially_set else 0))

    @property
    def uses_bitmap(self) -> bool:
        return True

    # -- memslots -----------------------------------------------------------
    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               flags: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION: create, move, re-flag or delete (size 0) a slot.

        The VM maps each slot's memory itself.  Turning logging on registers
        the slot with the host tracker and write-protects it; off, unregisters.
        """
        ioctl = "KVM_SET_USER_MEMORY_REGION"
        self._check_open(ioctl)
        slot, gpa, size, flags, npages = validate.memory_region(
            slot, guest_phys_addr, memory_size, flags, self.address_spaces, ioctl)
        old = self.slots.get(slot)
        base = gpa >> PAGE_SHIFT
        if size == 0:
            if old is None:
                raise KvmError(errno.EINVAL, ioctl, f"slot {slot:#x} does not exist")
            with self._slots_lock.write():
                del self.slots[slot]
                self._table = self._build_table()
                self._release(old)
            return
        if old is not None:
            if npages != old.npages or (flags ^ old.flags) & READONLY:
                raise KvmError(errno.EINVAL, ioctl, "an existing slot can only move or change flags")
            if base == old.base_gfn and flags == old.flags:
                return
        if (old is None or base != old.base_gfn) and self._overlaps(slot, base, npages):
            raise KvmError(errno.EEXIST, ioctl, "the range overlaps another slot")
        mapping = old.mapping if old is not None else _kvm.Mapping(size)
        tracker = old.tracker if old is not None else None
        fresh_tracker = None
        try:
            if flags & LOG and tracker is None:
                fresh_tracker = tracker = Tracker(mapping)    # registers and write-protects
        except BaseException:
            if old is None:
                mapping.close()
            raise
        with self._slots_lock.write():
            if not flags & LOG and tracker is not None:
                tracker.close()
                tracker = None
            self.slots[slot] = HostSlot(slot, base, npages, flags, mapping, tracker)
            self._table = self._build_table()
        del fresh_tracker

    def _overlaps(self, slot: int, base: int, npages: int) -> bool:
        for s in self.slots.values():
            if s.slot != slot and s.slot >> 16 == slot >> 16 and \
                    base < s.base_gfn + s.npages and s.base_gfn < base + npages:
                return True
        return False

    def _build_table(self):
        """The vCPUs' view of address space 0: (bases, npages, addresses, writable), by base."""
        rows = sorted((s.base_gfn, s.npages, s.mapping.address, 0 if s.flags & READONLY else 1)
                      for s in self.slots.values() if s.slot >> 16 == 0)
        cols = list(zip(*rows)) if rows else [(), (), (), ()]
        return (np.array(cols[0], np.uint64), np.array(cols[1], np.uint64),
                np.array(cols[2], np.uint64), np.array(cols[3], np.uint8))

    def memory(self, slot: int) -> np.ndarray:
        """Read-only uint64 view: the value of each page of the slot (its first 8 bytes)."""
        self._check_open("memory")
        s = self.slots.get(slot)
        if s is None:
            raise KvmError(errno.ENOENT, "memory", f"slot {slot:#x} does not exist")
        view = np.frombuffer(s.mapping, dtype=np.uint64)[:: PAGE_SIZE // 8]
        view.flags.writeable = False
        return view

    # -- vCPUs --------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int) -> HostVcpu:
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
        v = HostVcpu(self, vcpu_id)
        self.vcpus[vcpu_id] = v
        return v

    # -- the bitmap ioctls --------------------------------------------------
    def _logged_slot(self, slot: int, ioctl: str, first_page: Optional[int] = None) -> HostSlot:
        split_slot(slot, ioctl, self.address_spaces)
        if first_page is not None and first_page & 63:
            raise KvmError(errno.EINVAL, ioctl, "first_page is not a multiple of 64")
        s = self.slots.get(slot)
        if s is None or s.tracker is None:
            raise KvmError(errno.ENOENT, ioctl, f"slot {slot:#x} does not exist or is not logging")
        return s

    def get_dirty_log(self, slot: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        """KVM_GET_DIRTY_LOG: the host kernel's written pages of the slot, as uint64 words.

        Without manual protect they are write-protected again in the same
        PAGEMAP_SCAN walk; with it they stay reported until clear_dirty_log.
        ``out``: a caller-owned uint64 array to fill and return, as
        vm.VM.get_dirty_log takes it (EFAULT, taking nothing, when it is
        shorter than the slot's bitmap).
        """
        ioctl = "KVM_GET_DIRTY_LOG"
        self._check_open(ioctl)
        if out is not None:
            validate.out_words(out)
        with self._slots_lock.read():
            self._check_open(ioctl)
            s = self._logged_slot(slot, ioctl)
            need = (s.npages + 63) >> 6
            if out is not None and len(out) < need:
                raise KvmError(errno.EFAULT, ioctl, f"out has {len(out)} words, {need} needed")
            try:
                words = s.tracker.harvest(reprotect=not self.manual_protect)
            except OSError as e:
                raise KvmError(e.errno or errno.EIO, ioctl, str(e)) from e
            if out is None:
                return words
            # The copy cannot fail: out was checked above.
            dst = out if len(out) == need else out[:need]
            dst[:] = words[:need]
            return dst

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap) -> None:
        """KVM_CLEAR_DIRTY_LOG: write-protect again the pages set in ``bitmap`` (from first_page)."""
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
            self._check_open(ioctl)
            s = self._logged_slot(slot, ioctl, first_page)
            rest = s.npages - first_page
            if first_page > s.npages or num_pages > rest or (num_pages < rest and num_pages & 63):
                raise KvmError(errno.EINVAL, ioctl, "the range is not inside the slot")
            n = (num_pages + 63) >> 6
            if len(words) < n:
                raise KvmError(errno.EFAULT, ioctl, f"bitmap has {len(words)} words, {n} needed")
            if n == 0:
                return
            mask = words[:n].copy()
            if num_pages & 63:
                mask[-1] &= np.uint64((1 << (num_pages & 63)) - 1)
            try:
                s.tracker.protect(first_page, mask)
            except OSError as e:
                raise KvmError(e.errno or errno.EIO, ioctl, str(e)) from e

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS on a VM without a ring: EINVAL."""
        self._check_open("KVM_RESET_DIRTY_RINGS")
        raise KvmError(errno.EINVAL, "KVM_RESET_DIRTY_RINGS", "no dirty ring")

    def __repr__(self) -> str:
        return (f"HostVM(slots={len(self.slots)}, vcpus={len(self.vcpus)}"
                f"{', closed' if self._closed else ''})")
