"""One sweep, start to end: expand the grid, skip what is done, run the rest."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from .cells import Cell, expand
from .execute import drive
from .spec import Spec
from .store import ResultStore

SPEC_FILE = "spec.json"


@dataclass
class SweepRun:
    """What a call of ``run_sweep`` did: cells in the grid, skipped as done, run now."""

    cells: int
    skipped: int
    rows: List[Dict[str, Any]]
    out: str

    @property
    def failed(self) -> int:
        return sum(1 for r in self.rows if r.get("status") != "ok")


def save_spec(spec: Spec, path: str) -> None:
    doc = dataclasses.asdict(spec)
    doc["constraints"] = [str(c) for c in spec.constraints]
    tmp = os.path.join(path, SPEC_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, default=str)
    os.replace(tmp, os.path.join(path, SPEC_FILE))


def load_saved_spec(path: str) -> Optional[Dict[str, Any]]:
    p = os.path.join(path, SPEC_FILE)
    if not os.path.exists(p):
        return None
    with open(p, encoding="utf-8") as f:
        return json.load(f)


def plan(spec: Spec) -> List[Cell]:
    """The cells of ``spec`` (validated: a bad option fails here, before any cell runs)."""
    return expand(spec)


def run_sweep(spec: Spec, executor, *, on_start: Optional[Callable[[int, int], None]] = None,
              on_row: Optional[Callable[[Dict[str, Any]], None]] = None,
              table: Optional[str] = None) -> SweepRun:
    """Run every cell of ``spec`` not yet finished in ``spec.out``; rows land as they finish."""
    cells = plan(spec)
    with ResultStore(spec.out, table=table) as store:
        save_spec(spec, spec.out)
        done = store.done_keys()
        todo = [c for c in cells if c.key not in done]
        if on_start is not None:
            on_start(len(cells), len(cells) - len(todo))
        rows = drive(todo, executor, store, on_row=on_row)
    return SweepRun(cells=len(cells), skipped=len(cells) - len(todo), rows=rows, out=spec.out)
