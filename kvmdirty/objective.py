"""Ranking compare's settings: an objective, a stall bound, the best setting per design.

A setting's figure is the median over its repeated runs.  A setting is
feasible when it lost no write and, with ``max_stall_ms``, when its longest
single ring-full stall (median over runs of each run's longest) is within
the bound.  Settings are sorted feasible first, by the objective, ties
broken by the tie-breakers (less tracking CPU, then less stall), so that
e.g. the many settings with no stall at all are told apart by their cost.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .comparecolumns import BY_KEY
from .comparegrid import Cell
from .spread import Spread

#: name -> (metric key, what it means)
OBJECTIVES: Dict[str, Tuple[str, str]] = {
    "stall": ("stall_pct", "least vCPU time lost to ring-full stalls"),
    "stall-p99": ("stall_p99_s", "lowest 99th percentile stall per ring-full exit"),
    "stall-max": ("stall_max_s", "shortest longest stall per ring-full exit"),
    "tracking-cpu": ("tracking_pct", "least tracking CPU"),
    "ns-per-page": ("tracking_ns_per_page", "lowest tracking CPU per dirty page"),
    "harvest-p99": ("harvest_p99_s", "lowest 99th percentile harvest latency"),
    "age-p99": ("age_p99_s", "freshest dirty set: lowest 99th percentile page age"),
    "throughput": ("achieved_rate", "highest guest dirty rate achieved"),
}
TIE_BREAKERS = ("tracking_pct", "stall_pct")


def metric_spread(cell: Cell, key: str) -> Optional[Spread]:
    """The spread over the cell's runs of the column ``key``."""
    col = BY_KEY[key]
    return Spread.of(col.value(r) for r in cell.runs)


def _median(cell: Cell, key: str) -> Optional[float]:
    s = metric_spread(cell, key)
    return None if s is None else s.median


@dataclass
class Ranked:
    """A cell's place: its objective (median over its runs), whether it qualifies, and why not."""

    cell: Cell
    objective: Optional[float]     # median, in the metric's units (seconds, bytes/s, ...)
    feasible: bool
    why_not: str                   # why infeasible ("" when feasible)
    rank: int = 0


def rank(cells: Sequence[Cell], objective: str = "stall",
         max_stall_ms: Optional[float] = None) -> List[Ranked]:
    """The cells, best first (see the module docstring)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    key = OBJECTIVES[objective][0]
    col = BY_KEY[key]
    sign = 1.0 if col.lower_is_better else -1.0
    out = []
    for c in cells:
        why = []
        if any((BY_KEY["lost"].value(r) or 0) > 0 for r in c.runs) or any(not r.ok for r in c.runs):
            why.append("lost writes or broke the protocol")
        if max_stall_ms is not None:
            longest = _median(c, "stall_max_s") or 0.0
            if longest * 1e3 > max_stall_ms:
                why.append(f"longest stall {longest * 1e3:.2f} ms > {max_stall_ms:g} ms")
        out.append(Ranked(c, _median(c, key), not why, "; ".join(why)))

    def order(r: Ranked):
        def k(v: Optional[float], s: float = 1.0) -> float:
            return math.inf if v is None else s * v
        return (not r.feasible, k(r.objective, sign)) + tuple(k(_median(r.cell, t)) for t in TIE_BREAKERS)

    out.sort(key=order)
    for i, r in enumerate(out, 1):
        r.rank = i
    return out


def best_per_design(ranked: Sequence[Ranked]) -> Dict[str, Optional[Ranked]]:
    """Each design's best feasible setting (None when none of its settings is feasible)."""
    best: Dict[str, Optional[Ranked]] = {}
    for r in ranked:
        d = r.cell.setting.design
        if d not in best:
            best[d] = None
        if best[d] is None and r.feasible:
            best[d] = r
    return best
