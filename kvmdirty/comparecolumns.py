"""The measured columns of ``kvmdirty compare``: what each is, its unit, how it is shown.

One list, used by the table, the JSON cells, the objectives, ``--help`` and
(by a test) the README, so a column cannot be shown without a definition.
Values are read from a RunResult (kvmdirty.runner) in its units (seconds,
pages, bytes/s) and shown times ``scale`` in the unit of the header.  Totals
are shown per second of the run (or as a share of it), because the settings
of one grid may run for different lengths (kvmdirty.comparegrid.auto_duration).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

from .runner import RunResult


def _lost(r: RunResult) -> Optional[float]:
    n = r.lost_pages if r.lost_pages is not None else r.violations
    if n is None and r.unwritten_pages is None:
        return None
    return float((n or 0) + (r.unwritten_pages or 0))


def _pct_of_requested(r: RunResult) -> Optional[float]:
    return None if not r.dirty_rate else r.achieved_rate / r.dirty_rate


def _per_s(key: str) -> Callable[[RunResult], Optional[float]]:
    """A run's total ``key`` per second the vCPUs ran (runs of different lengths compare)."""
    def get(r: RunResult) -> Optional[float]:
        v = getattr(r, key)
        return None if v is None or not r.guest_s else v / r.guest_s
    return get


def _per_vcpu_s(key: str) -> Callable[[RunResult], Optional[float]]:
    """A run's total ``key`` (seconds, summed over vCPUs) over vCPUs x run time: a fraction."""
    def get(r: RunResult) -> Optional[float]:
        v = getattr(r, key)
        return None if v is None or not r.guest_s else v / (r.vcpus * r.guest_s)
    return get


def _harvests_per_s(r: RunResult) -> Optional[float]:
    n = r.harvest_calls - (1 if r.initial_harvest_s is not None else 0)
    return n / r.guest_s if r.guest_s else None


@dataclass(frozen=True)
class Column:
    """A measured figure of a run."""

    key: str                      # the JSON name (a RunResult field, or derived)
    head: str                     # the table header: what, a line break, the unit
    help: str                     # the definition (--help, README)
    scale: float = 1.0            # shown value = value x scale
    digits: int = 1               # decimals shown (0: an integer with thousands separators)
    floor: float = 0.0            # in shown units: smaller differences between runs are noise
    get: Optional[Callable[[RunResult], Optional[float]]] = None
    paced_only: bool = False      # only when a dirty rate was asked for
    lower_is_better: bool = True
    zero_when_none: bool = False  # no sample means none of it happened (no stall: 0)

    @property
    def title(self) -> str:
        """The header on one line (--help, README, warnings)."""
        return self.head.replace("\n", " ")

    def value(self, r: RunResult) -> Optional[float]:
        v = self.get(r) if self.get is not None else getattr(r, self.key)
        if v is None:
            return 0.0 if self.zero_when_none else None
        return float(v)


COLUMNS: List[Column] = [
    Column("achieved_rate", "guest\nMB/s",
           "guest writes x 4 KiB per second of the run (each write dirties one page): the dirty "
           "rate the vCPUs achieved", scale=1e-6, floor=1.0, lower_is_better=False),
    Column("achieved_pct", "% of\nasked", "guest MB/s over the --dirty-rate asked for, in percent",
           scale=100.0, digits=0, floor=1.0, get=_pct_of_requested, paced_only=True,
           lower_is_better=False),
    Column("stall_pct", "stall\n% vCPU",
           "share of the vCPUs' time lost to ring-full exits: each stall lasts from the exit until "
           "the harvest it forced has reset the rings and the vCPU can run again; summed over "
           "vCPUs, over vCPUs x run time", scale=100.0, digits=2, floor=0.01,
           get=_per_vcpu_s("stall_total_s"), zero_when_none=True),
    Column("exits_per_s", "full exits\n/s", "ring-full exits (DIRTY_RING_FULL; DIRTY_LOG_FULL for "
           "indexed-ring) per second, all vCPUs", floor=1.0, get=_per_s("stall_exits")),
    Column("stall_p50_s", "stall p50\nms", "median stall of one ring-full exit", scale=1e3,
           digits=2, floor=0.05, zero_when_none=True),
    Column("stall_p99_s", "stall p99\nms", "99th percentile of the stall of one ring-full exit",
           scale=1e3, digits=2, floor=0.05, zero_when_none=True),
    Column("stall_max_s", "stall max\nms", "longest stall of one ring-full exit (what "
           "--max-stall-ms bounds)", scale=1e3, digits=2, floor=0.05, zero_when_none=True),
    Column("harvests_per_s", "harvests\n/s", "harvests per second: every --interval, on each "
           "ring-full exit, and the final one with the vCPUs stopped (not clear-log's "
           "INITIALLY_SET one, before the guest runs)", floor=1.0, get=_harvests_per_s),
    Column("harvest_p50_s", "harvest p50\nms", "median wall time of one harvest: the design's "
           "own calls (collect + KVM_RESET_DIRTY_RINGS; GET_DIRTY_LOG; GET + CLEAR_DIRTY_LOG)",
           scale=1e3, digits=2, floor=0.05),
    Column("harvest_p99_s", "harvest p99\nms", "99th percentile of the wall time of one harvest",
           scale=1e3, digits=2, floor=0.05),
    Column("harvest_max_s", "harvest max\nms", "longest harvest (clear-log's INITIALLY_SET "
           "first harvest is reported apart)", scale=1e3, digits=2, floor=0.05),
    Column("pages_per_harvest_p50", "pages per\nharvest", "median of the distinct pages the guest "
           "dirtied that one harvest returned", digits=0, floor=1.0, lower_is_better=False),
    Column("age_p50_s", "age p50\nms", "median age of a harvested page: from the first write "
           "that dirtied it to the end of the harvest that returned it (every 8th page)", scale=1e3,
           floor=0.05),
    Column("age_p99_s", "age p99\nms", "99th percentile of that age (how stale the dirty set "
           "can be)", scale=1e3, floor=0.05),
    Column("faults_per_s", "WP faults\nk/s", "write-protect faults the guest took (each logs a "
           "page), thousands per second", scale=1e-3, floor=0.1, get=_per_s("wp_faults")),
    Column("dirtied_per_s", "dirty pages\nk/s", "pages the guest dirtied, once per harvest that "
           "returned them (a page in two vCPUs' rings once; clear-log's INITIALLY_SET pages "
           "not counted), thousands per second", scale=1e-3, floor=0.1,
           get=_per_s("pages_dirtied"), lower_is_better=False),
    Column("tracking_pct", "tracking\nCPU %", "CPU time of every harvest, in whichever thread "
           "ran it (the collector, or a vCPU after a ring-full exit), in percent of one CPU over "
           "the run", scale=100.0, digits=2, floor=0.01, get=_per_s("tracking_s")),
    Column("tracking_ns_per_page", "ns per\ndirty page", "tracking CPU over dirty pages",
           floor=1.0),
    Column("lost", "lost\npages", "pages whose last write the harvests missed (the verifier: "
           "must be 0)", digits=0, get=_lost),
]

BY_KEY = {c.key: c for c in COLUMNS}


def columns(paced: bool) -> List[Column]:
    """The columns of a table (the per-request ones only when a dirty rate was asked for)."""
    return [c for c in COLUMNS if paced or not c.paced_only]


def help_text() -> str:
    """Every column and its definition, for --help."""
    lines = ["columns (median over --repeat runs; the line under it: the runs' spread):"]
    lines += [f"  {c.title:<16} {c.help}" for c in COLUMNS]
    return "\n".join(lines)
