"""kvmdirty sweep: how a grid scales with workers, and what the Dask path adds per cell.

Run: python -m pytest benches/bench_sweep.py --benchmark-only -q -s
- scaling: the same grid of CPU-bound cells on 1 and on 2 local worker
  processes; the speed-up (1-worker time / 2-worker time) is printed and
  stored in extra_info (target >= 1.7 on a 2-core machine).
- dask overhead: trivial cells through the local executor and through a Dask
  LocalCluster (started outside the timed part), one worker each; the
  difference per cell is printed (target <= 50 ms).
"""
from __future__ import annotations

import shutil
import sys
import tempfile

import pytest
from conftest import QUICK, rounds

from kvmdirty.sweep import LocalExecutor, Spec, run_sweep

RESULTS: dict = {}


def _grid(out: str, cells: int, writes: int) -> Spec:
    # vcpus=1, deterministic: each cell keeps one core busy for its whole run.
    return Spec("compare", out=out, fixed={"memory": "64M", "vcpus": 1, "mode": "deterministic",
                                           "writes": writes, "design": "bitmap"},
                axes={"rate": [256 + i for i in range(cells)]})


def _run_fresh(make_executor, cells: int, writes: int) -> None:
    out = tempfile.mkdtemp(prefix="kvmdirty-bench-sweep-")
    try:
        run = run_sweep(_grid(out, cells, writes), make_executor())
        assert run.failed == 0 and len(run.rows) == cells
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.mark.parametrize("workers", [1, 2])
def test_sweep_scaling(benchmark, workers):
    cells, writes = (4, 2_000_000) if QUICK else (8, 6_000_000)
    benchmark.pedantic(_run_fresh, args=(lambda: LocalExecutor(workers), cells, writes),
                       rounds=rounds(3, 1), iterations=1)
    benchmark.extra_info.update(cells=cells, workers=workers)
    if not benchmark.stats:
        return
    RESULTS[workers] = benchmark.stats.stats.median
    if len(RESULTS) == 2:
        speedup = RESULTS[1] / RESULTS[2]
        benchmark.extra_info["speedup_2_over_1"] = round(speedup, 3)
        print(f"\nsweep scaling: 1 worker {RESULTS[1]:.2f} s, 2 workers {RESULTS[2]:.2f} s, "
              f"speed-up {speedup:.2f}x (target >= 1.7x)", file=sys.stderr)


OVERHEAD: dict = {}


@pytest.mark.parametrize("path", ["local", "dask"])
def test_sweep_per_cell_overhead(benchmark, path):
    cells = 20 if QUICK else 60
    tiny = {"memory": "1M", "vcpus": 1, "mode": "deterministic", "writes": 64, "design": "bitmap"}

    def spec(out):
        return Spec("compare", out=out, fixed=tiny, axes={"rate": list(range(1, cells + 1))})

    if path == "dask":
        pytest.importorskip("distributed", reason="needs kvmdirty[dask]")
        from kvmdirty.sweep import DaskExecutor
        ex = DaskExecutor("local", 1).__enter__()
    else:
        ex = LocalExecutor(1)
    try:
        def once():
            out = tempfile.mkdtemp(prefix="kvmdirty-bench-sweep-")
            try:
                assert len(run_sweep(spec(out), ex).rows) == cells
            finally:
                shutil.rmtree(out, ignore_errors=True)
        benchmark.pedantic(once, rounds=rounds(3, 1), iterations=1)
    finally:
        if path == "dask":
            ex.__exit__(None, None, None)
    if not benchmark.stats:
        return
    OVERHEAD[path] = benchmark.stats.stats.median / cells
    benchmark.extra_info["s_per_cell"] = round(OVERHEAD[path], 5)
    if len(OVERHEAD) == 2:
        extra = OVERHEAD["dask"] - OVERHEAD["local"]
        benchmark.extra_info["dask_extra_ms_per_cell"] = round(extra * 1e3, 2)
        print(f"\nper-cell: local {OVERHEAD['local'] * 1e3:.1f} ms, dask {OVERHEAD['dask'] * 1e3:.1f} ms, "
              f"Dask adds {extra * 1e3:.1f} ms per cell (target <= 50 ms)", file=sys.stderr)


def _fleet_1000(out: str) -> Spec:
    # 25 dirty rates x 8 links x 5 vCPU counts of a small guest: 1,000 migrations
    # (quick mode: 5 x 4 x 5 = 100).
    rates = range(2, 52, 2) if not QUICK else range(10, 60, 10)
    links = (20, 40, 80, 120, 160, 240, 320, 480) if not QUICK else (40, 120, 240, 480)
    return Spec("migrate", out=out,
                fixed={"memory": "16M", "max_bandwidth": "link", "max_time": 30, "design": "ring"},
                axes={"dirty_rate": [f"{r}M" for r in rates], "bandwidth": [f"{b}M" for b in links],
                      "vcpus": [1, 2, 3, 4, 5]})


def test_sweep_1000_migrations_then_resume(benchmark):
    """1,000 small migrations on 2 workers; then half the record is dropped and the rerun
    runs exactly that half (the resume path), each cell once."""
    from kvmdirty.sweep import expand, read_rows
    out = tempfile.mkdtemp(prefix="kvmdirty-bench-fleet-")
    spec = _fleet_1000(out)
    n = len(expand(spec))
    try:
        run = benchmark.pedantic(run_sweep, args=(spec, LocalExecutor(2)), rounds=1, iterations=1)
        assert len(run.rows) == n and run.failed == 0
        record = f"{out}/results.jsonl"
        lines = open(record).read().splitlines()
        keep = lines[: n // 2]
        with open(record, "w") as f:
            f.write("\n".join(keep) + "\n")
        again = run_sweep(spec, LocalExecutor(2))
        assert again.skipped == n // 2 and len(again.rows) == n - n // 2
        rows = read_rows(out)
        assert sorted(r["cell"] for r in rows) == sorted(c.key for c in expand(spec))
        assert len(open(record).read().splitlines()) == n          # each cell recorded once
        benchmark.extra_info.update(cells=n, resumed=len(again.rows),
                                    converged=sum(bool(r.get("converged")) for r in rows))
    finally:
        shutil.rmtree(out, ignore_errors=True)
