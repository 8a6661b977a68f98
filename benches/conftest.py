"""Shared machinery of the benchmark suite (pytest-benchmark).

- Collects ``bench_*.py`` when a directory is given (``pytest benches``), so
  the suite runs without ``-o python_files=...``; files named explicitly are
  left to pytest's own collector (no duplicates).
- Per-operation cost: a benchmark that stores ``extra_info["ops"]`` (pages,
  entries, words or calls handled by one timed call) gets
  ``ns_per_op`` (median) and ``ns_per_op_min`` added to its extra_info when it
  finishes; ``kvmdirty bench`` (kvmdirty/bench.py) builds its tables from them.
- Quick mode: ``KVMDIRTY_BENCH_QUICK=1`` (set by ``kvmdirty bench --quick``)
  shrinks sweeps and round counts; see ``quick`` / ``rounds``.
- ``dirty_words``: cached, reproducible dirty bitmaps of a given size/density.
- ``kvm_unusable()``: why /dev/kvm cannot be benchmarked here, or None.
"""
from __future__ import annotations

import fnmatch
import functools
import os
from typing import Optional

import numpy as np
import pytest

#: Quick mode: fewer points, fewer rounds (``kvmdirty bench --quick``; CI smoke).
QUICK = os.environ.get("KVMDIRTY_BENCH_QUICK") == "1"

GIB_PAGES = 1 << 18            # 4 KiB pages per GiB
PAGES_24G = 24 * GIB_PAGES     # the headline slot: 6,291,456 pages, 768 KiB of bitmap
DIRTY_24G = PAGES_24G // 1000  # 0.1% of it: 6291 pages

# The ring cases, shared by bench_vm.py (simulator) and bench_kvm.py (/dev/kvm):
# the real nested guest costs ~4 us per instruction, so the dirty count stays small.
RING_ENTRIES = 1 << 16         # KVM_DIRTY_RING_MAX_ENTRIES
RING_DIRTY = 4096              # entries harvested per round
RING_SLOT_PAGES = 1 << 22      # a 16 GiB slot: random pages spread over 512 KiB of W bits


def rounds(full: int, quick: int) -> int:
    """Round count of a pedantic benchmark in full / quick mode."""
    return quick if QUICK else full


def pytest_collect_file(file_path, parent):
    name = file_path.name
    if file_path.suffix != ".py" or not name.startswith("bench_"):
        return None
    if parent.session.isinitpath(file_path):
        return None                       # named on the command line: pytest collects it
    if any(fnmatch.fnmatch(name, p) for p in parent.config.getini("python_files")):
        return None                       # already matched by the ini's patterns
    return pytest.Module.from_parent(parent, path=file_path)


@pytest.fixture(autouse=True)
def _ns_per_op(request):
    """After each benchmark, derive ns per op from its stats and extra_info['ops']."""
    yield
    bm = request.node.funcargs.get("benchmark")
    if bm is None:
        return
    record_per_op(bm)


def record_per_op(bm) -> None:
    meta = getattr(bm, "stats", None)
    ops = bm.extra_info.get("ops")
    if not meta or not ops:
        return
    st = meta.stats
    bm.extra_info["ns_per_op"] = round(st.median * 1e9 / ops, 4)
    bm.extra_info["ns_per_op_min"] = round(st.min * 1e9 / ops, 4)


def set_ops(benchmark, ops: int, unit: str = "op", **info) -> None:
    """Record what one timed call handles: ``ops`` of ``unit`` (page, entry, word, call...)."""
    benchmark.extra_info["ops"] = int(ops)
    benchmark.extra_info["unit"] = unit
    benchmark.extra_info.update(info)


@functools.lru_cache(maxsize=32)
def _dirty_pages(npages: int, count: int, seed: int, layout: str) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if layout == "random":
        if count * 4 < npages:          # sparse: sample with replacement, then de-duplicate
            pages = np.unique(rng.integers(0, npages, count + count // 8 + 16))
            while len(pages) < count:
                pages = np.unique(np.concatenate([pages, rng.integers(0, npages, count)]))
            pages = np.sort(rng.choice(pages, count, replace=False))
        else:
            pages = np.sort(rng.choice(npages, count, replace=False))
    elif layout == "consecutive":
        start = int(rng.integers(0, npages - count + 1))
        pages = np.arange(start, start + count)
    else:
        raise ValueError(layout)
    out = pages.astype(np.uint64)
    out.flags.writeable = False
    return out


def dirty_pages(npages: int, count: int, seed: int = 1, layout: str = "random") -> np.ndarray:
    """``count`` distinct sorted page numbers below ``npages`` (read-only, cached)."""
    return _dirty_pages(int(npages), int(count), int(seed), layout)


def dirty_words(npages: int, count: int, seed: int = 1) -> np.ndarray:
    """A fresh bitmap of ceil(npages/64) words with ``count`` random pages set."""
    from kvmdirty import _bitmap
    w = np.zeros((npages + 63) >> 6, np.uint64)
    _bitmap.set_bits(w, dirty_pages(npages, count, seed))
    return w


def ring_plan(pattern: str) -> np.ndarray:
    """The guest's write plan of the ring cases: RING_DIRTY distinct pages of the ring slot."""
    if pattern == "consecutive":
        return np.arange(RING_DIRTY, dtype=np.uint64) + np.uint64(12345)
    plan = dirty_pages(RING_SLOT_PAGES, RING_DIRTY, seed=2)
    return np.random.default_rng(2).permutation(plan)          # random order too


@functools.lru_cache(maxsize=1)
def kvm_unusable() -> Optional[str]:
    """Why real-KVM benchmarks cannot run here (a clear reason), or None."""
    from kvmdirty.info import kvm_unusable as why
    return why()
