"""The settings ``kvmdirty compare`` runs: designs x swept knobs, each repeated.

Knobs that take a list: ring entries, harvest interval, vCPUs, dirty rate,
guest memory.  ``expand`` gives every combination once per design, in a
stable order (design, memory, vCPUs, dirty rate, ring entries, interval);
the ring size is a knob only of the designs that have a ring, so the bitmap
designs get one row per combination of the other knobs, not one per ring
size.  ``run_grid`` runs each setting ``repeat`` times and keeps every run.

A paced grid that is given no length runs each setting for ``auto_duration``
of its interval: two harvest intervals, at least 0.25 s and at most 1 s, so
a short cadence is seen many times and a long one at least once, and a grid
stays quick.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .collectors import RING_DESIGNS, all_designs
from .runner import RunResult, RunSpec, preflight, run

#: A dirty rate as given: bytes/s, and whether it is per vCPU (``200M/vcpu``) or for the guest.
DirtyRate = Tuple[float, bool]

#: The knobs, in the order of expansion and of the table's columns.
KNOBS = ("memory", "vcpus", "dirty_rate", "ring_entries", "interval")

#: auto_duration's bounds (seconds) and its multiple of the interval.
AUTO_MIN_S, AUTO_MAX_S, AUTO_INTERVALS = 0.25, 1.0, 2


def auto_duration(interval: float) -> float:
    """Seconds a paced setting runs when no length was given (see the module docstring)."""
    return min(AUTO_MAX_S, max(AUTO_MIN_S, AUTO_INTERVALS * interval))


@dataclass(frozen=True)
class Setting:
    """One combination: a design and a value of every knob (one row of the table)."""

    design: str
    memory: int
    vcpus: int
    dirty_rate: Optional[DirtyRate]     # None: unpaced (writes per step)
    ring_entries: Optional[int]         # None: the design has no ring
    interval: float                     # seconds between harvests (threads)
    duration: Optional[float] = None    # seconds per run (None: the base spec's length)

    @property
    def guest_rate(self) -> Optional[float]:
        """The dirty rate for the whole guest, bytes/s (a per-vCPU rate times the vCPUs)."""
        if self.dirty_rate is None:
            return None
        rate, per_vcpu = self.dirty_rate
        return rate * self.vcpus if per_vcpu else rate

    def to_dict(self) -> Dict[str, object]:
        return {"design": self.design, "memory": self.memory, "vcpus": self.vcpus,
                "dirty_rate": self.guest_rate, "ring_entries": self.ring_entries,
                "interval": self.interval, "duration": self.duration}


@dataclass
class Knobs:
    """The values of every knob (one value each unless swept)."""

    designs: List[str]
    memory: List[int]
    vcpus: List[int]
    dirty_rate: List[Optional[DirtyRate]] = field(default_factory=lambda: [None])
    ring_entries: List[int] = field(default_factory=lambda: [4096])
    interval: List[float] = field(default_factory=lambda: [0.01])
    auto_duration: bool = False         # each setting runs auto_duration(interval) seconds

    def __post_init__(self) -> None:
        known = all_designs()
        for d in self.designs:
            if d not in known:
                raise ValueError(f"unknown design {d!r}; known: {', '.join(known)}")
        for name in ("designs",) + KNOBS:
            values = getattr(self, name)
            if not values:
                raise ValueError(f"{name.replace('_', ' ')}: no value given")
            if len(set(values)) != len(values):
                raise ValueError(f"{name.replace('_', ' ')}: a value is given twice")

    def swept(self) -> List[str]:
        """The knobs given more than one value (the table and the plot show them)."""
        return [k for k in KNOBS if len(getattr(self, k)) > 1]


def has_ring(design: str) -> bool:
    """Whether ``ring_entries`` sizes this design."""
    return design in RING_DESIGNS


def expand(knobs: Knobs) -> List[Setting]:
    """Every setting, each once (see the module docstring for the order)."""
    out: List[Setting] = []
    seen = set()
    for d in knobs.designs:
        rings: Sequence[Optional[int]] = knobs.ring_entries if has_ring(d) else [None]
        for mem in knobs.memory:
            for n in knobs.vcpus:
                for rate in knobs.dirty_rate:
                    for ring in rings:
                        for iv in knobs.interval:
                            dur = auto_duration(iv) if knobs.auto_duration else None
                            s = Setting(d, mem, n, rate, ring, iv, dur)
                            if s not in seen:
                                seen.add(s)
                                out.append(s)
    return out


def spec_for(base: RunSpec, s: Setting) -> RunSpec:
    """``base`` with the setting's design and knob values."""
    return dataclasses.replace(base, design=s.design, memory=s.memory, vcpus=s.vcpus,
                               dirty_rate=s.guest_rate, interval=s.interval,
                               duration=s.duration if s.duration is not None else base.duration,
                               ring_entries=s.ring_entries if s.ring_entries is not None
                               else base.ring_entries)


@dataclass
class Cell:
    """A setting and its runs (``repeat`` of them once done)."""

    setting: Setting
    runs: List[RunResult] = field(default_factory=list)


def runnable(base: RunSpec, settings: Sequence[Setting],
             check: Callable[[RunSpec], None] = preflight) -> Tuple[List[Setting], List[Tuple[Setting, str]]]:
    """The settings a design can take, and the others with the reason.

    Every spec is validated (bad input raises); then each design is set up once
    per ring size: a size a design refuses (indexed-ring's u16 indexes stop at
    32768 entries) leaves that setting out, said so, instead of failing a grid.
    Raises ValueError when nothing is left to run.
    """
    specs = [spec_for(base, s) for s in settings]
    for sp in specs:
        sp.validate()
    refused: Dict[tuple, Optional[str]] = {}
    ok, skipped = [], []
    for s, sp in zip(settings, specs):
        key = (sp.design, s.ring_entries, sp.backend)
        if key not in refused:
            try:
                check(sp)
                refused[key] = None
            except ValueError as e:             # KvmError is an OSError: a real failure, raised
                refused[key] = str(e)
        if refused[key] is None:
            ok.append(s)
        else:
            skipped.append((s, refused[key]))
    if not ok:
        raise ValueError("no setting can run: " + "; ".join(sorted({
            f"{s.design}" + (f" with {s.ring_entries} entries" if s.ring_entries else "") + f": {why}"
            for s, why in skipped})))
    return ok, skipped


def run_grid(base: RunSpec, settings: Sequence[Setting], repeat: int = 1,
             runner: Callable[..., RunResult] = run,
             on_run: Optional[Callable[[Setting, int], None]] = None,
             on_progress: Optional[Callable[[float], None]] = None) -> List[Cell]:
    """Run every setting ``repeat`` times (check them first with ``runnable``)."""
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    specs = [spec_for(base, s) for s in settings]
    for sp in specs:
        sp.validate()
    cells = []
    for s, sp in zip(settings, specs):
        cell = Cell(s)
        for k in range(repeat):
            if on_run is not None:
                on_run(s, k)
            cell.runs.append(runner(sp, on_progress=on_progress))
        cells.append(cell)
    return cells
