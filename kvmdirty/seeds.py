"""The seed-era dirty-log designs, selectable with ``VM(design=name)``.

Each design replaces KVM's upstream logging in the simulated kernel and
offers (a) its own user-facing API, as its patch proposed it, and (b) the
uniform ``harvest()`` the runner and verifier drive every design through.

Life cycle (what the VM calls):
  create_design(name, vm, **options)  builds the design and installs it
                                      (install() is idempotent; it adopts
                                      the slots and vCPUs that already exist)
  design.vcpu_created(vcpu_id)        after each KVM_CREATE_VCPU
  design.slots_changed()              after every memslot change, with the
                                      VM's slot lock held for writing

Designs:
  indexed-ring           seeds 000/002: per-vCPU u16-indexed lists + a per-VM one,
                         KVM_RESET_DIRTY_PAGES, exit DIRTY_LOG_FULL
  shared-ring            one flags ring for every vCPU, cmpxchg reservation,
                         exit DIRTY_RING_FULL
  switched-bitmap        seed 003: double-buffered bitmaps and a switch call
  switched-bitmap-user   seed 003's reply: user space passes the next bitmap;
                         0 and no switch when the active one is clean
Seed 004's range write-protect is not a design but an MMU option
(``VM(protect="range")`` / ``Mmu.protect_range``), usable with any design.

Concurrency and failure (what every design promises):
  - Each design's ioctl-shaped calls (switch, reset, harvest, ...) run under
    the VM's slot lock for reading (no memslot change meanwhile) and the
    design's own mutex (one at a time, as KVM's slots_lock): two collectors
    are serialised, never interleaved.
  - Each call's state change is one compiled step (_seeds.switch_bitmaps,
    IndexedRingSet.reset / harvest): no KeyboardInterrupt can split it, and a
    failure inside it changes nothing or hands back what it took (fetch
    indexes put back, bits or-ed back into the active bitmap).
  - After VM.close() the ioctls fail with EBADF; what user space has mapped
    (the indexed lists, the shared ring, retired bitmaps) stays readable.
"""
from __future__ import annotations

import contextlib
import errno
import threading
from typing import Callable, ContextManager, Dict, List, Optional, Protocol, Tuple

import numpy as np

from . import _bitmap, _mmu, _seeds, validate
from ._ring import DirtyRing
from .api import EXIT_DIRTY_LOG_FULL
from .errors import KvmError
from .limits import MAX_VCPU_IDS

__all__ = ["DESIGNS", "Design", "create_design", "IndexedRingDesign", "SharedRingDesign",
           "SwitchedBitmapDesign", "SwitchedBitmapUserDesign", "EXIT_DIRTY_LOG_FULL"]

Harvest = Dict[int, np.ndarray]


class Design(Protocol):
    name: str

    def install(self) -> None: ...

    def vcpu_created(self, vcpu_id: int) -> None: ...

    def slots_changed(self) -> None: ...

    def harvest(self) -> Harvest:
        """Harvest everything logged so far and re-arm tracking (protect + flush)."""
        ...


def _reading(vm) -> ContextManager:
    """The VM's slot lock for reading (no memslot change while we protect), if it has one."""
    lock = getattr(vm, "slots_lock", None)
    return lock.read() if lock is not None else contextlib.nullcontext()


def _check_open(vm, ioctl: str) -> None:
    """EBADF once the VM is closed, as every ioctl on a closed fd (call with the slot lock held)."""
    if getattr(vm, "closed", False):
        raise KvmError(errno.EBADF, ioctl, "the VM is closed")


def _reset_sink(vm):
    """The write-protect sink of a reset, honouring the skip-reset-protect fault."""
    return None if vm.mmu.faults & _mmu.FAULT_SKIP_RESET_PROTECT else vm.mmu


def _group(slots: np.ndarray, offsets: np.ndarray, out: Dict[int, List[np.ndarray]]) -> None:
    for s in np.unique(slots):
        out.setdefault(int(s), []).append(offsets[slots == s])


def _merge(parts: Dict[int, List[np.ndarray]]) -> Harvest:
    # Offsets in harvest order; a page may appear more than once (as in a ring),
    # and sorting them would only add cost the upstream ring path does not pay.
    return {s: np.concatenate(p).astype(np.uint64, copy=False) for s, p in parts.items()}


class _RingDesign:
    """What the two ring designs share: tracker install and the reset-then-flush.

    ``_mutex`` serialises the design's collect/reset/harvest calls (KVM holds
    slots_lock for a reset); it is taken inside the VM's slot lock.
    """

    name = ""
    tracker: object

    def __init__(self, vm) -> None:
        self.vm = vm
        self._installed = False
        self._mutex = threading.Lock()

    def install(self) -> None:
        if not self._installed:
            self.vm.mmu.set_tracker(self.tracker)
            self._installed = True
        for vcpu_id in list(getattr(self.vm, "vcpus", {})):
            self.vcpu_created(vcpu_id)

    def vcpu_created(self, vcpu_id: int) -> None:
        pass

    def slots_changed(self) -> None:
        # Entries name slots by id; a reset batch for a deleted slot is dropped by the MMU.
        pass


class IndexedRingDesign(_RingDesign):
    """Seeds 000/002: {u16 avail_index; u16 fetch_index} lists, one per vCPU plus one per VM.

    User API: ``ring(vcpu_id)`` / ``vm_ring`` (kvmdirty._seeds.IndexedRing:
    ``fetch()``, ``avail_index``, ``fetch_index``, ``gfns``) and
    ``reset_dirty_pages()`` (KVM_RESET_DIRTY_PAGES).  A vCPU whose list
    reaches its limit exits with EXIT_DIRTY_LOG_FULL until a reset.
    The lists are user space's mappings: they stay readable after close();
    the ioctls (reset, harvest) then fail with EBADF.
    """

    name = "indexed-ring"

    def __init__(self, vm, entries: int = 4096) -> None:
        super().__init__(vm)
        # One list per vCPU id the VM accepts (KVM_MAX_VCPU_IDS), so vcpu_created cannot refuse one.
        self.rings = _seeds.IndexedRingSet(entries, getattr(vm, "max_vcpu_ids", MAX_VCPU_IDS))
        self.tracker = self.rings

    def vcpu_created(self, vcpu_id: int) -> None:
        self.rings.add_vcpu(vcpu_id)

    def ring(self, vcpu_id: int) -> "_seeds.IndexedRing":
        return self.rings.ring(vcpu_id)

    @property
    def vm_ring(self) -> "_seeds.IndexedRing":
        return self.rings.vm_ring

    def _flush(self) -> Optional[Callable[[], None]]:
        return self.vm.mmu.flush_remote_tlbs

    def reset_dirty_pages(self, flush: bool = True) -> int:
        """KVM_RESET_DIRTY_PAGES: re-protect what user space fetched, free it, flush TLBs if any.

        EINVAL (nothing changed) if a ring's fetch_index lies beyond what the kernel pushed.
        """
        with _reading(self.vm):
            _check_open(self.vm, "KVM_RESET_DIRTY_PAGES")
            n = self.rings.reset(_reset_sink(self.vm), self._flush() if flush else None)
        if n < 0:
            raise KvmError(errno.EINVAL, "KVM_RESET_DIRTY_PAGES",
                           "a fetch_index is beyond what the kernel pushed")
        return n

    def harvest(self) -> Harvest:
        """Fetch every list and reset them as one step: all or nothing (fetch indexes put back)."""
        with _reading(self.vm):
            _check_open(self.vm, "KVM_RESET_DIRTY_PAGES")
            got = self.rings.harvest(_reset_sink(self.vm), self._flush())
        if got is None:
            raise KvmError(errno.EINVAL, "KVM_RESET_DIRTY_PAGES",
                           "a fetch_index is beyond what the kernel pushed")
        return got


class SharedRingDesign(_RingDesign):
    """One flags ring for every vCPU and the host; writers reserve entries with cmpxchg.

    User API: ``ring`` (a kvmdirty._ring.DirtyRing: ``collect()``, ``gfns``)
    and ``reset()`` (re-protect harvested entries, then flush).  vCPUs exit
    with DIRTY_RING_FULL while the ring is soft-full.  The design's collect,
    reset and harvest are serialised; calling ``ring.collect`` directly from
    several threads is DirtyRing's business (it refuses).
    """

    name = "shared-ring"

    def __init__(self, vm, entries: int = 4096) -> None:
        super().__init__(vm)
        self.ring = DirtyRing(entries, cpu_dirty_log_size=getattr(vm, "cpu_dirty_log_size", 0))
        self.tracker = _seeds.SharedRingTracker(self.ring)

    def collect(self, max_count: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """User space's harvest of the shared ring (its mapping: works after close too)."""
        with self._mutex:
            return self.ring.collect(max_count)

    def _reset_locked(self, flush: bool) -> int:
        mmu = self.vm.mmu
        try:
            n = self.ring.reset(_reset_sink(self.vm))
        except BaseException:
            if flush:
                mmu.flush_remote_tlbs()     # whatever it re-protected before failing
            raise
        if n and flush:
            mmu.flush_remote_tlbs()
        return n

    def reset(self, flush: bool = True) -> int:
        with _reading(self.vm), self._mutex:
            _check_open(self.vm, "KVM_RESET_DIRTY_RINGS")
            return self._reset_locked(flush)

    def harvest(self) -> Harvest:
        parts: Dict[int, List[np.ndarray]] = {}
        with _reading(self.vm), self._mutex:
            _check_open(self.vm, "KVM_RESET_DIRTY_RINGS")
            # The result is built before the reset frees anything.
            _group(*self.ring.collect(), parts)
            out = _merge(parts)
            self._reset_locked(True)
        return out


#: ``_enter``'s default: the call is about every slot (a harvest), not one.
_EVERY_SLOT = object()


class _BitmapDesign:
    """Per logged slot, the bitmap(s) the write loop's built-in bitmap path logs into.

    ``_active[sid]`` is the bitmap the MMU logs into, ``_other[sid]`` its
    partner (the kernel's spare, or the user bitmap last retired).  Every
    switch runs under the VM's slot lock (read) and ``_mutex`` (one at a
    time), through _seeds.switch_bitmaps, which no interrupt can split.
    """

    name = ""

    def __init__(self, vm) -> None:
        self.vm = vm
        self._active: Dict[int, np.ndarray] = {}
        self._other: Dict[int, np.ndarray] = {}
        self._npages: Dict[int, int] = {}
        self._mutex = threading.Lock()

    def install(self) -> None:
        self.vm.mmu.set_tracker(None)     # the MMU's bitmap path does the logging
        self.slots_changed()

    def vcpu_created(self, vcpu_id: int) -> None:
        pass

    def _logged_slots(self) -> Dict[int, int]:
        # The guest writes address space 0 only (see VM._install_slots).
        return {s.slot: s.npages for s in getattr(self.vm, "slots", {}).values()
                if s.logging and s.slot >> 16 == 0}

    def slots_changed(self) -> None:
        logged = self._logged_slots()
        for sid in list(self._active):
            if logged.get(sid) != self._npages.get(sid):
                self._forget(sid)
        for sid, npages in logged.items():
            if sid not in self._active:
                self._adopt(sid, npages)
            # set_slots reinstalled the VM's own bitmap pointer: point it back at ours.
            self.vm.mmu.set_dirty(sid, self._active[sid])

    def _adopt(self, sid: int, npages: int) -> None:
        self._npages[sid] = npages
        self._active[sid] = np.zeros(max(1, (npages + 63) >> 6), np.uint64)

    def _forget(self, sid: int) -> None:
        self._active.pop(sid, None)
        self._other.pop(sid, None)
        self._npages.pop(sid, None)

    def _enter(self, ioctl: str, slot: object = _EVERY_SLOT) -> None:
        _check_open(self.vm, ioctl)
        if slot is _EVERY_SLOT:
            return
        # None is a bad slot like any other (it was taken for "every slot": a KeyError).
        slot = validate.u32(slot, "slot")   # bool / float / None slots are refused, as by every ioctl
        if slot not in self._active:
            raise KvmError(errno.ENOENT, ioctl, f"slot {slot:#x} is not logging")

    @staticmethod
    def _offsets(bitmap: np.ndarray, npages: int) -> np.ndarray:
        """The set pages of a retired bitmap below the slot's end (user garbage past it ignored)."""
        got = _bitmap.to_gfns(bitmap)
        return got[got < npages]

    def _switch(self, sids: List[int], news: List[np.ndarray], zero: bool, offsets: bool) -> list:
        mmu = self.vm.mmu
        return _seeds.switch_bitmaps(mmu, self._active, self._other, sids, news, self._npages,
                                     zero, bool(mmu.faults & _mmu.FAULT_FLUSH_BEFORE_PROTECT), offsets)


class SwitchedBitmapDesign(_BitmapDesign):
    """Seed 003: two kernel-allocated bitmaps per slot, user-visible; ``switch(slot)`` swaps them.

    ``switch`` returns the retired bitmap (read-only view), valid until the
    next switch of that slot: everything dirtied before the call, pages
    re-protected so later writes go to the new active bitmap.
    """

    name = "switched-bitmap"

    def _adopt(self, sid: int, npages: int) -> None:
        super()._adopt(sid, npages)
        self._other[sid] = np.zeros_like(self._active[sid])

    def addresses(self, slot: int) -> Tuple[np.ndarray, np.ndarray]:
        """KVM_GET_USER_DIRTY_LOG_ADDR: (active, old) read-only views of the slot's pair."""
        with _reading(self.vm), self._mutex:
            self._enter("KVM_GET_USER_DIRTY_LOG_ADDR", slot)
            return _ro(self._active[slot]), _ro(self._other[slot])

    def switch(self, slot: int) -> np.ndarray:
        """KVM_SWITCH_DIRTY_LOG: swap active and old; return the retired bitmap."""
        with _reading(self.vm), self._mutex:
            self._enter("KVM_SWITCH_DIRTY_LOG", slot)
            # The spare is the previous result: the user is done with it, it is zeroed.
            (old,) = self._switch([slot], [self._other[slot]], True, False)
        return _ro(old)

    def harvest(self) -> Harvest:
        """Switch every logged slot at once (one flush) and list each retired bitmap's pages."""
        with _reading(self.vm), self._mutex:
            self._enter("KVM_SWITCH_DIRTY_LOG")
            sids = sorted(self._active)
            got = self._switch(sids, [self._other[s] for s in sids], True, True)
        return dict(zip(sids, got))


class SwitchedBitmapUserDesign(_BitmapDesign):
    """Seed 003's reply: ``switch(slot, bitmap)`` installs the user's (clean) bitmap.

    Returns 0 and switches nothing when the active bitmap is clean; else 1,
    and the bitmap active until now (``retired(slot)``) holds the dirty pages,
    re-protected.  Cleaning bitmaps is user space's job.  A bitmap that is (or
    overlaps) any slot's active bitmap is refused with EBUSY: one buffer
    logging two slots would report pages against the wrong slot.
    """

    name = "switched-bitmap-user"

    def _busy(self, bitmap: np.ndarray) -> Optional[int]:
        for sid, a in self._active.items():
            if np.shares_memory(bitmap, a):
                return sid
        return None

    def switch(self, slot: int, bitmap: np.ndarray) -> int:
        ioctl = "KVM_SWITCH_DIRTY_LOG"
        if not isinstance(bitmap, np.ndarray) or bitmap.dtype != np.uint64 or bitmap.ndim != 1 \
                or not bitmap.flags.c_contiguous or not bitmap.flags.writeable:
            raise TypeError("bitmap must be a writable, C-contiguous 1-D uint64 numpy array")
        if not bitmap.flags.aligned:
            # The write loop sets bits with 8-byte atomics: a split one may trap (split-lock detection).
            raise ValueError("bitmap must be 8-byte aligned")
        with _reading(self.vm), self._mutex:
            self._enter(ioctl, slot)
            nwords = len(self._active[slot])
            if len(bitmap) < nwords:
                raise ValueError(f"bitmap has {len(bitmap)} words, the slot needs {nwords}")
            busy = self._busy(bitmap)
            if busy is not None:
                raise KvmError(errno.EBUSY, ioctl, f"bitmap is (or overlaps) slot {busy:#x}'s active bitmap")
            if not self._active[slot].any():
                return 0
            self._switch([slot], [bitmap], False, False)
        return 1

    def retired(self, slot: int) -> Optional[np.ndarray]:
        """The bitmap the last successful switch of ``slot`` retired (None before any).

        User space's own buffer: readable after close() too.
        """
        slot = validate.u32(slot, "slot")
        if slot not in self._active:
            raise KvmError(errno.ENOENT, "retired", f"slot {slot:#x} is not logging")
        r = self._other.get(slot)
        return None if r is None else _ro(r)

    def harvest(self) -> Harvest:
        """Switch every dirty slot (recycling its last retired bitmap, as user space would)."""
        out: Harvest = {}
        with _reading(self.vm), self._mutex:
            self._enter("KVM_SWITCH_DIRTY_LOG")
            sids, news = [], []
            for sid in sorted(self._active):
                if not self._active[sid].any():
                    out[sid] = np.zeros(0, np.uint64)
                    continue
                spare = self._other.get(sid)
                if spare is None or self._busy(spare) is not None:
                    # None yet, or user space made it another slot's active bitmap.
                    spare = np.zeros_like(self._active[sid])
                sids.append(sid)
                news.append(spare)
            got = self._switch(sids, news, True, True)
        out.update(zip(sids, got))
        return out


def _ro(a: np.ndarray) -> np.ndarray:
    v = a.view()
    v.flags.writeable = False
    return v


DESIGNS: Dict[str, Callable[..., Design]] = {
    IndexedRingDesign.name: IndexedRingDesign,
    SharedRingDesign.name: SharedRingDesign,
    SwitchedBitmapDesign.name: SwitchedBitmapDesign,
    SwitchedBitmapUserDesign.name: SwitchedBitmapUserDesign,
}


def create_design(name: str, vm, **options) -> Design:
    """Build design ``name`` for ``vm`` and install it into ``vm.mmu``.

    Options: ``entries`` (ring designs, default 4096).
    """
    try:
        cls = DESIGNS[name]
    except KeyError:
        raise ValueError(f"unknown design {name!r}; known: {sorted(DESIGNS)} (or 'kvm')") from None
    design = cls(vm, **options)
    design.install()
    return design
