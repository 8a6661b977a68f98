"""The guest: vCPUs that really write pages through the simulator, at a rate in virtual time.

Time advances in quanta.  In each quantum a vCPU first pays what it owes
(stalls and fault costs charged earlier), sleeps its throttle share, and
spends the rest writing at its rate: that many writes of its workload plan
go through ``Vcpu.run``, so every write is really trapped and logged by the
tracker under test.  Tracker exits (DIRTY_RING_FULL) are handled where they
happen and their cost is owed by that vCPU.
"""
from __future__ import annotations

import math
from typing import List, Optional

import numpy as np

from .costs import Costs
from .results import VcpuStats
from .tracepace import TracePace
from .trackers import Tracker

_EMPTY = np.zeros(0, np.uint64)


class Guest:
    """All vCPUs of the migrating guest."""

    def __init__(self, vm, tracker: Tracker, costs: Costs, plans, rates: List[float],
                 pace: Optional[TracePace] = None) -> None:
        self.vm, self.tracker, self.costs = vm, tracker, costs
        self.plans = plans
        self.pace = pace                            # a timed trace sets the writes instead of rates
        if pace is not None:
            rates = [pace.rate(i) for i in range(len(rates))]
        self.rates = [float(r) for r in rates]      # writes (pages) per second, per vCPU
        self.vcpus = [vm.create_vcpu(i) for i in range(len(rates))]
        self.stats = [VcpuStats(i) for i in range(len(rates))]
        self.debt = np.zeros(len(rates))            # seconds each vCPU still owes
        self.frac = np.zeros(len(rates))
        self.requested = np.zeros(len(rates))
        self.throttle_pct = 0.0                     # auto-converge: share of time asleep
        self.limit_sleep = np.zeros(len(rates))     # dirty-limit: sleep per ring-full exit
        self._faults = np.zeros(len(rates), np.int64)
        self._logged = np.zeros(len(rates), np.int64)
        self.running = True
        self.quantum = 0
        self.now = 0.0                              # virtual seconds since the guest started
        self.clock = np.zeros(len(rates))           # per vCPU: seconds it actually ran
        self.record: Optional[List[np.ndarray]] = None   # the pages written, when asked (checkpoints)

    def run(self, dt: float) -> int:
        """Run every vCPU for ``dt`` virtual seconds; returns the writes done."""
        if not self.running:
            return 0
        self.quantum += 1
        self.now += dt
        total = 0
        for i, v in enumerate(self.vcpus):
            st = self.stats[i]
            self.request(i, dt)
            avail = dt - self.debt[i]
            if avail <= 0:
                self.debt[i] = -avail
                continue
            self.debt[i] = 0.0
            if self.throttle_pct:
                sleep = avail * self.throttle_pct
                st.throttle_time += sleep
                avail -= sleep
            plan = self.take(i, avail)
            n = len(plan)
            if n == 0:
                continue
            # A value no earlier write used: a lost write shows at the destination.
            if self.record is not None:
                self.record.append(plan)
            ex = v.run(plan, (self.quantum << 12) | (i + 1))
            while ex.remaining:
                stall = self.tracker.on_exit(v, ex.reason)
                st.ring_full_exits += 1
                st.stall_time += stall
                self.debt[i] += stall
                if self.limit_sleep[i]:
                    st.throttle_time += self.limit_sleep[i]
                    self.debt[i] += self.limit_sleep[i]
                ex = v.run()
            st.writes += n
            total += n
            faults = v.stats["faults"]
            cost = (faults - self._faults[i]) * self.costs.wp_fault
            self._faults[i] = faults
            st.fault_time += cost
            self.debt[i] += cost
        return total

    def request(self, i: int, dt: float) -> None:
        """What vCPU i was asked to write by now: its rate's share, or the trace's events due."""
        if self.pace is not None:
            self.requested[i] = self.pace.due(i, self.now)
        else:
            self.requested[i] += self.rates[i] * dt

    def take(self, i: int, avail: float) -> np.ndarray:
        """The pages vCPU i writes in ``avail`` seconds of running."""
        if self.pace is not None:
            self.clock[i] += avail
            return self.pace.take(i, self.clock[i])
        want = avail * self.rates[i] + self.frac[i]
        n = int(want)
        self.frac[i] = want - n
        return self.plans[i].take(n) if n else _EMPTY

    def logged(self) -> np.ndarray:
        """Pages each vCPU logged since the last call (its dirty rate counter)."""
        now = np.array([v.stats["dirty_logged"] for v in self.vcpus], np.int64)
        out = now - self._logged
        self._logged = now
        return out

    def stall_all(self, seconds: float) -> None:
        """Every running vCPU loses ``seconds`` (e.g. a kick out of the guest)."""
        if seconds and self.running:
            for i, st in enumerate(self.stats):
                st.stall_time += seconds
                self.debt[i] += seconds

    def lock_wait(self, held: float) -> None:
        """vCPUs whose next write fault falls inside an MMU-lock hold of ``held`` seconds wait for it.

        A vCPU writing at rate f hits the hold with probability about
        1 - exp(-f * held) and then waits half of it on average.
        """
        if not held or not self.running:
            return
        for i, st in enumerate(self.stats):
            f = self.rates[i] * (1.0 - self.throttle_pct)
            w = 0.5 * held * (1.0 - math.exp(-f * held)) if f else 0.0
            st.stall_time += w
            self.debt[i] += w

    def stop(self) -> None:
        """vm_stop: no vCPU runs any more."""
        self.running = False

    def finish(self) -> List[VcpuStats]:
        for i, st in enumerate(self.stats):
            st.requested = int(round(self.requested[i]))
        return self.stats
