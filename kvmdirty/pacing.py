"""Pacing a vCPU at a dirty rate in real time: a token bucket between write batches.

A paced vCPU thread earns tokens (page writes) at its rate by the clock and
spends them in batches: when at least one quantum's worth (1 ms of writes,
at least one write) has accrued it runs every token it holds, up to the
batch cap, in one ``vcpu.run`` call (the compiled write loop, GIL released);
otherwise it sleeps until one quantum has accrued.  So the Python cost is
one bucket check per batch, never one per write, and a vCPU asked for more
than the machine can do runs back-to-back batches of the cap, as an unpaced
one does.

The bucket holds at most ``burst_s`` of writes (10 ms): a vCPU held up for
longer (a ring-full stall, a busy host) does not make the lost time up
later, as a guest held up does not; the run's achieved rate shows it.
"""
from __future__ import annotations

import time
from typing import Callable

from .api import PAGE_SIZE

#: Batches are at least this much time's worth of writes (and at least one write).
QUANTUM_S = 0.001
#: The bucket holds at most this much time's worth of writes.
BURST_S = 0.010


def pages_per_s(bytes_per_s: float) -> float:
    """A dirty rate in bytes/s as page writes per second (one write dirties one 4 KiB page)."""
    return bytes_per_s / PAGE_SIZE


class TokenBucket:
    """Page-write tokens earned at ``rate`` per second by ``clock`` (integer nanoseconds)."""

    def __init__(self, rate: float, *, quantum_s: float = QUANTUM_S, burst_s: float = BURST_S,
                 clock: Callable[[], int] = time.perf_counter_ns) -> None:
        if not rate > 0 or rate == float("inf"):
            raise ValueError(f"a token rate must be finite and > 0, got {rate!r}")
        self.rate = float(rate)
        self.clock = clock
        #: the smallest batch worth running: one quantum's writes, at least one
        self.quantum = max(1, int(self.rate * quantum_s))
        #: the most tokens held: ``burst_s`` of writes, at least one quantum
        self.capacity = max(float(self.quantum), self.rate * burst_s)
        self.tokens = 0.0
        self._last = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self._last) * self.rate / 1e9)
        self._last = now

    def take(self, most: int) -> int:
        """Writes to run now: every whole token held, at most ``most``; 0 until a quantum accrued."""
        if most < 1:
            return 0
        self._refill()
        if self.tokens < min(self.quantum, most):
            return 0
        n = min(int(self.tokens), most)
        self.tokens -= n
        return n

    def wait_s(self, most: int) -> float:
        """Seconds until ``take(most)`` gives writes (0 if it would now)."""
        self._refill()
        need = min(self.quantum, max(1, most)) - self.tokens
        return max(0.0, need / self.rate)
