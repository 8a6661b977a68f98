"""Convergence aids (QEMU's auto-converge and dirty-limit arithmetic) and checkpoints."""
from __future__ import annotations

import numpy as np
import pytest

from kvmdirty.migrate import Costs, MigrationConfig, run
from kvmdirty.migrate.checkpoint import CheckpointConfig, run_checkpoints
from kvmdirty.migrate.throttle import AutoConverge, DirtyLimit

# Uniform writes at 1.2 GB/s over 2 GiB against a 1 GB/s link: converges slowly alone.
HOT = dict(memory=2 << 30, dirty_rate=1.2e9, bandwidth=1e9, max_bandwidth=1e9, max_time=60)


def test_auto_converge_steps_as_qemu():
    a = AutoConverge()
    assert not a.check(60, 100)          # 60 > 50 % of 100: first high period
    assert a.check(60, 100) and a.pct == 20
    assert not a.check(10, 100)          # below: nothing (the count is not reset, as in QEMU)
    assert not a.check(60, 100)          # the count restarted at the trigger: one more needed
    assert a.check(60, 100) and a.pct == 30
    for _ in range(40):
        a.check(60, 100)
    assert a.pct == 99


def test_auto_converge_tailslow_caps_the_step():
    a = AutoConverge(tailslow=True, pct=20.0)
    a.high = 1
    # cpu_now 80, ideal = 80 * (50/55): the needed step (7.27) is below the increment (10).
    assert a.check(55, 100)
    assert a.pct == pytest.approx(20 + 80 - 80 * 50 / 55)


def test_dirty_limit_steps_as_qemu():
    d = DirtyLimit(quota_mb=10, ring_entries=4096, vcpus=2)
    d.start(0.0)
    assert d.due(1.0) and not d.due(0.5)
    per_s = 100e6 / 4096                 # vCPU 0 at 100 MB/s, vCPU 1 at 20 MB/s (within 25)
    d.adjust(1.0, np.array([per_s, 20e6 / 4096]), 1.0)
    full = 16 * 1e6 / 100                # ring 16 MiB, max rate 100 MB/s -> us per ring fill
    assert d.sleep_us[0] == pytest.approx(full * 90 / 10)
    assert d.sleep_us[1] == 0


@pytest.mark.parametrize("design,aid", [("bitmap", "auto-converge"), ("ring", "auto-converge"),
                                        ("ring", "dirty-limit")])
def test_aids_throttle_and_shorten_migration(design, aid):
    base = run(MigrationConfig(design=design, **HOT), Costs.zero())
    slowed = run(MigrationConfig(design=design, aid=aid, dirty_limit_mb=20, **HOT), Costs.zero())
    assert base.verified and slowed.verified
    assert sum(v.throttle_time for v in slowed.vcpus) > 0
    assert sum(v.throttle_time for v in base.vcpus) == 0
    assert slowed.total_time < base.total_time
    assert slowed.progress < base.progress


def test_dirty_limit_needs_the_ring():
    with pytest.raises(ValueError, match="dirty ring"):
        MigrationConfig(design="bitmap", aid="dirty-limit")


@pytest.mark.parametrize("design", ["bitmap", "clear-log", "ring"])
def test_checkpoints_verified_and_paused(design):
    cfg = MigrationConfig(memory=256 << 20, dirty_rate=50e6, design=design, vcpus=2,
                          max_bandwidth=1.25e9, ring_entries=1024)
    r = run_checkpoints(CheckpointConfig(cfg, epoch=0.05, checkpoints=10), check=True)
    assert r.checkpoints == 10 and r.verified
    assert all(p > 0 for p in r.pauses) and all(n > 0 for n in r.pages)
    assert r.slowdown > 1.0
    assert r.guest_time == pytest.approx(0.5)


def test_checkpoint_page_bound():
    cfg = MigrationConfig(memory=256 << 20, dirty_rate=50e6, design="ring", vcpus=2)
    r = run_checkpoints(CheckpointConfig(cfg, epoch=None, epoch_pages=2000, checkpoints=5),
                        Costs.zero(), check=True)
    assert all(2000 <= n < 2000 + 2 * 50e6 / 4096 * 0.01 + 64 for n in r.pages)


def test_checkpoint_catches_injected_bug():
    cfg = MigrationConfig(memory=32 << 20, dirty_rate=40e6, design="ring", vcpus=2,
                          faults=("skip-reset-protect",), ring_entries=1024)
    r = run_checkpoints(CheckpointConfig(cfg, epoch=0.05, checkpoints=20), Costs.zero())
    assert not r.verified and r.mismatched_gfns


def test_dirty_limit_slows_only_the_fast_vcpu():
    """dirty-limit's reason to exist: one vCPU dirtying fast, three slowly; only it sleeps."""
    cfg = MigrationConfig(design="ring", aid="dirty-limit", dirty_limit_mb=20, vcpus=4,
                          vcpu_dirty_rates=(1.2e9, 10e6, 10e6, 10e6), memory=2 << 30,
                          bandwidth=1e9, max_bandwidth=1e9, max_time=60)
    r = run(cfg, Costs.zero())
    assert r.verified and cfg.dirty_rate == pytest.approx(1.23e9)
    fast, *slow = r.vcpus
    assert fast.throttle_time > 0 and all(v.throttle_time == 0 for v in slow)
    assert fast.progress < 0.9 and all(v.progress > 0.99 for v in slow)
