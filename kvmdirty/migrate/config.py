"""What to migrate and how: one :class:`MigrationConfig` per run (plain data).

Units: memory in bytes (binary: 24G = 24 GiB); rates in bytes per second
(decimal: 800 MB/s = 800e6 B/s, 10 Gb/s = 1.25e9 B/s).  A guest write dirties
one 4 KiB page, so a dirty rate of R B/s is R / 4096 page writes per second,
split evenly over the vCPUs (or given per vCPU: ``vcpu_dirty_rates``).  QEMU's defaults: max-bandwidth 128 MiB/s,
downtime-limit 300 ms, x-clear-bitmap-shift 18, reaper period 1 s,
auto-converge 20 % / +10 % / 99 %, vcpu-dirty-limit 1 MB/s.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from ..api import PAGE_SIZE
from .trackers import DESIGNS

QEMU_MAX_BANDWIDTH = 128 << 20
AIDS = ("none", "auto-converge", "dirty-limit")


@dataclass
class MigrationConfig:
    memory: int = 4 << 30
    vcpus: int = 4
    dirty_rate: float = 100e6
    vcpu_dirty_rates: Tuple[float, ...] = ()   # per-vCPU rates instead (their sum is the dirty rate)
    pattern: str = "uniform"
    trace: Optional[str] = None
    trace_speed: Optional[float] = None  # replay a timed trace at its own pace x this (dirty_rate unused)
    trace_end: Optional[str] = None      # a migration outlasting the trace: "loop" or "stop" it
    trace_unit: str = "pages"            # a CSV trace's second column: gfns, or "bytes" (gpa)
    design: str = "bitmap"
    ring_entries: int = 4096
    reaper_period: float = 1.0
    clear_shift: int = 18
    pml: bool = False                    # Intel PML: the ring reserves 512 more entries (soft limit)
    bandwidth: float = 1.25e9            # the link
    max_bandwidth: float = QEMU_MAX_BANDWIDTH
    downtime_limit: float = 0.3
    aid: str = "none"
    tailslow: bool = False
    dirty_limit_mb: float = 1.0          # vcpu-dirty-limit, MB/s per vCPU
    postcopy_after: int = 0              # switch to postcopy after this many syncs (0: never)
    postcopy_rtt: float = 100e-6         # network round trip of a postcopy page request (a link parameter)
    max_time: float = 600.0              # give up (did not converge) after this many virtual seconds
    max_rounds: int = 0                  # ... or after this many syncs (0: no limit)
    quantum: float = 0.01                # virtual seconds per scheduling step
    slot_pages: int = 0                  # pages per memslot (0: as few slots as KVM allows)
    seed: int = 1
    faults: Tuple[str, ...] = ()         # deliberate kernel ordering bugs (kvmdirty.FAULTS)
    cost_overrides: Dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.memory < PAGE_SIZE or self.memory % PAGE_SIZE:
            raise ValueError(f"memory must be a positive multiple of {PAGE_SIZE} bytes")
        if self.vcpus < 1:
            raise ValueError("vcpus must be >= 1")
        self.vcpu_dirty_rates = tuple(float(r) for r in self.vcpu_dirty_rates)
        if self.vcpu_dirty_rates:
            if len(self.vcpu_dirty_rates) != self.vcpus:
                raise ValueError(f"vcpu_dirty_rates has {len(self.vcpu_dirty_rates)} rates "
                                 f"for {self.vcpus} vCPUs")
            if min(self.vcpu_dirty_rates) < 0:
                raise ValueError("vcpu_dirty_rates must be >= 0")
            self.dirty_rate = sum(self.vcpu_dirty_rates)
        if self.dirty_rate < 0:
            raise ValueError("dirty_rate must be >= 0")
        if self.design not in DESIGNS:
            raise ValueError(f"unknown design {self.design!r}; known: {', '.join(DESIGNS)}")
        if self.bandwidth <= 0 or self.max_bandwidth <= 0:
            raise ValueError("bandwidths must be > 0")
        if self.downtime_limit <= 0:
            raise ValueError("downtime_limit must be > 0")
        if self.aid not in AIDS:
            raise ValueError(f"unknown aid {self.aid!r}; known: {', '.join(AIDS)}")
        if self.aid == "dirty-limit" and self.design != "ring":
            raise ValueError("dirty-limit needs the dirty ring (QEMU refuses it otherwise)")
        if not 0 < self.quantum <= 0.1:
            raise ValueError("quantum must be in (0, 0.1] seconds")
        if self.postcopy_after < 0 or self.postcopy_rtt < 0:
            raise ValueError("postcopy_after and postcopy_rtt must be >= 0")
        if self.max_time <= 0:
            raise ValueError("max_time must be > 0")
        self.faults = tuple(self.faults)
        if self.trace_speed is not None:
            if self.trace is None:
                raise ValueError("trace_speed replays a timed trace: give the trace file")
            if not (self.trace_speed > 0 and math.isfinite(self.trace_speed)):
                raise ValueError(f"trace_speed must be finite and > 0, got {self.trace_speed}")
        if self.trace_unit not in ("pages", "bytes"):
            raise ValueError(f"trace_unit must be 'pages' or 'bytes', got {self.trace_unit!r}")
        if self.trace_unit != "pages" and self.trace_speed is None:
            raise ValueError("trace_unit applies to a trace replayed at its pace (trace_speed)")
        if self.trace_end is not None:
            if self.trace_speed is None:
                raise ValueError("trace_end applies to a trace replayed at its pace (trace_speed)")
            if self.trace_end not in ("loop", "stop"):
                raise ValueError(f"trace_end must be 'loop' or 'stop', got {self.trace_end!r}")

    @property
    def npages(self) -> int:
        return self.memory // PAGE_SIZE

    @property
    def send_rate(self) -> float:
        return min(self.bandwidth, self.max_bandwidth)

    def to_json(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["faults"] = list(self.faults)
        d["vcpu_dirty_rates"] = list(self.vcpu_dirty_rates)
        return d
