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

A harvest that fails part-way (an error or Ctrl-C after some slots' bitmaps
or some vCPUs' rings were already taken, which cleared them in the kernel)
keeps what it took and hands it out with the next harvest: pages taken are
never dropped.
"""
from __future__ import annotations

import importlib.util
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import _bitmap

BASE_DESIGNS = ("bitmap", "clear-log", "ring")
#: Designs sized by a ring's entries (``ring_entries``): per vCPU, or one shared ring.
RING_DESIGNS = ("ring", "indexed-ring", "shared-ring")

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
    #: What a failed harvest had already taken: handed out by the next one.
    _carry: Optional[Harvest] = None

    def vm_options(self) -> dict:
        return {}

    def configure(self, vm) -> None:
        """Enable the design's capabilities (before slots and vCPUs exist)."""

    def attach(self, vm, slots: Sequence[SlotSpec], vcpus: list) -> None:
        self.vm, self.slots, self.vcpus = vm, list(slots), list(vcpus)

    def harvest(self) -> Harvest:
        """Pages logged since the last harvest (and any a failed harvest had taken)."""
        out, self._carry = (self._carry or {}), None
        try:
            self._harvest_into(out)
        except BaseException:
            self._carry = out          # taken from the kernel already: never dropped
            raise
        return out

    def _harvest_into(self, out: Harvest) -> None:
        """Add the design's harvest to ``out`` (with _merge) as it goes."""
        raise NotImplementedError

    def _buffer(self, key, n: int, dtype=np.uint64) -> np.ndarray:
        """A caller-owned output buffer of n items, made once and reused by every harvest
        (get_dirty_log / collect write into it: nothing is allocated per harvest)."""
        bufs = self.__dict__.setdefault("_bufs", {})
        b = bufs.get(key)
        if b is None or len(b) != n:
            b = bufs[key] = np.empty(n, dtype)
        return b

    @property
    def problems(self) -> List[str]:
        """Protocol violations seen while harvesting (e.g. a reset count mismatch)."""
        return []


def _merge(out: Harvest, sid: int, offs: np.ndarray) -> None:
    prev = out.get(sid)
    out[sid] = offs if prev is None or len(prev) == 0 else np.concatenate([prev, offs])


class BitmapCollector(Collector):
    name = "bitmap"

    def _harvest_into(self, out: Harvest) -> None:
        for sid, _base, n in self.slots:
            # harvest + protect + flush, into a bitmap reused from harvest to harvest
            words = self.vm.get_dirty_log(sid, out=self._buffer(sid, (n + 63) >> 6))
            _merge(out, sid, _bitmap.to_gfns(words, 0))


class ClearLogCollector(Collector):
    name = "clear-log"

    def configure(self, vm) -> None:
        vm.enable_manual_protect(initially_set=True)

    def _harvest_into(self, out: Harvest) -> None:
        for sid, _base, npages in self.slots:
            # a copy, nothing cleared yet (into a reused bitmap)
            words = self.vm.get_dirty_log(sid, out=self._buffer(sid, (npages + 63) >> 6))
            offs = _bitmap.to_gfns(words, 0)
            if len(offs):
                # Re-protect exactly what we read; later writes set the bits again.
                # (If this fails the bits stay set: the next harvest reads them.)
                self.vm.clear_dirty_log(sid, 0, npages, words)
            _merge(out, sid, offs)


class RingCollector(Collector):
    name = "ring"

    def __init__(self, entries: int) -> None:
        self.entries = int(entries)
        self._problems: List[str] = []
        self._unreset = 0          # entries collected (marked RESET) and not yet reset

    def configure(self, vm) -> None:
        vm.enable_dirty_ring(self.entries)

    def _harvest_into(self, out: Harvest) -> None:
        for i, v in enumerate(self.vcpus):
            ring = v.dirty_ring
            # Into reused arrays; _group copies out what it keeps.
            s, o = ring.collect(None, self._buffer(("s", i), ring.entries, np.uint32),
                                self._buffer(("o", i), ring.entries))
            self._unreset += len(o)
            for sid, offs in _group(s, o).items():
                _merge(out, sid, offs)
        reset = self.vm.reset_dirty_rings()
        n, self._unreset = self._unreset, 0
        if reset != n:
            # QEMU asserts this: the kernel must re-arm exactly what was harvested.
            self._problems.append(f"KVM_RESET_DIRTY_RINGS reset {reset} entries, {n} were harvested")

    @property
    def problems(self) -> List[str]:
        return self._problems


class SeedCollector(Collector):
    """A seed-era design: the VM is created with it, harvest() is its own."""

    def __init__(self, name: str, entries: Optional[int] = None) -> None:
        self.name = name
        self.entries = entries           # ring seed designs: entries per ring

    def vm_options(self) -> dict:
        if self.entries is None:
            return {"design": self.name}
        return {"design": self.name, "design_options": {"entries": int(self.entries)}}

    def _harvest_into(self, out: Harvest) -> None:
        for k, v in self.vm.design.harvest().items():
            _merge(out, int(k), np.asarray(v, dtype=np.uint64))


def _group(slots: np.ndarray, offs: np.ndarray) -> Harvest:
    """{slot: offsets} from parallel arrays of ring entries."""
    if len(slots) == 0:
        return {}
    first = int(slots[0])
    if (slots == first).all():
        return {first: offs.astype(np.uint64, copy=True)}     # offs may be a reused buffer
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
        return SeedCollector(design, ring_entries if design in RING_DESIGNS else None)
    raise ValueError(f"unknown design {design!r}; known: {', '.join(list(BASE_DESIGNS) + seeds)}")
