"""Samples of one measured quantity, and the one definition of a percentile used everywhere.

``quantile(values, q)`` is the linear interpolation between closest ranks
(numpy's default, ``statistics.quantiles(method="inclusive")``, Excel's
PERCENTILE.INC): with n sorted values v[0..n-1], rank h = (n - 1) * q and
the result is v[floor h] + (h - floor h) * (v[floor h + 1] - v[floor h]).

:class:`Samples` keeps every value up to ``cap`` of them; past that it keeps
every 2nd, then every 4th, ... (a systematic sample of the whole run), so a
long run's per-page figures stay bounded in memory.  Count, sum, min and max
are always exact.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

Number = Union[int, float]

#: Values kept before a Samples thins itself out.
DEFAULT_CAP = 1 << 22


def quantile(values: Union[Sequence[Number], np.ndarray], q: float) -> Optional[float]:
    """The q-quantile (0 <= q <= 1) of ``values`` by linear interpolation; None if empty."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return None
    return float(np.quantile(a, q, method="linear"))


class Samples:
    """A growing set of numbers with exact count/sum/min/max and (near-)exact quantiles."""

    def __init__(self, cap: int = DEFAULT_CAP) -> None:
        self.cap = max(2, int(cap))
        self.count = 0
        self.total = 0.0
        self.min: Optional[float] = None
        self.max: Optional[float] = None
        self._parts: List[np.ndarray] = []
        self._kept = 0
        self._stride = 1        # keep every stride-th value from now on
        self._phase = 0         # values to skip before the next kept one

    def add(self, value: Number) -> None:
        self.extend(np.asarray([value], dtype=np.float64))

    def extend(self, values: Union[Iterable[Number], np.ndarray]) -> None:
        a = np.asarray(values, dtype=np.float64).ravel()
        if a.size == 0:
            return
        self.count += int(a.size)
        self.total += float(a.sum())
        lo, hi = float(a.min()), float(a.max())
        self.min = lo if self.min is None else min(self.min, lo)
        self.max = hi if self.max is None else max(self.max, hi)
        if self._stride > 1:
            kept = a[self._phase::self._stride]
            self._phase = (self._phase - a.size) % self._stride
            a = kept
        self._parts.append(a.copy())
        self._kept += int(a.size)
        while self._kept > self.cap:
            self._thin()

    def _thin(self) -> None:
        whole = self.values()[::2]
        self._parts, self._kept = [whole], int(whole.size)
        self._stride *= 2
        self._phase = 0

    def values(self) -> np.ndarray:
        """The kept values (all of them unless more than ``cap`` were added)."""
        if not self._parts:
            return np.zeros(0)
        if len(self._parts) > 1:
            self._parts = [np.concatenate(self._parts)]
        return self._parts[0]

    def quantile(self, q: float) -> Optional[float]:
        if q == 1.0:
            return self.max
        if q == 0.0:
            return self.min
        return quantile(self.values(), q)

    @property
    def mean(self) -> Optional[float]:
        return self.total / self.count if self.count else None

    def summary(self, scale: float = 1.0, qs: Sequence[float] = (0.5, 0.99)) -> Dict[str, Optional[float]]:
        """{"n", "total", "mean", "p50", "p99", "max"} (values times ``scale``)."""
        def s(x: Optional[float]) -> Optional[float]:
            return None if x is None or not math.isfinite(x) else x * scale
        out: Dict[str, Optional[float]] = {"n": self.count, "total": s(self.total), "mean": s(self.mean)}
        for q in qs:
            out[f"p{round(q * 100):d}"] = s(self.quantile(q))
        out["max"] = s(self.max)
        return out
