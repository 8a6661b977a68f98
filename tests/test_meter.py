"""kvmdirty.meter and kvmdirty.samples against schedules whose answers are worked out here.

Every expected figure is computed independently of the code under test:
ages by walking the schedule with a dict, percentiles with the standard
library's statistics.quantiles (method "inclusive" is the definition
kvmdirty documents: linear interpolation between closest ranks).
"""
from __future__ import annotations

import statistics

import numpy as np
import pytest

from kvmdirty.meter import Meter
from kvmdirty.samples import Samples, quantile
from kvmdirty.spread import Spread


def p(values, q: int) -> float:
    """The q-th percentile, the standard library's way."""
    if q == 50:
        return statistics.median(values)
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


class Clock:
    def __init__(self) -> None:
        self.t = 0

    def __call__(self) -> int:
        return self.t


# -- percentiles --------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 10, 101, 997])
def test_quantile_is_the_inclusive_definition(n):
    rng = np.random.default_rng(n)
    v = list(rng.exponential(5.0, n))
    for q in (50, 99):
        expect = v[0] if n == 1 else p(v, q)
        assert quantile(v, q / 100) == pytest.approx(expect, rel=1e-12)
    assert quantile([], 0.5) is None


def test_samples_thin_out_but_keep_exact_totals():
    s = Samples(cap=1000)
    values = np.arange(1, 10_001, dtype=np.float64)
    for part in np.array_split(values, 37):
        s.extend(part)
    assert s.count == 10_000 and s.total == values.sum()
    assert s.min == 1 and s.max == 10_000
    assert len(s.values()) <= 1000
    # A systematic sample of a uniform ramp: its median is the ramp's, to within the stride.
    assert abs(s.quantile(0.5) - 5000.5) < 20


def test_spread_of_runs():
    sp = Spread.of([3.0, None, 1.0, 2.0, 10.0])
    assert (sp.median, sp.min, sp.max, sp.n) == (2.5, 1.0, 10.0, 4)
    assert sp.q1 == pytest.approx(statistics.quantiles([1, 2, 3, 10], n=4, method="inclusive")[0])
    assert sp.wide() and sp.relative() == pytest.approx(9.0 / 2.5)
    tight = Spread.of([100.0, 101.0, 102.0])
    assert not tight.wide()
    # Near zero a spread is clock noise: the floor stands in for the median.
    assert not Spread.of([0.0, 0.01, 0.02]).wide(floor=0.1)
    assert Spread.of([None, None]) is None


# -- a schedule with known answers ----------------------------------------------------
def test_ages_latencies_and_pages_of_a_known_schedule():
    """One vCPU writes pages in batches at known times; harvests of known lengths take them.

    Worked out by hand, then by a dict walk: a page's age is the end of the
    harvest that returned it minus the start of the first batch that wrote
    it since it was last harvested.
    """
    clk = Clock()
    m = Meter(1000, {0: 0, 1: 500}, age_sample=1, clock=clk)
    rng = np.random.default_rng(7)
    first = {}            # page -> time of its first write since its last harvest
    ages, latencies, per_harvest = [], [], []
    for step in range(60):
        clk.t = step * 1_000_000                           # a batch every 1 ms
        batch = rng.integers(0, 1000, 40)
        tok = m.before_run()
        clk.t += 5_000                                     # the run takes 5 us
        m.after_run(tok, batch)
        for page in batch.tolist():
            first.setdefault(page, step * 1_000_000)
        if step % 7 == 6:                                  # a harvest every 7 ms, (step+1) x 10 us long
            t0 = m.harvest_begin()
            clk.t += (step + 1) * 10_000
            pages = sorted(first)
            harvest = {0: np.array([x for x in pages if x < 500], np.uint64),
                       1: np.array([x - 500 for x in pages if x >= 500], np.uint64)}
            m.harvest_end(t0, clk.t, harvest)
            latencies.append((step + 1) * 10_000)
            per_harvest.append(len(pages))
            ages += [clk.t - first.pop(x) for x in pages]
    st = m.stats()
    assert st["age_known"] == len(ages) and st["age_unknown"] == 0
    assert st["age_p50_s"] == pytest.approx(p(ages, 50) * 1e-9)
    assert st["age_p99_s"] == pytest.approx(p(ages, 99) * 1e-9)
    assert st["age_max_s"] == pytest.approx(max(ages) * 1e-9)
    assert st["harvest_p50_s"] == pytest.approx(p(latencies, 50) * 1e-9)
    assert st["harvest_p99_s"] == pytest.approx(p(latencies, 99) * 1e-9)
    assert st["harvest_max_s"] == pytest.approx(max(latencies) * 1e-9)
    assert st["pages_per_harvest_p50"] == p(per_harvest, 50)
    assert st["pages_dirtied"] == sum(per_harvest) == st["entries_harvested"]
    # By hand: the first harvest (t = 6 ms, 70 us long) holds pages written at 0..6 ms,
    # so its oldest page (written at 0) is 6 ms + the 5 us run + 70 us old.
    assert max(ages[:per_harvest[0]]) == 6_075_000


def test_stalls_exclude_bookkeeping_under_the_lock():
    clk = Clock()
    m = Meter(10, {0: 0}, clock=clk)
    m.held(100, 400)                   # verifier work under the lock: 300 ns
    m.held(900, 1000)                  # 100 ns, only half inside [0, 950]
    assert m.held_within(0, 950) == 300 + 50
    for ns in (5, 1, 3, 2, 4):
        m.stalled(ns * 1_000_000)
    st = m.stats()
    stalls = [5e6, 1e6, 3e6, 2e6, 4e6]
    assert st["stall_exits"] == 5 and st["stall_total_s"] == pytest.approx(15e-3)
    assert st["stall_p50_s"] == pytest.approx(p(stalls, 50) * 1e-9)
    assert st["stall_p99_s"] == pytest.approx(p(stalls, 99) * 1e-9)
    assert st["stall_max_s"] == pytest.approx(5e-3)


def test_no_stall_means_no_percentiles():
    st = Meter(10, {0: 0}, clock=Clock()).stats()
    assert st["stall_exits"] == 0 and st["stall_total_s"] == 0.0 and st["stall_p99_s"] is None


def test_initially_set_first_harvest_is_counted_apart():
    clk = Clock()
    m = Meter(100, {0: 0}, initially_set=True, age_sample=1, clock=clk)
    tok = m.before_run()
    m.after_run(tok, np.array([3, 5, 5, 7]))
    t0 = m.harvest_begin()
    clk.t = 2_000
    m.harvest_end(t0, clk.t, {0: np.arange(100, dtype=np.uint64)})   # every page: INITIALLY_SET
    tok = m.before_run()
    m.after_run(tok, np.array([9]))
    t0 = m.harvest_begin()
    clk.t = 2_500
    m.harvest_end(t0, clk.t, {0: np.array([9], np.uint64)})
    st = m.stats()
    assert st["initial_pages"] == 97 and st["pages_dirtied"] == 3 + 1
    assert st["initial_harvest_s"] == pytest.approx(2e-6)
    assert st["harvest_max_s"] == pytest.approx(500e-9)               # only the second harvest
    assert st["age_known"] == 4


def test_ring_duplicates_count_once():
    clk = Clock()
    m = Meter(100, {0: 0}, dedupe=True, age_sample=1, clock=clk)
    tok = m.before_run()
    m.after_run(tok, np.array([1, 2, 3]))
    t0 = m.harvest_begin()
    # Two vCPUs' rings both hold page 2.
    m.harvest_end(t0, t0, {0: np.array([1, 2, 2, 3], np.uint64)})
    st = m.stats()
    assert st["entries_harvested"] == 4 and st["duplicate_entries"] == 1 and st["pages_dirtied"] == 3
    assert st["age_known"] == 3


def test_a_run_overlapping_a_harvest_never_reports_a_stale_age():
    """A page a harvest took while the run that wrote it had not yet stamped it: unknown, not wrong."""
    clk = Clock()
    m = Meter(10, {0: 0}, age_sample=1, clock=clk)
    tok = m.before_run()                    # the run starts (writes page 4) ...
    t0 = m.harvest_begin()                  # ... a harvest takes page 4 meanwhile
    clk.t = 1_000
    m.harvest_end(t0, clk.t, {0: np.array([4], np.uint64)})
    m.after_run(tok, np.array([4, 6]))      # the run ends; page 6 was written after the harvest
    clk.t = 50_000_000
    t0 = m.harvest_begin()
    m.harvest_end(t0, clk.t, {0: np.array([4, 6], np.uint64)})   # page 4 written again since
    st = m.stats()
    assert st["age_unknown"] == 2           # page 4 in the first harvest, and now
    assert st["age_known"] == 1             # page 6: never taken by the overlapping harvest
    assert st["age_max_s"] == pytest.approx(50e-3)


def test_ages_are_sampled_every_8th_page():
    clk = Clock()
    m = Meter(64, {0: 0}, clock=clk)                 # the default sample: pages 0, 8, 16, ...
    tok = m.before_run()
    m.after_run(tok, np.arange(64))
    clk.t = 1_000
    t0 = m.harvest_begin()
    m.harvest_end(t0, clk.t, {0: np.arange(64, dtype=np.uint64)})
    st = m.stats()
    assert st["age_known"] == 8 and st["age_unknown"] == 0 and st["pages_dirtied"] == 64
    with pytest.raises(ValueError, match="power of two"):
        Meter(8, {0: 0}, age_sample=3)
