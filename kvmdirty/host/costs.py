"""The host kernel's dirty-tracking costs, measured on this machine (for the migration cost model).

``measure_host_costs()`` times, on a real populated anonymous mapping under
userfaultfd async write-protect (THP off, so every page is 4 KiB):

wp_fault_ns_per_page        one store to a write-protected page minus one
                            store to a writable one: the async WP fault
                            (trap, the kernel resolves it, returns)
harvest_clean_us_per_gib    one PAGEMAP_SCAN + re-protect of a clean region,
                            scaled per GiB (page-table walk cost)
harvest_ns_per_dirty_page   extra scan cost per written page (report it,
                            write-protect it, its share of the per-page-table
                            TLB flush), ``dirty_pages`` spread evenly over the
                            region, none adjacent: it depends on how many
                            share a 2 MiB page table (sparser costs more)
store_ns_per_page           one store to a writable page (the baseline)

Each figure is the median of ``repeats`` runs.  Keys carry their units.
"""
from __future__ import annotations

import statistics
import time
from typing import Dict

import numpy as np

from .. import _host, _kvm
from .tracker import PAGE_SIZE, Tracker, require_host


def _stores(addr: int, npages: int, gfns: np.ndarray, value: int) -> float:
    t = time.perf_counter_ns()
    reason, done = _host.store_loop(np.array([0], np.uint64), np.array([npages], np.uint64),
                                    np.array([addr], np.uint64), np.array([1], np.uint8),
                                    gfns, value, 0, 0)
    elapsed = time.perf_counter_ns() - t
    assert reason == 0 and done == len(gfns)
    return float(elapsed)


def measure_host_costs(memory_bytes: int = 256 << 20, dirty_pages: int = 16384,
                       repeats: int = 5) -> Dict[str, float]:
    """Real write-protect fault and harvest costs on this machine (see the module docstring)."""
    require_host()
    npages = memory_bytes // PAGE_SIZE
    if npages < 2 * dirty_pages or dirty_pages < 1 or repeats < 1:
        raise ValueError("need memory for 2 x dirty_pages pages, dirty_pages >= 1, repeats >= 1")
    m = _kvm.Mapping(npages * PAGE_SIZE)
    try:
        _host.no_huge_pages(m.address, m.size)
        every = np.arange(npages, dtype=np.uint64)
        _stores(m.address, npages, every, 1)                   # populate every page
        sparse = (np.arange(dirty_pages, dtype=np.uint64) * np.uint64(npages // dirty_pages))
        with Tracker(m) as t:
            fault, plain, clean, dirty = [], [], [], []
            for r in range(repeats):
                t.harvest()
                t0 = time.perf_counter_ns()
                t.harvest()
                clean.append(time.perf_counter_ns() - t0)
                fault.append(_stores(m.address, npages, sparse, r + 2))    # each store faults
                plain.append(_stores(m.address, npages, sparse, r + 3))    # now writable
                t0 = time.perf_counter_ns()
                words = t.harvest()
                dirty.append(time.perf_counter_ns() - t0)
                assert int(np.unpackbits(words.view(np.uint8)).sum()) == dirty_pages
        med = statistics.median
        gib = memory_bytes / (1 << 30)
        return {
            "wp_fault_ns_per_page": (med(fault) - med(plain)) / dirty_pages,
            "store_ns_per_page": med(plain) / dirty_pages,
            "harvest_clean_us_per_gib": med(clean) / 1e3 / gib,
            "harvest_ns_per_dirty_page": max(0.0, (med(dirty) - med(clean)) / dirty_pages),
            "harvest_dirty_us": med(dirty) / 1e3,
            "memory_bytes": float(memory_bytes),
            "dirty_pages": float(dirty_pages),
            "repeats": float(repeats),
        }
    finally:
        m.close()
