"""The runner: every design, both modes, counts that add up, no loss."""
from __future__ import annotations

import pytest

from kvmdirty.collectors import all_designs
from kvmdirty.runner import RunSpec, Runner, layout, run
from kvmdirty.workloads import Workload

DESIGNS = all_designs()


def spec(**kw) -> RunSpec:
    base = dict(memory=8 << 20, vcpus=3, writes=20_000, rate=512, mode="deterministic", seed=1)
    base.update(kw)
    return RunSpec(**base)


def test_layout_covers_memory():
    assert layout(10 * 4096, 3) == [(0, 0, 3), (1, 3, 3), (2, 6, 4)]


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("mode", ["deterministic", "threads"])
def test_every_design_loses_nothing(design, mode):
    r = run(spec(design=design, mode=mode, slots=2, ring_entries=1024))
    assert r.ok, (r.lost[:3], r.problems)
    assert r.lost_pages == 0
    assert r.writes == 3 * 20_000
    assert r.harvest_calls >= 1 and r.pages_harvested > 0
    assert r.wp_faults is not None and r.wp_faults > 0
    assert r.tracking_s > 0 and r.elapsed_s > 0 and r.writes_per_s > 0
    if design in ("bitmap",):
        # Every fault is logged once and harvested once.
        assert r.pages_harvested == r.wp_faults


@pytest.mark.parametrize("design", DESIGNS)
def test_deterministic_runs_repeat_exactly(design):
    keys = ("writes", "wp_faults", "pages_harvested", "harvest_calls", "full_exits")
    a, b = run(spec(design=design)), run(spec(design=design))
    assert [getattr(a, k) for k in keys] == [getattr(b, k) for k in keys]


@pytest.mark.skipif("ring" not in DESIGNS, reason="kvmdirty._ring is not built")
def test_small_ring_fills_and_the_vcpu_resumes():
    r = run(spec(design="ring", ring_entries=256, writes=30_000, workload=Workload("uniform")))
    assert r.full_exits > 0 and r.ok
    assert r.pages_harvested == r.wp_faults       # one entry per fault, all harvested


def test_per_vcpu_rates_scale_writes():
    r = run(spec(rate=[100, 200, 400], writes=4000))
    assert r.writes == 1000 + 2000 + 4000


def test_duration_mode():
    r = run(spec(mode="threads", duration=0.2, writes=1, rounds=2))
    assert r.writes > 0 and r.ok and 0.15 < r.elapsed_s < 5


def test_selftest_check_rounds():
    r = run(spec(design="clear-log", check="both", rounds=4))
    assert r.ok and r.violations == 0 and r.lost_pages == 0


def test_progress_is_reported():
    seen = []
    Runner(spec(), on_progress=seen.append).run()
    assert seen and seen[-1] == pytest.approx(1.0) and seen == sorted(seen)


@pytest.mark.parametrize("kw", [
    dict(mode="x"), dict(check="x"), dict(memory=100), dict(vcpus=0), dict(rounds=0),
    dict(duration=1.0), dict(ring_knobs=("nope",)), dict(ring_knobs=("publish_early",)),
    dict(backend="kvm", faults=("skip-flush",)), dict(rate=[1, 2]), dict(cpus=()),
])
def test_bad_specs(kw):
    with pytest.raises(ValueError):
        run(spec(**kw))


def test_unknown_design():
    with pytest.raises(ValueError, match="unknown design"):
        run(spec(design="nope"))
