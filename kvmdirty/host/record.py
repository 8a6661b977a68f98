"""`kvmdirty record`: a timed trace of the pages a real workload writes in this process.

Every ``interval`` the recorder thread
  1. re-reads /proc/self/maps and registers each writable private anonymous
     mapping it has not seen (heap, thread stacks, numpy/sqlite buffers, ...)
     for async write-protect; the pages already present in a new mapping are
     reported once as written (they were, before we could see them);
  2. harvests with one PAGEMAP_SCAN over the whole span of registered
     mappings (``PM_SCAN_WP_MATCHING``, categories ``PAGE_IS_WPALLOWED`` and
     ``PAGE_IS_WRITTEN``: unregistered mappings in between are skipped, so a
     mapping unmapped meanwhile cannot fail the walk), re-protecting what it
     reports;
  3. maps each written process page to a guest frame: every new stretch of
     address space gets the next free gfns, so the process's memory becomes
     one contiguous guest RAM (``regions`` in the metadata records the map);
     a stretch unmapped and mapped again keeps its gfns.

The trace therefore holds one event per page per interval in which it was
written (the kernel keeps one bit per page).  Which thread wrote is not
visible to PAGEMAP_SCAN: recorded traces have no vcpu column.  The
recorder's own work (its thread's stack, the arrays it appends) writes a few
pages per interval that land in the trace too; the PAGEMAP_SCAN result
buffer is excluded.  Transparent huge pages report all 512 pages of a
2 MiB page written on one write.  Only populated pages are write-protected
(see _refresh): the first read of a never-touched page is reported as a
write, once.  Mappings larger than ``max_mapping_bytes`` (address-space
reservations such as a sanitizer's shadow memory) are skipped.
"""
from __future__ import annotations

import bisect
import os
import platform
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .. import _host
from ..trace import PAGE_SIZE, Trace
from .tracker import open_uffd, require_host

#: The recorder's harvest: report written pages of async-WP mappings, re-protect them.
SCAN_FLAGS = _host.PM_SCAN_WP_MATCHING
SCAN_MASK = _host.PAGE_IS_WPALLOWED | _host.PAGE_IS_WRITTEN
_SKIP_NAMES = ("[vvar]", "[vdso]", "[vsyscall]", "[vvar_vclock]")


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    name: str


def anonymous_writable_mappings(maps_text: Optional[str] = None) -> List[Mapping]:
    """Writable private anonymous mappings of this process (from /proc/self/maps)."""
    if maps_text is None:
        with open("/proc/self/maps") as f:
            maps_text = f.read()
    out = []
    for line in maps_text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        rng, perms, _off, _dev, inode = parts[:5]
        name = parts[5].strip() if len(parts) > 5 else ""
        if perms[:2] != "rw" or perms[3] != "p" or inode != "0":
            continue
        if name and not name.startswith("[") or name in _SKIP_NAMES:
            continue            # file-backed, or a kernel special mapping
        a, b = (int(x, 16) for x in rng.split("-"))
        out.append(Mapping(a, b, name or "[anon]"))
    return out


class GuestLayout:
    """Process address ranges -> guest frame numbers, assigned on first sight, never reused."""

    def __init__(self) -> None:
        self._starts: List[int] = []      # sorted vaddr starts of assigned pieces
        self._pieces: List[Tuple[int, int, int, str]] = []   # (start, end, base gfn, name)
        self.next_gfn = 0

    def cover(self, m: Mapping) -> List[Tuple[int, int]]:
        """Assign gfns to the parts of ``m`` not yet covered; returns the new (start, end) parts."""
        new = []
        cur = m.start
        i = bisect.bisect_right(self._starts, cur) - 1
        i = max(i, 0)
        while cur < m.end:
            while i < len(self._pieces) and self._pieces[i][1] <= cur:
                i += 1
            if i < len(self._pieces) and self._pieces[i][0] <= cur:
                cur = self._pieces[i][1]
                continue
            stop = min(m.end, self._pieces[i][0]) if i < len(self._pieces) else m.end
            new.append((cur, stop))
            cur = stop
        for a, b in new:
            k = bisect.bisect_left(self._starts, a)
            self._starts.insert(k, a)
            self._pieces.insert(k, (a, b, self.next_gfn, m.name))
            self.next_gfn += (b - a) // PAGE_SIZE
        return new

    def gfns(self, regions: np.ndarray) -> np.ndarray:
        """The gfns of the pages in ``regions`` ((n, 2) vaddr [start, end)); unmapped pages dropped."""
        if not len(regions) or not self._pieces:
            return np.zeros(0, np.uint64)
        pages = [np.arange(int(a), int(b), PAGE_SIZE, dtype=np.uint64) for a, b in regions]
        va = np.concatenate(pages)
        starts = np.array([p[0] for p in self._pieces], np.uint64)
        ends = np.array([p[1] for p in self._pieces], np.uint64)
        bases = np.array([p[2] for p in self._pieces], np.uint64)
        k = np.searchsorted(starts, va, side="right") - 1
        ok = (k >= 0)
        k = np.maximum(k, 0)
        ok &= va < ends[k]
        return bases[k[ok]] + (va[ok] - starts[k[ok]]) // np.uint64(PAGE_SIZE)

    def regions(self) -> List[Dict[str, Any]]:
        return [{"vaddr": a, "pages": (b - a) // PAGE_SIZE, "gfn": g, "name": n}
                for a, b, g, n in self._pieces]


class Recorder:
    """Tracks every writable anonymous mapping of this process and samples it periodically.

    ``with Recorder(interval_s) as r: ...work...`` then ``r.trace(workload)``.
    """

    def __init__(self, interval_s: float = 0.01, *, max_mapping_bytes: int = 64 << 30) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval must be > 0, got {interval_s}")
        require_host()
        self.interval_s = interval_s
        self.max_mapping_bytes = max_mapping_bytes
        self.layout = GuestLayout()
        self._uffd = open_uffd()
        self._pagemap = _host.Pagemap()
        self._own = self._pagemap.buffer_range          # written by the kernel on every scan
        self._registered: Dict[Tuple[int, int], str] = {}
        self._span = (0, 0)
        self._times: List[int] = []
        self._chunks: List[np.ndarray] = []
        self._counts: List[int] = []
        self.skipped: Dict[str, int] = {}
        self.samples = 0
        self.sample_s = 0.0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._t0 = 0

    # -- tracking ------------------------------------------------------
    def _refresh(self, now_ns: int) -> None:
        """Register mappings not seen yet; report their present pages once.

        A mapping split off one we registered (mprotect, partial munmap)
        inherits the registration: it is recognised by PAGE_IS_WPALLOWED and
        left alone, since protecting it again would drop writes not yet
        harvested.  A stretch unmapped and mapped again between two
        refreshes with the very same bounds is not re-registered (a known
        blind spot: its writes are missed until it changes).
        """
        lo, hi = self._span
        own_a, _ = self._own
        current = anonymous_writable_mappings()
        keys = {(m.start, m.end) for m in current}
        for k in [k for k in self._registered if k not in keys]:
            del self._registered[k]
        for m in current:
            key = (m.start, m.end)
            if m.start <= own_a < m.end or key in self._registered:
                continue
            length = m.end - m.start
            allowed, _ = self._pagemap.scan_regions(m.start, m.end, flags=0,
                                                    category_mask=_host.PAGE_IS_WPALLOWED)
            if int(((allowed[:, 1] - allowed[:, 0]).sum()) if len(allowed) else 0) == length:
                self._registered[key] = m.name      # ours already (split off a registered one)
                self.layout.cover(m)
                continue
            if length > self.max_mapping_bytes:
                why = f"larger than {self.max_mapping_bytes >> 30} GiB (a reservation, not RAM)"
                self.skipped[why] = self.skipped.get(why, 0) + 1
                continue
            try:
                self._uffd.register_wp(m.start, length)
            except OSError as e:
                why = e.strerror or str(e)
                self.skipped[why] = self.skipped.get(why, 0) + 1
                continue
            self._registered[key] = m.name
            self.layout.cover(m)
            # Protect the populated pages only: protecting never-touched ones
            # would build page tables for the whole range (a sparse multi-TiB
            # reservation would exhaust memory).  A first write to an
            # untouched page still shows as written (its new PTE has no
            # write-protect bit); a first read does too, once.
            populated, _ = self._pagemap.scan_regions(
                m.start, m.end, flags=0, category_mask=0,
                anyof_mask=_host.PAGE_IS_PRESENT | _host.PAGE_IS_SWAPPED)
            # Pages written before we saw the mapping: present and not the shared zero page.
            present, _ = self._pagemap.scan_regions(
                m.start, m.end, flags=0, category_mask=_host.PAGE_IS_PRESENT | _host.PAGE_IS_PFNZERO,
                inverted=_host.PAGE_IS_PFNZERO)
            for a, b in populated.tolist():
                try:
                    self._uffd.writeprotect(a, b - a)
                except OSError:
                    break     # unmapped meanwhile: the next refresh sees what replaced it
            self._append(now_ns, self.layout.gfns(present))
            lo = m.start if not hi else min(lo, m.start)
            hi = max(hi, m.end)
        self._span = (lo, hi)

    def _append(self, t_ns: int, gfns: np.ndarray) -> None:
        if len(gfns):
            self._times.append(t_ns)
            self._counts.append(len(gfns))
            self._chunks.append(gfns)

    def sample(self) -> int:
        """Pick up new mappings, harvest and re-protect written pages; returns pages this sample."""
        t = time.monotonic_ns() - self._t0
        self._refresh(t)
        lo, hi = self._span
        if hi <= lo:
            return 0
        c0 = time.perf_counter()
        regions, err = self._pagemap.scan_regions(lo, hi, flags=SCAN_FLAGS, category_mask=SCAN_MASK)
        self.sample_s += time.perf_counter() - c0
        if err:
            raise OSError(err, f"PAGEMAP_SCAN over the process: {os.strerror(err)}")
        gfns = self.layout.gfns(regions)
        self._append(t, gfns)
        self.samples += 1
        return len(gfns)

    # -- the sampling thread -----------------------------------------
    def start(self) -> None:
        self._t0 = time.monotonic_ns()
        self._refresh(0)
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="kvmdirty-record", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        next_t = time.monotonic() + self.interval_s
        try:
            while not self._stop.wait(max(0.0, next_t - time.monotonic())):
                self.sample()
                next_t += self.interval_s
                if next_t < time.monotonic():        # fell behind: do not burst to catch up
                    next_t = time.monotonic() + self.interval_s
        except BaseException as e:   # reported by stop()
            self._error = e

    def stop(self) -> None:
        """Stop sampling after one last harvest; re-raises a sampling error."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            if self._error is None:
                self.sample()
        self.duration_ns = time.monotonic_ns() - self._t0
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Unregister everything (closing the userfaultfd) and free the scan buffer."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self._uffd.close()
        self._pagemap.close()

    def __enter__(self) -> "Recorder":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if exc[0] is None:
                self.stop()
        finally:
            self.close()

    def trace(self, workload: str, **extra: Any) -> Trace:
        """The recorded events as a Trace with its metadata."""
        t = np.repeat(np.array(self._times, np.uint64), self._counts) if self._times else \
            np.zeros(0, np.uint64)
        g = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.uint64)
        meta = {
            "source": "kvmdirty record", "workload": workload,
            "interval_ns": int(self.interval_s * 1e9),
            "duration_ns": int(getattr(self, "duration_ns", 0)),
            "memory_bytes": max(self.layout.next_gfn, 1) * PAGE_SIZE,
            "kernel": platform.release(), "samples": self.samples,
            "harvest_s_total": self.sample_s,
            "regions": self.layout.regions(), "skipped_mappings": self.skipped,
        }
        meta.update(extra)
        return Trace(t, g, None, meta)


def record(step: Callable[[], Any], seconds: float, *, interval_s: float = 0.01,
           workload: str = "custom") -> Trace:
    """Call ``step()`` repeatedly for ``seconds`` (at least once) while recording; the trace."""
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    steps = 0
    with Recorder(interval_s) as r:
        deadline = time.monotonic() + seconds
        while True:
            step()
            steps += 1
            if time.monotonic() >= deadline:
                break
    return r.trace(workload, steps=steps)
