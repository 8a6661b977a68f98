"""Collectors: how user space harvests dirty pages, one class per tracking design.

Each collector sets its design up on a fresh VM (``vm_options`` before the VM
exists, ``configure`` before slots and vCPUs), and ``harvest()`` returns the
pages logged since the last harvest as ``{slot: offsets}``, with tracking
re-armed (pages write-protected again) before it returns, so the caller may
read page contents right away: a write after that read is logged again.

    bitmap     KVM_GET_DIRTY_LOG per slot (harvest, protect, flush in one ioctl).
    clear-log  manual protect with INITIALLY_SET: GET_DIRTY_LOG copies the
               bitmap, CLEAR_DIRTY_LOG re-protects what was read
               (dirty_log_perf_test's get-then-clear).
    ring       QEMU's reaper: collect every vCPU ring, then
               KVM_RESET_DIRTY_RINGS, which must reset exactly the entries collected.
    <seed>     a seed-era design of kvmdirty.seeds, through its uniform harvest().

Only the public VM API is used, so the bitmap, clear-log and ring collectors
also drive real KVM (kvmdirty.kvm).
"""
from __future__ import annotations

import importlib.util
from typing import Dict, List, Sequence, Tuple

import numpy as np

from . import _bitmap

BASE_DESIGNS = ("bitmap", "clear-log", "ring")

Harvest = Dict[int, np.ndarray]
SlotSpec = Tuple[int, int, int]      # (slot id, base gfn, npages)


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def seed_designs() -> List[str]:
    """Names of the seed-era designs (empty until kvmdirty.seeds exists)."""
    if not _have("kvmdirty.seeds"):
        return []
    from .seeds import DESIGNS
    return list(DESIGNS)


def all_designs() -> List[str]:
    """Every design this build can run: the upstream ones, then the seed-era ones."""
    base = [d for d in BASE_DESIGNS if d != "ring" or _have("kvmdirty._ring")]
    return base + seed_designs()


class Collector:
    """Base: the design's setup and its harvest."""

    name = ""

    def vm_options(self) -> dict:
        return {}

    def configure(self, vm) -> None:
        """Enable the design's capabilities (before slots and vCPUs exist)."""

    def attach(self, vm, slots: Sequence[SlotSpec], vcpus: list) -> None:
        self.vm, self.slots, self.vcpus = vm, list(slots), list(vcpus)

    def harvest(self) -> Harvest:
        raise NotImplementedError

    @property
    def problems(self) -> List[str]:
        """Protocol violations seen while harvesting (e.g. a reset count mismatch)."""
        return []


class BitmapCollector(Collector):
    name = "bitmap"

    def harvest(self) -> Harvest:
        out: Harvest = {}
        for sid, _base, _n in self.slots:
            words = self.vm.get_dirty_log(sid)       # harvest + protect + flush
            out[sid] = _bitmap.to_gfns(words, 0)
        return out


class ClearLogCollector(Collector):
    name = "clear-log"

    def configure(self, vm) -> None:
        vm.enable_manual_protect(initially_set=True)

    def harvest(self) -> Harvest:
        out: Harvest = {}
        for sid, _base, npages in self.slots:
            words = self.vm.get_dirty_log(sid)       # a copy; nothing cleared yet
            offs = _bitmap.to_gfns(words, 0)
            if len(offs):
                # Re-protect exactly what we read; later writes set the bits again.
                self.vm.clear_dirty_log(sid, 0, npages, words)
            out[sid] = offs
        return out


class RingCollector(Collector):
    name = "ring"

    def __init__(self, entries: int) -> None:
        self.entries = int(entries)
        self._problems: List[str] = []

    def configure(self, vm) -> None:
        vm.enable_dirty_ring(self.entries)

    def harvest(self) -> Harvest:
        slots, offs = [], []
        for v in self.vcpus:
            s, o = v.dirty_ring.collect()
            slots.append(s)
            offs.append(o)
        n = sum(len(o) for o in offs)
        reset = self.vm.reset_dirty_rings()
        if reset != n:
            # QEMU asserts this: the kernel must re-arm exactly what was harvested.
            self._problems.append(f"KVM_RESET_DIRTY_RINGS reset {reset} entries, {n} were harvested")
        return _group(np.concatenate(slots) if slots else np.zeros(0, np.uint32),
                      np.concatenate(offs) if offs else np.zeros(0, np.uint64))

    @property
    def problems(self) -> List[str]:
        return self._problems


class SeedCollector(Collector):
    """A seed-era design: the VM is created with it, harvest() is its own."""

    def __init__(self, name: str) -> None:
        self.name = name

    def vm_options(self) -> dict:
        return {"design": self.name}

    def harvest(self) -> Harvest:
        h = self.vm.design.harvest()
        return {int(k): np.asarray(v, dtype=np.uint64) for k, v in h.items()}


def _group(slots: np.ndarray, offs: np.ndarray) -> Harvest:
    """{slot: offsets} from parallel arrays of ring entries."""
    if len(slots) == 0:
        return {}
    first = int(slots[0])
    if (slots == first).all():
        return {first: offs.astype(np.uint64, copy=False)}
    return {int(s): offs[slots == s].astype(np.uint64, copy=False) for s in np.unique(slots)}


def make_collector(design: str, ring_entries: int = 4096) -> Collector:
    if design == "bitmap":
        return BitmapCollector()
    if design == "clear-log":
        return ClearLogCollector()
    if design == "ring":
        return RingCollector(ring_entries)
    seeds = seed_designs()
    if design in seeds:
        return SeedCollector(design)
    raise ValueError(f"unknown design {design!r}; known: {', '.join(list(BASE_DESIGNS) + seeds)}")
