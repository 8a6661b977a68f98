"""Postcopy after N pre-copy rounds (QEMU's postcopy-ram, reduced to what decides time).

At switchover the guest is stopped at the source, the tracker syncs once more
(postcopy_start -> ram_postcopy_send_discard_bitmap) and the pages still
flagged are discarded at the destination: downtime = what the migration
thread owed + that sync.  The guest then runs at the destination (its writes
go to the destination copy); its first touch of a page not yet there is a
remote fault: the vCPU waits a network round trip plus the page's transfer,
and the page is pulled before the write lands.  Meanwhile the source pushes
the remaining flagged pages in its walk order at the link rate (less what the
faults pulled).  It ends when every page has arrived.

Verified at the end: a page the guest wrote at the destination holds the last
value written there (a push must never overwrite it with the stale source
copy), every other page equals the source's value at switchover.
"""
from __future__ import annotations

import numpy as np

from ..api import PAGE_SIZE
from .memory import Destination, MigrationBitmap
from .vcpus import Guest


class Postcopy:
    """The destination-side run after switchover."""

    def __init__(self, guest: Guest, mig: MigrationBitmap, dest: Destination, rate: float,
                 rtt: float) -> None:
        self.guest, self.mig, self.dest = guest, mig, dest
        self.rate, self.rtt = rate, rtt
        n = len(mig.flags)
        self.written = np.zeros(n, np.bool_)          # written at the destination
        self.truth = np.zeros(n, np.uint64)           # ... and the last value written there
        self.faults = 0
        self.stall = 0.0
        self.sent = 0
        self.quantum = guest.quantum

    def _pull(self, gfns: np.ndarray) -> None:
        if len(gfns):
            self.dest.send(np.sort(gfns))
            self.mig.flags[gfns] = False
            self.mig.count -= len(gfns)
            self.sent += len(gfns) * PAGE_SIZE

    def run(self, dt: float) -> float:
        """One quantum; returns the seconds of link time the faults used."""
        g = self.guest
        self.quantum += 1
        g.now += dt
        link = 0.0
        per_fault = self.rtt + PAGE_SIZE / self.rate
        for i in range(len(g.vcpus)):
            st = g.stats[i]
            g.request(i, dt)
            avail = dt - g.debt[i]
            if avail <= 0:
                g.debt[i] = -avail
                continue
            g.debt[i] = 0.0
            plan = g.take(i, avail).astype(np.int64)
            n = len(plan)
            if not n:
                continue
            missing = np.unique(plan[self.mig.flags[plan]])
            if len(missing):
                self._pull(missing)
                self.faults += len(missing)
                s = len(missing) * per_fault
                self.stall += s
                st.stall_time += s
                g.debt[i] += s
                link += len(missing) * PAGE_SIZE / self.rate
            value = np.uint64((self.quantum << 12) | (i + 1))
            self.dest.values[plan] = value
            self.written[plan] = True
            self.truth[plan] = value
            st.writes += n
        return link

    def push(self, seconds: float) -> None:
        """The source's background push for ``seconds`` of link time."""
        n = int(seconds * self.rate / PAGE_SIZE)
        if n > 0:
            g = self.mig.take(n)
            if len(g):
                self.dest.send(np.sort(g) if len(g) > 1 else g)
                self.sent += len(g) * PAGE_SIZE

    def mismatches(self, limit: int = 64):
        """(first ``limit`` gfns, count) breaking the postcopy invariant (module docstring)."""
        bad = []
        total = 0
        d = self.dest
        step = 1 << 22
        for sid, first, n in d.mem.layout:
            src = d.mem.values(sid)
            for off in range(0, n, step):
                k = min(step, n - off)
                a, b = first + off, first + off + k
                w = self.written[a:b]
                wrong = np.where(w, d.values[a:b] != self.truth[a:b],
                                 (d.values[a:b] != src[off:off + k]) | ~d.received[a:b])
                hit = np.flatnonzero(wrong)
                total += len(hit)
                bad.extend(int(x) + a for x in hit[: max(0, limit - len(bad))])
        return bad, total
