"""Convergence aids, as QEMU computes them.

auto-converge (migration/ram.c migration_trigger_throttle, mig_throttle_guest_down;
system/cpu-throttle.c): checked in a bitmap sync at least 1 s after the last
check; when the bytes dirtied in the period exceed ``trigger`` % of the bytes
sent, twice, throttle: 20 % first, then +10 % per trigger (with tailslow, at
most what the measured ratio needs), up to 99 %.  A throttled vCPU sleeps
pct / (1 - pct) x 10 ms per 10 ms of running: it runs (1 - pct) of the time.

dirty-limit (system/dirtylimit.c, ring only): the same trigger switches it
on; each vCPU then sleeps ``throttle_us_per_full`` after every DIRTY_RING_FULL
exit, re-tuned each period (1 s) from the vCPU's measured dirty rate against
the quota (``vcpu-dirty-limit`` MB/s): a linear step when more than 50 % off,
a tenth of the ring-full time otherwise, nothing within 25 MB/s.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..api import PAGE_SIZE

MB = 1_000_000


@dataclass
class AutoConverge:
    initial: float = 20.0
    increment: float = 10.0
    maximum: float = 99.0
    tailslow: bool = False
    trigger: float = 50.0
    pct: float = 0.0
    high: int = 0
    triggers: int = 0

    def check(self, bytes_dirty: float, bytes_sent: float) -> bool:
        """migration_trigger_throttle for one >= 1 s period; True when the guest must slow down."""
        threshold = bytes_sent * self.trigger / 100.0
        if bytes_dirty > threshold:
            self.high += 1
            if self.high >= 2:
                self.high = 0
                self.triggers += 1
                self._down(bytes_dirty, threshold)
                return True
        return False

    def _down(self, dirty: float, threshold: float) -> None:
        if not self.pct:
            self.pct = self.initial
            return
        inc = self.increment
        if self.tailslow and dirty:
            now = 100.0 - self.pct
            ideal = now * (threshold / dirty)
            inc = min(now - ideal, self.increment)
        self.pct = min(self.pct + inc, self.maximum)


class DirtyLimit:
    """Per-vCPU sleep on each ring-full exit, tuned towards ``quota_mb`` MB/s per vCPU."""

    TOLERANCE_MB = 25
    LINEAR_PCT = 50
    PCT_MAX = 99

    def __init__(self, quota_mb: float, ring_entries: int, vcpus: int, period: float = 1.0) -> None:
        if quota_mb <= 0:
            raise ValueError("the dirty limit must be > 0 MB/s")
        self.quota = float(quota_mb)
        self.ring_mib = ring_entries * PAGE_SIZE / (1 << 20)
        self.period = period
        self.active = False
        self.next = 0.0
        self.max_rate = 0.0
        self.sleep_us = np.zeros(vcpus)

    def start(self, now: float) -> None:
        self.active = True
        self.next = now + self.period

    def _full_time_us(self, rate: float) -> float:
        self.max_rate = max(self.max_rate, rate)
        return self.ring_mib * 1e6 / self.max_rate

    def due(self, now: float) -> bool:
        return self.active and now >= self.next - 1e-9

    def adjust(self, now: float, logged_pages: np.ndarray, span: float) -> None:
        """dirtylimit_process (once a period): ``logged_pages`` per vCPU over ``span`` seconds."""
        self.next = now + self.period
        for i, pages in enumerate(logged_pages):
            cur = pages * PAGE_SIZE / MB / span                 # MB/s, as vcpu_dirty_rate_get
            if abs(cur - self.quota) <= self.TOLERANCE_MB:
                continue
            if cur == 0:
                self.sleep_us[i] = 0.0
                continue
            full = self._full_time_us(cur)
            lo, hi = min(self.quota, cur), max(self.quota, cur)
            if (hi - lo) * 100 / hi > self.LINEAR_PCT:
                pct = int((abs(cur - self.quota)) * 100 / (cur if self.quota < cur else self.quota))
                step = full * pct / (100.0 - pct) if pct < 100 else full * self.PCT_MAX
                self.sleep_us[i] += step if self.quota < cur else -step
            else:
                self.sleep_us[i] += full / 10 if self.quota < cur else -full / 10
            self.sleep_us[i] = min(max(self.sleep_us[i], 0.0), full * self.PCT_MAX)
