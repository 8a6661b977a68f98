"""`kvmdirty sweep`: the command line of kvmdirty.sweep (rich progress and tables)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional

from .commands import command, names
from .spec import Constraint, Spec, load, parse_assignments


def add_parser(sub) -> "callable":
    p = sub.add_parser(
        "sweep", help="run a grid of compare or migrate runs, locally or on a Dask cluster",
        description="Run every combination of the axes of SPEC (a TOML or YAML file; see "
                    "examples/fleet.toml) as an independent cell, on local worker processes or a "
                    "Dask cluster, recording each cell's row as it finishes (results.jsonl, plus "
                    "results.parquet or results.csv). Running the same command again resumes: "
                    "finished cells are skipped. Ends with the best setting per axis value.",
        epilog="Exit status: 0 every cell ran and verified, 1 a cell failed or lost writes, "
               "2 bad usage, 130 interrupted (rerun to resume).")
    p.add_argument("spec", nargs="?", help="the spec file (.toml / .yaml); or use --command/--axis")
    g = p.add_argument_group("the grid (added to, or instead of, SPEC)")
    g.add_argument("--command", dest="sweep_command", choices=names(), help="what each cell runs")
    g.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a fixed option of every cell (repeatable)")
    g.add_argument("--axis", action="append", default=[], metavar="NAME=V1,V2,...",
                   help="an axis of the grid (repeatable)")
    g.add_argument("--seed", type=int, default=None, help="base seed (cells derive theirs from it)")
    g.add_argument("--out", help="results folder (default: the spec's, or ./sweep-results)")
    x = p.add_argument_group("where cells run")
    x.add_argument("--workers", type=int, default=None,
                   help="worker processes (local executor default 1; --scheduler local: Dask's default)")
    x.add_argument("--scheduler", default=None,
                   help="'local' for a Dask LocalCluster, or tcp://HOST:PORT of a running "
                        "dask.distributed scheduler (needs kvmdirty[dask])")
    x.add_argument("--table", choices=("parquet", "csv"), default=None,
                   help="results table format (default parquet when pyarrow is installed, else csv)")
    s = p.add_argument_group("summary")
    s.add_argument("--summarize", metavar="RESULTS",
                   help="summarise the results folder RESULTS instead of running anything")
    s.add_argument("--objective", help="metric to minimise, '-metric' to maximise "
                                       "(default: the spec's, else the command's)")
    s.add_argument("--constraint", action="append", default=[], metavar="'METRIC OP VALUE'",
                   help="keep only cells where this holds, e.g. 'downtime_s <= 0.3' (repeatable)")
    s.add_argument("--plot", help="write the summary plot here (default RESULTS/summary.png "
                                  "when matplotlib is installed)")
    s.add_argument("--json", action="store_true", help="print the summary as JSON, no progress bar")
    return _run


def _spec(args: argparse.Namespace) -> Spec:
    if args.spec:
        spec = load(args.spec)
    elif args.sweep_command:
        spec = Spec(args.sweep_command)
    else:
        raise ValueError("give a SPEC file, or --command with --axis/--set")
    if args.sweep_command and args.sweep_command != spec.command:
        raise ValueError(f"--command {args.sweep_command} differs from the spec's {spec.command!r}")
    fixed = dict(spec.fixed)
    fixed.update(parse_assignments(args.set, lists=False))
    axes = dict(spec.axes)
    for k, v in parse_assignments(args.axis, lists=True).items():
        fixed.pop(k, None)
        axes[k] = v
    for k in axes:
        fixed.pop(k, None)
    return Spec(spec.command, fixed=fixed, axes=axes,
                seed=spec.seed if args.seed is None else args.seed,
                out=args.out or spec.out, objective=args.objective or spec.objective,
                constraints=spec.constraints + [Constraint.parse(c) for c in args.constraint])


def _summary_inputs(args: argparse.Namespace, results: str, spec: Optional[Spec]):
    from .run import load_saved_spec
    from .store import read_rows
    rows = read_rows(results)
    saved = load_saved_spec(results) or {}
    cmd = spec.command if spec else saved.get("command")
    axes = list(spec.axes) if spec else list(saved.get("axes") or {})
    if not axes:
        raise ValueError(f"{results}: no spec.json naming the axes; summarise with the spec")
    objective = args.objective or (spec.objective if spec else saved.get("objective"))
    if not objective and cmd:
        objective = command(cmd).objective
    constraints = [Constraint.parse(c) for c in args.constraint]
    if not args.constraint:
        constraints = list(spec.constraints) if spec else \
            [Constraint.parse(c) for c in saved.get("constraints") or []]
    return rows, axes, objective, constraints, (command(cmd).show if cmd else _plain)


def _plain(name: str, value: Any) -> str:
    return "n/a" if value is None else str(value)


def _report(args: argparse.Namespace, results: str, spec: Optional[Spec]) -> None:
    from .summary import plot, summarize
    rows, axes, objective, constraints, show = _summary_inputs(args, results, spec)
    summary = summarize(rows, axes, objective, constraints)
    plot_path = args.plot
    if plot_path is None:
        try:
            import matplotlib  # noqa: F401
            plot_path = os.path.join(results, "summary.png")
        except ImportError:
            plot_path = None
    if plot_path and summary.feasible:
        plot(rows, summary, plot_path, show)
    if args.json:
        import dataclasses
        doc = dataclasses.asdict(summary)
        doc["plot"] = plot_path
        json.dump(doc, sys.stdout, indent=2, default=str, allow_nan=False)
        sys.stdout.write("\n")
        return
    _print_summary(summary, plot_path, show)


def _print_summary(summary, plot_path: Optional[str], show) -> None:
    from ..console import stdout_console
    from rich.table import Table
    con = stdout_console()     # a closed stdout: exit 141, as every command
    goal = f"{'highest' if summary.maximise else 'lowest'} {summary.objective}"
    if summary.constraints:
        goal += f" subject to {', '.join(summary.constraints)}"
    con.print(f"{summary.cells} cells: {summary.ok} ran, {summary.failed} failed, "
              f"{summary.feasible} feasible; best = {goal}")
    t = Table("axis", "value", summary.objective, "feasible", "best setting")
    for b in summary.per_value:
        t.add_row(b.axis, show(b.axis, b.value), "-" if b.objective is None else f"{b.objective:.6g}",
                  f"{b.feasible}/{b.total}", _setting(b.setting, show, skip=b.axis))
    con.print(t)
    if summary.overall and summary.overall.objective is not None:
        con.print(f"overall best: {_setting(summary.overall.setting, show)}  "
                  f"({summary.objective} = {summary.overall.objective:.6g})")
    if plot_path and summary.feasible:
        con.print(f"plot: {plot_path}")


def _setting(setting: Dict[str, Any], show, skip: str = "") -> str:
    # An option a cell's design does not use (a ring size under bitmap) shows as n/a.
    return ", ".join(f"{k}={show(k, v)}" for k, v in setting.items() if k != skip) or "-"


def _run(args: argparse.Namespace) -> int:
    from .execute import make_executor
    from .run import plan, run_sweep
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.summarize:
        _report(args, args.summarize, None)
        return 0
    spec = _spec(args)
    cells = plan(spec)                 # bad options fail here, before any worker starts
    executor = make_executor(args.scheduler, args.workers)
    state: Dict[str, Any] = {"done": 0, "failed": 0}
    progress = None
    if not args.json and sys.stderr.isatty():
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)
        progress = Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn(),
                            TextColumn("ETA"), TimeRemainingColumn(), transient=True)
    task: List[Any] = []

    def on_start(total: int, skipped: int) -> None:
        if skipped:
            print(f"resuming: {skipped} of {total} cells already done", file=sys.stderr)
        if progress is not None:
            progress.start()
            task.append(progress.add_task("sweep", total=total - skipped, failed=0))

    def on_row(row: Dict[str, Any]) -> None:
        state["done"] += 1
        state["failed"] += row.get("status") != "ok"
        if progress is not None:
            progress.update(task[0], advance=1, failed=state["failed"])

    try:
        if hasattr(executor, "__enter__"):
            with executor:
                result = run_sweep(spec, executor, on_start=on_start, on_row=on_row, table=args.table)
        else:
            result = run_sweep(spec, executor, on_start=on_start, on_row=on_row, table=args.table)
    except KeyboardInterrupt:
        if progress is not None:
            progress.stop()
        print(f"kvmdirty sweep: interrupted after {state['done']} of {len(cells)} cells; "
              f"run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        if progress is not None:
            progress.stop()
    lost = sum(1 for r in result.rows if r.get("verified") is False)
    if not args.json:
        print(f"{result.cells} cells ({result.skipped} already done, {len(result.rows)} run now on "
              f"{executor.describe}; {result.failed} failed, {lost} lost writes); "
              f"results in {result.out}")
    _report(args, result.out, spec)
    return 1 if result.failed or lost else 0
