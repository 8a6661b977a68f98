"""Whether the real /dev/kvm can be used here, probed for real, and helpers for its tests.

`requires_kvm` skips with the reason (missing device, no permission, KVM_CREATE_VM
failing, extension not built) instead of failing where KVM is unusable.
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Tuple

import numpy as np
import pytest


def _probe() -> Optional[str]:
    """None when a VM can be created, else why not."""
    try:
        from kvmdirty.info import kvm_unusable
    except ImportError as e:
        return f"kvmdirty is not built ({e})"
    return kvm_unusable()


KVM_UNUSABLE = _probe()
requires_kvm = pytest.mark.skipif(KVM_UNUSABLE is not None,
                                  reason=f"real KVM unusable here: {KVM_UNUSABLE}")


@functools.lru_cache(maxsize=None)
def ring_capable() -> Optional[str]:
    """None when the dirty ring (and kvmdirty._ring's collect) can be used."""
    if KVM_UNUSABLE:
        return KVM_UNUSABLE
    try:
        from kvmdirty import _ring  # noqa: F401
    except ImportError as e:
        return f"kvmdirty._ring is not built ({e})"
    from kvmdirty import _uapi
    from kvmdirty.kvm import KvmVM
    with KvmVM() as vm:
        if vm.check_extension(_uapi.CAP_DIRTY_LOG_RING) < 4096:
            return "this KVM has no dirty ring"
    return None


def bitmap_gfns(words: np.ndarray) -> np.ndarray:
    """Set bits of a dirty bitmap as page offsets (reference, numpy only)."""
    bits = np.unpackbits(np.asarray(words, dtype="<u8").view(np.uint8), bitorder="little")
    return np.flatnonzero(bits).astype(np.uint64)


def reference_collect(ring) -> Tuple[list, list]:
    """A naive reader of a KvmDirtyRing's raw entries (to cross-check _ring.collect):
    the DIRTY entries from fetch_index on, without marking them."""
    view = ring.entries_view()
    slots, offsets = [], []
    i = ring.fetch_index
    while len(slots) < ring.entries:
        e = view[i % ring.entries]
        if e["flags"] != 1:
            break
        slots.append(int(e["slot"]))
        offsets.append(int(e["offset"]))
        i += 1
    return slots, offsets


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def map_count() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)
