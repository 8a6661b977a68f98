"""A timed trace replayed in real time by vCPU threads (``compare --trace T --speed S``).

Each vCPU thread owns its share of the trace (``kvmdirty.trace.split``) and
writes each event when it is due by the wall clock: all events already due
go in one batch, then the thread sleeps until the next one (or until told to
stop).  A vCPU that cannot keep up (ring-full exits, a busy host) falls
behind; ``late_s`` says by how much at worst.  A run longer than the trace
loops it or stops at its end, as the caller chose; without a choice it is
refused before anything runs.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Optional

import numpy as np

from .trace import AT_END, Trace, split


class TimedReplay:
    """The trace's events for ``vcpus`` threads over ``run_s`` seconds of replay."""

    def __init__(self, trace: Trace, vcpus: int, speed: float, run_s: Optional[float] = None,
                 at_end: Optional[str] = None) -> None:
        if at_end is not None and at_end not in AT_END:
            raise ValueError(f"trace end must be one of {AT_END}, not {at_end!r}")
        self.length = max(trace.duration_ns, 1) / speed / 1e9
        if run_s is not None and run_s > self.length and at_end is None:
            raise ValueError(f"the run ({run_s:g} s) is longer than the trace at speed {speed:g} "
                             f"({self.length:.3f} s): choose to loop it or to stop at its end "
                             f"(--trace-end loop|stop)")
        self.run_s = self.length if run_s is None else run_s
        self.at_end = at_end
        self.shares = split(trace, vcpus, speed)
        self.npages = max((int(g.max()) + 1 for _, g in self.shares if len(g)), default=0)
        self.late_s = [0.0] * vcpus
        self.laps = [1] * vcpus

    @property
    def ended(self) -> str:
        if self.run_s <= self.length:
            return "run ended within the trace" if self.run_s < self.length else "trace end"
        return f"looped ({max(self.laps)} passes)" if self.at_end == "loop" else "stopped at trace end"

    def writes(self, i: int, lo: float, hi: float, stop: threading.Event,
               run: Callable[[np.ndarray], None], clock: Callable[[], float] = time.perf_counter) -> int:
        """Thread i: write its events due in replay time [lo, hi), each when due; returns the count."""
        due, gfns = self.shares[i]
        start = clock() - lo
        done = 0
        lap = int(lo // self.length)
        if self.at_end != "loop" and lap > 0:
            return 0                                   # stopped at the trace's end
        base = lap * self.length
        cursor = int(np.searchsorted(due, lo - base, side="left"))
        while not stop.is_set():
            end_t = min(hi, base + self.length)
            # A pass is [0, length]: its last event is due exactly at its end.
            closed = end_t >= base + self.length
            now = clock() - start
            limit = min(now, end_t)
            side = "right" if closed and limit >= end_t else "left"
            upto = int(np.searchsorted(due, limit - base, side=side))
            if upto > cursor:
                self.late_s[i] = max(self.late_s[i], now - (base + float(due[cursor])))
                run(gfns[cursor:upto])
                done += upto - cursor
                cursor = upto
                continue
            if cursor < len(due) and (base + due[cursor] < end_t or
                                      (closed and base + due[cursor] <= end_t)):
                stop.wait(min(base + float(due[cursor]) - now, 0.05))
                continue
            # Nothing more due in this pass before the window's end: done, or the next pass.
            if end_t >= hi or self.at_end != "loop":
                return done
            lap += 1
            base = lap * self.length
            cursor = 0
            self.laps[i] = max(self.laps[i], lap + 1)
        return done
