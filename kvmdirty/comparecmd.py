"""The `kvmdirty compare` subcommand: parser and handler.

    kvmdirty compare                                   every design, one run each
    kvmdirty compare --dirty-rate 800M --ring-entries 1024,4096,16384,65536 \\
        --interval 10,100,1000 --repeat 3 --plot grid.png

Registered in kvmdirty/cli.py COMMANDS as ("compare", add_parser).
Exit status: 0 ok, 1 a run lost writes or broke the protocol, 2 bad usage.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, List

from .argtypes import dirty_rate, float_in, int_at_least, list_of, parse_size, positive_int

Handler = Callable[[argparse.Namespace], int]

EXAMPLES = """\
examples:
  kvmdirty compare                                   every design, the default workload
  kvmdirty compare --dirty-rate 800M --ring-entries 1024,4096,16384,65536 --interval 10,100,1000 \\
      --repeat 3 --plot grid.png                     which ring size and cadence stall vCPUs least
  kvmdirty compare --designs ring --dirty-rate 200M/vcpu --vcpus 2,4,8 --objective tracking-cpu

units: sizes are binary (4G = 4 GiB), rates decimal (800M = 800 MB/s); a guest write dirties
one 4 KiB page, so 800M is 195,312 page writes per second over the guest (as kvmdirty migrate).
"""


def _rate(text: str):
    from .workloads import MAX_RATE
    parts = [int_at_least(1, MAX_RATE)(p) for p in text.split(",")]
    return parts[0] if len(parts) == 1 else parts


def add_parser(sub) -> Handler:
    """Add ``compare`` to an argparse subparsers object; return its handler."""
    from .comparecolumns import help_text
    from .objective import OBJECTIVES
    from .runner import CHECKS
    from .workloads import PATTERNS, Workload
    d = Workload()
    objectives = "\n".join(f"  {k:<13} {v[1]}" for k, v in OBJECTIVES.items())
    p = sub.add_parser(
        "compare", help="compare dirty-tracking designs, live, over a grid of settings",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run one workload under every dirty-tracking design (vCPUs in real threads racing "
                    "a harvester on this host) and print what each cost, measured in the runs, and "
                    "whether any write was lost (none may be). Lists (a,b,c) of --memory, --vcpus, "
                    "--dirty-rate, --ring-entries and --interval run every combination, --repeat N "
                    "times each; rows are sorted by --objective, the best setting per design named.",
        epilog=f"{help_text()}\n\nobjectives (--objective):\n{objectives}\n\n{EXAMPLES}")
    g = p.add_argument_group("scenario")
    g.add_argument("--memory", type=list_of(parse_size), default=[4 << 30],
                   help="guest memory, or a comma list (default 4G)")
    g.add_argument("--vcpus", type=list_of(positive_int), default=[4], help="vCPUs, or a list (default 4)")
    g.add_argument("--slots", type=positive_int, default=1, help="memslots memory is split into (default 1)")
    g.add_argument("--dirty-rate", type=list_of(dirty_rate), default=None, metavar="RATE[,RATE...]",
                   help="pace the guest in real time at this dirty rate, bytes/s of page writes for the "
                        "whole guest (800M), or per vCPU with /vcpu (200M/vcpu); a list sweeps it. "
                        "Default: unpaced, --rate writes per step")
    g.add_argument("--pattern", choices=PATTERNS, default=None,
                   help="write pattern (default uniform; trace when --trace is given)")
    g.add_argument("--hot-fraction", type=float_in(0, 1, lo_open=True), default=d.hot_fraction,
                   help=f"hotcold: fraction of memory that is hot (default {d.hot_fraction})")
    g.add_argument("--hot-share", type=float_in(0, 1), default=d.hot_share,
                   help=f"hotcold: share of writes to hot pages (default {d.hot_share})")
    g.add_argument("--stride", type=positive_int, default=d.stride,
                   help=f"strided: pages between writes (default {d.stride})")
    g.add_argument("--zipf-s", type=float_in(0, 1000, lo_open=True), default=d.zipf_s,
                   help=f"zipf: exponent (default {d.zipf_s})")
    g.add_argument("--trace", help="trace: a timed trace (kvmdirty record's .npz, or .csv t_ns,gfn[,vcpu]), "
                                   "replayed at its pace; or a bare list of RAM pages (.npy or text)")
    g.add_argument("--speed", type=float_in(0, 1e6, lo_open=True), default=None,
                   help="timed trace: replay at its recorded pace times this (default 1)")
    g.add_argument("--trace-unit", choices=("pages", "bytes"), default="pages",
                   help="a CSV trace's second column: page numbers (default) or guest-physical "
                        "addresses in bytes")
    g.add_argument("--trace-end", choices=("loop", "stop"), default=None,
                   help="timed trace shorter than --duration: loop it, or stop at its end "
                        "(required then)")
    amount = g.add_mutually_exclusive_group()
    amount.add_argument("--writes", type=positive_int, default=None,
                        help="writes per vCPU (default 2000000; 20000 with --backend kvm)")
    amount.add_argument("--duration", type=float_in(0, 1e6, lo_open=True), default=None,
                        help="seconds per run instead of a write count (threads only; with "
                             "--dirty-rate the default is two --interval, 0.25 s to 1 s)")
    g.add_argument("--rate", type=_rate, default=None,
                   help="writes per step per vCPU, one number or a comma list (default 4096 "
                        "with threads, 1024 deterministic); with --dirty-rate, the largest batch")
    t = p.add_argument_group("tracking")
    t.add_argument("--designs", default=None,
                   help="comma list of designs (default: all; see --list-designs)")
    t.add_argument("--list-designs", action="store_true", help="print the designs and exit")
    t.add_argument("--ring-entries", type=list_of(int_at_least(1)), default=[4096],
                   help="dirty ring entries per vCPU (one shared ring: in all), or a list (default 4096)")
    t.add_argument("--interval", type=list_of(float_in(0, 3.6e6, lo_open=True)), default=[10.0],
                   help="threads: harvest every this many ms, or a list (default 10)")
    t.add_argument("--period", type=positive_int, default=8,
                   help="deterministic: harvest every this many steps (default 8)")
    o = p.add_argument_group("decision")
    o.add_argument("--repeat", type=positive_int, default=1,
                   help="runs per setting: the table shows the median and the runs' spread, and warns "
                        "when it is wide (default 1)")
    o.add_argument("--objective", choices=list(OBJECTIVES), default="stall",
                   help="what the rows are sorted by and the best setting minimises (default stall)")
    o.add_argument("--max-stall-ms", type=float_in(0, 1e9), default=None,
                   help="only settings whose longest single ring-full stall is at most this qualify")
    o.add_argument("--plot", metavar="FILE.png", help="the objective over the swept knobs, a panel per "
                   "design (needs matplotlib: the plot extra)")
    r = p.add_argument_group("run")
    mode = r.add_mutually_exclusive_group()
    mode.add_argument("--threads", dest="mode", action="store_const", const="threads",
                      help="vCPUs in threads, truly concurrent (default)")
    mode.add_argument("--deterministic", dest="mode", action="store_const", const="deterministic",
                      help="vCPUs interleaved in one thread by a seeded schedule")
    r.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the workload and schedule (default 0)")
    r.add_argument("--check", choices=CHECKS, default="shadow",
                   help="verifier: shadow copy (default), the kernel selftest's check, both, none")
    r.add_argument("--rounds", type=positive_int, default=None,
                   help="rounds with the vCPUs stopped in between (default 1; 8 with --check selftest)")
    r.add_argument("--backend", choices=("sim", "kvm"), default="sim",
                   help="simulator (default) or the real /dev/kvm (use small sizes)")
    r.add_argument("--json", action="store_true", help="machine-readable output, no progress bar")
    p.set_defaults(mode="threads")
    return run_compare


def _designs(args: argparse.Namespace) -> List[str]:
    from .collectors import BASE_DESIGNS, all_designs
    if args.designs:
        return [d.strip() for d in args.designs.split(",") if d.strip()]
    if args.backend == "kvm":
        return [d for d in all_designs() if d in BASE_DESIGNS]
    return all_designs()


def _base(args: argparse.Namespace):
    from .runner import RunSpec
    from .trace import is_timed
    from .workloads import Workload
    rounds = args.rounds or (8 if args.check in ("selftest", "both") else 1)
    pattern = args.pattern or ("trace" if args.trace else "uniform")
    speed = args.speed
    if args.trace and speed is None and is_timed(args.trace) and args.dirty_rate is None:
        speed = 1.0                       # a recorded trace replays at its own pace
    if speed is not None and not (args.trace and is_timed(args.trace)):
        raise ValueError("--speed replays a timed trace (.npz / .csv): give it with --trace")
    if args.trace_end and speed is None:
        raise ValueError("--trace-end applies to a timed trace replayed at its pace")
    if args.dirty_rate is not None and args.mode != "threads":
        raise ValueError("--dirty-rate paces vCPUs in real time: it needs threads, not --deterministic")
    if args.mode == "deterministic" and len(args.interval) > 1:
        raise ValueError("--interval is the threads' harvest cadence; deterministic runs use --period")
    return RunSpec(
        memory=args.memory[0], slots=args.slots, vcpus=args.vcpus[0],
        workload=Workload(pattern, hot_fraction=args.hot_fraction, hot_share=args.hot_share,
                          stride=args.stride, zipf_s=args.zipf_s, trace=args.trace),
        writes=args.writes or (20_000 if args.backend == "kvm" else 2_000_000),
        duration=args.duration,
        rate=args.rate or (4096 if args.mode == "threads" else 1024),
        mode=args.mode, period=args.period, interval=args.interval[0] / 1e3,
        ring_entries=args.ring_entries[0], rounds=rounds, check=args.check,
        seed=args.seed, backend=args.backend, trace_speed=speed, trace_end=args.trace_end,
        trace_unit=args.trace_unit)


def run_compare(args: argparse.Namespace) -> int:
    from .collectors import all_designs
    from .compare import compare_grid, to_json_text
    from .comparegrid import Knobs

    if args.list_designs:
        print("\n".join(all_designs()))
        return 0
    if args.backend == "kvm":
        from .info import kvm_unusable
        err = kvm_unusable()
        if err:
            print(f"kvmdirty compare: --backend kvm: {err}", file=sys.stderr)
            return 2
    if args.plot:
        from .compareplot import _import_pyplot
        _import_pyplot()                  # fail now, not after the runs
    base = _base(args)
    knobs = Knobs(_designs(args), args.memory, args.vcpus,
                  dirty_rate=args.dirty_rate or [None], ring_entries=args.ring_entries,
                  interval=[ms / 1e3 for ms in args.interval],
                  auto_duration=args.dirty_rate is not None and args.duration is None
                  and args.writes is None)
    with _progress(enabled=not args.json and sys.stderr.isatty()) as bar:
        report = compare_grid(base, knobs, args.repeat, args.objective, args.max_stall_ms,
                              on_run=bar.next_run, on_progress=bar.within, on_plan=bar.plan)
    if args.json:
        sys.stdout.write(to_json_text(report) + "\n")
    else:
        from .comparetable import render
        render(_console(), report)
    if args.plot:
        from .compareplot import plot
        plot(report.ranked, knobs, args.objective, args.plot)
        if not args.json:
            print(f"plot written to {args.plot}")
    return 0 if report.ok else 1


def _console():
    from .console import stdout_console
    return stdout_console(unfolded=True, highlight=False)


class _progress:
    """A rich progress bar on stderr over the grid's runs (only on a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.done = -1
        self._bar = self._task = None

    def __enter__(self) -> "_progress":
        return self

    def plan(self, total: int) -> None:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=Console(stderr=True), transient=True)
            self._bar.start()
            self._task = self._bar.add_task("compare", total=total)

    def next_run(self, setting, k: int) -> None:
        self.done += 1
        if self._bar is not None:
            label = setting.design + (f" {setting.ring_entries}" if setting.ring_entries else "") + \
                f" {setting.interval * 1e3:g} ms"
            self._bar.update(self._task, completed=self.done, description=f"{label:<28.28}")

    def within(self, fraction: float) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done + min(1.0, max(0.0, fraction)))

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
