"""Write plans: seeded, in range, shaped as their pattern says."""
from __future__ import annotations

import numpy as np
import pytest

from kvmdirty.workloads import PATTERNS, Workload, load_trace, rates, split_trace, writes_per_step

NPAGES = 1 << 14


@pytest.mark.parametrize("pattern", [p for p in PATTERNS if p != "trace"])
def test_plans_are_seeded_and_in_range(pattern):
    a = [p.take(5000) for p in Workload(pattern).plans(3, NPAGES, seed=1)]
    b = [p.take(5000) for p in Workload(pattern).plans(3, NPAGES, seed=1)]
    for x, y in zip(a, b):
        assert x.dtype == np.uint64 and len(x) == 5000
        assert int(x.max()) < NPAGES
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("pattern", ["uniform", "hotcold", "zipf"])
def test_seed_and_vcpu_change_the_stream(pattern):
    p0, p1 = Workload(pattern).plans(2, NPAGES, seed=1)
    q0 = Workload(pattern).plans(2, NPAGES, seed=2)[0]
    x = p0.take(1000)
    assert not np.array_equal(x, p1.take(1000))
    assert not np.array_equal(x, q0.take(1000))


def test_take_in_pieces_continues_the_stream():
    whole = Workload("sequential").plans(1, NPAGES, 0)[0].take(3000)
    p = Workload("sequential").plans(1, NPAGES, 0)[0]
    np.testing.assert_array_equal(np.concatenate([p.take(1000), p.take(2000)]), whole)
    u = Workload("uniform").plans(1, NPAGES, 0)[0]
    parts = np.concatenate([u.take(100_000), u.take(50_000)])   # crosses a block boundary
    assert len(parts) == 150_000 and int(parts.max()) < NPAGES


def test_sequential_and_strided_shapes():
    s = Workload("sequential").plans(4, 100, 0)
    np.testing.assert_array_equal(s[1].take(5), [25, 26, 27, 28, 29])
    np.testing.assert_array_equal(s[3].take(30)[-6:], [99, 0, 1, 2, 3, 4])   # wraps
    st = Workload("strided", stride=7).plans(1, 100, 0)[0].take(20)
    np.testing.assert_array_equal(st, (np.arange(20) * 7) % 100)


def test_hotcold_share():
    w = Workload("hotcold", hot_fraction=0.1, hot_share=0.9)
    x = w.plans(1, NPAGES, 5)[0].take(200_000)
    counts = np.bincount(x.astype(np.int64), minlength=NPAGES)
    hot = np.sort(counts)[::-1][: NPAGES // 10].sum()
    assert 0.88 < hot / len(x) < 0.92


def test_zipf_is_skewed():
    x = Workload("zipf", zipf_s=1.2).plans(1, NPAGES, 0)[0].take(100_000)
    counts = np.sort(np.bincount(x.astype(np.int64), minlength=NPAGES))[::-1]
    assert counts[0] > 10 * counts[100] > 0


def test_trace_npy_split_evenly(tmp_path):
    f = tmp_path / "t.npy"
    np.save(f, np.arange(10, dtype=np.uint64))
    p = Workload("trace", trace=str(f)).plans(2, 100, 0)
    np.testing.assert_array_equal(p[0].take(7), [0, 1, 2, 3, 4, 0, 1])    # wraps its piece
    np.testing.assert_array_equal(p[1].take(5), [5, 6, 7, 8, 9])


def test_trace_text_per_vcpu(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("# vcpu gfn\n0 0x10\n1 3\n0 17  # comment\n\n1 4\n")
    p = Workload("trace", trace=str(f)).plans(2, 100, 0)
    np.testing.assert_array_equal(p[0].take(2), [16, 17])
    np.testing.assert_array_equal(p[1].take(2), [3, 4])


def test_trace_structured_npy(tmp_path):
    f = tmp_path / "t.npy"
    a = np.zeros(3, dtype=[("vcpu", "<u4"), ("gfn", "<u8")])
    a["vcpu"], a["gfn"] = [1, 0, 1], [5, 6, 7]
    np.save(f, a)
    p = Workload("trace", trace=str(f)).plans(2, 100, 0)
    np.testing.assert_array_equal(p[1].take(2), [5, 7])


@pytest.mark.parametrize("text,err", [
    ("1\n2 3\n", "every line"), ("x\n", "not a number"), ("", "empty"), ("-1\n", "negative"),
])
def test_bad_text_traces(tmp_path, text, err):
    f = tmp_path / "t.txt"
    f.write_text(text)
    with pytest.raises(ValueError, match=err):
        load_trace(str(f))


def test_trace_checks_against_the_run(tmp_path):
    with pytest.raises(ValueError, match="outside guest memory"):
        split_trace(np.array([5, 200]), 1, 100)
    with pytest.raises(ValueError, match="names vCPU 3"):
        split_trace(np.array([[3, 1]]), 2, 100)
    with pytest.raises(ValueError, match="no writes for vCPU 1"):
        split_trace(np.array([[0, 1]]), 2, 100)


@pytest.mark.parametrize("kw", [dict(pattern="nope"), dict(hot_fraction=0), dict(hot_share=2),
                                dict(stride=0), dict(zipf_s=0), dict(pattern="trace"),
                                dict(trace="x.npy")])
def test_bad_workloads(kw):
    with pytest.raises(ValueError):
        Workload(**kw)


def test_rates():
    assert rates(8, 3) == [8, 8, 8]
    assert rates([1, 2], 2) == [1, 2]
    with pytest.raises(ValueError):
        rates([1, 2], 3)
    with pytest.raises(ValueError):
        rates(0, 1)
    assert writes_per_step(4.096, 1.0) == 1000
    with pytest.raises(ValueError):
        writes_per_step(0, 1)
