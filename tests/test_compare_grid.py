"""compare's grid: settings, repeats, medians and spreads, the objective, the JSON, the table."""
from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from kvmdirty.compare import compare_grid, to_json, to_json_text
from kvmdirty.comparecolumns import COLUMNS
from kvmdirty.comparegrid import Knobs, Setting, auto_duration, expand
from kvmdirty.comparetable import render
from kvmdirty.objective import best_per_design, rank
from kvmdirty.runinfo import SCHEMA
from kvmdirty.runner import RunResult, RunSpec


def fake_result(spec: RunSpec, **kw) -> RunResult:
    base = dict(design=spec.design, mode=spec.mode, backend="sim", vcpus=spec.vcpus,
                memory=spec.memory, pattern="uniform", writes=1000, wp_faults=900,
                pages_harvested=900, harvest_calls=10, full_exits=0, tracking_s=0.01,
                tracking_ns_per_page=11.0, tracking_wall_s=0.01, elapsed_s=1.0, writes_per_s=1000.0,
                check="shadow", lost_pages=0, violations=None, unwritten_pages=0, lost=[],
                problems=[], bad_rounds=[], pages_dirtied=900, entries_harvested=900,
                achieved_rate=4.096e6, guest_s=1.0)
    base.update(kw)
    return RunResult(**base)


class FakeRunner:
    """Stall falls with the ring size and rises with the interval; repeats differ by a known amount."""

    def __init__(self) -> None:
        self.calls = []

    def __call__(self, spec: RunSpec, on_progress=None) -> RunResult:
        self.calls.append(spec)
        k = sum(1 for s in self.calls if (s.design, s.ring_entries, s.interval) ==
                (spec.design, spec.ring_entries, spec.interval)) - 1      # repeat index
        if spec.design == "ring":
            stall = max(0.0, spec.interval * 4096 / spec.ring_entries - 0.005) * (1 + 0.1 * k)
            return fake_result(spec, stall_total_s=stall, stall_max_s=stall / 4 if stall else None,
                               full_exits=8 if stall else 0, stall_exits=8 if stall else 0,
                               tracking_s=0.01 + spec.interval)
        return fake_result(spec, tracking_s=0.02 * (1 + k))


def knobs(**kw) -> Knobs:
    base = dict(designs=["bitmap", "ring"], memory=[16 << 20], vcpus=[2],
                ring_entries=[1024, 4096], interval=[0.01, 0.1])
    base.update(kw)
    return Knobs(**base)


def test_ring_entries_only_multiply_ring_designs():
    s = expand(knobs())
    assert [(x.design, x.ring_entries, x.interval) for x in s] == [
        ("bitmap", None, 0.01), ("bitmap", None, 0.1),
        ("ring", 1024, 0.01), ("ring", 1024, 0.1), ("ring", 4096, 0.01), ("ring", 4096, 0.1)]
    assert knobs().swept() == ["ring_entries", "interval"]


def test_per_vcpu_rates_scale_with_vcpus_and_auto_duration():
    s = expand(knobs(designs=["bitmap"], vcpus=[2, 4], dirty_rate=[(100e6, True)], interval=[0.01, 2.0],
                     auto_duration=True))
    assert [(x.vcpus, x.guest_rate, x.duration) for x in s] == [
        (2, 200e6, 0.25), (2, 200e6, 1.0), (4, 400e6, 0.25), (4, 400e6, 1.0)]
    assert auto_duration(0.3) == pytest.approx(0.6)


@pytest.mark.parametrize("kw,msg", [
    (dict(designs=["warp"]), "unknown design"), (dict(interval=[]), "no value"),
    (dict(vcpus=[2, 2]), "twice"),
])
def test_bad_knobs(kw, msg):
    with pytest.raises(ValueError, match=msg):
        knobs(**kw)


def test_repeats_medians_ranking_and_best():
    fake = FakeRunner()
    rep = compare_grid(RunSpec(memory=16 << 20, vcpus=2), knobs(), repeat=3, runner=fake)
    assert len(fake.calls) == 6 * 3
    assert all(len(c.runs) == 3 for c in rep.cells)
    # ring 4096 / 10 ms: 0.01 * 1 - 0.005 = 5 ms of stall x (1, 1.1, 1.2): median 5.5 ms,
    # over 2 vCPUs x 1 s of run: 0.275 % of the vCPUs' time.
    cell = next(r for r in rep.ranked if r.cell.setting.ring_entries == 4096 and r.cell.setting.interval == 0.01)
    assert cell.objective == pytest.approx(0.0055 / 2)
    # No stall for the bitmap designs: ties broken by tracking CPU (median 0.04 s).
    assert [r.cell.setting.design for r in rep.ranked[:2]] == ["bitmap", "bitmap"]
    best = best_per_design(rep.ranked)
    assert best["ring"].cell.setting == Setting("ring", 16 << 20, 2, None, 4096, 0.01)
    assert best["bitmap"].cell.setting.interval == 0.01
    assert [r.rank for r in rep.ranked] == list(range(1, 7))


def test_max_stall_rules_settings_out():
    fake = FakeRunner()
    rep = compare_grid(RunSpec(memory=16 << 20, vcpus=2), knobs(designs=["ring"]), runner=fake,
                       objective="tracking-cpu", max_stall_ms=2.0)
    ok = [r for r in rep.ranked if r.feasible]
    # ring 1024 stalls at 10 ms (35 ms total, 8.75 ms longest) and 100 ms; 4096/10 ms stalls 1.25 ms.
    assert [(r.cell.setting.ring_entries, r.cell.setting.interval) for r in ok] == [(4096, 0.01)]
    assert "longest stall" in rep.ranked[-1].why_not
    with pytest.raises(ValueError, match="unknown objective"):
        rank(rep.cells, "fastest")


def test_a_run_that_lost_writes_never_wins():
    def runner(spec, on_progress=None):
        if spec.ring_entries == 1024:
            return fake_result(spec, lost_pages=3, stall_total_s=0.0)
        return fake_result(spec, stall_total_s=1.0)
    rep = compare_grid(RunSpec(memory=16 << 20), knobs(designs=["ring"], interval=[0.01]), runner=runner)
    assert rep.ranked[0].cell.setting.ring_entries == 4096 and not rep.ranked[1].feasible
    assert not rep.ok


def test_json_shares_the_schema_and_keeps_every_run():
    rep = compare_grid(RunSpec(memory=16 << 20, vcpus=2), knobs(dirty_rate=[(800e6, False)]),
                       repeat=2, runner=FakeRunner())
    out = json.loads(to_json_text(rep))
    assert out["schema"] == SCHEMA and out["command"] == "compare"
    assert {"kvmdirty", "kernel", "machine", "backend", "units", "time"} <= set(out["meta"])
    assert out["meta"]["time"] == "real"
    sc = out["scenario"]
    assert sc["swept"] == ["ring_entries", "interval"]
    assert sc["ring_entries"] == [1024, 4096] and sc["interval"] == [0.01, 0.1]
    assert sc["memory"] == 16 << 20 and sc["dirty_rate"] == 800e6 and sc["repeat"] == 2
    assert len(out["results"]) == 12 and {r["repeat"] for r in out["results"]} == {0, 1}
    assert len(out["cells"]) == 6 and out["cells"][0]["rank"] == 1
    m = out["cells"][-1]["metrics"]["stall_pct"]
    assert set(m) == {"median", "min", "max", "q1", "q3", "n", "wide"} and m["n"] == 2
    assert set(out["columns"]) == {c.key for c in COLUMNS}
    assert out["best"]["ring"]["setting"]["ring_entries"] == 4096
    assert to_json(rep)["ok"] is True


def test_table_has_units_spreads_best_and_warnings():
    rep = compare_grid(RunSpec(memory=16 << 20, vcpus=2), knobs(dirty_rate=[(800e6, False)]),
                       repeat=3, runner=FakeRunner())
    buf = io.StringIO()
    render(Console(file=buf, width=400, color_system=None), rep)
    text = buf.getvalue()
    for title in ("stall", "ms", "guest", "MB/s", "% of", "ring", "entries", "interval"):
        assert title in text
    assert "best per design" in text and "ring, 4096 entries, every 10 ms" in text
    assert "±0%" in text                                # identical repeats
    assert "±9%" in text                                # 5, 5.5, 6 ms: half the range is 9 % of 5.5
    assert "! wide spread over 3 runs: bitmap" in text  # tracking 0.02 / 0.04 / 0.06 s
