"""measure_host_costs(): a plain dict of measured figures, units in the keys (no timing asserts)."""
from __future__ import annotations

import pytest

from host_util import requires_host

from kvmdirty.host.costs import measure_host_costs


@requires_host
def test_returns_measured_figures_with_units_in_keys():
    d = measure_host_costs(16 << 20, 512, repeats=2)
    for key in ("wp_fault_ns_per_page", "store_ns_per_page", "harvest_clean_us_per_gib",
                "harvest_ns_per_dirty_page", "harvest_dirty_us"):
        assert isinstance(d[key], float) and d[key] >= 0, key
    assert d["harvest_clean_us_per_gib"] > 0 and d["memory_bytes"] == 16 << 20


@requires_host
@pytest.mark.parametrize("kw", [dict(memory_bytes=4096, dirty_pages=1), dict(dirty_pages=0),
                                dict(repeats=0)])
def test_bad_arguments(kw):
    with pytest.raises(ValueError):
        measure_host_costs(**kw)
