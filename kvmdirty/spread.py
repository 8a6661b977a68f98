"""A measured figure over repeated runs: its median and how far the runs spread.

``Spread.of(values)`` summarises the runs' values (None, a figure a run
could not measure, is left out): median, min, max and the quartiles (the
same percentile definition as everywhere, kvmdirty.samples.quantile).
``relative`` is the range over the median; below ``floor`` (in the
figure's own units) a difference is noise of the clock, not a spread, so
the median is taken as at least ``floor``.  A spread is *wide* when the
range is more than WIDE (25 %) of the median: then one run's number is not
to be trusted alone, and the table says so.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Iterable, Optional

from .samples import quantile

#: A range wider than this fraction of the median is flagged.
WIDE = 0.25


@dataclass(frozen=True)
class Spread:
    median: float
    min: float
    max: float
    q1: float
    q3: float
    n: int

    @classmethod
    def of(cls, values: Iterable[Optional[float]]) -> Optional["Spread"]:
        """The spread of the values that are not None (None when there are none)."""
        v = sorted(float(x) for x in values if x is not None)
        if not v:
            return None
        q = [quantile(v, p) for p in (0.5, 0.25, 0.75)]
        return cls(q[0], v[0], v[-1], q[1], q[2], len(v))  # type: ignore[arg-type]

    def relative(self, floor: float = 0.0) -> float:
        """(max - min) / max(|median|, floor); 0 when all runs agree."""
        rng = self.max - self.min
        if rng <= 0:
            return 0.0
        base = max(abs(self.median), floor)
        return rng / base if base > 0 else float("inf")

    def wide(self, floor: float = 0.0) -> bool:
        return self.n > 1 and self.relative(floor) > WIDE

    def to_dict(self) -> Dict[str, float]:
        return asdict(self)
