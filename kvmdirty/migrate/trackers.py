"""Dirty trackers as QEMU drives them over KVM, on the simulator's real mechanism.

Each tracker calls the VM's ioctls for real (the pages are really protected,
logged, harvested, reset and flushed) and returns the *virtual* time each
step costs, from the cost table:

    bitmap     KVM_GET_DIRTY_LOG per memslot per sync (harvest + write-protect)
    clear-log  manual protect + INITIALLY_SET: GET copies the bitmap; QEMU
               clears lazily, one 2^clear_shift-page chunk at a time, right
               before it sends a page of that chunk (migration_bitmap_clear_dirty)
    ring       per-vCPU dirty rings; a reaper collects every ring and calls
               KVM_RESET_DIRTY_RINGS on a timer (1 s in QEMU); a sync kicks
               every vCPU and reaps; a vCPU whose ring is full exits and reaps
               all rings itself before re-entering (QEMU's kvm_cpu_exec)

and the seed-era designs of kvmdirty.seeds (SeedTracker), driven like the
ring or like the bitmap according to their kind.

A step returns (seconds, lock): ``lock`` is the part spent write-protecting
under the MMU lock, which a vCPU's write fault has to wait for.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Dict, List, Tuple

import numpy as np

from ..api import EXIT_DIRTY_LOG_FULL, EXIT_DIRTY_RING_FULL
from .costs import Costs
from .memory import GIB_PAGES, GuestMemory, MigrationBitmap

Step = Tuple[float, float]


def _popcount(words: np.ndarray) -> int:
    return int(np.bitwise_count(words).sum()) if len(words) else 0


class Tracker(ABC):
    """Common interface; see the module docstring for each design."""

    name = ""

    def __init__(self, costs: Costs) -> None:
        self.costs = costs
        self.vm = None
        self.mem: GuestMemory = None  # type: ignore[assignment]
        self.stats: Dict[str, float] = {"syncs": 0, "harvested_pages": 0, "sync_time": 0.0}

    def vm_options(self) -> dict:
        """Keyword arguments for kvmdirty.VM (a seed design names itself here)."""
        return {}

    def configure(self, vm) -> None:
        """Capabilities that must be enabled before memslots and vCPUs exist."""
        self.vm = vm

    def attach(self, mem: GuestMemory) -> None:
        self.mem = mem

    def start(self) -> float:
        """Turn dirty logging on (QEMU's memory_global_dirty_log_start); seconds."""
        self.mem.set_logging(True)
        c = self.costs
        return len(self.mem.layout) * c.ioctl + self.mem.npages / GIB_PAGES * c.log_start_per_gib

    @abstractmethod
    def sync(self, mig: MigrationBitmap) -> Tuple[float, float, float]:
        """Harvest into ``mig``; (migration thread seconds, MMU-lock seconds, per-vCPU stall)."""

    def before_send(self, gfns: np.ndarray) -> Step:
        """Work due right before sending ``gfns`` (clear-log's lazy clear)."""
        return 0.0, 0.0

    def on_exit(self, vcpu, reason: int) -> float:
        """A vCPU exit the tracker causes; returns that vCPU's stall (seconds)."""
        raise RuntimeError(f"unexpected exit {reason} from vCPU {vcpu.id}")

    def _words(self, key, n: int, dtype=np.uint64) -> np.ndarray:
        """An output buffer the harvest ioctls write into, made once per key and reused
        (a bitmap of n pages for a slot id, or n items for a ring key)."""
        bufs = self.__dict__.setdefault("_bufs", {})
        size = (n + 63) >> 6 if isinstance(key, int) else n
        b = bufs.get(key)
        if b is None or len(b) != size:
            b = bufs[key] = np.empty(size, dtype)
        return b

    def tick(self, now: float) -> Step:
        """Background work due at virtual time ``now`` (the ring reaper)."""
        return 0.0, 0.0

    def _protect(self, pages: int, span: int) -> float:
        """Write-protecting ``pages`` dirty pages among ``span``: per page when sparse, at
        most what protecting the whole span costs (the walk of a log start) when dense."""
        if not pages:
            return 0.0
        c = self.costs
        return min(pages * c.protect_per_page, span / GIB_PAGES * c.log_start_per_gib) + c.tlb_flush

    def _qemu_merge(self) -> float:
        # kvm_slot_sync_dirty_pages + ramblock_sync_dirty_bitmap walk whole bitmaps.
        return self.mem.npages / GIB_PAGES * self.costs.qemu_sync_per_gib


class BitmapTracker(Tracker):
    """KVM_GET_DIRTY_LOG: every sync harvests and write-protects each slot."""

    name = "bitmap"

    def sync(self, mig: MigrationBitmap) -> Tuple[float, float, float]:
        c = self.costs
        cost = lock = 0.0
        for sid, first, n in self.mem.layout:
            words = self.vm.get_dirty_log(sid, out=self._words(sid, n))
            dirty = _popcount(words)
            mig.merge_words(first, n, words)
            held = self._protect(dirty, n)
            cost += c.ioctl + n / GIB_PAGES * c.get_log_per_gib + held
            lock += held
            self.stats["harvested_pages"] += dirty
        cost += self._qemu_merge()
        self.stats["syncs"] += 1
        self.stats["sync_time"] += cost
        return cost, lock, 0.0


class ClearLogTracker(Tracker):
    """Manual protect with INITIALLY_SET; lazy KVM_CLEAR_DIRTY_LOG per chunk."""

    name = "clear-log"

    def __init__(self, costs: Costs, clear_shift: int = 18) -> None:
        super().__init__(costs)
        if not 6 <= clear_shift <= 31:
            raise ValueError(f"clear_shift must be in [6, 31], got {clear_shift}")
        self.shift = clear_shift
        self.snap: Dict[int, np.ndarray] = {}
        self.need: Dict[int, np.ndarray] = {}   # per slot: chunk still to clear
        self.stats.update(clears=0, cleared_pages=0, clear_time=0.0)

    def configure(self, vm) -> None:
        super().configure(vm)
        vm.enable_manual_protect(initially_set=True)

    def attach(self, mem: GuestMemory) -> None:
        super().attach(mem)
        for sid, first, n in mem.layout:
            if first & ((1 << self.shift) - 1):
                raise ValueError(f"clear-log needs memslots aligned to 2^{self.shift} pages")
            self.need[sid] = np.zeros((n + (1 << self.shift) - 1) >> self.shift, np.bool_)

    def start(self) -> float:
        # INITIALLY_SET: logging starts without write-protecting anything.
        self.mem.set_logging(True)
        return len(self.mem.layout) * self.costs.ioctl

    def sync(self, mig: MigrationBitmap) -> Tuple[float, float, float]:
        c = self.costs
        cost = 0.0
        cw = 1 << (self.shift - 6)
        for sid, first, n in self.mem.layout:
            # a copy, nothing is protected here (into the snapshot of the last sync: replaced whole)
            words = self.vm.get_dirty_log(sid, out=self.snap.get(sid))
            mig.merge_words(first, n, words)
            self.snap[sid] = words
            nz = np.flatnonzero(words)
            self.need[sid][np.unique(nz // cw)] = True
            self.stats["harvested_pages"] += _popcount(words)
            cost += c.ioctl + n / GIB_PAGES * c.get_log_copy_per_gib
        cost += self._qemu_merge()
        self.stats["syncs"] += 1
        self.stats["sync_time"] += cost
        return cost, 0.0, 0.0

    def before_send(self, gfns: np.ndarray) -> Step:
        if not len(gfns):
            return 0.0, 0.0
        c = self.costs
        cost = lock = 0.0
        chunk = 1 << self.shift
        for sid, first, part in self.mem.split(np.sort(gfns)):
            need = self.need[sid]
            for ch in np.unique((part - first) >> self.shift):
                ch = int(ch)
                if not need[ch]:
                    continue
                need[ch] = False
                n = min(chunk, self.mem.layout[sid][2] - ch * chunk)
                w0, w1 = (ch * chunk) >> 6, (ch * chunk + n + 63) >> 6
                mask = self.snap[sid][w0:w1].copy()
                if not mask.any():
                    continue
                cleared = self.vm.clear_dirty_log(sid, ch * chunk, n, mask)
                self.snap[sid][w0:w1] = 0
                held = self._protect(cleared, n)
                cost += c.ioctl + n / GIB_PAGES * c.clear_per_gib + held
                lock += held
                self.stats["clears"] += 1
                self.stats["cleared_pages"] += cleared
        self.stats["clear_time"] += cost
        return cost, lock


class RingTracker(Tracker):
    """Per-vCPU dirty rings, a timed reaper, kicks at sync, ring-full exits."""

    name = "ring"

    def __init__(self, costs: Costs, entries: int = 4096, reaper_period: float = 1.0) -> None:
        super().__init__(costs)
        if entries < 1:
            raise ValueError("ring entries must be >= 1")
        if not reaper_period > 0:
            raise ValueError("reaper_period must be > 0 seconds")
        self.entries, self.period = entries, reaper_period
        self.next_reap = reaper_period
        self.pending: List[np.ndarray] = []       # QEMU's per-slot dirty_bmap, as gfn lists
        self.stats.update(reaps=0, reaped_entries=0, reaper_time=0.0, full_exits=0,
                          full_reap_time=0.0, kicks=0)

    def configure(self, vm) -> None:
        super().configure(vm)
        vm.enable_dirty_ring(self.entries)

    def attach(self, mem: GuestMemory) -> None:
        super().attach(mem)
        top = max(sid for sid, _, _ in mem.layout) + 1
        self.first = np.zeros(top, np.uint64)
        for sid, first, _ in mem.layout:
            self.first[sid] = first

    def reap(self) -> Step:
        """kvm_dirty_ring_reap: collect every vCPU's ring, then KVM_RESET_DIRTY_RINGS."""
        c = self.costs
        n = 0
        for v in self.vm.vcpus.values():
            ring = v.dirty_ring
            # Into arrays reused from reap to reap (the gfns below are a new array).
            slots, offs = ring.collect(None, self._words(("s", v.id), ring.entries, np.uint32),
                                       self._words(("o", v.id), ring.entries, np.uint64))
            if len(offs):
                self.pending.append(self.first[slots & 0xFFFF] + offs)
                n += len(offs)
        reset = self.vm.reset_dirty_rings() if n else 0
        held = reset * c.ring_reset_per_entry + (c.tlb_flush if reset else 0.0)
        cost = n * c.ring_collect_per_entry + c.ioctl + held
        self.stats["reaps"] += 1
        self.stats["reaped_entries"] += n
        return cost, held

    def _drain(self, mig: MigrationBitmap) -> None:
        if self.pending:
            g = np.concatenate(self.pending)
            self.pending = []
            self.stats["harvested_pages"] += mig.merge_gfns(g.astype(np.int64))

    def sync(self, mig: MigrationBitmap) -> Tuple[float, float, float]:
        # kvm_dirty_ring_flush: kick every vCPU out (their PML buffers reach
        # the rings), reap, then QEMU merges the slot bitmaps.
        kick = self.costs.vcpu_kick
        self.stats["kicks"] += len(self.vm.vcpus)
        cost, lock = self.reap()
        self._drain(mig)
        cost += self._qemu_merge()
        self.stats["syncs"] += 1
        self.stats["sync_time"] += cost
        return cost, lock, kick

    def on_exit(self, vcpu, reason: int) -> float:
        if reason != EXIT_DIRTY_RING_FULL:
            return super().on_exit(vcpu, reason)
        cost, _ = self.reap()
        self.stats["full_exits"] += 1
        self.stats["full_reap_time"] += cost
        return self.costs.ring_full_exit + cost

    def tick(self, now: float) -> Step:
        if now < self.next_reap:
            return 0.0, 0.0
        while self.next_reap <= now:
            self.next_reap += self.period
        cost, lock = self.reap()
        self.stats["reaper_time"] += cost
        return cost, lock


class SeedTracker(Tracker):
    """A seed-era design (kvmdirty.seeds) through its uniform ``harvest()``.

    Ring-like designs (indexed-ring, shared-ring) are driven as QEMU drives the
    ring: a timed reaper, a harvest at each sync, a harvest by the vCPU that
    hits a full log; costs per entry.  Bitmap-like designs (switched-bitmap,
    switched-bitmap-user) as the bitmap: a switch per slot per sync, a scan of
    the retired bitmap per GiB, a protect per dirty page.
    """

    RINGS = ("indexed-ring", "shared-ring")

    def __init__(self, costs: Costs, design: str, entries: int = 4096,
                 reaper_period: float = 1.0) -> None:
        super().__init__(costs)
        self.name = design
        self.ringlike = design in self.RINGS
        self.entries, self.period = entries, reaper_period
        self.next_reap = reaper_period
        self.pending: List[np.ndarray] = []
        self.stats.update(harvests=0, harvested_entries=0, reaper_time=0.0, full_exits=0,
                          full_reap_time=0.0)

    def vm_options(self) -> dict:
        opts = {"entries": self.entries} if self.ringlike else None
        return {"design": self.name, "design_options": opts}

    def attach(self, mem: GuestMemory) -> None:
        super().attach(mem)
        self.first = {sid: first for sid, first, _ in mem.layout}

    def _harvest(self) -> Step:
        c = self.costs
        got = self.vm.design.harvest()
        n = 0
        for sid, offs in got.items():
            if len(offs):
                self.pending.append(np.uint64(self.first[sid]) + offs)
                n += len(offs)
        self.stats["harvests"] += 1
        self.stats["harvested_entries"] += n
        if self.ringlike:
            held = n * c.ring_reset_per_entry + (c.tlb_flush if n else 0.0)
            return n * c.ring_collect_per_entry + c.ioctl + held, held
        cost = lock = 0.0
        for sid, first, npages in self.mem.layout:
            k = len(got.get(sid, ()))
            held = self._protect(k, npages)
            cost += c.ioctl + npages / GIB_PAGES * c.get_log_per_gib + held
            lock += held
        return cost, lock

    def _drain(self, mig: MigrationBitmap) -> None:
        if self.pending:
            g = np.concatenate(self.pending)
            self.pending = []
            self.stats["harvested_pages"] += mig.merge_gfns(g.astype(np.int64))

    def sync(self, mig: MigrationBitmap) -> Tuple[float, float, float]:
        cost, lock = self._harvest()
        self._drain(mig)
        cost += self._qemu_merge()
        self.stats["syncs"] += 1
        self.stats["sync_time"] += cost
        return cost, lock, self.costs.vcpu_kick if self.ringlike else 0.0

    def on_exit(self, vcpu, reason: int) -> float:
        if reason not in (EXIT_DIRTY_RING_FULL, EXIT_DIRTY_LOG_FULL) or not self.ringlike:
            return super().on_exit(vcpu, reason)
        cost, _ = self._harvest()
        self.stats["full_exits"] += 1
        self.stats["full_reap_time"] += cost
        return self.costs.ring_full_exit + cost

    def tick(self, now: float) -> Step:
        if not self.ringlike or now < self.next_reap:
            return 0.0, 0.0
        while self.next_reap <= now:
            self.next_reap += self.period
        cost, lock = self._harvest()
        self.stats["reaper_time"] += cost
        return cost, lock


SEED_DESIGNS = ("indexed-ring", "shared-ring", "switched-bitmap", "switched-bitmap-user")
DESIGNS = ("bitmap", "clear-log", "ring") + SEED_DESIGNS


def make_tracker(design: str, costs: Costs, *, ring_entries: int = 4096,
                 reaper_period: float = 1.0, clear_shift: int = 18) -> Tracker:
    """A tracker by name (one of DESIGNS)."""
    if design == "bitmap":
        return BitmapTracker(costs)
    if design == "clear-log":
        return ClearLogTracker(costs, clear_shift)
    if design == "ring":
        return RingTracker(costs, ring_entries, reaper_period)
    if design in SEED_DESIGNS:
        return SeedTracker(costs, design, ring_entries, reaper_period)
    raise ValueError(f"unknown design {design!r}; known: {', '.join(DESIGNS)}")
