"""The trace format (npz / CSV), its validation, and the timed replay schedule."""
from __future__ import annotations

import json

import numpy as np
import pytest

from kvmdirty.trace import Trace, load, replay, schedule


def small() -> Trace:
    return Trace(np.array([0, 10, 10, 30], np.uint64), np.array([1, 2, 3, 1], np.uint64),
                 meta={"workload": "unit", "duration_ns": 40, "interval_ns": 10})


def test_npz_round_trip(tmp_path):
    tr = small()
    path = str(tmp_path / "t.npz")
    tr.save(path)
    back = load(path)
    assert back.t_ns.tolist() == [0, 10, 10, 30]
    assert back.gfn.tolist() == [1, 2, 3, 1]
    assert back.vcpu is None
    assert back.meta["workload"] == "unit" and back.meta["memory_bytes"] == 4 * 4096
    assert back.duration_ns == 40 and back.interval_ns == 10
    with np.load(path) as z:
        assert json.loads(str(z["meta"]))["format"] == "kvmdirty-trace"


def test_csv_with_header_vcpu_and_bytes(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("t_ns,gfn,vcpu\n# a comment\n5,0x10,1\n1,3,0\n")
    tr = load(str(p))
    assert tr.t_ns.tolist() == [1, 5] and tr.gfn.tolist() == [3, 16] and tr.vcpu.tolist() == [0, 1]
    q = tmp_path / "b.csv"
    q.write_text("t_ns,gpa\n0,8192\n7,4095\n")
    tr = load(str(q), unit="bytes", memory_bytes=1 << 20)
    assert tr.gfn.tolist() == [2, 0] and tr.npages == 256


@pytest.mark.parametrize("text,msg", [
    ("", "empty"), ("t,gfn\n1,2\n", "header"), ("t_ns,gfn\n1\n", "fields"),
    ("t_ns,gfn\n1,x\n", "integer"), ("t_ns,gfn\n-1,2\n", "negative")])
def test_bad_csv_says_what_is_wrong(tmp_path, text, msg):
    p = tmp_path / "bad.csv"
    p.write_text(text)
    with pytest.raises(ValueError, match=msg):
        load(str(p))


def test_bad_npz_and_arrays(tmp_path):
    p = str(tmp_path / "x.npz")
    np.savez(p, a=np.arange(3))
    with pytest.raises(ValueError, match="not a kvmdirty trace"):
        load(p)
    with pytest.raises(ValueError):
        Trace(np.arange(3), np.arange(2))
    with pytest.raises(TypeError):
        Trace(np.array([0.5]), np.array([1]))
    with pytest.raises(ValueError, match="beyond"):
        Trace(np.array([0]), np.array([10]), meta={"memory_bytes": 4096})
    with pytest.raises(ValueError):
        load(p, unit="bytes")


def test_schedule_at_speed_and_per_vcpu():
    tr = Trace(np.array([0, 10, 10], np.uint64), np.array([1, 2, 3], np.uint64),
               np.array([0, 1, 0], np.uint32), {"duration_ns": 20})
    b = list(schedule(tr, vcpus=2, speed=2.0))
    assert [(x.due_ns, x.vcpu, x.gfns.tolist()) for x in b] == [(0, 0, [1]), (5, 0, [3]), (5, 1, [2])]
    with pytest.raises(ValueError, match="vCPU 1"):
        list(schedule(tr, vcpus=1))


def test_a_run_longer_than_the_trace_must_choose():
    tr = small()
    with pytest.raises(ValueError, match="loop or to stop"):
        list(schedule(tr, run_ns=100))
    looped = list(schedule(tr, run_ns=100, at_end="loop"))
    assert [b.due_ns for b in looped] == [0, 10, 30, 40, 50, 70, 80, 90]
    assert max(b.lap for b in looped) == 2
    stopped = list(schedule(tr, run_ns=100, at_end="stop"))
    assert [b.due_ns for b in stopped] == [0, 10, 30]


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.sleeps = []

    def clock(self):
        return self.now

    def sleep(self, s):
        self.sleeps.append(s)
        self.now += s


class RecordingVcpu:
    def __init__(self, clock):
        self.clock, self.calls = clock, []

    def run(self, gfns, value):
        self.calls.append((self.clock.now, list(map(int, gfns))))


def test_replay_runs_each_batch_when_due_and_reports_the_end():
    tr = Trace(np.array([0, 1_000_000_000, 2_000_000_000], np.uint64), np.array([4, 5, 6], np.uint64),
               meta={"duration_ns": 3_000_000_000})
    fc = FakeClock()
    v = RecordingVcpu(fc)
    res = replay(tr, [v], speed=2.0, clock=fc.clock, sleep=fc.sleep)
    assert v.calls == [(0.0, [4]), (0.5, [5]), (1.0, [6])]
    assert (res.writes, res.batches, res.ended) == (3, 3, "trace end")
    fc2 = FakeClock()
    res = replay(tr, [RecordingVcpu(fc2)], run_s=4.0, at_end="stop", clock=fc2.clock, sleep=fc2.sleep)
    assert res.ended == "stopped at trace end" and res.writes == 3
    fc3 = FakeClock()
    res = replay(tr, [RecordingVcpu(fc3)], run_s=7.0, at_end="loop", clock=fc3.clock, sleep=fc3.sleep)
    assert res.ended == "looped" and res.laps == 3 and res.writes == 7


def test_replay_on_a_real_backend_at_speed():
    import kvmdirty
    from kvmdirty import _bitmap
    tr = Trace(np.array([0, 5_000_000, 10_000_000], np.uint64), np.array([1, 2, 3], np.uint64),
               meta={"duration_ns": 10_000_000})
    vm = kvmdirty.open_vm("sim")
    vm.set_user_memory_region(0, 0, 1 << 20, 1)
    res = replay(tr, [vm.create_vcpu(0)], speed=1.0)
    assert res.writes == 3 and res.elapsed_s >= 0.01
    assert _bitmap.to_gfns(vm.get_dirty_log(0)).tolist() == [1, 2, 3]


def test_replay_on_the_host_backend_gives_the_trace_pages():
    from host_util import HOST_UNUSABLE
    if HOST_UNUSABLE:
        pytest.skip(f"host write tracking unusable here: {HOST_UNUSABLE}")
    import kvmdirty
    from kvmdirty import _bitmap
    tr = Trace(np.array([0, 1_000_000, 1_000_000, 3_000_000], np.uint64),
               np.array([7, 9, 100, 7], np.uint64), np.array([0, 1, 1, 0], np.uint32),
               {"duration_ns": 4_000_000})
    vm = kvmdirty.open_vm("host")
    try:
        vm.set_user_memory_region(0, 0, 1 << 20, 1)
        res = replay(tr, [vm.create_vcpu(0), vm.create_vcpu(1)], speed=0.5)
        assert res.writes == 4 and res.elapsed_s >= 0.006
        assert _bitmap.to_gfns(vm.get_dirty_log(0)).tolist() == [7, 9, 100]
    finally:
        vm.close()
