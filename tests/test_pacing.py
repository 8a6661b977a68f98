"""Dirty-rate pacing: the token bucket, the rate's spelling, and real paced runs."""
from __future__ import annotations

import pytest

from kvmdirty.api import PAGE_SIZE
from kvmdirty.pacing import TokenBucket
from kvmdirty.runner import RunSpec, Runner
from kvmdirty.units import parse_dirty_rate, parse_rate
from kvmdirty.workloads import Workload


class Clock:
    def __init__(self) -> None:
        self.t = 0

    def __call__(self) -> int:
        return self.t


def test_bucket_earns_by_the_clock_in_batches():
    clk = Clock()
    b = TokenBucket(100_000, clock=clk)             # 100 writes per ms
    assert b.quantum == 100 and b.capacity == 1000  # 1 ms batches, 10 ms of burst
    assert b.take(4096) == 0
    assert b.wait_s(4096) == pytest.approx(1e-3)
    clk.t = 500_000
    assert b.take(4096) == 0                        # half a quantum: not yet
    assert b.wait_s(4096) == pytest.approx(0.5e-3)
    clk.t = 1_000_000
    assert b.take(4096) == 100
    clk.t = 3_500_000
    assert b.take(64) == 64                         # capped by the caller's batch
    assert b.take(4096) == 186                      # the rest (250 earned)
    clk.t = 1_000_000_000                           # held up a long while:
    assert b.take(1 << 20) == 1000                  # only 10 ms of writes are made up


def test_bucket_refuses_nonsense():
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            TokenBucket(bad)


@pytest.mark.parametrize("text,expect", [
    ("800M", (800e6, False)), ("800MB/s", (800e6, False)), ("200M/vcpu", (200e6, True)),
    ("1.5G/vCPU", (1.5e9, True)), ("64MiB/s", (64 * 2 ** 20, False)), ("10Gb/s", (1.25e9, False)),
])
def test_dirty_rate_spellings(text, expect):
    assert parse_dirty_rate(text) == pytest.approx(expect)


@pytest.mark.parametrize("text", ["0", "fast", "-5M", "800M/guest", "9" * 400, "/vcpu"])
def test_bad_dirty_rates(text):
    with pytest.raises(ValueError):
        parse_dirty_rate(text)


@pytest.mark.parametrize("rate", [8e6, 40e6])
def test_paced_run_achieves_the_rate(rate):
    """Feasible rates: within 10 % of what was asked, split evenly over the vCPUs."""
    spec = RunSpec(design="bitmap", memory=32 << 20, vcpus=2, mode="threads", duration=0.6,
                   dirty_rate=rate, interval=0.02, workload=Workload("uniform"), seed=1)
    runner = Runner(spec)
    r = runner.run()
    assert r.ok and r.dirty_rate == rate
    assert r.achieved_rate == pytest.approx(rate, rel=0.10)
    assert r.achieved_rate == pytest.approx(r.writes * PAGE_SIZE / r.guest_s)
    share = rate / PAGE_SIZE / 2 * r.guest_s
    for done in runner.done:
        assert done == pytest.approx(share, rel=0.10)


def test_paced_ring_run_reports_stalls_and_ages():
    spec = RunSpec(design="ring", memory=64 << 20, vcpus=2, mode="threads", duration=0.4,
                   dirty_rate=60e6, interval=1.0, ring_entries=256, workload=Workload("sequential"))
    r = Runner(spec).run()
    assert r.ok
    # 7,300 pages/s per vCPU and a ring of 256: it fills every ~26 ms, the 1 s reaper never helps.
    assert r.full_exits > 5 and r.stall_exits == r.full_exits
    assert 0 < r.stall_p50_s <= r.stall_p99_s <= r.stall_max_s <= r.stall_total_s
    assert r.age_known > 0 and 0 < r.age_p50_s <= r.age_p99_s < 0.4
    assert r.pages_dirtied == r.entries_harvested - r.duplicate_entries


def test_a_rate_too_large_for_a_float_is_refused():
    """400 digits parsed as inf: every --dirty-rate / --bandwidth took it (migrate's too)."""
    with pytest.raises(ValueError, match="too large"):
        parse_rate("9" * 400)


@pytest.mark.parametrize("kw,msg", [
    (dict(dirty_rate=0.0), "finite and > 0"),
    (dict(dirty_rate=float("inf")), "finite and > 0"),
    (dict(dirty_rate=1e6, mode="deterministic"), "needs threads"),
])
def test_bad_paced_specs(kw, msg):
    with pytest.raises(ValueError, match=msg):
        RunSpec(**kw).validate()
