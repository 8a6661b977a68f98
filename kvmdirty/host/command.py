"""The `kvmdirty record` and `kvmdirty dirtyrate` subcommands (registered in kvmdirty.cli.COMMANDS)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, List

Handler = Callable[[argparse.Namespace], int]


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def _periods(text: str) -> List[float]:
    return [_positive_float(p) for p in text.split(",") if p.strip()]


# -- record -----------------------------------------------------------------
def add_record(sub) -> Handler:
    from .workloads_real import BUILTINS
    p = sub.add_parser(
        "record", help="record a timed dirty-page trace of a real workload (host kernel tracking)",
        description="Run a real workload in this process while the host kernel tracks every "
                    "write to the process's anonymous memory (userfaultfd write-protect + "
                    "PAGEMAP_SCAN, Linux >= 6.7, root or vm.unprivileged_userfaultfd=1 or "
                    "UFFD_USER_MODE_ONLY), and write the pages written per interval as a trace "
                    "(.npz, see docs/host.md).")
    w = p.add_mutually_exclusive_group(required=True)
    w.add_argument("--workload", choices=sorted(BUILTINS), help="a built-in real workload")
    w.add_argument("--python", metavar="MODULE:FUNCTION",
                   help="your own callable, called repeatedly (a generator function: advanced)")
    p.add_argument("--seconds", type=_positive_float, default=5.0, help="how long (default 5)")
    p.add_argument("--interval", type=_positive_float, default=10.0,
                   help="harvest every this many ms (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the built-in workload (default 0)")
    p.add_argument("-o", "--output", required=True, metavar="TRACE.npz", help="where to write the trace")
    return _record


def _record(args: argparse.Namespace) -> int:
    import numpy as np
    from .record import record
    from .tracker import HostTrackingUnsupported
    from .workloads_real import make, python_workload
    if not args.output.endswith(".npz"):
        print("kvmdirty record: the output must be an .npz file", file=sys.stderr)
        return 2
    step = python_workload(args.python) if args.python else make(args.workload, args.seed)
    name = args.python or args.workload
    try:
        trace = record(step, args.seconds, interval_s=args.interval / 1e3, workload=name)
    except HostTrackingUnsupported as e:
        print(f"kvmdirty record: {e.strerror}", file=sys.stderr)
        return 2
    trace.save(args.output)
    m = trace.meta
    distinct = len(np.unique(trace.gfn))
    print(f"{args.output}: {name}, {m['duration_ns'] / 1e9:.2f} s, {m['samples']} samples every "
          f"{args.interval:g} ms, {len(trace)} events, {distinct} distinct pages of "
          f"{m['memory_bytes'] >> 20} MiB tracked; harvest {m['harvest_s_total'] / max(1, m['samples']) * 1e3:.3f} ms "
          f"per sample")
    return 0


# -- dirtyrate --------------------------------------------------------------
def add_dirtyrate(sub) -> Handler:
    from .dirtyrate import (DEFAULT_PERIODS_S, DEFAULT_REAP_INTERVAL_S, DEFAULT_RING_ENTRIES,
                            DEFAULT_SAMPLE_PAGES)
    p = sub.add_parser(
        "dirtyrate", help="QEMU's dirty-rate estimators over a trace, against the truth",
        description="Compute QEMU's calc-dirty-rate estimates (page-sampling, dirty ring, dirty "
                    "bitmap) over a trace for several periods, beside the true distinct-page and "
                    "write rates, with each estimator's error.")
    p.add_argument("trace", metavar="TRACE", help="a trace: .npz (kvmdirty record) or CSV t_ns,gfn[,vcpu]")
    p.add_argument("--trace-unit", choices=("pages", "bytes"), default="pages",
                   help="CSV second column: gfn (pages, default) or guest-physical address (bytes)")
    p.add_argument("--memory", default=None, help="guest memory size for a CSV trace (e.g. 4G; "
                   "default one page past the highest gfn)")
    p.add_argument("--periods", type=_periods, default=list(DEFAULT_PERIODS_S),
                   help="comma list of periods in seconds (default %s)" % ",".join(f"{x:g}" for x in DEFAULT_PERIODS_S))
    p.add_argument("--sample-pages", type=int, default=DEFAULT_SAMPLE_PAGES,
                   help=f"page-sampling: pages per GiB (QEMU default {DEFAULT_SAMPLE_PAGES}, 128..16384)")
    p.add_argument("--ring-entries", type=int, default=DEFAULT_RING_ENTRIES,
                   help=f"ring: entries per vCPU ring; reaped when soft-full, 64 short "
                        f"(default {DEFAULT_RING_ENTRIES})")
    p.add_argument("--reap-interval", type=_positive_float, default=DEFAULT_REAP_INTERVAL_S,
                   help=f"ring: seconds between reaps (QEMU's reaper: {DEFAULT_REAP_INTERVAL_S:g})")
    p.add_argument("--seed", type=int, default=0, help="seed of the page sampling (default 0)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return _dirtyrate


def _dirtyrate(args: argparse.Namespace) -> int:
    from ..cli import parse_size
    from .dirtyrate import estimate, format_table
    from ..trace import load
    memory = parse_size(args.memory) if args.memory else None
    trace = load(args.trace, unit=args.trace_unit, memory_bytes=memory)
    rows = estimate(trace, args.periods, sample_pages_per_gib=args.sample_pages,
                    ring_entries=args.ring_entries, reap_interval_s=args.reap_interval, seed=args.seed)
    if args.json:
        meta = {k: v for k, v in trace.meta.items() if k != "regions"}
        json.dump({"trace": meta, "rows": [r.to_dict() for r in rows]}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_table(rows, trace, sample_pages_per_gib=args.sample_pages))
    return 0
