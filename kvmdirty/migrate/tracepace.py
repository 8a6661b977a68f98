"""A recorded trace as the guest's dirtying, at the trace's own pace.

Each vCPU replays its share of the trace's events (``kvmdirty.trace.schedule``)
by its own clock: the virtual time it actually ran.  A vCPU that is stalled
(ring full, a sync's lock) or throttled falls behind the trace, as a real
guest would; ``due`` says how many of its events the trace had asked for by
a given time, so progress = done / due.  When the migration outlasts the
trace it loops or stops, as the caller chose; with no choice it is an error
at that point, never a silent end.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..trace import AT_END, Trace, load, split

_EMPTY = np.zeros(0, np.uint64)


class TracePace:
    """Per-vCPU event streams of one trace, consumed by each vCPU's clock (seconds)."""

    def __init__(self, trace: Trace, vcpus: int, speed: float = 1.0,
                 at_end: Optional[str] = None) -> None:
        if at_end is not None and at_end not in AT_END:
            raise ValueError(f"trace_end must be one of {AT_END}, not {at_end!r}")
        self.at_end = at_end
        self.speed = speed
        self.length = max(trace.duration_ns, 1) / speed / 1e9
        shares = split(trace, vcpus, speed)
        self.due_s = [d for d, _ in shares]
        self.gfns = [g for _, g in shares]
        self.cursor = [0] * vcpus
        self.lap = [0] * vcpus
        self.stopped = False

    @classmethod
    def open(cls, path: str, vcpus: int, speed: float, at_end: Optional[str],
             unit: str = "pages") -> "TracePace":
        return cls(load(path, unit=unit), vcpus, speed, at_end)

    @property
    def npages(self) -> int:
        """Pages the trace's gfns need (one past the highest)."""
        return max((int(g.max()) + 1 for g in self.gfns if len(g)), default=0)

    def rate(self, i: int) -> float:
        """vCPU i's average writes per second over one pass of the trace."""
        return len(self.gfns[i]) / self.length

    @property
    def laps(self) -> int:
        return 1 + max(self.lap, default=0)

    def _lap_end(self, i: int) -> float:
        return (self.lap[i] + 1) * self.length

    def take(self, i: int, until: float) -> np.ndarray:
        """vCPU i's events due before its clock reads ``until``; advances past them."""
        out = []
        due, g = self.due_s[i], self.gfns[i]
        while True:
            base = self.lap[i] * self.length
            # A pass is [0, length]: its last event is due exactly at its end.
            end = len(due) if until >= self._lap_end(i) else \
                int(np.searchsorted(due, until - base, side="left"))
            if end > self.cursor[i]:
                out.append(g[self.cursor[i]:end])
                self.cursor[i] = end
            if until < self._lap_end(i) or self.stopped:
                break
            if self.at_end == "loop":
                self.lap[i] += 1
                self.cursor[i] = 0
            elif self.at_end == "stop":
                self.stopped = True
                break
            else:
                raise ValueError(f"the migration outlasted the trace ({self.length:.3f} s at speed "
                                 f"{self.speed:g}): choose to loop it or to stop at its end "
                                 f"(--trace-end loop|stop)")
        if not out:
            return _EMPTY
        return out[0] if len(out) == 1 else np.concatenate(out)

    def due(self, i: int, t: float) -> int:
        """Events of vCPU i the trace asks for by time ``t`` (counting loops, or up to a stop)."""
        n = len(self.due_s[i])
        if self.at_end == "loop":
            laps, rest = divmod(t, self.length)
            return int(laps) * n + int(np.searchsorted(self.due_s[i], rest, side="left"))
        return int(np.searchsorted(self.due_s[i], t, side="left")) if t < self.length else n
