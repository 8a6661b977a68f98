"""The `kvmdirty migrate` and `kvmdirty calibrate` subcommands.

    kvmdirty migrate --scenario seed-001 --plot t.png
    kvmdirty migrate --designs bitmap,clear-log,ring --memory 8G --dirty-rate 200M,400M --bandwidth 10Gb/s
    kvmdirty migrate --mode checkpoint --designs bitmap,ring --memory 4G,64G --epoch 0.1
    kvmdirty calibrate --out host.json ; kvmdirty migrate --costs host.json ...

Registered in kvmdirty/cli.py COMMANDS as ("migrate", add_migrate_parser)
and ("calibrate", add_calibrate_parser); each returns its handler.
Exit status: 0 ok, 1 a destination differed from its source, 2 bad usage.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from typing import Any, Callable, Dict, List

from .config import AIDS, QEMU_MAX_BANDWIDTH, MigrationConfig
from .costs import COST_DOC, Costs, resolve
from .scenarios import SCENARIOS
from .trackers import DESIGNS
from ..trace import is_timed
from ..units import fmt_bytes, fmt_rate, fmt_time, parse_list, parse_rate, parse_size

Handler = Callable[[argparse.Namespace], int]


def _arg(fn):
    def parse(text: str):
        try:
            return fn(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def _designs(text: str) -> List[str]:
    out = parse_list(text, str.strip)
    for d in out:
        if d not in DESIGNS:
            raise ValueError(f"unknown design {d!r}; known: {', '.join(DESIGNS)}")
    return out


def _cost(text: str):
    name, sep, val = text.partition("=")
    if not sep or name not in COST_DOC:
        raise ValueError(f"--cost takes NAME=SECONDS with NAME one of {', '.join(COST_DOC)}")
    return name, float(val)


def add_migrate_parser(sub) -> Handler:
    """Add ``migrate`` to an argparse subparsers object; return its handler."""
    p = sub.add_parser(
        "migrate", help="live migration / checkpointing over a real tracker, in virtual time",
        description="Migrate (or checkpoint) a simulated guest with QEMU's pre-copy algorithm over "
                    "a real dirty tracker: guest writes, protection, harvests and the destination "
                    "copy are executed; time is virtual, charged from a measured cost table. "
                    "Lists (a,b,c) run every combination, one row each. Rates are decimal "
                    "(800M = 800 MB/s; 10Gb/s is bits), sizes binary (24G = 24 GiB).")
    p.add_argument("--scenario", choices=sorted(SCENARIOS), help="a named scenario (its parameters "
                   "first, then any option given here)")
    p.add_argument("--mode", choices=("migrate", "checkpoint"), default="migrate")
    p.add_argument("--designs", type=_arg(_designs), help=f"trackers (default bitmap): {', '.join(DESIGNS)}")
    p.add_argument("--memory", type=_arg(lambda t: parse_list(t, parse_size)), help="guest memory (default 4G)")
    p.add_argument("--vcpus", type=int, help="vCPUs (default 4)")
    p.add_argument("--dirty-rate", type=_arg(lambda t: parse_list(t, parse_rate)),
                   help="guest page writes in bytes/s, over all vCPUs (default 100M)")
    p.add_argument("--vcpu-dirty-rates", type=_arg(lambda t: parse_list(t, parse_rate)),
                   help="one rate per vCPU instead (sets --vcpus and the dirty rate)")
    p.add_argument("--pattern", help="write pattern of kvmdirty.workloads (default uniform)")
    p.add_argument("--trace", help="trace file for --pattern trace: its pages, replayed at --dirty-rate; "
                                   "with --speed, a timed trace (kvmdirty record, .npz / .csv) at its own pace")
    p.add_argument("--speed", type=float, default=None,
                   help="replay --trace at its recorded pace times this (default 1 for a timed "
                        ".npz / .csv trace); the trace sets the dirtying, --dirty-rate is not used")
    p.add_argument("--trace-unit", choices=("pages", "bytes"), default=None,
                   help="a CSV trace's second column: page numbers (default) or guest-physical "
                        "addresses in bytes")
    p.add_argument("--trace-end", choices=("loop", "stop"), default=None,
                   help="a migration that outlasts the timed trace loops it or stops writing at its "
                        "end (required when that happens)")
    p.add_argument("--bandwidth", type=_arg(lambda t: parse_list(t, parse_rate)),
                   help="link speed (default 10Gb/s)")
    p.add_argument("--max-bandwidth", type=_arg(lambda t: t if t == "link" else parse_rate(t)),
                   help="QEMU max-bandwidth, or 'link' (default QEMU's 128MiB/s)")
    p.add_argument("--downtime-limit", type=float, help="QEMU downtime-limit in ms (default 300)")
    p.add_argument("--ring-entries", type=_arg(lambda t: parse_list(t, int)), help="dirty ring entries per vCPU (default 4096)")
    p.add_argument("--pml", action="store_true", default=None,
                   help="Intel PML: rings keep 512 more entries in reserve (an earlier soft limit)")
    p.add_argument("--reaper-period", type=float, help="ring reaper wake-up period, s (default 1)")
    p.add_argument("--clear-shift", type=int, help="clear-log chunk: 2^N pages (default 18)")
    p.add_argument("--aid", choices=AIDS, help="convergence aid (default none)")
    p.add_argument("--tailslow", action="store_true", default=None, help="auto-converge: cpu-throttle-tailslow")
    p.add_argument("--dirty-limit", type=float, help="dirty-limit: vcpu-dirty-limit MB/s (default 1)")
    p.add_argument("--postcopy-after", type=int, help="switch to postcopy after N syncs (default: never)")
    p.add_argument("--postcopy-rtt", type=float, help="postcopy page request round trip, s (default 100e-6)")
    p.add_argument("--max-time", type=float, help="give up after this many virtual seconds (default 600)")
    p.add_argument("--max-rounds", type=int, help="give up after this many syncs (default: no limit)")
    p.add_argument("--quantum", type=float, help="virtual seconds per scheduling step (default 0.01)")
    p.add_argument("--seed", type=int, help="workload seed (default 1)")
    p.add_argument("--fault", action="append", default=[], metavar="NAME",
                   help="inject a kernel ordering bug (kvmdirty.FAULTS): the destination check must fail")
    p.add_argument("--costs", metavar="FILE", help="cost profile from `kvmdirty calibrate` (default: the shipped one)")
    p.add_argument("--cost", type=_arg(_cost), action="append", default=[], metavar="NAME=SECONDS",
                   help="override one cost entry")
    g = p.add_argument_group("checkpoint mode")
    g.add_argument("--epoch", type=float, default=None, help="seconds of guest time per checkpoint (default 0.1)")
    g.add_argument("--epoch-pages", type=int, default=None, help="checkpoint when the guest has dirtied this many pages")
    g.add_argument("--checkpoints", type=int, default=50, help="checkpoints per run (default 50)")
    p.add_argument("--rounds", action="store_true", help="print each run's per-round table (default when <= 4 runs)")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="timeline of each run (needs matplotlib)")
    return _run_migrate


def _configs(args: argparse.Namespace) -> List[MigrationConfig]:
    base: Dict[str, Any] = {}
    designs = ["bitmap"]
    if args.scenario:
        sc = SCENARIOS[args.scenario]
        base.update(sc["config"])
        designs = list(sc["designs"])
    simple = {"vcpus": args.vcpus, "pattern": args.pattern, "trace": args.trace,
              "reaper_period": args.reaper_period, "clear_shift": args.clear_shift,
              "aid": args.aid, "tailslow": args.tailslow, "dirty_limit_mb": args.dirty_limit,
              "max_time": args.max_time, "postcopy_after": args.postcopy_after,
              "postcopy_rtt": args.postcopy_rtt, "max_rounds": args.max_rounds, "quantum": args.quantum,
              "seed": args.seed, "pml": args.pml, "trace_speed": args.speed,
              "trace_end": args.trace_end, "trace_unit": args.trace_unit}
    base.update({k: v for k, v in simple.items() if v is not None})
    if args.trace and args.pattern is None:
        base["pattern"] = "trace"
    if args.trace and args.speed is None and is_timed(args.trace):
        base["trace_speed"] = 1.0         # a recorded trace replays at its own pace
    if args.downtime_limit is not None:
        base["downtime_limit"] = args.downtime_limit / 1000.0
    if args.fault:
        base["faults"] = tuple(args.fault)
    if args.vcpu_dirty_rates:
        base["vcpu_dirty_rates"] = tuple(args.vcpu_dirty_rates)
        base["vcpus"] = len(args.vcpu_dirty_rates)
    designs = args.designs or designs
    lists = {
        "memory": args.memory or [base.get("memory", 4 << 30)],
        "dirty_rate": args.dirty_rate or [base.get("dirty_rate", 100e6)],
        "bandwidth": args.bandwidth or [base.get("bandwidth", 1.25e9)],
    }
    rings = args.ring_entries or [base.get("ring_entries", 4096)]
    out = []
    for d, mem, rate, bw in itertools.product(designs, lists["memory"], lists["dirty_rate"],
                                              lists["bandwidth"]):
        for ring in (rings if d == "ring" else rings[:1]):
            kw = dict(base, design=d, memory=mem, bandwidth=bw, ring_entries=ring)
            if not args.vcpu_dirty_rates:
                kw["dirty_rate"] = rate
            mb = args.max_bandwidth if args.max_bandwidth is not None else base.get("max_bandwidth")
            kw["max_bandwidth"] = bw if mb == "link" else (mb if mb is not None else QEMU_MAX_BANDWIDTH)
            out.append(MigrationConfig(**kw))
    return out


def _run_migrate(args: argparse.Namespace) -> int:
    costs = resolve(args.costs)
    if args.cost:
        costs = costs.override(dict(args.cost))
    cfgs = _configs(args)
    if args.mode == "checkpoint":
        from .checkpoint import CheckpointConfig, format_checkpoints, run_checkpoints
        results = [run_checkpoints(CheckpointConfig.from_migration(
            c, epoch=args.epoch, epoch_pages=args.epoch_pages, checkpoints=args.checkpoints), costs)
            for c in cfgs]
        if args.json:
            json.dump(dict(_envelope(args, cfgs), costs=costs.to_json(),
                           results=[r.to_json() for r in results]), sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            print(format_checkpoints(results))
        return 0 if all(r.verified for r in results) else 1
    from .precopy import run
    results = []
    for c in cfgs:
        if not args.json:
            dirtying = (f"trace at {c.trace_speed:g}x its pace" if c.trace_speed is not None
                        else fmt_rate(c.dirty_rate))
            print(f"running {c.design} {fmt_bytes(c.memory)} {dirtying} "
                  f"over {fmt_rate(c.bandwidth)} ...", file=sys.stderr, flush=True)
        results.append(run(c, costs))
    if args.json:
        json.dump(dict(_envelope(args, cfgs), costs=costs.to_json(),
                       results=[r.to_json() for r in results]), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        if args.scenario:
            print(f"scenario {args.scenario}: {SCENARIOS[args.scenario]['about']}\n")
        print(f"costs: {args.costs or 'shipped default profile'} ({costs.machine})\n")
        print(format_summary(results))
        if args.rounds or len(results) <= 4:
            for r in results:
                print()
                print(format_rounds(r))
    if args.plot:
        from .plot import plot_timelines
        plot_timelines(results, args.plot)
        if not args.json:
            print(f"\nplot written to {args.plot}")
    bad = [r for r in results if not r.verified]
    for r in bad:
        print(f"kvmdirty migrate: {r.design}: destination differs from source at gfns "
              f"{r.mismatched_gfns[:16]}", file=sys.stderr)
    return 1 if bad else 0


def _envelope(args: argparse.Namespace, cfgs: List[MigrationConfig]) -> Dict[str, Any]:
    """The JSON keys migrate shares with compare (kvmdirty.runinfo): schema, meta, scenario."""
    import dataclasses

    from ..runinfo import envelope, scenario
    params = dataclasses.asdict(cfgs[0])
    params.pop("design")
    lists = {"designs": list(dict.fromkeys(c.design for c in cfgs))}
    for k in ("memory", "dirty_rate", "bandwidth", "ring_entries"):
        lists[k] = list(dict.fromkeys(getattr(c, k) for c in cfgs))
    swept = [k for k, v in lists.items() if len(v) > 1 and k != "designs"]
    for k, v in lists.items():
        params[k] = v if (len(v) > 1 or k == "designs") else v[0]
    params["mode"] = args.mode
    about = SCENARIOS[args.scenario]["about"] if args.scenario else None
    return envelope("migrate", "sim", "virtual", scenario(params, swept, name=args.scenario, about=about))


def format_summary(results) -> str:
    head = ("design", "ring", "memory", "dirty", "link", "conv", "total", "downtime", "sent",
            "rounds", "stall/vcpu", "thrott/vcpu", "progress", "verified", "wall")
    rows = [head]
    for r in results:
        p = r.params
        n = max(1, len(r.vcpus))
        rows.append((r.design, str(p["ring_entries"]) if r.design == "ring" else "-",
                     fmt_bytes(p["memory"]), fmt_rate(p["dirty_rate"]), fmt_rate(p["bandwidth"]),
                     "yes" if r.converged else "NO", fmt_time(r.total_time), fmt_time(r.downtime),
                     f"{r.sent_ratio:.2f}x", str(r.rounds),
                     fmt_time(sum(v.stall_time for v in r.vcpus) / n),
                     fmt_time(sum(v.throttle_time for v in r.vcpus) / n),
                     f"{100 * r.progress:.1f}%", "ok" if r.verified else "MISMATCH",
                     f"{r.wall_time:.1f} s"))
    out = _table(rows)
    notes = [f"  {r.design}: {r.why}" for r in results if not r.converged or r.postcopy_faults]
    notes += [f"  {r.design}: the trace " + ("stopped at its end" if r.trace_stopped else
                                            f"looped ({r.trace_laps} passes)")
              for r in results if r.trace_stopped or r.trace_laps > 1]
    notes += [f"  {r.design}: postcopy stall {fmt_time(r.postcopy_stall)} over all vCPUs"
              for r in results if r.postcopy_faults]
    return out + ("\n" + "\n".join(notes) if notes else "")


def format_rounds(r) -> str:
    rows = [("round", "start", "sync cost", "pages dirty", "pages sent", "bandwidth", "exp. downtime")]
    for row in r.table:
        rows.append((str(row.round), fmt_time(row.start), fmt_time(row.sync_cost), str(row.pages_dirty),
                     str(row.pages_sent), fmt_rate(row.bandwidth) if row.bandwidth else "-",
                     fmt_time(row.expected_downtime)))
    t = r.tracker
    extra = ", ".join(f"{k}={v:.4g}" for k, v in t.items())
    per = "; ".join(f"vCPU{v.vcpu}: faults {fmt_time(v.fault_time)}, stall {fmt_time(v.stall_time)}"
                    f" ({v.ring_full_exits} ring-full), throttle {fmt_time(v.throttle_time)}"
                    for v in r.vcpus)
    return (f"{r.design}: {r.why}; stop-and-copy at {fmt_time(r.stop_time or 0)}\n" + _table(rows)
            + f"\ntracker: {extra}\n{per}")


def _table(rows) -> str:
    w = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).rjust(w[i]) for i, c in enumerate(row)) for row in rows)


def add_calibrate_parser(sub) -> Handler:
    """Add ``calibrate`` to an argparse subparsers object; return its handler."""
    p = sub.add_parser("calibrate", help="measure this host's dirty-tracking costs into a profile",
                       description="Time every entry of the migration cost table on this host: the "
                                   "simulator's kernels through the public API and, where /dev/kvm "
                                   "is usable, the real ioctls. Writes a JSON profile for "
                                   "`kvmdirty migrate --costs FILE`.")
    p.add_argument("--out", default="kvmdirty-costs.json", metavar="FILE",
                   help="profile to write (default kvmdirty-costs.json)")
    p.add_argument("--no-kvm", action="store_true", help="do not use /dev/kvm even where usable")
    p.add_argument("--no-host", action="store_true",
                   help="do not measure the host kernel's write-protect tracking (userfaultfd-wp)")
    p.add_argument("--repeats", type=int, default=5, help="repeats per measurement (median; default 5)")
    p.add_argument("--json", action="store_true", help="also print the profile")
    return _run_calibrate


def _run_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate, command_line
    if args.repeats < 1:
        raise ValueError("--repeats must be >= 1")
    costs, why = calibrate(False if args.no_kvm else None, command_line(), args.repeats,
                           log=lambda s: print(s, file=sys.stderr, flush=True),
                           use_host=not args.no_host)
    costs.save(args.out)
    if args.json:
        json.dump(costs.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        rows = [("cost", "seconds", "from")]
        for k, c in costs.entries.items():
            rows.append((k, f"{c.value:.3g}", c.source.split(":")[0]))
        print(_table(rows))
        if costs.host:
            print("\nhost kernel (userfaultfd-wp + PAGEMAP_SCAN, real hardware):")
            print(_table([("figure", "value")] + [(k, f"{v:.4g}") for k, v in costs.host.items()]))
    print(f"profile written to {args.out}" + (f" (real KVM not used: {why})" if why else ""),
          file=sys.stderr)
    return 0


__all__ = ["add_migrate_parser", "add_calibrate_parser", "Costs"]
