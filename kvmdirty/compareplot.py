"""``compare --plot FILE.png``: the objective over the swept knobs, one panel per design.

A design swept over two knobs (ring entries x interval, typically) gets a
heatmap with each cell's median written in it and its best setting framed;
over one knob, a line with the runs' min-max as a band; over none, a bar.
Knobs swept beyond the two shown are held at the design's best setting.
Needs matplotlib (the ``plot`` extra).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

from .comparecolumns import BY_KEY
from .comparegrid import Knobs, Setting, has_ring
from .objective import OBJECTIVES, Ranked, best_per_design
from .spread import Spread

_LABELS = {"ring_entries": "ring entries", "interval": "harvest interval (ms)", "vcpus": "vCPUs",
           "dirty_rate": "dirty rate asked (MB/s)", "memory": "guest memory (GiB)"}


def _knob(s: Setting, k: str) -> float:
    if k == "interval":
        return s.interval * 1e3
    if k == "dirty_rate":
        return (s.guest_rate or 0.0) / 1e6
    if k == "memory":
        return s.memory / (1 << 30)
    return float(getattr(s, k))


def _axes_for(design: str, knobs: Knobs) -> List[str]:
    swept = [k for k in knobs.swept() if k != "ring_entries" or has_ring(design)]
    # Ring entries and interval first: the question the tool is built for.
    swept.sort(key=lambda k: ("ring_entries", "interval").index(k) if k in ("ring_entries", "interval") else 9)
    return swept[:2]


def _import_pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OSError("--plot needs matplotlib: pip install 'kvmdirty[plot]'") from None
    return plt


def plot(ranked: Sequence[Ranked], knobs: Knobs, objective: str, path: str) -> None:
    """Write the figure to ``path`` (PNG, or any format matplotlib knows by the extension)."""
    plt = _import_pyplot()
    key, what = OBJECTIVES[objective]
    col = BY_KEY[key]
    unit = col.title
    best = best_per_design(ranked)
    designs = list(dict.fromkeys(r.cell.setting.design for r in ranked))
    n = len(designs)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, d in zip(axes.flat, designs):
        mine = [r for r in ranked if r.cell.setting.design == d]
        anchor = best.get(d) or mine[0]
        shown = _axes_for(d, knobs)
        held = [k for k in knobs.swept() if k not in shown and (k != "ring_entries" or has_ring(d))]
        # Hold the other swept knobs at the design's best setting.
        sel = [r for r in mine if all(_knob(r.cell.setting, k) == _knob(anchor.cell.setting, k) for k in held)]
        vals: Dict[tuple, Optional[float]] = {}
        bands: Dict[tuple, Optional[Spread]] = {}
        for r in sel:
            pos = tuple(_knob(r.cell.setting, k) for k in shown)
            vals[pos] = None if r.objective is None else r.objective * col.scale
            bands[pos] = Spread.of(col.value(x) for x in r.cell.runs)
        title = d if not held else d + " (" + ", ".join(
            f"{_LABELS[k].split(' (')[0]} {_knob(anchor.cell.setting, k):g}" for k in held) + ")"
        ax.set_title(title, fontsize=10)
        if len(shown) == 2:
            ys = sorted({p[0] for p in vals})
            xs = sorted({p[1] for p in vals})
            grid = [[vals.get((y, x)) for x in xs] for y in ys]
            data = [[math.nan if v is None else v for v in row] for row in grid]
            im = ax.imshow(data, cmap="viridis_r" if col.lower_is_better else "viridis",
                           aspect="auto", origin="lower")
            fig.colorbar(im, ax=ax, label=unit)
            ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
            ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
            ax.set_xlabel(_LABELS[shown[1]])
            ax.set_ylabel(_LABELS[shown[0]])
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    r_, g_, b_, _a = im.cmap(im.norm(0.0 if v is None else v))
                    light = 0.299 * r_ + 0.587 * g_ + 0.114 * b_ > 0.5
                    ax.text(j, i, "-" if v is None else f"{v:.3g}", ha="center", va="center",
                            fontsize=8, color="black" if light else "white")
            if best.get(d) is not None:
                b = best[d].cell.setting
                i, j = ys.index(_knob(b, shown[0])), xs.index(_knob(b, shown[1]))
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=2.5))
        elif len(shown) == 1:
            pts = sorted((p[0], v) for p, v in vals.items() if v is not None)
            xs = [p for p, _v in pts]
            ax.plot(xs, [v for _p, v in pts], marker="o")
            lo = [bands[(x,)].min * col.scale for x in xs if bands[(x,)] is not None]
            hi = [bands[(x,)].max * col.scale for x in xs if bands[(x,)] is not None]
            if len(lo) == len(xs):
                ax.fill_between(xs, lo, hi, alpha=0.25, label="runs' min-max")
            if shown[0] in ("ring_entries", "interval") and xs and min(xs) > 0:
                ax.set_xscale("log")
            ax.set_xlabel(_LABELS[shown[0]])
            ax.set_ylabel(unit)
        else:
            v = vals.get(())
            ax.bar([d], [0 if v is None else v])
            ax.set_ylabel(unit)
    fig.suptitle(f"kvmdirty compare: {what} (median of each setting's runs; red: the design's best)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
