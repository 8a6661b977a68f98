"""The `kvmdirty` command.

Subcommands are registered in COMMANDS: each entry adds its parser and
returns the function that runs it (``args -> exit status``), so new ones
(e.g. ``bench``) are one function and one line.

    kvmdirty compare   every dirty-tracking design on one workload (the main job)
    kvmdirty info      what this machine's /dev/kvm offers (kvmdirty.info)

Exit status: 0 ok, 1 a run lost writes or broke the protocol, 2 bad usage
(always exactly one line on stderr, never a traceback), 130 interrupted,
141 stdout closed early (e.g. ``| head``: quietly, as a tool killed by
SIGPIPE).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable, Dict, List, NoReturn, Optional

from . import units
from .bench import add_parser as _add_bench
from .host.command import add_dirtyrate as add_dirtyrate_parser
from .host.command import add_record as add_record_parser
from .migrate.command import add_calibrate_parser, add_migrate_parser
from .sweep.command import add_parser as _add_sweep

Handler = Callable[[argparse.Namespace], int]

class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``kvmdirty compare: error: ...`` and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line(message)}\n")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def parse_size(text: str) -> int:
    """'4G', '512MiB', '1.5g', '65536' (bytes) -> bytes; binary units (kvmdirty.units)."""
    try:
        return units.parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _int_at_least(lo: int, hi: Optional[int] = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi}, got {v}")
        return v
    return parse


_positive_int = _int_at_least(1)


def _float_in(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Callable[[str], float]:
    """A finite float in [lo, hi] (open at either end if asked): NaN and inf never pass."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
            left, right = "(" if lo_open else "[", ")" if hi_open else "]"
            raise argparse.ArgumentTypeError(f"must be in {left}{lo:g}, {hi:g}{right}, got {v:g}")
        return v
    return parse


def _rate(text: str):
    from .workloads import MAX_RATE
    parts = [_int_at_least(1, MAX_RATE)(p) for p in text.split(",")]
    return parts[0] if len(parts) == 1 else parts


# -- compare ----------------------------------------------------------------
def _add_compare(sub) -> Handler:
    from .runner import CHECKS
    from .workloads import PATTERNS, Workload
    d = Workload()
    p = sub.add_parser("compare", help="compare every dirty-tracking design on one workload",
                       description="Run one workload under every dirty-tracking design and print "
                                   "what each one cost, measured in this run, and whether it lost "
                                   "any write (it must not).")
    g = p.add_argument_group("scenario")
    g.add_argument("--memory", type=parse_size, default=4 << 30, help="guest memory (default 4G)")
    g.add_argument("--vcpus", type=_positive_int, default=4, help="vCPUs (default 4)")
    g.add_argument("--slots", type=_positive_int, default=1, help="memslots memory is split into (default 1)")
    g.add_argument("--pattern", choices=PATTERNS, default=None,
                   help="write pattern (default uniform; trace when --trace is given)")
    g.add_argument("--hot-fraction", type=_float_in(0, 1, lo_open=True), default=d.hot_fraction,
                   help=f"hotcold: fraction of memory that is hot (default {d.hot_fraction})")
    g.add_argument("--hot-share", type=_float_in(0, 1), default=d.hot_share,
                   help=f"hotcold: share of writes to hot pages (default {d.hot_share})")
    g.add_argument("--stride", type=_positive_int, default=d.stride,
                   help=f"strided: pages between writes (default {d.stride})")
    g.add_argument("--zipf-s", type=_float_in(0, 1000, lo_open=True), default=d.zipf_s, help=f"zipf: exponent (default {d.zipf_s})")
    g.add_argument("--trace", help="trace: a timed trace (kvmdirty record's .npz, or .csv t_ns,gfn[,vcpu]), "
                                   "replayed at its pace; or a bare list of RAM pages (.npy or text)")
    g.add_argument("--speed", type=_float_in(0, 1e6, lo_open=True), default=None,
                   help="timed trace: replay at its recorded pace times this (default 1)")
    g.add_argument("--trace-unit", choices=("pages", "bytes"), default="pages",
                   help="a CSV trace's second column: page numbers (default) or guest-physical "
                        "addresses in bytes")
    g.add_argument("--trace-end", choices=("loop", "stop"), default=None,
                   help="timed trace shorter than --duration: loop it, or stop at its end "
                        "(required then)")
    amount = g.add_mutually_exclusive_group()
    amount.add_argument("--writes", type=_positive_int, default=None,
                        help="writes per vCPU (default 2000000; 20000 with --backend kvm)")
    amount.add_argument("--duration", type=_float_in(0, 1e6, lo_open=True), default=None,
                        help="seconds per design instead of a write count (threads only)")
    g.add_argument("--rate", type=_rate, default=None,
                   help="writes per step per vCPU, one number or a comma list (default 4096 "
                        "with threads, 1024 deterministic)")
    t = p.add_argument_group("tracking")
    t.add_argument("--designs", default=None,
                   help="comma list of designs (default: all; see --list-designs)")
    t.add_argument("--list-designs", action="store_true", help="print the designs and exit")
    t.add_argument("--ring-entries", type=_positive_int, default=4096,
                   help="dirty ring entries per vCPU (default 4096)")
    t.add_argument("--interval", type=_float_in(0, 3.6e6, lo_open=True), default=10.0,
                   help="threads: harvest every this many ms (default 10)")
    t.add_argument("--period", type=_positive_int, default=8,
                   help="deterministic: harvest every this many steps (default 8)")
    r = p.add_argument_group("run")
    mode = r.add_mutually_exclusive_group()
    mode.add_argument("--threads", dest="mode", action="store_const", const="threads",
                      help="vCPUs in threads, truly concurrent (default)")
    mode.add_argument("--deterministic", dest="mode", action="store_const", const="deterministic",
                      help="vCPUs interleaved in one thread by a seeded schedule")
    r.add_argument("--seed", type=_int_at_least(0), default=0, help="seed of the workload and schedule (default 0)")
    r.add_argument("--check", choices=CHECKS, default="shadow",
                   help="verifier: shadow copy (default), the kernel selftest's check, both, none")
    r.add_argument("--rounds", type=_positive_int, default=None,
                   help="rounds with the vCPUs stopped in between (default 1; 8 with --check selftest)")
    r.add_argument("--backend", choices=("sim", "kvm"), default="sim",
                   help="simulator (default) or the real /dev/kvm (use small sizes)")
    r.add_argument("--json", action="store_true", help="machine-readable output, no progress bar")
    p.set_defaults(mode="threads")
    return _compare


def _compare(args: argparse.Namespace) -> int:
    from .collectors import BASE_DESIGNS, all_designs
    from .compare import compare, format_table, to_json_text
    from .progress import Progress
    from .runner import RunSpec
    from .trace import is_timed
    from .workloads import Workload

    if args.list_designs:
        print("\n".join(all_designs()))
        return 0
    if args.backend == "kvm":
        from .info import kvm_unusable
        err = kvm_unusable()
        if err:
            print(f"kvmdirty compare: --backend kvm: {err}", file=sys.stderr)
            return 2
    designs: Optional[List[str]] = None
    if args.designs:
        designs = [d.strip() for d in args.designs.split(",") if d.strip()]
    elif args.backend == "kvm":
        designs = [d for d in all_designs() if d in BASE_DESIGNS]
    rounds = args.rounds or (8 if args.check in ("selftest", "both") else 1)
    pattern = args.pattern or ("trace" if args.trace else "uniform")
    speed = args.speed
    if args.trace and speed is None and is_timed(args.trace):
        speed = 1.0                       # a recorded trace replays at its own pace
    if speed is not None and not (args.trace and is_timed(args.trace)):
        raise ValueError("--speed replays a timed trace (.npz / .csv): give it with --trace")
    if args.trace_end and speed is None:
        raise ValueError("--trace-end applies to a timed trace replayed at its pace")
    spec = RunSpec(
        memory=args.memory, slots=args.slots, vcpus=args.vcpus,
        workload=Workload(pattern, hot_fraction=args.hot_fraction, hot_share=args.hot_share,
                          stride=args.stride, zipf_s=args.zipf_s, trace=args.trace),
        writes=args.writes or (20_000 if args.backend == "kvm" else 2_000_000),
        duration=args.duration,
        rate=args.rate or (4096 if args.mode == "threads" else 1024),
        mode=args.mode, period=args.period, interval=args.interval / 1e3,
        ring_entries=args.ring_entries, rounds=rounds, check=args.check,
        seed=args.seed, backend=args.backend, trace_speed=speed, trace_end=args.trace_end,
        trace_unit=args.trace_unit)
    with Progress(len(designs or all_designs()), enabled=None if not args.json else False) as bar:
        results = compare(spec, designs, progress=bar)
    if args.json:
        sys.stdout.write(to_json_text(results, spec) + "\n")
    else:
        print(format_table(results, spec))
    return 0 if all(r.ok for r in results) else 1


# -- info -------------------------------------------------------------------
def _add_info(sub) -> Handler:
    sub.add_parser("info", help="what this machine's /dev/kvm offers for dirty tracking")
    return _info


def _info(args: argparse.Namespace) -> int:
    from .info import format_info, kvm_info
    print(format_info(kvm_info()))
    return 0


#: (name, register): register(subparsers) adds the parser and returns its handler.
COMMANDS = [
    ("compare", _add_compare),
    ("info", _add_info),
    ("bench", _add_bench),
    ("migrate", add_migrate_parser),
    ("calibrate", add_calibrate_parser),
    ("record", add_record_parser),
    ("dirtyrate", add_dirtyrate_parser),
    ("sweep", _add_sweep),
]


def build_parser() -> "tuple[argparse.ArgumentParser, Dict[str, Handler]]":
    parser = _Parser(
        prog="kvmdirty", description="Linux KVM dirty-page tracking, simulated and real.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"kvmdirty {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    handlers = {name: register(sub) for name, register in COMMANDS}
    return parser, handlers


#: Exit status when stdout was closed under us (128 + SIGPIPE, as a shell reports it).
EXIT_BROKEN_PIPE = 141


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command; bad input of any kind ends in one stderr line and exit 2."""
    try:
        parser, handlers = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            sys.stdout.flush()
            return 2
        try:
            status = handlers[args.command](args)
            sys.stdout.flush()
            return status
        except BrokenPipeError:
            raise
        # Bad input reaches here as these (a huge size may surface as MemoryError
        # or OverflowError from numpy): one line, never a traceback.
        except (ValueError, OSError, OverflowError, MemoryError) as e:
            print(f"kvmdirty {args.command}: error: {_one_line(e) or type(e).__name__}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"kvmdirty {args.command}: interrupted", file=sys.stderr)
            return 130
    except BrokenPipeError:
        # The reader went away (``| head``). As the Python docs advise: point
        # stdout at /dev/null so the interpreter's final flush cannot fail
        # again, and exit quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
