"""Results of a migration or a checkpoint run: plain dataclasses, JSON-able."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class RoundRow:
    """One pre-copy sync (QEMU's dirty-sync count) and what followed it."""

    round: int                 # 0 = the bulk round that sends every page
    start: float               # virtual seconds at the sync
    sync_cost: float           # seconds the migration thread spent in the sync
    pages_dirty: int           # pages in the migration bitmap right after the sync
    pages_sent: int            # pages sent between this sync and the next
    bandwidth: float           # bytes/s measured in the last ~100 ms period
    expected_downtime: float   # pages_dirty x page size / bandwidth


@dataclass
class VcpuStats:
    """Where one vCPU's virtual time went."""

    vcpu: int
    writes: int = 0            # guest writes executed
    requested: int = 0         # writes its rate asked for over the run
    fault_time: float = 0.0    # logging write faults
    stall_time: float = 0.0    # ring-full exits and reaps, kicks, waits on a sync's lock
    throttle_time: float = 0.0 # auto-converge / dirty-limit sleeps
    ring_full_exits: int = 0

    @property
    def progress(self) -> float:
        return self.writes / self.requested if self.requested else 1.0


@dataclass
class TimelinePoint:
    t: float
    dirty_pages: int           # pages still to send (migration bitmap)
    bytes_sent: int


@dataclass
class MigrationResult:
    """Everything one migration produced (see docs/migrate.md for each field)."""

    design: str
    params: Dict[str, Any]
    converged: bool
    why: str                   # how it ended
    total_time: float
    downtime: float
    bytes_sent: int
    guest_bytes: int
    rounds: int
    verified: bool             # destination == source page by page
    mismatched_gfns: List[int] = field(default_factory=list)
    vcpus: List[VcpuStats] = field(default_factory=list)
    table: List[RoundRow] = field(default_factory=list)
    timeline: List[TimelinePoint] = field(default_factory=list)
    stop_time: Optional[float] = None   # when stop-and-copy (or postcopy) began
    tracker: Dict[str, float] = field(default_factory=dict)  # per-design counters
    throttle_pct: float = 0.0  # auto-converge percentage at the end
    postcopy_faults: int = 0
    postcopy_stall: float = 0.0
    final_dirty_rate: float = 0.0  # bytes/s newly dirtied, last sync period
    wall_time: float = 0.0
    trace_laps: int = 0        # timed trace: passes started (> 1: it looped); 0 without one
    trace_stopped: bool = False  # timed trace: the guest stopped writing at its end

    @property
    def sent_ratio(self) -> float:
        return self.bytes_sent / self.guest_bytes if self.guest_bytes else 0.0

    @property
    def progress(self) -> float:
        req = sum(v.requested for v in self.vcpus)
        return sum(v.writes for v in self.vcpus) / req if req else 1.0

    def to_json(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sent_ratio"] = self.sent_ratio
        d["progress"] = self.progress
        for v, s in zip(d["vcpus"], self.vcpus):
            v["progress"] = s.progress
        return d


@dataclass
class CheckpointResult:
    """A checkpointing run: one pause per epoch."""

    design: str
    params: Dict[str, Any]
    checkpoints: int
    pauses: List[float]        # seconds the guest was paused, per checkpoint
    pages: List[int]           # pages copied, per checkpoint
    guest_time: float          # virtual seconds the guest ran
    total_time: float          # guest time + pauses + stalls
    slowdown: float            # total_time / guest_time of work done
    verified: bool
    mismatched_gfns: List[int] = field(default_factory=list)
    vcpus: List[VcpuStats] = field(default_factory=list)
    wall_time: float = 0.0
    trace_laps: int = 0
    trace_stopped: bool = False

    def percentile(self, q: float) -> float:
        import numpy as np
        return float(np.percentile(self.pauses, q)) if self.pauses else 0.0

    def to_json(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["pause_p50"], d["pause_p99"] = self.percentile(50), self.percentile(99)
        d["pause_max"] = max(self.pauses) if self.pauses else 0.0
        return d


class VerificationError(AssertionError):
    """The destination differs from the source: the tracker lost a write."""

    def __init__(self, gfns: List[int], total: int) -> None:
        self.gfns, self.total = gfns, total
        super().__init__(f"destination differs from source at {total} pages, gfns {gfns[:16]}"
                         + (" ..." if total > 16 else ""))
