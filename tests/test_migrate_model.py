"""kvmdirty migrate against an independent closed-form pre-copy model.

Uniform random writes, every tracking cost zero: the expected number of
distinct pages hit by k uniform writes over M pages is M (1 - (1 - 1/M)^k).
QEMU's loop, per round: after a sync the bitmap holds C pages; the migration
thread sends B pages/s and checks, after each 50 ms iteration, whether at most
T = B x downtime-limit pages are left; if so it syncs: the pages dirtied since
the last sync join the R unsent ones (a fraction R/M of them already are),
C' = R + D (1 - R/M); C' < T completes with downtime C'/B.
"""
from __future__ import annotations

import math

import pytest

from kvmdirty.migrate import Costs, MigrationConfig, run

PAGE = 4096
CHECK = 0.05


def closed_form(memory: int, dirty_rate: float, bandwidth: float, downtime_limit: float = 0.3):
    """(rounds, total time, downtime) of the expected-value recurrence."""
    M = memory // PAGE
    w = dirty_rate / PAGE
    B = bandwidth / PAGE
    T = B * downtime_limit
    C, t, rounds = float(M), 0.0, 0
    while True:
        n = math.ceil(max(0.0, C - T) / (B * CHECK) - 1e-9)
        dt = max(1, n) * CHECK
        R = max(0.0, C - B * dt)
        D = M * (1.0 - (1.0 - 1.0 / M) ** (w * dt))
        C = R + D * (1.0 - R / M)
        t += dt
        rounds += 1
        if C < T:
            return rounds, t + C / B, C / B
        assert rounds < 1000, "the model does not converge"


def _close(a: float, b: float, tol: float = 0.05) -> bool:
    return abs(a - b) <= tol * abs(b)


@pytest.mark.parametrize("memory,dirty_rate,bandwidth", [
    (1 << 30, 100e6, 400e6),
    (2 << 30, 300e6, 1.25e9),
    (512 << 20, 40e6, 200e6),
])
def test_agrees_with_closed_form(memory, dirty_rate, bandwidth):
    rounds, total, downtime = closed_form(memory, dirty_rate, bandwidth)
    res = run(MigrationConfig(memory=memory, dirty_rate=dirty_rate, bandwidth=bandwidth,
                              max_bandwidth=bandwidth, design="bitmap", vcpus=2), Costs.zero())
    assert res.converged and res.verified
    assert _close(res.rounds, rounds), (res.rounds, rounds)
    assert _close(res.total_time, total), (res.total_time, total)
    assert _close(res.downtime, downtime), (res.downtime, downtime)


@pytest.mark.parametrize("design", ["clear-log", "ring"])
def test_every_design_agrees_when_free(design):
    """With zero costs the tracker cannot change time: all designs match the model."""
    memory, rate, bw = 1 << 30, 100e6, 400e6
    rounds, total, downtime = closed_form(memory, rate, bw)
    res = run(MigrationConfig(memory=memory, dirty_rate=rate, bandwidth=bw, max_bandwidth=bw,
                              design=design, vcpus=2, ring_entries=65536), Costs.zero())
    assert res.converged and res.verified
    assert _close(res.rounds, rounds) and _close(res.total_time, total) and _close(res.downtime, downtime)


def test_closed_form_itself():
    """The model's own sanity: no dirtying -> one round, M/B seconds, ~0 downtime."""
    rounds, total, downtime = closed_form(1 << 30, 0.0, 1e9)
    assert rounds == 1
    assert abs(total - (1 << 30) / 1e9) < CHECK + 1e-9
    assert downtime < 0.3
