"""The cost table is charged where QEMU pays it: per GiB for the bitmap, per entry for the ring."""
from __future__ import annotations

import pytest

from kvmdirty.migrate import Costs, MigrationConfig, run
from kvmdirty.migrate.checkpoint import CheckpointConfig, run_checkpoints

GIB = 1 << 30


def _pause(design: str, memory: int, costs: Costs) -> float:
    cfg = MigrationConfig(memory=memory, dirty_rate=20e6, design=design, vcpus=2,
                          max_bandwidth=1.25e9, ring_entries=4096)
    r = run_checkpoints(CheckpointConfig(cfg, epoch=0.05, checkpoints=3), costs, check=True)
    return r.percentile(50) - r.pages[1] * 4096 / 1.25e9


def test_bitmap_pays_per_gib_ring_does_not():
    c = Costs.zero().override({"get_log_per_gib": 1e-3})
    assert _pause("bitmap", 16 * GIB, c) - _pause("bitmap", GIB, c) == pytest.approx(15e-3, rel=1e-6)
    assert _pause("ring", 16 * GIB, c) == pytest.approx(_pause("ring", GIB, c), abs=1e-12)


def test_ring_pays_per_entry_and_qemu_merge_per_gib_for_all():
    c = Costs.zero().override({"ring_collect_per_entry": 1e-6, "qemu_sync_per_gib": 1e-3})
    ring1, ring16 = _pause("ring", GIB, c), _pause("ring", 16 * GIB, c)
    assert ring16 - ring1 == pytest.approx(15e-3, rel=1e-3)      # QEMU's merge, every design
    assert ring1 > 1e-3                                           # + 1 us per reaped entry
    assert _pause("bitmap", GIB, c) == pytest.approx(1e-3)        # no entries for the bitmap


def test_sync_cost_in_the_round_table():
    c = Costs.zero().override({"get_log_per_gib": 0.01})
    r = run(MigrationConfig(memory=2 * GIB, dirty_rate=100e6, bandwidth=1e9, max_bandwidth=1e9,
                            vcpus=2), c)
    assert all(row.sync_cost == pytest.approx(0.02) for row in r.table)


def test_not_converging_is_reported():
    r = run(MigrationConfig(memory=GIB, dirty_rate=800e6, bandwidth=1.25e9, vcpus=2, max_time=5),
            Costs.zero())                          # QEMU's 128 MiB/s default max-bandwidth
    assert not r.converged and "did not converge: time limit 5 s" in r.why
    assert r.verified and r.downtime > 1.0
    r = run(MigrationConfig(memory=GIB, dirty_rate=800e6, bandwidth=1.25e9, vcpus=2, max_rounds=2,
                            max_bandwidth=300e6), Costs.zero())
    assert not r.converged and r.rounds == 2 and "round limit 2" in r.why
