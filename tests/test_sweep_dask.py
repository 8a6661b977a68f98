"""kvmdirty.sweep on a real dask.distributed LocalCluster with several worker processes."""
import os
import signal

import pytest

pytest.importorskip("distributed", reason="the Dask executor needs kvmdirty[dask] (dask.distributed)")

from kvmdirty.sweep import DaskExecutor, LocalExecutor, Spec, expand, read_rows, run_sweep  # noqa: E402

FIXED = {"memory": "32M", "vcpus": 2, "mode": "deterministic"}
COUNTS = ("wp_faults", "pages_harvested", "harvest_calls", "full_exits", "lost_pages", "writes")


def _spec(out, writes=5000, axes=None):
    return Spec("compare", fixed=dict(FIXED, writes=writes), out=str(out),
                axes=axes or {"design": ["bitmap", "clear-log", "ring"], "ring_entries": [1024, 4096]})


def test_dask_gives_the_local_executors_results(tmp_path):
    local = {r["cell"]: r for r in run_sweep(_spec(tmp_path / "local"), LocalExecutor(2)).rows}
    with DaskExecutor("local", 2) as ex:
        dask = {r["cell"]: r for r in run_sweep(_spec(tmp_path / "dask"), ex).rows}
        workers = set(ex.client.scheduler_info()["workers"])
    assert local.keys() == dask.keys() and len(local) == 4
    for k in local:
        assert {c: local[k][c] for c in COUNTS} == {c: dask[k][c] for c in COUNTS}
        assert dask[k]["status"] == "ok" and dask[k]["worker"] in workers


def test_a_worker_killed_mid_sweep_loses_nothing(tmp_path):
    spec = _spec(tmp_path / "out", writes=300_000,
                 axes={"design": ["bitmap", "clear-log", "ring"], "rate": [256, 512, 1024]})
    killed = []
    with DaskExecutor("local", 2) as ex:
        pids = ex.client.run(os.getpid)

        def on_row(row):
            if not killed:                    # after the first result: kill a busy worker
                victim = next(a for a in pids if a != row["worker"])
                os.kill(pids[victim], signal.SIGKILL)
                killed.append(victim)

        run = run_sweep(spec, ex, on_row=on_row)
    assert killed
    rows = read_rows(spec.out)
    assert sorted(r["cell"] for r in rows) == sorted(c.key for c in expand(spec))
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    assert run.failed == 0


def test_dask_sweep_resumes_only_missing_cells(tmp_path):
    spec = _spec(tmp_path / "out")
    cells = expand(spec)
    with DaskExecutor("local", 2) as ex:
        partial = Spec(spec.command, fixed=spec.fixed, out=spec.out,
                       axes={"design": ["bitmap"], "ring_entries": [1024, 4096]})
        assert len(run_sweep(partial, ex).rows) == 1
        rest = run_sweep(spec, ex)
    assert rest.skipped == 1 and len(rest.rows) == len(cells) - 1


def test_unreachable_scheduler_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot reach the Dask scheduler"):
        with DaskExecutor("tcp://127.0.0.1:9"):
            pass


def test_fleet_example_on_a_local_dask_cluster(tmp_path):
    """The README's command: the fleet grid on a LocalCluster, then a resume that runs nothing."""
    import child
    example = os.path.join(child.ROOT, "examples", "fleet.toml")
    args = ["-m", "kvmdirty", "sweep", example, "--scheduler", "local",
            "--workers", "2", "--out", str(tmp_path / "fleet")]
    r = child.run(args, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "20 cells (0 already done, 20 run now on Dask LocalCluster" in r.stdout
    assert (tmp_path / "fleet" / "summary.png").exists()
    again = child.run(args, timeout=600)
    assert again.returncode == 0 and "resuming: 20 of 20" in again.stderr
