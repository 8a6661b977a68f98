"""kvmdirty migrate: wall time against the virtual time it simulates, and RSS.

- seed 001's migration (24 GiB, 800 MB/s random, 10 Gb/s, QEMU defaults) per
  design: the target is wall < half the simulated migration time
  (``extra_info["wall_over_simulated"]`` < 0.5);
- a 1 TiB guest dirtying 20 MB/s (the sparse-1t scenario, ring): feasible on
  a 24 GiB machine thanks to lazily mapped memory; ``extra_info["rss_mib"]``
  is the process's peak RSS after it (the largest of the run so far).
One round each: a run is seconds to minutes and deterministic.
"""
from __future__ import annotations

import resource

import pytest

from conftest import QUICK, set_ops
from kvmdirty.migrate import MigrationConfig, run
from kvmdirty.migrate.scenarios import SCENARIOS


def _migrate(benchmark, cfg: MigrationConfig):
    res = benchmark.pedantic(run, args=(cfg,), rounds=1, iterations=1)
    assert res.verified and res.converged
    set_ops(benchmark, 1, "migration", design=cfg.design, memory=cfg.memory,
            simulated_s=res.total_time, downtime_s=res.downtime, rounds=res.rounds)
    if benchmark.stats:                  # --benchmark-disable: ran once, nothing timed
        benchmark.extra_info["wall_over_simulated"] = benchmark.stats.stats.median / res.total_time
    benchmark.extra_info["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


@pytest.mark.parametrize("design", ["bitmap", "clear-log", "ring"])
def test_migrate_seed_001(benchmark, design):
    benchmark.group = "migrate-seed-001"
    sc = dict(SCENARIOS["seed-001"]["config"])
    if QUICK:
        sc["memory"] = 4 << 30
    _migrate(benchmark, MigrationConfig(design=design, **sc))


@pytest.mark.skipif(QUICK, reason="a 1 TiB migration takes minutes (full runs only)")
def test_migrate_sparse_1t_ring(benchmark):
    benchmark.group = "migrate-sparse-1t"
    _migrate(benchmark, MigrationConfig(design="ring", **SCENARIOS["sparse-1t"]["config"]))
