"""``kvmdirty compare``'s table: one row per setting, best first, with the runs' spread.

Each measured cell shows the median over the repeated runs and, under it,
their spread: ± half the range in percent of the median (``!`` when wide,
kvmdirty.spread), or the range itself when the figure is too close to 0
for a percentage to mean anything.  Under the table: the best setting per
design, how the counts add up (INITIALLY_SET pages, faults vs pages), wide
spreads, and anything a run found wrong.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

from rich import box
from rich.console import Console
from rich.table import Table

from .comparecolumns import BY_KEY, Column, columns
from .comparegrid import AUTO_INTERVALS, AUTO_MAX_S, AUTO_MIN_S, Cell, Knobs, has_ring
from .objective import OBJECTIVES, Ranked, best_per_design
from .runner import RunResult, RunSpec
from .spread import Spread
from .units import fmt_bytes

if TYPE_CHECKING:
    from .compare import Report

#: At most this many lines of spread warnings.
MAX_WARNINGS = 12


def _num(col: Column, v: Optional[float]) -> str:
    if v is None:
        return "-"
    shown = v * col.scale
    if col.digits == 0:
        return f"{shown:,.0f}"
    return f"{shown:,.{col.digits}f}"


def _spread(col: Column, s: Optional[Spread]) -> str:
    """The second line of a cell: how far the runs spread."""
    if s is None or s.n < 2:
        return ""
    floor = col.floor / col.scale
    if s.max == s.min or _num(col, s.min) == _num(col, s.max):
        return "±0%"
    if abs(s.median) < floor:
        return f"{_num(col, s.min)}-{_num(col, s.max)}"
    pct = 50.0 * s.relative(floor)
    mark = "!" if s.wide(floor) else ""
    return f"±{pct:.0f}%{mark}"


def setting_text(r: Ranked, knobs: Knobs) -> str:
    """A setting in words: the design and the knobs that vary."""
    s = r.cell.setting
    parts = [s.design]
    if s.ring_entries is not None:
        parts.append(f"{s.ring_entries} entries")
    parts.append(f"every {s.interval * 1e3:g} ms")
    swept = knobs.swept()
    if "vcpus" in swept:
        parts.append(f"{s.vcpus} vCPUs")
    if "dirty_rate" in swept and s.guest_rate is not None:
        parts.append(f"{s.guest_rate / 1e6:g} MB/s")
    if "memory" in swept:
        parts.append(fmt_bytes(s.memory))
    return ", ".join(parts)


def describe(base: RunSpec, knobs: Knobs, repeat: int) -> str:
    """The scenario in one line (the knobs that are not swept, with their value)."""
    swept = knobs.swept()
    bits = []
    if "memory" not in swept:
        bits.append(f"{fmt_bytes(knobs.memory[0])} guest")
    if "vcpus" not in swept:
        bits.append(f"{knobs.vcpus[0]} vCPUs")
    bits.append(f"{base.workload.describe()} writes")
    rate = knobs.dirty_rate[0]
    if "dirty_rate" not in swept and rate is not None:
        bits.append(f"{rate[0] / 1e6:g} MB/s asked" + (" per vCPU" if rate[1] else ""))
    elif rate is None and base.trace_speed is None:
        bits.append(f"unpaced ({base.rate if isinstance(base.rate, int) else list(base.rate)} "
                    f"writes per step)")
    if knobs.auto_duration:
        bits.append(f"each run {AUTO_INTERVALS} harvest intervals long ({AUTO_MIN_S:g} s to {AUTO_MAX_S:g} s)")
    elif base.duration is not None:
        bits.append(f"{base.duration:g} s per run")
    else:
        bits.append(f"{base.writes:,} writes per vCPU")
    if "ring_entries" not in swept and any(has_ring(d) for d in knobs.designs):
        bits.append(f"rings of {knobs.ring_entries[0]} entries")
    if "interval" not in swept and base.mode == "threads":
        bits.append(f"harvest every {knobs.interval[0] * 1e3:g} ms")
    bits += [base.mode, f"seed {base.seed}", f"backend {base.backend}"]
    line = ", ".join(bits)
    if repeat > 1:
        line += (f"; {repeat} runs each: the median, and under it the runs' spread "
                 f"(± half the range, % of the median; ! wide)")
    return line


def build_table(ranked: Sequence[Ranked], knobs: Knobs, paced: bool, deterministic: bool) -> Table:
    cols = columns(paced)
    swept = knobs.swept()
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    t.add_column("#", justify="right")
    t.add_column("design", justify="left", no_wrap=True)
    knob_cols = []
    if any(has_ring(d) for d in knobs.designs):
        knob_cols.append(("ring_entries", "ring\nentries"))
    if not deterministic:
        knob_cols.append(("interval", "interval\nms"))
    for k, title in (("vcpus", "vCPUs"), ("dirty_rate", "asked\nMB/s"), ("memory", "memory\nGiB")):
        if k in swept:
            knob_cols.append((k, title))
    for _k, title in knob_cols:
        t.add_column(title, justify="right", no_wrap=True)
    for c in cols:
        t.add_column(c.head, justify="right", no_wrap=True)
    best = {id(r) for r in best_per_design(ranked).values() if r is not None}
    for r in ranked:
        s = r.cell.setting
        mark = "*" if id(r) in best else ("x" if not r.feasible else "")
        row = [f"{r.rank}{mark}", s.design]
        for k, _title in knob_cols:
            if k == "ring_entries":
                row.append("-" if s.ring_entries is None else f"{s.ring_entries:,}")
            elif k == "interval":
                row.append(f"{s.interval * 1e3:g}")
            elif k == "vcpus":
                row.append(str(s.vcpus))
            elif k == "dirty_rate":
                row.append("-" if s.guest_rate is None else f"{s.guest_rate / 1e6:g}")
            else:
                row.append(f"{s.memory / (1 << 30):g}")
        for c in cols:
            sp = Spread.of(c.value(x) for x in r.cell.runs)
            text = _num(c, None if sp is None else sp.median)
            second = _spread(c, sp)
            if second:
                style = "yellow" if second.endswith("!") else "dim"
                text += f"\n[{style}]{second}[/]"
            row.append(text)
        t.add_row(*row, style=None if r.feasible else "dim")
    return t


def accounting_notes(cells: Sequence[Cell]) -> List[str]:
    """Per design, why WP faults, entries and dirty pages differ (summed over its runs)."""
    by_design: Dict[str, List[RunResult]] = {}
    for c in cells:
        by_design.setdefault(c.setting.design, []).extend(c.runs)
    notes = []
    for d, runs in by_design.items():
        n = len(runs)
        faults = sum(r.wp_faults or 0 for r in runs)
        dirtied = sum(r.pages_dirtied for r in runs)
        dup = sum(r.duplicate_entries for r in runs)
        initial = sum(r.initial_pages for r in runs)
        if initial:
            ms = [r.initial_harvest_s for r in runs if r.initial_harvest_s is not None]
            notes.append(f"{d}: the first harvest of each run returned every page (INITIALLY_SET): "
                         f"{initial // n:,} pages per run never written, counted apart from dirty "
                         f"pages and from harvest latency (that harvest took "
                         f"{1e3 * sum(ms) / max(1, len(ms)):.1f} ms)")
        if dup:
            notes.append(f"{d}: {dup // n:,} ring entries per run named a page another entry of "
                         f"the same harvest named (several vCPUs wrote it between harvests: one "
                         f"fault and one entry each); dirty pages count it once")
        extra = faults - dirtied - dup
        if runs[0].wp_faults is None or extra == 0:
            continue
        if extra > 0:
            notes.append(f"{d}: {extra // n:,} WP faults per run added no page: several vCPUs "
                         f"faulted one page before either had made it writable (one bit, one "
                         f"page, several faults)")
        else:
            notes.append(f"{d}: {-extra // n:,} dirty pages per run took no WP fault (a page "
                         f"already writable when it was dirtied)")
    return notes


def spread_warnings(ranked: Sequence[Ranked], knobs: Knobs, paced: bool) -> List[str]:
    lines = []
    for r in ranked:
        wide = []
        for c in columns(paced):
            sp = Spread.of(c.value(x) for x in r.cell.runs)
            if sp is not None and sp.wide(c.floor / c.scale):
                wide.append(f"{c.title} {_num(c, sp.median)} ({_num(c, sp.min)}-{_num(c, sp.max)})")
        if wide:
            lines.append(f"! wide spread over {len(r.cell.runs)} runs: {setting_text(r, knobs)}: "
                         + "; ".join(wide))
    if len(lines) > MAX_WARNINGS:
        lines = lines[:MAX_WARNINGS] + [f"! ... and {len(lines) - MAX_WARNINGS} more settings"]
    if lines:
        lines.append("  (a wide spread means one run's number is not to be trusted alone: use more "
                     "--repeat, a longer --duration, or a quieter machine)")
    return lines


def best_lines(ranked: Sequence[Ranked], knobs: Knobs, objective: str,
               max_stall_ms: Optional[float]) -> List[str]:
    what = OBJECTIVES[objective][1]
    head = f"best per design ({what}"
    if max_stall_ms is not None:
        head += f"; no single stall over {max_stall_ms:g} ms"
    head += "; ties go to less tracking CPU):"
    lines = [head]
    key = OBJECTIVES[objective][0]
    col = BY_KEY[key]
    for d, r in best_per_design(ranked).items():
        if r is None:
            lines.append(f"  {d}: no setting qualifies")
            continue
        figs = [f"{col.title} {_num(col, r.objective)}"]
        for k in ("stall_pct", "stall_max_s", "age_p99_s", "tracking_pct"):
            if k != key:
                c = BY_KEY[k]
                sp = Spread.of(c.value(x) for x in r.cell.runs)
                figs.append(f"{c.title} {_num(c, None if sp is None else sp.median)}")
        lines.append(f"  {setting_text(r, knobs)}: " + ", ".join(figs))
    return lines


def problem_lines(cells: Sequence[Cell]) -> List[str]:
    out = []
    for c in cells:
        for r in c.runs:
            if r.trace_ended is not None:
                out.append(f"  {r.design}: trace replay {r.trace_ended}; vCPUs at worst "
                           f"{(r.trace_late_s or 0.0) * 1e3:.1f} ms behind it")
            for p in r.problems:
                out.append(f"! {r.design}: {p}")
            for x in r.lost[:5]:
                out.append(f"! {r.design}: lost {x}")
    return out


def _unique_skips(skipped):
    seen, out = set(), []
    for s, why in skipped:
        if (s.design, s.ring_entries) not in seen:
            seen.add((s.design, s.ring_entries))
            out.append((s, why))
    return out


def render(console: Console, rep: "Report") -> None:
    """Print the whole report on ``console``."""
    ranked, cells, knobs, base = rep.ranked, rep.cells, rep.knobs, rep.base
    repeat, objective, max_stall_ms = rep.repeat, rep.objective, rep.max_stall_ms
    paced = any(s is not None for s in knobs.dirty_rate)
    console.print(describe(base, knobs, repeat), highlight=False, soft_wrap=True)
    console.print(build_table(ranked, knobs, paced, base.mode == "deterministic"))
    # With one setting per design the order says it all; with a grid, name each design's best.
    lines = best_lines(ranked, knobs, objective, max_stall_ms) \
        if len(ranked) > len({r.cell.setting.design for r in ranked}) else []
    lines += ["  (# : rank; * the best of its design; x not qualifying: "
              + "; ".join(sorted({r.why_not for r in ranked if r.why_not})) + ")"] \
        if any(not r.feasible for r in ranked) else []
    lines += accounting_notes(cells)
    lines += spread_warnings(ranked, knobs, paced)
    lines += [f"  {s.design} with {s.ring_entries:,} entries: not run ({why})"
              for s, why in _unique_skips(rep.skipped)]
    lines += problem_lines(cells)
    for line in lines:
        console.print(line, highlight=False, markup=False, soft_wrap=True)
