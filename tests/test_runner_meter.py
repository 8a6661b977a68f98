"""The runner's stall / latency / age figures against its own deterministic schedule.

A deterministic run (one thread, seeded schedule) on a clock that moves only
when the guest writes (1 us per write) or a harvest runs (a known, varying
length).  Every run call and every harvest is logged as it happens; the
expected figures are then worked out from that log alone (a dict walk and
the standard library's percentiles) and must equal what the runner reports.
"""
from __future__ import annotations

import statistics

import numpy as np
import pytest

from kvmdirty.api import EXIT_DIRTY_RING_FULL, PAGE_SIZE
from kvmdirty.collectors import all_designs
from kvmdirty.meter import AGE_SAMPLE
from kvmdirty.runner import RunSpec, Runner
from kvmdirty.workloads import Workload

NS_PER_WRITE = 1_000


def p(values, q: int) -> float:
    if q == 50:
        return statistics.median(values)
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


class Scripted(Runner):
    """A Runner whose clock is moved by its guest writes and harvests, which it logs."""

    def __init__(self, spec: RunSpec) -> None:
        self.t = 0
        self.log: list = []
        super().__init__(spec, clock=lambda: self.t)

    def _setup(self) -> None:
        super()._setup()
        real_harvest = self.collector.harvest

        def harvest():
            t0 = self.t
            h = real_harvest()
            self.t += 10_000 * (1 + len(self.log) % 13)     # 10..130 us, varying
            pages = np.unique(np.concatenate([np.zeros(0, np.uint64)] + [o for o in h.values()]))
            self.log.append(("harvest", t0, self.t, pages))
            return h
        self.collector.harvest = harvest
        for v in self.vcpus:
            self._wrap(v)

    def _wrap(self, v) -> None:
        real_run, plan = v.run, {"gfns": None, "pos": 0}

        def run(gfns=None, value=None, *, max_writes=None):
            if gfns is not None:
                plan["gfns"], plan["pos"] = np.asarray(gfns), 0
            start = self.t
            ex = real_run(gfns, value, max_writes=max_writes)
            written = plan["gfns"][plan["pos"]:plan["pos"] + ex.writes]
            plan["pos"] += ex.writes
            self.t += NS_PER_WRITE * ex.writes
            self.log.append(("run", start, written, ex.reason))
            return ex
        v.run = run


def expected(log):
    """Ages, harvest latencies, stalls and pages per harvest, from the log alone."""
    first: dict = {}
    ages, lat, stalls, pages, unknown = [], [], [], [], 0
    prev = None
    for ev in log:
        if ev[0] == "run":
            _k, start, written, _reason = ev
            for g in written.tolist():
                first.setdefault(g, start)
        else:
            _k, t0, t1, hp = ev
            lat.append(t1 - t0)
            pages.append(len(hp))
            if prev is not None and prev[0] == "run" and prev[3] == EXIT_DIRTY_RING_FULL:
                stalls.append(t1 - t0)          # the exit was at t0: the vCPU waited this long
            for g in hp.tolist():
                if g % AGE_SAMPLE:
                    first.pop(g, None)          # ages are measured on every 8th page only
                elif g in first:
                    ages.append(t1 - first.pop(g))
                else:
                    unknown += 1
        prev = ev
    return ages, lat, stalls, pages, unknown


def _spec(design: str, **kw) -> RunSpec:
    base = dict(design=design, memory=4 << 20, vcpus=2, writes=3000, rate=200, period=3,
                mode="deterministic", seed=3, ring_entries=256, workload=Workload("uniform"))
    base.update(kw)
    return RunSpec(**base)


@pytest.mark.skipif("ring" not in all_designs(), reason="kvmdirty._ring is not built")
def test_ring_run_figures_match_the_schedule():
    runner = Scripted(_spec("ring"))
    r = runner.run()
    assert r.ok and r.full_exits > 0
    ages, lat, stalls, pages, unknown = expected(runner.log)
    assert len(stalls) == r.full_exits == r.stall_exits
    assert r.stall_total_s == pytest.approx(sum(stalls) * 1e-9)
    for q in (50, 99):
        assert getattr(r, f"stall_p{q}_s") == pytest.approx(p(stalls, q) * 1e-9)
        assert getattr(r, f"harvest_p{q}_s") == pytest.approx(p(lat, q) * 1e-9)
        assert getattr(r, f"age_p{q}_s") == pytest.approx(p(ages, q) * 1e-9)
    assert r.stall_max_s == pytest.approx(max(stalls) * 1e-9)
    assert r.harvest_max_s == pytest.approx(max(lat) * 1e-9)
    assert r.age_max_s == pytest.approx(max(ages) * 1e-9)
    assert r.age_known == len(ages) and r.age_unknown == unknown == 0
    assert r.pages_per_harvest_p50 == p(pages, 50)
    assert r.harvest_calls == len(lat)
    # One thread: no two vCPUs fault one page, so every fault is one entry is one page.
    assert r.pages_dirtied == sum(pages) == r.wp_faults == r.entries_harvested
    assert r.duplicate_entries == 0


def test_bitmap_run_figures_match_the_schedule():
    runner = Scripted(_spec("bitmap", period=2))
    r = runner.run()
    assert r.ok and r.full_exits == 0 and r.stall_total_s == 0 and r.stall_p99_s is None
    ages, lat, _stalls, pages, _unknown = expected(runner.log)
    assert r.age_p50_s == pytest.approx(p(ages, 50) * 1e-9)
    assert r.age_p99_s == pytest.approx(p(ages, 99) * 1e-9)
    assert r.harvest_p99_s == pytest.approx(p(lat, 99) * 1e-9)
    assert r.pages_dirtied == sum(pages) == r.wp_faults
    assert r.tracking_ns_per_page == pytest.approx(r.tracking_s * 1e9 / r.pages_dirtied)


def test_clear_log_initially_set_pages_are_counted_apart():
    runner = Scripted(_spec("clear-log"))
    r = runner.run()
    assert r.ok
    log = runner.log
    npages = (4 << 20) // PAGE_SIZE
    # The INITIALLY_SET harvest comes first, before the guest writes: every page, none dirtied.
    assert log[0][0] == "harvest" and len(log[0][3]) == npages
    assert r.initial_pages == npages
    assert r.initial_harvest_s == pytest.approx((log[0][2] - log[0][1]) * 1e-9)
    later = [ev for ev in log[1:] if ev[0] == "harvest"]
    assert r.pages_dirtied == sum(len(ev[3]) for ev in later)
    assert r.harvest_max_s == pytest.approx(max(ev[2] - ev[1] for ev in later) * 1e-9)
    ages, _lat, _stalls, _pages, unknown = expected(log[1:])
    assert r.age_p99_s == pytest.approx(p(ages, 99) * 1e-9) and unknown == 0
    # From there on the guest runs against armed tracking: one fault per dirty page.
    assert r.wp_faults == r.pages_dirtied
    assert r.tracking_ns_per_page == pytest.approx(r.tracking_s * 1e9 / r.pages_dirtied)
