"""What a finished (or partial) sweep says: the best setting per axis value.

The objective is a metric to minimise ("-metric" maximises it); constraints
("downtime_s <= 0.3") rule cells out.  For each value of each axis the best
feasible cell with that value is named, with its whole setting; the axes that
move the objective most (the spread of the objective's mean over their
values) are the ones the plot shows, per design.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .spec import Constraint

Row = Dict[str, Any]


@dataclass
class Best:
    """The best feasible cell among those with ``axis == value``."""

    axis: str
    value: Any
    objective: Optional[float]
    setting: Dict[str, Any]
    feasible: int
    total: int


@dataclass
class Summary:
    objective: str
    maximise: bool
    constraints: List[str]
    axes: List[str]
    cells: int
    ok: int
    failed: int
    feasible: int
    overall: Optional[Best]
    per_value: List[Best] = field(default_factory=list)
    importance: Dict[str, float] = field(default_factory=dict)


def _metric(row: Row, name: str) -> Optional[float]:
    v = row.get(name)
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _rank(objective: str) -> Tuple[str, bool]:
    return (objective[1:], True) if objective.startswith("-") else (objective, False)


def summarize(rows: Sequence[Row], axes: Sequence[str], objective: str,
              constraints: Sequence[Constraint] = ()) -> Summary:
    """Best settings of ``rows`` (a sweep's results) by ``objective`` under ``constraints``."""
    metric, maximise = _rank(objective)
    ok = [r for r in rows if r.get("status") == "ok"]
    if ok and all(_metric(r, metric) is None for r in ok):
        numeric = sorted({k for r in ok for k, v in r.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool)} - set(axes))
        raise ValueError(f"no cell has a numeric {metric!r}; metrics: {', '.join(numeric)}")
    feasible = [r for r in ok if _metric(r, metric) is not None and all(c.holds(r) for c in constraints)]
    sign = -1.0 if maximise else 1.0

    def best_of(sel: List[Row], axis: str, value: Any, total: int) -> Best:
        if not sel:
            return Best(axis, value, None, {}, 0, total)
        b = min(sel, key=lambda r: sign * _metric(r, metric))  # type: ignore[operator]
        return Best(axis, value, _metric(b, metric), {a: b.get(a) for a in axes}, len(sel), total)

    per_value = []
    importance = {}
    for a in axes:
        values = list(dict.fromkeys(r.get(a) for r in ok))
        means = []
        for v in values:
            sel = [r for r in feasible if r.get(a) == v]
            per_value.append(best_of(sel, a, v, sum(1 for r in ok if r.get(a) == v)))
            if sel:
                means.append(sum(_metric(r, metric) for r in sel) / len(sel))  # type: ignore[misc]
        importance[a] = (max(means) - min(means)) if len(means) > 1 else 0.0
    return Summary(objective=metric, maximise=maximise, constraints=[str(c) for c in constraints],
                   axes=list(axes), cells=len(rows), ok=len(ok),
                   failed=sum(1 for r in rows if r.get("status") == "failed"),
                   feasible=len(feasible), overall=best_of(feasible, "", None, len(ok)) if ok else None,
                   per_value=per_value, importance=importance)


def plot(rows: Sequence[Row], summary: Summary, path: str,
         show: Callable[[str, Any], str] = lambda name, v: str(v)) -> None:
    """The objective over the two most important axes, one panel per design.

    ``show(axis, value)`` labels the ticks (e.g. the command's units)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("plots need matplotlib: pip install matplotlib") from None
    metric = summary.objective
    constraints = [Constraint.parse(c) for c in summary.constraints]
    rows = [r for r in rows if r.get("status") == "ok" and _metric(r, metric) is not None
            and all(c.holds(r) for c in constraints)]
    group = "design" if "design" in summary.axes else None
    others = sorted((a for a in summary.axes if a != group),
                    key=lambda a: -summary.importance.get(a, 0.0))[:2]
    groups = list(dict.fromkeys(r.get(group) for r in rows)) if group else [None]
    if not rows:
        raise ValueError("no feasible cell to plot")
    fig, axs = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    better = max if summary.maximise else min
    for ax, g in zip(axs[0], groups):
        sel = [r for r in rows if group is None or r.get(group) == g]
        ax.set_title(f"{g}" if g is not None else metric)
        if len(others) == 2:
            xs = sorted({r.get(others[0]) for r in sel}, key=_sortable)
            ys = sorted({r.get(others[1]) for r in sel}, key=_sortable)
            grid = [[math.nan] * len(xs) for _ in ys]
            for r in sel:
                i, j = ys.index(r.get(others[1])), xs.index(r.get(others[0]))
                v = _metric(r, metric)
                grid[i][j] = v if math.isnan(grid[i][j]) else better(grid[i][j], v)
            im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis_r" if not summary.maximise else "viridis")
            ax.set_xticks(range(len(xs)), [show(others[0], x) for x in xs])
            ax.set_yticks(range(len(ys)), [show(others[1], y) for y in ys])
            ax.set_xlabel(others[0])
            ax.set_ylabel(others[1])
            lo, hi = im.get_clim()
            for i in range(len(ys)):
                for j in range(len(xs)):
                    v = grid[i][j]
                    if not math.isnan(v):
                        # Dark text on the light end of the colour map, light on the dark end.
                        light = (v - lo) / (hi - lo) < 0.5 if hi > lo else True
                        if summary.maximise:
                            light = not light
                        ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=8,
                                color="black" if light else "white")
            fig.colorbar(im, ax=ax, label=metric)
        elif len(others) == 1:
            xs = sorted({r.get(others[0]) for r in sel}, key=_sortable)
            vals = [better(_metric(r, metric) for r in sel if r.get(others[0]) == x) for x in xs]
            ax.plot(range(len(xs)), vals, marker="o")
            ax.set_xticks(range(len(xs)), [show(others[0], x) for x in xs])
            ax.set_xlabel(others[0])
            ax.set_ylabel(metric)
        else:
            ax.bar([0], [better(_metric(r, metric) for r in sel)])
            ax.set_ylabel(metric)
    fig.suptitle(f"{'max' if summary.maximise else 'min'} {metric}"
                 + (f" subject to {', '.join(summary.constraints)}" if summary.constraints else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _sortable(v: Any) -> Tuple[int, Any]:
    return (0, v) if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, str(v))
