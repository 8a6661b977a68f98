"""QEMU's dirty-rate estimators on synthetic traces whose answers are known in closed form."""
from __future__ import annotations

import numpy as np
import pytest

from kvmdirty.host.dirtyrate import (estimate, qemu_rate, ring_entries_pushed, sample_count,
                                     sampling_estimate, sampling_expectation, format_table)
from kvmdirty.trace import Trace

GIB = 1 << 30
PAGES_1G = GIB // 4096


def per_window(pages_per_window, windows, period_ns, *, memory=GIB, repeat=1, vcpu=None):
    """Each window writes the same page list ``repeat`` times, at distinct times inside it."""
    t, g = [], []
    for k in range(windows):
        for r in range(repeat):
            t.append(np.full(len(pages_per_window), k * period_ns + (r + 1) * period_ns // (repeat + 2)))
            g.append(pages_per_window)
    tr = Trace(np.concatenate(t), np.concatenate(g), vcpu,
               {"memory_bytes": memory, "duration_ns": windows * period_ns})
    return tr


def test_qemu_rate_is_integer_mib_per_second():
    assert qemu_rate(256, 1000) == 1            # 1 MiB in 1 s
    assert qemu_rate(255, 1000) == 0            # truncated to whole MiB first
    assert qemu_rate(2560, 100) == 100


def test_sample_count_as_qemu():
    assert sample_count(GIB) == 512
    assert sample_count(4 * GIB, 1024) == 4096
    assert sample_count(1 << 20) == 0            # (1 MiB * 512) >> 30
    assert sample_count(64 << 10, 16384) == 0    # under MIN_RAMBLOCK_SIZE: not sampled


def test_everything_written_every_estimator_exact():
    period = 100_000_000
    tr = per_window(np.arange(PAGES_1G, dtype=np.uint64), 3, period)
    (row,) = estimate(tr, [0.1])
    truth = PAGES_1G * 4096 / (1 << 20) / 0.1      # 10240 MiB/s
    assert row.true_distinct == pytest.approx(truth)
    # Every sampled page is dirty (the last page is never sampled, but all are written).
    assert row.sampling == 1024 * 1000 // 100
    assert row.bitmap == qemu_rate(PAGES_1G, 100) == truth
    assert row.ring == truth                    # each page pushed once, however often the ring fills
    assert row.sampling_zero_windows == 0


def test_rewrites_are_missed_by_sampling_and_bitmap_but_not_by_writes():
    period = 1_000_000_000
    hot = np.arange(0, PAGES_1G, 4, dtype=np.uint64)        # a quarter of memory, rewritten 5x
    tr = per_window(hot, 4, period, repeat=5)
    (row,) = estimate(tr, [1.0], ring_entries=1 << 30)
    assert row.true_writes == pytest.approx(5 * row.true_distinct)
    assert row.bitmap == pytest.approx(row.true_distinct)
    assert row.ring == pytest.approx(row.true_distinct)     # one reap per 1 s period
    # The sampling estimate's closed-form mean is the distinct rate, a fifth of the write rate.
    assert row.sampling_expected == pytest.approx(row.true_distinct, rel=1e-3)
    sd = np.sqrt(0.25 * 0.75 / 512) * 1024 * 4      # binomial sd of the mean over 4 windows x2
    assert abs(row.sampling - row.sampling_expected) < 5 * sd
    assert row.sampling < row.true_writes / 4


def test_sampling_mean_matches_the_closed_form_over_many_draws():
    rng = np.random.default_rng(1)
    written = np.zeros(PAGES_1G, bool)
    written[rng.choice(PAGES_1G, PAGES_1G // 10, replace=False)] = True
    draws = [sampling_estimate(written, GIB, 1000, rng) for _ in range(400)]
    exp = sampling_expectation(written, GIB, 1000)
    # mean of 400 draws: sd = sqrt(p(1-p)/512) * 1024 / sqrt(400); integer truncation biases by < 1
    sd = np.sqrt(0.1 * 0.9 / 512) * 1024 / 20
    assert abs(np.mean(draws) - exp) < 5 * sd + 1


def test_sparse_writes_are_mostly_invisible_to_sampling():
    """10 pages of 1 GiB: P(no sampled page written) = (1 - 10/(N-1))**512, about 98%."""
    period = 50_000_000
    tr = per_window(np.arange(10, dtype=np.uint64) * 1000, 200, period)
    (row,) = estimate(tr, [0.05], seed=3)
    p_miss = (1 - 10 / (PAGES_1G - 1)) ** 512
    assert row.sampling_zero_windows / row.windows == pytest.approx(p_miss, abs=0.05)
    assert row.bitmap == 0                         # 10 pages are < 1 MiB: QEMU's truncation says 0
    assert row.true_distinct > 0


def test_the_last_page_is_never_sampled():
    written = np.zeros(PAGES_1G, bool)
    written[-1] = True
    rng = np.random.default_rng(0)
    assert all(sampling_estimate(written, GIB, 1000, rng) == 0 for _ in range(50))
    assert sampling_expectation(written, GIB, 1000) == 0


def test_ring_counts_a_page_again_after_each_reap():
    t = np.array([1, 2, 3, 11, 12, 21], np.uint64)          # epochs of 10 ns: 0, 1, 2
    g = np.array([5, 5, 6, 5, 6, 5], np.uint64)
    v = np.zeros(6, np.uint32)
    assert ring_entries_pushed(t, g, v, 0, 10, 1 << 20) == {0: 5}   # {5,6} + {5,6} + {5}
    assert ring_entries_pushed(t, g, v, 0, 100, 1 << 20) == {0: 2}


def test_ring_full_reaps_every_ring():
    t = np.arange(6, dtype=np.uint64)
    g = np.array([1, 2, 1, 2, 3, 1], np.uint64)
    v = np.zeros(6, np.uint32)
    # ring of 2: 1,2 pushed -> full, reaped; then 1,2 again -> full; then 3,1 -> full
    assert ring_entries_pushed(t, g, v, 0, 1 << 40, 2) == {0: 6}


def test_ring_is_per_vcpu_and_summed():
    period = 1_000_000_000
    pages = np.arange(512, dtype=np.uint64)                  # 2 MiB in 1 s, half per vCPU
    tr = per_window(pages, 2, period, vcpu=np.tile((pages % 2).astype(np.uint32), 2))
    (row,) = estimate(tr, [1.0])
    assert row.ring == 2 * qemu_rate(256, 1000) == 2.0
    assert row.bitmap == qemu_rate(512, 1000) == 2.0


def test_periods_longer_than_the_trace_are_left_out_and_bad_args_refused():
    tr = per_window(np.arange(4, dtype=np.uint64), 2, 100_000_000)
    rows = estimate(tr, [0.1, 0.2, 0.5])
    assert [r.period_s for r in rows] == [0.1, 0.2]
    assert "0.2 s" in format_table(rows, tr)
    with pytest.raises(ValueError):
        estimate(tr, [0.1], sample_pages_per_gib=64)
    with pytest.raises(ValueError):
        estimate(tr, [-1.0])


def test_estimate_reaps_at_the_soft_limit_not_the_ring_size():
    """Ring of 64 + 500 entries: soft-full after 500 pushes (KVM reserves 64), so
    1000 pages written twice in a window are pushed 2000 times, not 1000."""
    period = 1_000_000_000
    pages = np.arange(1000, dtype=np.uint64)
    tr = per_window(pages, 1, period, memory=1 << 24, repeat=2)
    row_small = estimate(tr, [1.0], ring_entries=64 + 500)[0]
    row_big = estimate(tr, [1.0], ring_entries=1 << 20)[0]
    t = tr.t_ns
    assert ring_entries_pushed(t, tr.gfn, np.zeros(len(t), np.uint32), 0, period, 500) == {0: 2000}
    assert ring_entries_pushed(t, tr.gfn, np.zeros(len(t), np.uint32), 0, period, 1 << 20) == {0: 1000}
    assert (row_small.ring, row_big.ring) == (qemu_rate(2000, 1000), qemu_rate(1000, 1000)) == (7, 3)
    with pytest.raises(ValueError, match="reserve"):
        estimate(tr, [1.0], ring_entries=64)
