"""`kvmdirty compare`: designs x knobs, each setting run ``repeat`` times, live on this host.

``compare(spec, designs)`` runs one scenario under each design and returns
the RunResults (one run each).  ``compare_grid(spec, knobs, repeat)`` runs
every setting of a grid (kvmdirty.comparegrid) and ranks the settings by an
objective (kvmdirty.objective); ``to_json`` gives the report in the shared
schema (kvmdirty.runinfo).  Nothing is estimated: every number comes from
the runs of that setting.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .collectors import all_designs
from .comparecolumns import COLUMNS
from .comparegrid import KNOBS, Cell, Knobs, Setting, expand, run_grid, runnable
from .objective import OBJECTIVES, Ranked, best_per_design, rank
from .runinfo import envelope, scenario
from .runner import RunResult, RunSpec, run
from .spread import Spread


def compare(spec: RunSpec, designs: Optional[Sequence[str]] = None,
            runner: Callable[..., RunResult] = run,
            on_progress: Optional[Callable[[float], None]] = None) -> List[RunResult]:
    """Run ``spec`` once under each design (default: every design this build has)."""
    knobs = Knobs(list(designs) if designs else all_designs(), [spec.memory], [spec.vcpus],
                  ring_entries=[spec.ring_entries], interval=[spec.interval])
    if spec.dirty_rate is not None:
        knobs.dirty_rate = [(spec.dirty_rate, False)]
    settings, _skipped = runnable(spec, expand(knobs))
    cells = run_grid(spec, settings, 1, runner=runner, on_progress=on_progress)
    return [c.runs[0] for c in cells]


@dataclass
class Report:
    """A finished grid: its cells (settings and runs) ranked by the objective."""

    base: RunSpec
    knobs: Knobs
    repeat: int
    objective: str
    max_stall_ms: Optional[float]
    cells: List[Cell]
    ranked: List[Ranked]
    skipped: List[Tuple[Setting, str]] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for c in self.cells for r in c.runs)


def compare_grid(base: RunSpec, knobs: Knobs, repeat: int = 1, objective: str = "stall",
                 max_stall_ms: Optional[float] = None, runner: Callable[..., RunResult] = run,
                 on_run: Optional[Callable[..., None]] = None,
                 on_progress: Optional[Callable[[float], None]] = None,
                 on_plan: Optional[Callable[[int], None]] = None) -> Report:
    """Run every setting of ``knobs`` ``repeat`` times and rank them.

    ``on_plan(n)`` is told how many runs there will be, once the settings a
    design refuses are left out; ``on_run(setting, k)`` before each run.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    if max_stall_ms is not None and not (math.isfinite(max_stall_ms) and max_stall_ms >= 0):
        raise ValueError(f"max stall must be a finite number of ms >= 0, got {max_stall_ms!r}")
    settings, skipped = runnable(base, expand(knobs), **({} if runner is run else {"check": _no_check}))
    if on_plan is not None:
        on_plan(len(settings) * repeat)
    cells = run_grid(base, settings, repeat, runner=runner, on_run=on_run, on_progress=on_progress)
    return Report(base, knobs, repeat, objective, max_stall_ms, cells,
                  rank(cells, objective, max_stall_ms), skipped)


def _no_check(spec: RunSpec) -> None:
    """A stand-in runner (tests) needs no VM set up to check a setting."""


def _scenario(rep: Report) -> Dict[str, Any]:
    sc = dataclasses.asdict(rep.base)
    sc.pop("design")
    sc["workload"] = dataclasses.asdict(rep.base.workload)
    k = rep.knobs
    swept = k.swept()
    rates = [None if r is None else r[0] for r in k.dirty_rate]
    values = {"memory": k.memory, "vcpus": k.vcpus, "dirty_rate": rates,
              "ring_entries": k.ring_entries, "interval": k.interval}
    for name in KNOBS:
        sc[name] = values[name] if name in swept else values[name][0]
    sc["dirty_rate_per_vcpu"] = any(r is not None and r[1] for r in k.dirty_rate)
    sc["designs"] = list(k.designs)
    sc["repeat"] = rep.repeat
    return scenario(sc, swept)


def to_json(rep: Report) -> dict:
    """The report as the shared JSON schema: every run, and every setting's spread, ranked."""
    out = envelope("compare", rep.base.backend, "real", _scenario(rep))
    key, about = OBJECTIVES[rep.objective]
    out["objective"] = {"name": rep.objective, "metric": key, "about": about,
                        "max_stall_ms": rep.max_stall_ms}
    out["results"] = [dict(r.to_dict(), setting=c.setting.to_dict(), repeat=n)
                      for c in rep.cells for n, r in enumerate(c.runs)]
    out["columns"] = {c.key: c.help for c in COLUMNS}
    cells = []
    for r in rep.ranked:
        metrics = {}
        for c in COLUMNS:
            sp = Spread.of(c.value(x) for x in r.cell.runs)
            metrics[c.key] = None if sp is None else dict(sp.to_dict(), wide=sp.wide(c.floor / c.scale))
        cells.append({"rank": r.rank, "setting": r.cell.setting.to_dict(), "objective": r.objective,
                      "feasible": r.feasible, "why_not": r.why_not or None, "metrics": metrics})
    out["cells"] = cells
    out["best"] = {d: None if b is None else {"rank": b.rank, "setting": b.cell.setting.to_dict(),
                                              "objective": b.objective}
                   for d, b in best_per_design(rep.ranked).items()}
    out["skipped"] = [dict(s.to_dict(), why=why) for s, why in rep.skipped]
    out["ok"] = rep.ok
    return out


def _finite(x):
    """``x`` with every non-finite float (NaN, inf) replaced by None: JSON has no such numbers."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def to_json_text(rep: Report) -> str:
    """``to_json`` as strict JSON text (non-finite numbers become null)."""
    return json.dumps(_finite(to_json(rep)), indent=2, allow_nan=False)
