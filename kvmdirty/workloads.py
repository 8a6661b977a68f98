"""Guest write plans: which page each vCPU writes next, seeded and vectorised.

A :class:`Workload` describes a pattern; ``workload.plan(vcpu, npages, seed)``
gives that vCPU's :class:`Plan`, a stream of page indices in ``[0, npages)``
(the runner lays guest memory out from gfn 0, so a page index is a gfn).
``plan.take(n)`` returns the next ``n`` writes; the stream depends only on
(workload, vcpu, npages, seed) and on the sequence of ``take`` sizes, never on
timing, so threaded and deterministic runs replay the same writes.

Patterns
    uniform     every page equally likely.
    hotcold     ``hot_fraction`` of memory (a seeded, scattered set of pages)
                takes ``hot_share`` of the writes; the rest go to the cold pages.
    sequential  vCPU i sweeps memory from page i * npages / vcpus, wrapping.
    strided     as sequential, ``stride`` pages apart.
    zipf        page popularity ~ 1 / rank**zipf_s over all pages (ranks are a
                seeded permutation of pages, so hot pages are scattered).
    trace       replay of a trace file (see below).

Trace files
    Numbers are RAM page indices (the runner maps index i to gfn i below the
    PCI hole and above 4 GiB past it: runner.ram_gfns), at most 2**63 - 1.
    ``.npy``: a 1-D integer array of page indices, or an (n, 2) integer
    array / a structured array with fields ``vcpu`` and ``gfn`` for a
    per-vCPU split.  Anything else: text, one write per line, ``#`` starts a
    comment, numbers decimal or ``0x`` hex; a line is ``gfn`` or ``vcpu gfn``
    (all lines must have the same number of columns).
    Without a vCPU column the trace is cut into ``vcpus`` contiguous pieces,
    piece i for vCPU i; with one, vCPU i replays its own lines in order
    (vCPU ids >= vcpus are an error).  A vCPU that reaches the end of its
    piece starts it again.  Every gfn must be below the guest's page count.

Rates
    A vCPU's rate is writes per scheduling step (:func:`rates`); use
    :func:`writes_per_step` to convert MB/s of simulated guest time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np

from .api import PAGE_SIZE

PATTERNS = ("uniform", "hotcold", "sequential", "strided", "zipf", "trace")

#: Most writes per step per vCPU: a step's chunk is one array in memory.
MAX_RATE = 1 << 24
_INT63 = 1 << 63

# Random patterns draw this many writes at a time; take() slices the buffer,
# so per-step chunks stay cheap however small they are.
_BLOCK = 1 << 16


@dataclass(frozen=True)
class Workload:
    """A write pattern and its parameters (see the module docstring)."""

    pattern: str = "uniform"
    hot_fraction: float = 0.1
    hot_share: float = 0.9
    stride: int = 8
    zipf_s: float = 1.1
    trace: Optional[str] = None

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {self.pattern!r}; known: {', '.join(PATTERNS)}")
        if not 0.0 < self.hot_fraction <= 1.0:
            raise ValueError(f"hot_fraction must be in (0, 1], got {self.hot_fraction}")
        if not 0.0 <= self.hot_share <= 1.0:
            raise ValueError(f"hot_share must be in [0, 1], got {self.hot_share}")
        if isinstance(self.stride, bool) or not isinstance(self.stride, (int, np.integer)):
            raise TypeError(f"stride must be an int, not {type(self.stride).__name__}")
        if int(self.stride) < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if not self.zipf_s > 0.0:
            raise ValueError(f"zipf_s must be > 0, got {self.zipf_s}")
        if (self.pattern == "trace") != (self.trace is not None):
            raise ValueError("the trace pattern needs a trace file, and only it takes one")

    def plans(self, vcpus: int, npages: int, seed: int) -> List["Plan"]:
        """One plan per vCPU."""
        if vcpus < 1:
            raise ValueError(f"vcpus must be >= 1, got {vcpus}")
        if npages < 1:
            raise ValueError(f"npages must be >= 1, got {npages}")
        shared = _Shared(self, vcpus, npages, seed)
        return [Plan(self, i, vcpus, npages, seed, shared) for i in range(vcpus)]

    def describe(self) -> str:
        p = self.pattern
        if p == "hotcold":
            return f"hotcold ({self.hot_fraction:g} of memory takes {self.hot_share:g} of writes)"
        if p == "strided":
            return f"strided (stride {self.stride})"
        if p == "zipf":
            return f"zipf (s={self.zipf_s:g})"
        if p == "trace":
            return f"trace ({os.path.basename(str(self.trace))})"
        return p


class _Shared:
    """State common to all vCPUs of one run: the hot set, the zipf table, the trace."""

    def __init__(self, w: Workload, vcpus: int, npages: int, seed: int) -> None:
        rng = np.random.default_rng([seed, 0xC01D])
        self.hot: Optional[np.ndarray] = None
        self.cold: Optional[np.ndarray] = None
        self.zipf_cdf: Optional[np.ndarray] = None
        self.zipf_pages: Optional[np.ndarray] = None
        self.trace: Optional[List[np.ndarray]] = None
        if w.pattern == "hotcold":
            nhot = max(1, min(npages, int(round(w.hot_fraction * npages))))
            perm = rng.permutation(npages).astype(np.uint64)
            self.hot, self.cold = perm[:nhot], perm[nhot:]
        elif w.pattern == "zipf":
            weights = np.arange(1, npages + 1, dtype=np.float64) ** -w.zipf_s
            cdf = np.cumsum(weights)
            self.zipf_cdf = cdf / cdf[-1]
            self.zipf_pages = rng.permutation(npages).astype(np.uint64)
        elif w.pattern == "trace":
            self.trace = split_trace(load_trace(str(w.trace)), vcpus, npages)


class Plan:
    """One vCPU's stream of page indices."""

    def __init__(self, w: Workload, vcpu: int, vcpus: int, npages: int, seed: int,
                 shared: _Shared) -> None:
        self.workload, self.vcpu, self.npages = w, vcpu, npages
        self._rng = np.random.default_rng([seed, vcpu])
        self._sh = shared
        self._pos = 0                      # writes handed out so far
        self._start = vcpu * npages // vcpus
        self._buf = np.zeros(0, np.uint64)
        self._bufpos = 0

    def take(self, n: int) -> np.ndarray:
        """The next ``n`` page indices (uint64)."""
        if n < 0:
            raise ValueError("n must be >= 0")
        p = self.workload.pattern
        if p in ("sequential", "strided"):
            # Reduced mod npages first: the same pages, and no uint64 overflow for any stride.
            step = (1 if p == "sequential" else int(self.workload.stride)) % self.npages
            i = np.arange(self._pos, self._pos + n, dtype=np.uint64)
            out = (np.uint64(self._start) + i * np.uint64(step)) % np.uint64(self.npages)
        elif p == "trace":
            t = self._sh.trace[self.vcpu]
            out = t[(np.arange(self._pos, self._pos + n) % len(t))] if len(t) else t[:0]
        else:
            out = self._random(n)
        self._pos += n
        return out

    def _random(self, n: int) -> np.ndarray:
        parts = []
        while n:
            if self._bufpos == len(self._buf):
                self._buf, self._bufpos = self._draw(_BLOCK), 0
            k = min(n, len(self._buf) - self._bufpos)
            parts.append(self._buf[self._bufpos:self._bufpos + k])
            self._bufpos += k
            n -= k
        return parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else self._buf[:0]

    def _draw(self, n: int) -> np.ndarray:
        rng, p, sh = self._rng, self.workload.pattern, self._sh
        if p == "uniform":
            return rng.integers(0, self.npages, n, dtype=np.uint64)
        if p == "hotcold":
            hot = rng.random(n) < self.workload.hot_share
            if len(sh.cold) == 0:
                hot[:] = True
            out = np.empty(n, np.uint64)
            nh = int(hot.sum())
            out[hot] = sh.hot[rng.integers(0, len(sh.hot), nh)]
            out[~hot] = sh.cold[rng.integers(0, max(1, len(sh.cold)), n - nh)] if n - nh else 0
            return out
        # zipf: inverse CDF of the bounded distribution, then rank -> page.
        ranks = np.searchsorted(sh.zipf_cdf, rng.random(n), side="right")
        np.minimum(ranks, self.npages - 1, out=ranks)
        return sh.zipf_pages[ranks]


def load_trace(path: str) -> np.ndarray:
    """A trace as an int64 array: shape (n,) of gfns, or (n, 2) of (vcpu, gfn)."""
    if path.endswith(".npy"):
        try:
            a = np.load(path, allow_pickle=False)
        except (OSError, MemoryError):
            raise
        except Exception as e:      # a malformed header fails in many ways (SyntaxError, TokenError, ...)
            raise ValueError(f"{path}: not a valid .npy file ({type(e).__name__}: {e})") from None
        if not isinstance(a, np.ndarray):
            raise ValueError(f"{path}: not a .npy array")
        if a.dtype.names:
            if set(a.dtype.names) != {"vcpu", "gfn"}:
                raise ValueError(f"{path}: a structured trace needs fields 'vcpu' and 'gfn'")
            for name in ("vcpu", "gfn"):
                f = a.dtype[name]
                if f.kind not in "ui" or f.shape != () or f.names:
                    raise ValueError(f"{path}: field {name!r} must be a plain integer, not {f}")
            a = np.stack([_checked_int64(a["vcpu"], path), _checked_int64(a["gfn"], path)], axis=1)
        if a.dtype.kind not in "ui":
            raise ValueError(f"{path}: trace must hold integers, not {a.dtype}")
        if a.ndim not in (1, 2) or (a.ndim == 2 and a.shape[1] != 2):
            raise ValueError(f"{path}: trace must have shape (n,) or (n, 2), not {a.shape}")
        return _checked_int64(a, path)
    rows: List[List[int]] = []
    with open(path, encoding="utf-8", errors="strict") as f:
        for lineno, line in _lines(f, path):
            text = line.split("#", 1)[0].split()
            if not text:
                continue
            try:
                nums = [int(x, 0) for x in text]
            except ValueError:
                raise ValueError(f"{path}:{lineno}: not a number: {line.strip()!r}") from None
            if len(nums) not in (1, 2) or (rows and len(nums) != len(rows[0])):
                raise ValueError(f"{path}:{lineno}: expected 'gfn' or 'vcpu gfn' on every line")
            if min(nums) < 0:
                raise ValueError(f"{path}:{lineno}: negative number")
            if max(nums) >= _INT63:
                raise ValueError(f"{path}:{lineno}: number too large (at most 2**63 - 1)")
            rows.append(nums)
    if not rows:
        raise ValueError(f"{path}: the trace is empty")
    a = np.array(rows, dtype=np.int64)
    return a[:, 0] if a.shape[1] == 1 else a


def _lines(f, path: str):
    try:
        yield from enumerate(f, 1)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a text trace ({e.reason} at byte {e.start})") from None


def _checked_int64(a: np.ndarray, path: str) -> np.ndarray:
    """An integer array as int64, refusing what int64 cannot hold (no wrap-around)."""
    if a.size:
        if int(a.min()) < 0:
            raise ValueError(f"{path}: negative numbers in the trace")
        if int(a.max()) >= _INT63:
            raise ValueError(f"{path}: number {int(a.max())} too large (at most 2**63 - 1)")
    return a.astype(np.int64)


def split_trace(a: np.ndarray, vcpus: int, npages: int) -> List[np.ndarray]:
    """Per-vCPU uint64 gfn arrays from a loaded trace (see the module docstring)."""
    if a.size == 0:
        raise ValueError("the trace is empty")
    gfns = a if a.ndim == 1 else a[:, 1]
    if int(gfns.max()) >= npages:
        raise ValueError(f"trace gfn {int(gfns.max())} is outside guest memory ({npages} pages)")
    if a.ndim == 1:
        bounds = [i * len(a) // vcpus for i in range(vcpus + 1)]
        parts = [a[bounds[i]:bounds[i + 1]] for i in range(vcpus)]
    else:
        ids = a[:, 0]
        if int(ids.max()) >= vcpus:
            raise ValueError(f"trace names vCPU {int(ids.max())}, the run has {vcpus}")
        parts = [a[ids == i, 1] for i in range(vcpus)]
    for i, p in enumerate(parts):
        if len(p) == 0:
            raise ValueError(f"the trace has no writes for vCPU {i}")
    return [np.ascontiguousarray(p, dtype=np.uint64) for p in parts]


def rates(rate: Union[int, Sequence[int]], vcpus: int) -> List[int]:
    """Per-vCPU writes per step from one number or a list of ``vcpus`` numbers."""
    r = [int(rate)] * vcpus if isinstance(rate, (int, np.integer)) else [int(x) for x in rate]
    if len(r) != vcpus:
        raise ValueError(f"{len(r)} rates given for {vcpus} vCPUs")
    if min(r) < 1:
        raise ValueError("rates must be >= 1 write per step")
    if max(r) > MAX_RATE:
        raise ValueError(f"rates must be <= {MAX_RATE} writes per step")
    return r


def writes_per_step(mb_per_s: float, step_seconds: float) -> int:
    """A rate in MB/s of simulated guest time as whole page writes per step (at least 1)."""
    if mb_per_s <= 0 or step_seconds <= 0:
        raise ValueError("rate and step must be positive")
    return max(1, int(round(mb_per_s * 1e6 * step_seconds / PAGE_SIZE)))
