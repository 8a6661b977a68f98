"""compare replaying a timed trace (kvmdirty record's format) at its recorded pace, in real time."""
import json
import threading

import numpy as np
import pytest

import child
from kvmdirty.replay import TimedReplay
from kvmdirty.runner import RunSpec, run
from kvmdirty.trace import Trace
from kvmdirty.workloads import Workload

MEM = 64 << 20


def _trace(tmp_path, events=6000, seconds=0.6, vcpu=None):
    rng = np.random.default_rng(3)
    t = np.sort(rng.integers(0, int(seconds * 1e9), events)).astype(np.uint64)
    t[-1] = int(seconds * 1e9)                    # an event exactly at the end of the trace
    g = rng.integers(0, MEM // 4096, events).astype(np.uint64)
    path = str(tmp_path / "t.npz")
    Trace(t, g, vcpu, meta={"memory_bytes": MEM}).save(path)
    return path, t, g


def _spec(path, **kw):
    return RunSpec(**dict(dict(design="bitmap", memory=MEM, vcpus=2, mode="threads",
                               workload=Workload("trace", trace=path), trace_speed=1.0), **kw))


def test_every_event_is_written_once_and_nothing_is_lost(tmp_path):
    path, t, _ = _trace(tmp_path)
    r = run(_spec(path))
    assert r.ok and r.writes == len(t)
    assert r.trace_ended == "trace end"
    assert r.elapsed_s >= 0.6 * 0.9               # it waited for the events' times


@pytest.mark.parametrize("design", ["clear-log", "ring"])
def test_other_designs_and_rounds(tmp_path, design):
    path, t, _ = _trace(tmp_path)
    r = run(_spec(path, design=design, rounds=3, ring_entries=1024))
    assert r.ok and r.writes == len(t)


def test_loop_and_stop_when_the_run_is_longer(tmp_path):
    path, t, _ = _trace(tmp_path, seconds=0.3, events=3000)
    looped = run(_spec(path, duration=0.7, trace_end="loop"))
    assert looped.ok and looped.trace_ended.startswith("looped (3 passes)")
    assert len(t) * 2 <= looped.writes <= len(t) * 3
    stopped = run(_spec(path, duration=0.7, trace_end="stop"))
    assert stopped.ok and stopped.writes == len(t) and stopped.trace_ended == "stopped at trace end"
    with pytest.raises(ValueError, match="longer than the trace"):
        run(_spec(path, duration=0.7))


def test_speed_scales_wall_time(tmp_path):
    path, t, _ = _trace(tmp_path, seconds=0.8)
    fast = run(_spec(path, trace_speed=4.0))
    assert fast.writes == len(t) and fast.elapsed_s < 0.8 * 0.75


def test_a_vcpu_column_picks_the_writer(tmp_path):
    vcpu = (np.arange(6000) % 4 == 0).astype(np.uint32)
    path, t, _ = _trace(tmp_path, vcpu=vcpu)
    replay = TimedReplay(Trace(np.arange(4, dtype=np.uint64), np.arange(4, dtype=np.uint64),
                               np.array([0, 1, 1, 1], np.uint32)), 2, 1.0)
    got = [[], []]
    for i in (0, 1):
        replay.writes(i, 0.0, replay.run_s, threading.Event(), got[i].append)
    assert [int(np.concatenate(g).size) for g in got] == [1, 3]
    assert run(_spec(path)).writes == len(t)
    with pytest.raises(ValueError, match="vCPU"):
        run(_spec(path, vcpus=1))


def test_bad_options(tmp_path):
    path, _, _ = _trace(tmp_path)
    for kw, msg in (({"mode": "deterministic"}, "threads"), ({"trace_speed": 0.0}, "> 0"),
                    ({"memory": 16 << 20}, "at least"), ({"trace_end": "twice"}, "loop")):
        with pytest.raises(ValueError, match=msg):
            run(_spec(path, **kw))
    with pytest.raises(ValueError, match="timed trace"):
        RunSpec(trace_speed=1.0).validate()


def test_cli_replays_at_its_pace_by_default(tmp_path):
    path, t, _ = _trace(tmp_path)
    r = child.run(["-m", "kvmdirty", "compare", "--trace", path, "--memory", "64M", "--vcpus", "2",
                   "--designs", "bitmap,ring", "--json"], timeout=120)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["results"]
    assert [x["writes"] for x in rows] == [len(t)] * 2
    assert all(x["trace_ended"] == "trace end" for x in rows)
    bad = child.run(["-m", "kvmdirty", "compare", "--trace", path, "--duration", "5"], timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "--trace-end" in bad.stderr


def test_a_csv_trace_of_addresses_replays_in_compare_and_migrate(tmp_path):
    rng = np.random.default_rng(5)
    t = np.sort(rng.integers(0, 300_000_000, 2000))
    gpa = rng.integers(0, MEM // 4096, 2000) * 4096 + 123          # addresses inside pages
    path = tmp_path / "t.csv"
    path.write_text("t_ns,gpa\n" + "".join(f"{a},{b}\n" for a, b in zip(t, gpa)))
    r = run(_spec(str(path), trace_unit="bytes"))
    assert r.ok and r.writes == 2000
    m = child.run(["-m", "kvmdirty", "migrate", "--memory", "64M", "--vcpus", "2", "--trace", str(path),
                   "--trace-unit", "bytes", "--trace-end", "stop", "--bandwidth", "100M",
                   "--max-bandwidth", "link", "--json"], timeout=300)
    assert m.returncode == 0, m.stderr
    res = json.loads(m.stdout)["results"][0]
    assert res["verified"] and sum(v["writes"] for v in res["vcpus"]) == 2000
    with pytest.raises(ValueError, match="trace_unit"):
        RunSpec(trace_unit="bytes").validate()
