"""Guest memory layout, the migration bitmap and the destination copy.

Guest memory is laid out from gfn 0 in memslots of equal size (so a page
index is a gfn, as in kvmdirty.workloads).  The migration bitmap is QEMU's
RAMBlock bmap: one flag per page, set by syncs, cleared as pages are sent,
walked from where the last send stopped and wrapping (ram_find_and_save_block).
The destination is a real array of the page values that were sent.
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np

from ..api import PAGE_SHIFT
from ..limits import MEM_MAX_NR_PAGES
from ..vm import MEM_LOG_DIRTY_PAGES
from .results import VerificationError

GIB_PAGES = 1 << (30 - PAGE_SHIFT)


def slot_layout(npages: int, slot_pages: int = 0) -> List[Tuple[int, int, int]]:
    """[(slot id, first gfn, pages)]: equal slots of ``slot_pages`` (default: as few as KVM allows)."""
    if npages < 1:
        raise ValueError("guest memory must be at least one page")
    limit = MEM_MAX_NR_PAGES & ~((1 << 18) - 1)
    per = slot_pages or min(npages, limit)
    if per < 1 or per > limit:
        raise ValueError(f"slot size must be 1..{limit} pages")
    return [(i, first, min(per, npages - first))
            for i, first in enumerate(range(0, npages, per))]


class GuestMemory:
    """The guest's memslots in a kvmdirty VM, and views of their page values."""

    def __init__(self, vm, npages: int, slot_pages: int = 0) -> None:
        self.vm, self.npages = vm, npages
        self.layout = slot_layout(npages, slot_pages)
        for sid, first, n in self.layout:
            vm.set_user_memory_region(sid, first << PAGE_SHIFT, n << PAGE_SHIFT, 0)
        self.bases = np.array([first for _, first, _ in self.layout], np.int64)

    def set_logging(self, on: bool) -> None:
        for sid, first, n in self.layout:
            self.vm.set_user_memory_region(sid, first << PAGE_SHIFT, n << PAGE_SHIFT,
                                           MEM_LOG_DIRTY_PAGES if on else 0)

    def values(self, sid: int) -> np.ndarray:
        return self.vm.memory(sid)

    def split(self, gfns: np.ndarray):
        """Yield (slot id, first gfn, the sorted gfns in that slot) for sorted ``gfns``."""
        if len(self.layout) == 1:
            sid, first, _ = self.layout[0]
            yield sid, first, gfns
            return
        cuts = np.searchsorted(gfns, self.bases[1:].astype(gfns.dtype))
        for (sid, first, _), part in zip(self.layout, np.split(gfns, cuts)):
            if len(part):
                yield sid, first, part


class MigrationBitmap:
    """One flag per page: the pages still to send."""

    def __init__(self, npages: int) -> None:
        self.flags = np.zeros(npages, np.bool_)
        self.count = 0
        self.pos = 0           # the walk's position (QEMU's pss->page)
        self.wrapped = 0       # passes completed over the whole bitmap

    def set_all(self) -> None:
        self.flags[:] = True
        self.count = len(self.flags)

    def merge_words(self, first: int, npages: int, words: np.ndarray) -> int:
        """OR a KVM bitmap (uint64 words, page 0 = bit 0 of word 0) in; return pages newly set."""
        bits = np.unpackbits(np.ascontiguousarray(words).view(np.uint8), count=npages,
                             bitorder="little").view(np.bool_)
        dst = self.flags[first:first + npages]
        new = int(np.count_nonzero(bits & ~dst))
        dst |= bits
        self.count += new
        return new

    def merge_gfns(self, gfns: np.ndarray) -> int:
        """Set the flags of ``gfns`` (any order, repeats allowed); return pages newly set."""
        if not len(gfns):
            return 0
        self.flags[gfns] = True              # repeats are harmless; recount exactly
        before, self.count = self.count, int(np.count_nonzero(self.flags))
        return self.count - before

    def take(self, n: int) -> np.ndarray:
        """Up to ``n`` flagged pages from the walk position on (wrapping), sorted per pass; cleared."""
        out = []
        want = min(n, self.count)
        total = len(self.flags)
        window = 1 << 16
        while want > 0:
            end = min(total, self.pos + max(window, 4 * want))
            hit = np.flatnonzero(self.flags[self.pos:end])
            if len(hit) > want:
                hit = hit[:want]
                end = self.pos + int(hit[-1]) + 1
            if len(hit):
                g = hit + self.pos
                self.flags[g] = False
                out.append(g)
                want -= len(hit)
                self.count -= len(hit)
            self.pos = end
            if self.pos >= total:
                self.pos = 0
                self.wrapped += 1
            window = min(window * 4, 1 << 24)
        if not out:
            return np.zeros(0, np.int64)
        return out[0] if len(out) == 1 else np.concatenate(out)


class Destination:
    """The migration target: the value of every page as received."""

    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem
        self.values = np.zeros(mem.npages, np.uint64)     # lazily mapped by the kernel
        self.received = np.zeros(mem.npages, np.bool_)

    def send(self, gfns: np.ndarray) -> None:
        """Copy the source's current values of ``gfns`` (sorted within a pass)."""
        if not len(gfns):
            return
        g = np.sort(gfns) if len(self.mem.layout) > 1 else gfns
        for sid, first, part in self.mem.split(g):
            self.values[part] = self.mem.values(sid)[part - first]
        self.received[gfns] = True

    def mismatches(self, limit: int = 64) -> Tuple[List[int], int]:
        """(first ``limit`` gfns where destination != source, how many there are)."""
        bad: List[int] = []
        total = 0
        for sid, first, n in self.mem.layout:
            src = self.mem.values(sid)
            step = 1 << 22
            for off in range(0, n, step):
                k = min(step, n - off)
                d = np.flatnonzero((self.values[first + off:first + off + k] != src[off:off + k])
                                   | ~self.received[first + off:first + off + k])
                total += len(d)
                bad.extend(int(x) + first + off for x in d[: max(0, limit - len(bad))])
        return bad, total

    def verify(self) -> None:
        """Raise VerificationError (with the gfns) unless destination == source everywhere."""
        bad, total = self.mismatches()
        if total:
            raise VerificationError(bad, total)
