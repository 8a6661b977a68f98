"""migrate replaying a timed trace (kvmdirty record's format) at its own pace."""
import numpy as np
import pytest

import child
from kvmdirty.migrate import MigrationConfig, run
from kvmdirty.migrate.checkpoint import CheckpointConfig, run_checkpoints
from kvmdirty.trace import Trace

MEM = 64 << 20                      # 16,384 pages
LINK = dict(bandwidth=40e6, max_bandwidth=40e6)


def _trace(tmp_path, events=20_000, seconds=2.0, vcpu=None, name="t.npz"):
    rng = np.random.default_rng(1)
    t = np.sort(rng.integers(0, int(seconds * 1e9), events)).astype(np.uint64)
    g = rng.integers(0, MEM // 4096, events).astype(np.uint64)
    path = str(tmp_path / name)
    Trace(t, g, vcpu, meta={"memory_bytes": MEM}).save(path)
    return path, t, g


def _cfg(path, **kw):
    kw = dict(dict(memory=MEM, vcpus=2, trace=path, pattern="trace", trace_speed=1.0), **kw)
    return MigrationConfig(**{**LINK, **kw})


def test_stop_replays_every_event_once_then_the_guest_is_idle(tmp_path):
    path, t, _ = _trace(tmp_path)
    r = run(_cfg(path, trace_end="stop"))
    assert r.verified and r.converged
    assert r.trace_stopped and r.trace_laps == 1
    assert sum(v.writes for v in r.vcpus) == len(t)
    assert sum(v.requested for v in r.vcpus) == len(t)


def test_loop_reports_its_passes_and_outlasting_without_a_choice_is_an_error(tmp_path):
    path, t, _ = _trace(tmp_path, events=2000, seconds=0.5)
    r = run(_cfg(path, trace_end="loop"))
    assert r.verified and r.trace_laps > 1 and not r.trace_stopped
    assert sum(v.writes for v in r.vcpus) > len(t)
    with pytest.raises(ValueError, match="outlasted the trace"):
        run(_cfg(path))


def test_speed_scales_the_pace(tmp_path):
    path, t, _ = _trace(tmp_path, events=40_000, seconds=4.0)
    slow = run(_cfg(path, trace_end="stop", trace_speed=0.5))
    fast = run(_cfg(path, trace_end="stop", trace_speed=2.0))
    # The fast replay is done in 2 s, before the migration ends; the slow one takes 8 s,
    # and by the stop-and-copy it has been asked for the events due by then, no more.
    assert fast.trace_stopped and sum(v.writes for v in fast.vcpus) == len(t)
    assert not slow.trace_stopped
    asked = sum(v.requested for v in slow.vcpus)
    assert asked == pytest.approx(len(t) * slow.stop_time / 8.0, rel=0.1)
    assert sum(v.writes for v in slow.vcpus) <= asked


def test_the_trace_vcpu_column_assigns_the_writer(tmp_path):
    vcpu = (np.arange(6000) % 3 == 0).astype(np.uint32)      # a third of the events on vCPU 1
    path, t, _ = _trace(tmp_path, events=6000, seconds=1.0, vcpu=vcpu)
    r = run(_cfg(path, trace_end="stop"))
    assert [v.writes for v in r.vcpus] == [4000, 2000]
    with pytest.raises(ValueError, match="vCPU"):
        run(_cfg(path, trace_end="stop", vcpus=1))


def test_a_stalled_vcpu_falls_behind_the_trace(tmp_path):
    path, t, _ = _trace(tmp_path, events=200_000, seconds=1.0)
    r = run(_cfg(path, trace_end="loop", design="ring", ring_entries=1024, max_time=3.0,
                 cost_overrides={"ring_full_exit": 5e-3}))
    assert r.verified
    assert r.progress < 0.9                   # ring-full stalls: fewer writes than the trace asked
    assert all(v.ring_full_exits > 0 for v in r.vcpus)


def test_checkpoints_replay_a_trace(tmp_path):
    path, t, _ = _trace(tmp_path)
    r = run_checkpoints(CheckpointConfig.from_migration(_cfg(path, trace_end="stop"), epoch=0.1,
                                                        checkpoints=5))
    assert r.verified and r.checkpoints == 5 and not r.trace_stopped


def test_bad_trace_options():
    with pytest.raises(ValueError, match="trace file"):
        MigrationConfig(trace_speed=1.0)
    with pytest.raises(ValueError, match="finite"):
        MigrationConfig(trace="x.npz", pattern="trace", trace_speed=float("nan"))
    with pytest.raises(ValueError, match="trace_end"):
        MigrationConfig(trace="x.npz", pattern="trace", trace_end="loop")


def test_guest_smaller_than_the_trace_is_refused(tmp_path):
    path, _, _ = _trace(tmp_path)
    with pytest.raises(ValueError, match="at least"):
        run(_cfg(path, memory=16 << 20, trace_end="stop"))


def test_cli_replays_a_trace_at_its_pace(tmp_path):
    path, t, _ = _trace(tmp_path)
    r = child.run(["-m", "kvmdirty", "migrate", "--memory", "64M", "--vcpus", "2", "--bandwidth",
                   "40M", "--max-bandwidth", "link", "--trace", path, "--speed", "1",
                   "--trace-end", "stop", "--designs", "bitmap,ring"], timeout=300)
    assert r.returncode == 0, r.stderr
    assert "bitmap: the trace stopped at its end" in r.stdout
    bad = child.run(["-m", "kvmdirty", "migrate", "--memory", "64M", "--trace", path, "--speed", "1",
                     "--bandwidth", "1M"], timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    errors = [line for line in bad.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "outlasted the trace" in errors[0]
