"""QEMU's three dirty-rate estimators (``calc-dirty-rate``) over a trace, against the truth.

For each period P the trace is cut into whole windows [kP, (k+1)P); in each
window every estimator is computed as QEMU computes it (migration/dirtyrate.c,
integer MB/s with MB = MiB) and compared with what the trace says really
happened:

true distinct rate   pages written at least once in the window x 4 KiB / P
true write rate      events in the window x 4 KiB / P: every write for a
                     per-write trace; for a recorded trace one per page per
                     sampling interval (the finest the kernel shows), so
                     rewrites within one interval are already folded
page-sampling        ``(memory * sample_pages_per_gib) >> 30`` pages drawn at
                     random in [0, pages - 1) (g_rand_int_range, so never the
                     last page), hashed at the start and end; the changed
                     fraction x memory (MiB, truncated) x 1000 / msec.  A page
                     counts as changed when the trace writes it in the window
                     (a write of the same bytes would not change the hash, so
                     this is QEMU's best case).  Memory below 128 KiB is not
                     sampled, and with no sampled page there is no estimate
                     (QEMU leaves the rate at -1): shown as n/a.
ring                 per-vCPU dirty-ring entries pushed in the window, each
                     converted with (pages x 4 KiB) >> 20 x 1000 / msec and
                     summed.  A page is pushed on its first write after being
                     write-protected; protection is restored when the rings are
                     reaped: QEMU's reaper every ``reap_interval`` (1 s) and
                     whenever a vCPU's ring is soft-full (``ring_entries``
                     minus KVM's reserve of 64: KVM_EXIT_DIRTY_RING_FULL).
bitmap               one sync at the start (discarded), one at the end: the
                     distinct pages of the window, converted as above.

Errors are relative to the true distinct rate (what migration must copy per
period); the sampling row also reports its spread over windows.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..limits import DIRTY_RING_RSVD_ENTRIES
from ..trace import PAGE_SIZE, Trace

#: QEMU's DIRTYRATE_DEFAULT_SAMPLE_PAGES, MIN/MAX_SAMPLE_PAGE_COUNT, MIN_RAMBLOCK_SIZE (KiB).
DEFAULT_SAMPLE_PAGES = 512
MIN_SAMPLE_PAGES, MAX_SAMPLE_PAGES = 128, 16384
MIN_RAMBLOCK_KIB = 128
#: kvm_dirty_ring_reaper_thread sleeps 1 s between reaps.
DEFAULT_REAP_INTERVAL_S = 1.0
DEFAULT_RING_ENTRIES = 4096
DEFAULT_PERIODS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
MIB = 1 << 20


def qemu_rate(pages: int, msec: int) -> int:
    """do_calculate_dirtyrate: (pages x page size) >> 20 MiB, x 1000 / msec, in integers."""
    return ((pages * PAGE_SIZE) >> 20) * 1000 // msec


def sample_count(memory_bytes: int, sample_pages_per_gib: int = DEFAULT_SAMPLE_PAGES) -> int:
    """get_ramblock_dirty_info: pages sampled in a RAM block of ``memory_bytes``."""
    if memory_bytes < MIN_RAMBLOCK_KIB << 10:
        return 0
    return (memory_bytes * sample_pages_per_gib) >> 30


def sampling_estimate(written: np.ndarray, memory_bytes: int, msec: int, rng: np.random.Generator,
                      sample_pages_per_gib: int = DEFAULT_SAMPLE_PAGES) -> Optional[int]:
    """QEMU's page-sampling rate (MB/s) for one window; ``written`` is a bool per page. None = n/a."""
    n = sample_count(memory_bytes, sample_pages_per_gib)
    pages = memory_bytes // PAGE_SIZE
    if n == 0 or pages < 2:
        return None
    vfn = rng.integers(0, pages - 1, n)       # g_rand_int_range(0, pages - 1): [0, pages - 1)
    dirty = int(written[vfn].sum())
    return dirty * (memory_bytes >> 20) * 1000 // (n * msec)


def sampling_expectation(written: np.ndarray, memory_bytes: int, msec: int,
                         sample_pages_per_gib: int = DEFAULT_SAMPLE_PAGES) -> Optional[float]:
    """Closed form of the sampling estimate's mean (before QEMU's final integer division)."""
    n = sample_count(memory_bytes, sample_pages_per_gib)
    pages = memory_bytes // PAGE_SIZE
    if n == 0 or pages < 2:
        return None
    p = float(written[: pages - 1].sum()) / (pages - 1)
    return p * (memory_bytes >> 20) * 1000 / msec


def ring_entries_pushed(t_ns: np.ndarray, gfn: np.ndarray, vcpu: np.ndarray, start_ns: int,
                        reap_ns: int, soft_limit: int) -> Dict[int, int]:
    """Entries each vCPU pushes for the events of one window (sorted by time), per vCPU.

    All pages are protected at the window's start; after each reap (every
    ``reap_ns`` from the start, or when any vCPU's ring holds ``soft_limit``
    entries and exits DIRTY_RING_FULL) written pages are protected again.
    """
    pushed: Dict[int, int] = {}
    epoch_of = (t_ns - np.uint64(start_ns)) // np.uint64(reap_ns)
    for e in np.unique(epoch_of):
        sel = epoch_of == e
        g, v = gfn[sel], vcpu[sel]
        _, first = np.unique(g, return_index=True)
        first.sort()
        owners = v[first]                   # who pushed each page (the first writer)
        counts = np.bincount(owners)
        if counts.max(initial=0) < soft_limit:
            for i, c in enumerate(counts):
                if c:
                    pushed[i] = pushed.get(i, 0) + int(c)
            continue
        # A ring fills inside this epoch: replay the events in order.
        seen: set = set()
        fill: Dict[int, int] = {}
        for page, who in zip(g.tolist(), v.tolist()):
            if page in seen:
                continue
            seen.add(page)
            pushed[who] = pushed.get(who, 0) + 1
            fill[who] = fill.get(who, 0) + 1
            if fill[who] >= soft_limit:          # soft-full: QEMU reaps every ring
                seen.clear()
                fill.clear()
    return pushed


@dataclass
class PeriodRow:
    """The estimators and the truth for one period, averaged over its windows (MB/s, MB = MiB)."""

    period_s: float
    windows: int
    true_distinct: float
    true_writes: float
    sampling: Optional[float]        # mean over windows with an estimate
    sampling_std: Optional[float]
    sampling_expected: Optional[float]
    sampling_zero_windows: int       # windows where sampling saw nothing though pages were written
    ring: float
    bitmap: float

    def error(self, name: str) -> Optional[float]:
        est = getattr(self, name)
        if est is None or not self.true_distinct:
            return None
        return est / self.true_distinct - 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("sampling", "ring", "bitmap", "true_writes"):
            d[f"{k}_error"] = self.error(k)
        return d


def estimate(trace: Trace, periods_s: Sequence[float] = DEFAULT_PERIODS_S, *,
             sample_pages_per_gib: int = DEFAULT_SAMPLE_PAGES,
             ring_entries: int = DEFAULT_RING_ENTRIES,
             reap_interval_s: float = DEFAULT_REAP_INTERVAL_S, seed: int = 0) -> List[PeriodRow]:
    """One PeriodRow per period that fits at least once in the trace."""
    if not MIN_SAMPLE_PAGES <= sample_pages_per_gib <= MAX_SAMPLE_PAGES:
        raise ValueError(f"sample pages per GiB must be in [{MIN_SAMPLE_PAGES}, {MAX_SAMPLE_PAGES}]")
    if ring_entries <= DIRTY_RING_RSVD_ENTRIES or not reap_interval_s > 0:
        raise ValueError(f"ring_entries must be > {DIRTY_RING_RSVD_ENTRIES} (KVM's reserve) "
                         "and reap_interval_s > 0")
    rng = np.random.default_rng(seed)
    mem = int(trace.meta["memory_bytes"])
    npages = trace.npages
    vcpu = trace.vcpu if trace.vcpu is not None else np.zeros(len(trace), np.uint32)
    rows = []
    for period in periods_s:
        if not period > 0:
            raise ValueError(f"periods must be > 0, got {period}")
        p_ns = int(round(period * 1e9))
        msec = max(1, int(round(period * 1000)))
        nwin = trace.duration_ns // p_ns
        if nwin < 1:
            continue
        bounds = np.searchsorted(trace.t_ns, np.arange(nwin + 1, dtype=np.uint64) * np.uint64(p_ns))
        distinct, writes, samp, expct, ring, bitmap = [], [], [], [], [], []
        zero = 0
        written = np.zeros(npages, bool)
        for k in range(nwin):
            a, b = bounds[k], bounds[k + 1]
            g = trace.gfn[a:b]
            written[:] = False
            written[g] = True
            d = int(written.sum())
            distinct.append(d)
            writes.append(b - a)
            s = sampling_estimate(written, mem, msec, rng, sample_pages_per_gib)
            if s is not None:
                samp.append(s)
                expct.append(sampling_expectation(written, mem, msec, sample_pages_per_gib))
                zero += s == 0 and d > 0
            pushed = ring_entries_pushed(trace.t_ns[a:b], g, vcpu[a:b], k * p_ns,
                                         int(reap_interval_s * 1e9),
                                         ring_entries - DIRTY_RING_RSVD_ENTRIES)
            ring.append(sum(qemu_rate(c, msec) for c in pushed.values()))
            bitmap.append(qemu_rate(d, msec))
        to_rate = PAGE_SIZE / MIB / period
        rows.append(PeriodRow(
            period_s=period, windows=int(nwin),
            true_distinct=float(np.mean(distinct)) * to_rate,
            true_writes=float(np.mean(writes)) * to_rate,
            sampling=float(np.mean(samp)) if samp else None,
            sampling_std=float(np.std(samp)) if samp else None,
            sampling_expected=float(np.mean(expct)) if expct else None,
            sampling_zero_windows=int(zero),
            ring=float(np.mean(ring)), bitmap=float(np.mean(bitmap))))
    return rows


def _pct(e: Optional[float]) -> str:
    return "n/a" if e is None else f"{e * 100:+.0f}%"


def _num(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def format_table(rows: Sequence[PeriodRow], trace: Optional[Trace] = None, *,
                 sample_pages_per_gib: int = DEFAULT_SAMPLE_PAGES) -> str:
    """The estimator table: MB/s (MiB) per period, each estimator's error against the true distinct rate."""
    head = ["period", "windows", "true distinct", "true writes", "sampling", "err", "+-sd",
            "0-windows", "ring", "err", "bitmap", "err"]
    body = [[f"{r.period_s:g} s", str(r.windows), _num(r.true_distinct), _num(r.true_writes),
             _num(r.sampling), _pct(r.error("sampling")), _num(r.sampling_std),
             str(r.sampling_zero_windows), _num(r.ring), _pct(r.error("ring")),
             _num(r.bitmap), _pct(r.error("bitmap"))] for r in rows]
    table = [head] + body
    widths = [max(len(row[c]) for row in table) for c in range(len(head))]
    lines = []
    if trace is not None:
        m = trace.meta
        iv = trace.interval_ns
        lines.append(f"trace: {m.get('workload') or m.get('source') or '?'}, {len(trace)} events, "
                     f"{trace.duration_ns / 1e9:.2f} s, memory {int(m['memory_bytes']) >> 20} MiB, "
                     f"{'sampled every %g ms' % (iv / 1e6) if iv else 'one event per write'}; "
                     f"sampling {sample_pages_per_gib} pages/GiB")
    lines.append("MB/s (MiB/s); err = estimate / true distinct rate - 1")
    for n, row in enumerate(table):
        lines.append("  ".join([row[0].ljust(widths[0])] + [row[c].rjust(widths[c]) for c in range(1, len(row))]))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    if not rows:
        lines.append("(the trace is shorter than every period)")
    return "\n".join(lines)
