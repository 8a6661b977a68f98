"""A deliberately naive pure-Python model of KVM's flags dirty ring (tests only).

Lists and plain ints, no masks or indexes modulo anything clever: each entry is
a dict, the kernel and user indexes are free-running Python ints.  Reset
coalescing is written straight from kvm_dirty_ring_reset's description.

Reset is the kernel's: it walks from reset_index while the flags have RESET,
whoever wrote them, so RESET forged on never-pushed entries is reset (and
counted) and reset_index may pass dirty_index.  ``used`` then reads 0, as
/dev/kvm behaves (Linux 6.18, measured: no soft-full exit, pushes go on from
dirty_index).  A push is refused when used reaches the size (KVM WARNs
there; we never overwrite a live entry).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

DIRTY = 1
RESET = 2
RSVD = 64


class ModelRing:
    def __init__(self, entries: int, cpu_dirty_log_size: int = 0) -> None:
        self.size = entries
        self.soft_limit = entries - RSVD - cpu_dirty_log_size
        self.entries = [{"flags": 0, "slot": 0, "offset": 0} for _ in range(entries)]
        self.dirty_index = 0
        self.reset_index = 0
        self.fetch_index = 0

    @property
    def used(self) -> int:
        """Pushed and not reset; 0 while a forged reset has run ahead."""
        return max(self.backlog, 0)

    @property
    def backlog(self) -> int:
        """Pushed and not reset: negative once a forged reset ran ahead."""
        return self.dirty_index - self.reset_index

    def push(self, slot: int, offset: int) -> Optional[bool]:
        """None when full (refused), else whether the ring is now soft-full."""
        if self.used >= self.size:
            return None
        e = self.entries[self.dirty_index % self.size]
        e["slot"], e["offset"], e["flags"] = slot, offset, DIRTY
        self.dirty_index += 1
        return self.used >= self.soft_limit

    def collect(self, max_count: Optional[int] = None) -> Tuple[List[int], List[int]]:
        slots, offsets = [], []
        limit = self.size if max_count is None else min(max_count, self.size)
        while len(slots) < limit:
            e = self.entries[self.fetch_index % self.size]
            if e["flags"] != DIRTY:
                break
            slots.append(e["slot"])
            offsets.append(e["offset"])
            e["flags"] = RESET
            self.fetch_index += 1
        return slots, offsets

    def reset(self, protect: Optional[Callable[[int, int, int], object]] = None) -> int:
        """Returns the count; batches go to protect(slot, base, mask)."""
        count = 0
        batch = None  # [slot, base, mask]

        def flush():
            if batch is not None and protect is not None:
                protect(batch[0], batch[1], batch[2])

        while True:
            e = self.entries[self.reset_index % self.size]
            if not e["flags"] & RESET:
                break
            slot, offset = e["slot"], e["offset"]
            e["flags"] = 0
            self.reset_index += 1
            count += 1
            if batch is not None and slot == batch[0]:
                # The kernel subtracts u64s and reads the result as s64.
                delta = (offset - batch[1]) % (1 << 64)
                if delta >= 1 << 63:
                    delta -= 1 << 64
                if 0 <= delta < 64:
                    batch[2] |= 1 << delta
                    continue
                if -64 < delta < 0:
                    shifted = batch[2] << -delta
                    if shifted < (1 << 64):          # no bit shifted out
                        batch[1], batch[2] = offset, shifted | 1
                        continue
            flush()
            batch = [slot, offset, 1]
        flush()
        return count


def make_mmu(slot_id: int = 1, npages: int = 4096, base_gfn: int = 0x1000):
    """A kvmdirty._mmu.Mmu with one logged slot, every page writable (for reset's protect)."""
    import numpy as np

    from kvmdirty import _mmu, _uapi

    mmu = _mmu.Mmu()
    writable = np.full(max(1, (npages + 63) >> 6), ~np.uint64(0), np.uint64)
    values = np.zeros(max(1, npages), np.uint64)
    mmu.set_slots([(slot_id, base_gfn, npages, _uapi.MEM_LOG_DIRTY_PAGES, writable, values, None)])
    return mmu, writable
