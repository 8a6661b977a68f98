"""Grids of runs: ``kvmdirty sweep`` over parameter axes and trace collections.

Each cell of the grid is an independent task with its own derived seed, run by
local worker processes or on a Dask cluster; its row is recorded as soon as it
finishes, so an interrupted sweep resumes where it stopped.

    from kvmdirty.sweep import Spec, LocalExecutor, run_sweep
    spec = Spec("compare", fixed={"memory": "256M", "writes": 20000},
                axes={"design": ["bitmap", "ring"], "ring_entries": [1024, 4096]})
    run = run_sweep(spec, LocalExecutor(2))
"""
from .cells import Cell, expand
from .execute import DaskExecutor, LocalExecutor, make_executor, run_cell
from .run import SweepRun, run_sweep
from .spec import Constraint, Spec, load
from .store import ResultStore, read_rows
from .summary import Summary, summarize

__all__ = ["Cell", "Constraint", "DaskExecutor", "LocalExecutor", "ResultStore", "Spec", "Summary",
           "SweepRun", "expand", "load", "make_executor", "read_rows", "run_cell", "run_sweep",
           "summarize"]
