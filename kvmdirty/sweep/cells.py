"""The grid's cells: one independent task per combination of axis values.

A cell's identity is a hash of its command and its (normalised) options, so
the same cell has the same key, and the same derived seed, wherever and
whenever it runs: that is what resume matches on, and why a cell gives the
same result on any worker.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from typing import Any, Dict, List

from .commands import command
from .spec import Spec


@dataclass(frozen=True)
class Cell:
    """One task: ``options`` for ``command``; ``key`` names it, ``seed`` seeds it."""

    command: str
    options: Dict[str, Any]
    key: str
    seed: int

    def to_dict(self) -> dict:
        return {"command": self.command, "options": self.options, "key": self.key, "seed": self.seed}


def cell_key(command_name: str, options: Dict[str, Any], base_seed: int) -> str:
    doc = json.dumps({"command": command_name, "options": options, "seed": base_seed},
                     sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(doc.encode()).hexdigest()[:20]


def expand(spec: Spec) -> List[Cell]:
    """Every cell of the grid, in axis order, without duplicates.

    The command normalises each combination first (e.g. a ring size means
    nothing to the bitmap design and is dropped), so combinations that would
    run the same thing become one cell.
    """
    cmd = command(spec.command)
    cmd.check_options(list(spec.fixed) + list(spec.axes))
    names = list(spec.axes)
    seen = set()
    cells = []
    for combo in itertools.product(*(spec.axes[n] for n in names)):
        options = dict(spec.fixed)
        options.update(zip(names, combo))
        options = cmd.normalize(options)
        key = cell_key(spec.command, options, spec.seed)
        if key in seen:
            continue
        seen.add(key)
        seed = int(key[:8], 16)          # derived from the inputs only
        cells.append(Cell(spec.command, options, key, seed))
    return cells
