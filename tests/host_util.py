"""Whether the host kernel's write tracking (userfaultfd-wp + PAGEMAP_SCAN) works here."""
from __future__ import annotations

import pytest


def _probe():
    try:
        from kvmdirty.host import host_unusable
    except ImportError as e:
        return f"kvmdirty is not built ({e})"
    return host_unusable()


HOST_UNUSABLE = _probe()
requires_host = pytest.mark.skipif(HOST_UNUSABLE is not None,
                                   reason=f"host write tracking unusable here: {HOST_UNUSABLE}")
