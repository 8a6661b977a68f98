"""Postcopy after N rounds: tiny downtime, remote faults, and its own destination invariant."""
from __future__ import annotations

import numpy as np
import pytest

from kvmdirty.migrate import Costs, MigrationConfig, run
from kvmdirty.migrate import postcopy as pc_mod

HOT = dict(memory=512 << 20, dirty_rate=1.2e9, bandwidth=1e9, max_bandwidth=1e9, vcpus=2,
           max_time=60)


@pytest.mark.parametrize("design", ["bitmap", "clear-log", "ring"])
def test_postcopy_completes_verified(design):
    pre = run(MigrationConfig(design=design, **HOT), Costs.zero())
    post = run(MigrationConfig(design=design, postcopy_after=2, **HOT), Costs.zero())
    assert post.verified and post.converged and post.rounds == 2
    assert post.postcopy_faults > 0 and post.postcopy_stall > 0
    assert post.downtime < pre.downtime / 10          # only the final sync
    assert post.bytes_sent >= post.guest_bytes
    assert "postcopy after 2 rounds" in post.why


def test_postcopy_fault_cost_is_rtt_plus_transfer():
    r = run(MigrationConfig(design="bitmap", postcopy_after=1, postcopy_rtt=1e-3, **HOT), Costs.zero())
    assert r.postcopy_stall == pytest.approx(r.postcopy_faults * (1e-3 + 4096 / 1e9))


def test_stale_push_over_a_written_page_is_caught(monkeypatch):
    """A pull that leaves the page flagged lets the push overwrite the guest's newer write."""
    def leaky_pull(self, gfns):
        if len(gfns):
            self.dest.send(np.sort(gfns))
            self.sent += len(gfns) * 4096
    monkeypatch.setattr(pc_mod.Postcopy, "_pull", leaky_pull)
    r = run(MigrationConfig(design="bitmap", postcopy_after=2, **HOT), Costs.zero())
    assert not r.verified and r.mismatched_gfns
