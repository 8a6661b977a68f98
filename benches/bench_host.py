"""The host kernel's own write tracking (userfaultfd async write-protect + PAGEMAP_SCAN).

- harvest (PAGEMAP_SCAN + re-protect) of a clean, populated 1 GiB region, and
  of one with 1,000 pages written (the issue's figure: about 0.7 ms);
- a HostVM vCPU's stores to write-protected pages (each takes an async WP
  fault) against stores to writable pages, per page.
Skipped, with the reason, where the host tracking is unavailable.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import GIB_PAGES, dirty_pages, rounds, set_ops

from kvmdirty import _host, _kvm


def _why():
    try:
        from kvmdirty.host import host_unusable
    except ImportError as e:
        return f"kvmdirty is not built ({e})"
    return host_unusable()


_reason = _why()
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"host tracking: {_reason}")


@pytest.fixture
def tracked_gib():
    from kvmdirty.host import Tracker
    m = _kvm.Mapping(GIB_PAGES * 4096)
    _host.no_huge_pages(m.address, m.size)
    np.frombuffer(m, dtype=np.uint64)[::512] = 1          # populated, as guest RAM would be
    t = Tracker(m)
    yield m, t
    t.close()
    m.close()


def _store(m, gfns, value=2):
    _host.store_loop(np.array([0], np.uint64), np.array([m.size // 4096], np.uint64),
                     np.array([m.address], np.uint64), np.array([1], np.uint8), gfns, value, 0, 0)


@pytest.mark.benchmark(group="host-harvest")
def test_host_harvest_clean_1g(benchmark, tracked_gib):
    m, t = tracked_gib
    t.harvest()
    set_ops(benchmark, 1, "call", pages=GIB_PAGES, dirty=0, impl="host")
    assert not benchmark(t.harvest).any()


@pytest.mark.benchmark(group="host-harvest")
def test_host_harvest_1000_dirty_1g(benchmark, tracked_gib):
    m, t = tracked_gib
    plan = dirty_pages(GIB_PAGES, 1000)
    set_ops(benchmark, 1, "call", pages=GIB_PAGES, dirty=1000, impl="host")
    words = benchmark.pedantic(t.harvest, setup=lambda: _store(m, plan), rounds=rounds(30, 3))
    assert int(np.unpackbits(words.view(np.uint8)).sum()) == 1000


@pytest.mark.benchmark(group="host-store")
@pytest.mark.parametrize("protected", [True, False], ids=["wp-fault", "writable"])
def test_host_store_per_page(benchmark, tracked_gib, protected):
    m, t = tracked_gib
    plan = dirty_pages(GIB_PAGES, 16384)

    def setup():
        _store(m, plan, 3)
        if protected:
            t.harvest()
    set_ops(benchmark, len(plan), "page", impl="host", protected=protected)
    benchmark.pedantic(_store, args=(m, plan), setup=setup, rounds=rounds(20, 3))
