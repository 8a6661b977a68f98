"""`kvmdirty compare`: one scenario, every design, one measured row each.

``compare(spec, designs)`` runs the scenario ``spec`` (a RunSpec whose design
is replaced per row) once per design and returns the RunResults;
``format_table`` and ``to_json`` present them.  Nothing is estimated: every
number comes from the run of that row.
"""
from __future__ import annotations

import dataclasses
import json
import math
import platform
from typing import Callable, List, Optional, Sequence

from .collectors import all_designs
from .progress import Progress
from .runner import RunResult, RunSpec, run

COLUMNS = (
    ("design", "design"),
    ("writes", "writes"),
    ("wp_faults", "WP faults"),
    ("pages_harvested", "pages harvested"),
    ("harvest_calls", "harvest calls"),
    ("full_exits", "ring-full exits"),
    ("tracking_ms", "tracking ms"),
    ("tracking_ns_per_page", "ns/dirty page"),
    ("writes_per_s", "guest writes/s"),
    ("lost_pages", "lost pages"),
)


def compare(spec: RunSpec, designs: Optional[Sequence[str]] = None,
            progress: Optional[Progress] = None,
            runner: Callable[..., RunResult] = run) -> List[RunResult]:
    """Run ``spec`` under each design (default: every design this build has)."""
    names = list(designs) if designs else all_designs()
    known = all_designs()
    for d in names:
        if d not in known:
            raise ValueError(f"unknown design {d!r}; known: {', '.join(known)}")
    specs = [dataclasses.replace(spec, design=d) for d in names]
    for s in specs:
        s.validate()            # fail before the first run, not in the middle
    results = []
    for s in specs:
        if progress is not None:
            progress.start(s.design)
        results.append(runner(s, on_progress=progress.update if progress else None))
        if progress is not None:
            progress.finish_item()
    return results


def _si(x: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def _cell(r: RunResult, key: str) -> str:
    if key == "tracking_ms":
        return f"{r.tracking_s * 1e3:.1f}"
    if key == "tracking_ns_per_page":
        return "-" if r.tracking_ns_per_page is None else f"{r.tracking_ns_per_page:.1f}"
    if key == "writes_per_s":
        return _si(r.writes_per_s)
    if key == "lost_pages":
        n = r.lost_pages if r.lost_pages is not None else r.violations
        if n is None:
            return "-"
        return f"{n + (r.unwritten_pages or 0):,}"
    v = getattr(r, key)
    if v is None:
        return "-"
    return f"{v:,}" if isinstance(v, int) else str(v)


def describe(spec: RunSpec) -> str:
    size = spec.memory
    mem = f"{size / (1 << 30):g} GiB" if size >= 1 << 30 else f"{size / (1 << 20):g} MiB"
    if spec.trace_speed is not None:
        amount = f"at {spec.trace_speed:g}x its recorded pace" + \
            (f" for {spec.duration:g} s ({spec.trace_end})" if spec.duration is not None else "")
    else:
        amount = f"{spec.duration:g} s" if spec.duration is not None else f"{spec.writes:,} writes/vCPU"
    return (f"{mem} guest, {spec.vcpus} vCPUs, {spec.workload.describe()} writes, {amount}, "
            f"ring {spec.ring_entries} entries, {spec.mode}, seed {spec.seed}, backend {spec.backend}")


def format_table(results: Sequence[RunResult], spec: Optional[RunSpec] = None) -> str:
    rows = [[title for _k, title in COLUMNS]]
    rows += [[_cell(r, k) for k, _t in COLUMNS] for r in results]
    widths = [max(len(row[c]) for row in rows) for c in range(len(COLUMNS))]
    lines = []
    if spec is not None:
        lines.append(describe(spec))
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [row[c].rjust(widths[c]) for c in range(1, len(row))]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    for r in results:
        if r.trace_ended is not None:
            lines.append(f"  {r.design}: trace replay {r.trace_ended}; vCPUs at worst "
                         f"{(r.trace_late_s or 0.0) * 1e3:.1f} ms behind it")
        for p in r.problems:
            lines.append(f"! {r.design}: {p}")
        for x in r.lost[:5]:
            lines.append(f"! {r.design}: lost {x}")
    return "\n".join(lines)


def to_json(results: Sequence[RunResult], spec: RunSpec) -> dict:
    sc = dataclasses.asdict(spec)
    sc.pop("design")
    sc["workload"] = dataclasses.asdict(spec.workload)
    return {
        "scenario": sc,
        "machine": {"python": platform.python_version(), "machine": platform.machine()},
        "results": [r.to_dict() for r in results],
        "ok": all(r.ok for r in results),
    }


def _finite(x):
    """``x`` with every non-finite float (NaN, inf) replaced by None: JSON has no such numbers."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def to_json_text(results: Sequence[RunResult], spec: RunSpec) -> str:
    """``to_json`` as strict JSON text (non-finite numbers become null)."""
    return json.dumps(_finite(to_json(results, spec)), indent=2, allow_nan=False)
