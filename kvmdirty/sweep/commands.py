"""What a sweep can run: each command turns a cell's options into a call of its
Python API and the result into flat metrics.

Option names and units are the command line's (``kvmdirty compare --help``),
with one value each: ``design`` names one design, sizes may be "4G", and
``interval`` is in milliseconds.  ``normalize`` converts the values and drops
the options that do not apply to the cell (a ring size under the bitmap
design), so cells that would run the same thing are one cell.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Mapping, Tuple

from ..units import parse_rate, parse_size


def _int(name: str, v: Any, lo: int = 1) -> int:
    if isinstance(v, str):
        v = parse_size(v)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return v


def _float(name: str, v: Any, lo: float = 0.0, *, open_lo: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{name} must be a number, got {v!r}")
    v = float(v)
    if not math.isfinite(v) or v < lo or (open_lo and v == lo):
        raise ValueError(f"{name} must be a finite number {'>' if open_lo else '>='} {lo:g}, got {v}")
    return v


def _rate(name: str, v: Any) -> float:
    # Rates as the command line writes them: "800M" = 800 MB/s, "10Gb/s" = 1.25 GB/s.
    if isinstance(v, str):
        v = parse_rate(v)
    return _float(name, v, open_lo=False)


def _bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be true or false, got {v!r}")
    return v


def _choice(name: str, v: Any, choices: Iterable[str]) -> str:
    choices = list(choices)
    if v not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {v!r}")
    return v


class Command:
    """A sweepable command: its options, how to normalise them, how to run a cell."""

    name = ""
    #: what ``sweep --summarize`` minimises unless told otherwise
    objective = ""
    #: option -> converter(name, value) -> value
    options: Dict[str, Callable[[str, Any], Any]] = {}

    #: options held in bytes / bytes per second, shown as sizes / rates
    sizes: Tuple[str, ...] = ("memory",)
    rates: Tuple[str, ...] = ()

    def show(self, name: str, value: Any) -> str:
        """A value as people read it: 2 GiB, 1.25 GB/s; 'n/a' for an option the cell does not use."""
        from ..units import fmt_bytes, fmt_rate
        if value is None:
            return "n/a"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if name in self.sizes:
                return fmt_bytes(value)
            if name in self.rates:
                return fmt_rate(value)
        return str(value)

    def check_options(self, names: Iterable[str]) -> None:
        bad = sorted(set(names) - set(self.options))
        if bad:
            raise ValueError(f"{self.name} has no option {', '.join(map(repr, bad))}; "
                             f"known: {', '.join(sorted(self.options))}")

    def normalize(self, options: Mapping[str, Any]) -> Dict[str, Any]:
        self.check_options(options)
        return {k: self.options[k](k, v) for k, v in sorted(options.items())}

    def run(self, options: Mapping[str, Any], seed: int) -> Dict[str, Any]:
        """Run one cell; flat metrics (numbers, strings, bools, None), with ``verified``:
        False when the run lost a write or broke the protocol."""
        raise NotImplementedError


class CompareCommand(Command):
    """One design of ``kvmdirty compare``: a live, threaded (or deterministic) run."""

    name = "compare"
    objective = "tracking_s"
    rates = ("dirty_rate",)

    def __init__(self) -> None:
        from ..collectors import all_designs
        from ..runner import CHECKS, MODES
        from ..workloads import PATTERNS
        self.options = {
            "design": lambda n, v: _choice(n, v, all_designs()),
            "memory": _int,
            "vcpus": _int,
            "slots": _int,
            "pattern": lambda n, v: _choice(n, v, [p for p in PATTERNS if p != "trace"] + ["trace"]),
            "hot_fraction": lambda n, v: _float(n, v),
            "hot_share": lambda n, v: _float(n, v, open_lo=False),
            "stride": _int,
            "zipf_s": lambda n, v: _float(n, v),
            "trace": lambda n, v: str(v),
            "speed": lambda n, v: _float(n, v),                   # timed trace at its pace x this
            "trace_end": lambda n, v: _choice(n, v, ("loop", "stop")),
            "writes": _int,
            "duration": lambda n, v: _float(n, v),
            "rate": _int,
            "dirty_rate": _rate,                                  # bytes/s, whole guest (paced)
            "ring_entries": _int,
            "interval": lambda n, v: _float(n, v),
            "period": _int,
            "mode": lambda n, v: _choice(n, v, MODES),
            "check": lambda n, v: _choice(n, v, CHECKS),
            "rounds": _int,
            "backend": lambda n, v: _choice(n, v, ("sim", "kvm")),
        }

    def normalize(self, options: Mapping[str, Any]) -> Dict[str, Any]:
        out = super().normalize(options)
        if "design" not in out:
            raise ValueError("compare cells need a design (fixed or an axis)")
        from ..collectors import RING_DESIGNS
        if out["design"] not in RING_DESIGNS:      # a ring size sizes only a ring
            out.pop("ring_entries", None)
        if "trace" in out:
            out["pattern"] = "trace"          # a trace file is its own pattern
        pattern = out.get("pattern", "uniform")
        for opt, used_by in (("hot_fraction", "hotcold"), ("hot_share", "hotcold"),
                             ("stride", "strided"), ("zipf_s", "zipf"), ("trace", "trace")):
            if pattern != used_by:
                out.pop(opt, None)
        if "trace" not in out:
            out.pop("speed", None)
        if "speed" not in out:
            out.pop("trace_end", None)
        return out

    def spec(self, options: Mapping[str, Any], seed: int):
        from ..runner import RunSpec
        from ..workloads import Workload
        o = dict(options)
        wl = {k: o.pop(k) for k in ("pattern", "hot_fraction", "hot_share", "stride", "zipf_s", "trace")
              if k in o}
        if "interval" in o:
            o["interval"] = o["interval"] / 1e3           # ms on the command line
        if "speed" in o:
            o["trace_speed"] = o.pop("speed")
        return RunSpec(workload=Workload(**wl), seed=seed, **o)

    def run(self, options: Mapping[str, Any], seed: int) -> Dict[str, Any]:
        from ..runner import run
        result = run(self.spec(options, seed)).to_dict()
        result["verified"] = result.pop("ok")        # no write lost, protocol kept
        for k in ("lost", "problems", "bad_rounds"):
            v = result.pop(k)
            result[f"{k}_n"] = len(v)
            if v and k != "bad_rounds":
                result[f"{k}_first"] = str(v[0])
        return result


class MigrateCommand(Command):
    """One run of ``kvmdirty migrate`` (``mode = "migrate"``) or of its checkpoint mode."""

    name = "migrate"
    objective = "total_time_s"
    rates = ("dirty_rate", "bandwidth", "max_bandwidth")

    def __init__(self) -> None:
        from ..migrate import AIDS, DESIGNS
        from ..workloads import PATTERNS
        self.options = {
            "mode": lambda n, v: _choice(n, v, ("migrate", "checkpoint")),
            "design": lambda n, v: _choice(n, v, DESIGNS),
            "memory": _int,
            "vcpus": _int,
            "dirty_rate": _rate,
            "pattern": lambda n, v: _choice(n, v, PATTERNS),
            "trace": lambda n, v: str(v),
            "speed": lambda n, v: _float(n, v),                   # timed trace at its pace x this
            "trace_end": lambda n, v: _choice(n, v, ("loop", "stop")),
            "ring_entries": _int,
            "reaper_period": lambda n, v: _float(n, v),
            "clear_shift": lambda n, v: _int(n, v, 0),
            "pml": _bool,
            "bandwidth": _rate,
            "max_bandwidth": lambda n, v: "link" if v == "link" else _rate(n, v),
            "downtime_limit": lambda n, v: _float(n, v),          # ms, as on the command line
            "aid": lambda n, v: _choice(n, v, AIDS),
            "tailslow": _bool,
            "dirty_limit": lambda n, v: _float(n, v),             # MB/s per vCPU
            "postcopy_after": lambda n, v: _int(n, v, 0),
            "postcopy_rtt": lambda n, v: _float(n, v, open_lo=False),
            "max_time": lambda n, v: _float(n, v),
            "max_rounds": lambda n, v: _int(n, v, 0),
            "costs": lambda n, v: str(v),
            "epoch": lambda n, v: _float(n, v),
            "epoch_pages": _int,
            "checkpoints": _int,
        }

    def normalize(self, options: Mapping[str, Any]) -> Dict[str, Any]:
        out = super().normalize(options)
        design = out.get("design", "bitmap")
        if "ring" not in design:                  # ring, indexed-ring, shared-ring keep a size
            out.pop("ring_entries", None)
        if design != "ring":
            out.pop("reaper_period", None)
        if design != "clear-log":
            out.pop("clear_shift", None)
        if out.get("aid", "none") != "auto-converge":
            out.pop("tailslow", None)
        if out.get("aid", "none") != "dirty-limit":
            out.pop("dirty_limit", None)
        if not out.get("postcopy_after"):
            out.pop("postcopy_rtt", None)
        if out.get("mode", "migrate") != "checkpoint":
            for k in ("epoch", "epoch_pages", "checkpoints"):
                out.pop(k, None)
        if "trace" in out:
            out["pattern"] = "trace"
        else:
            out.pop("speed", None)
        if "speed" in out:
            out.pop("dirty_rate", None)           # the trace sets the pace
        else:
            out.pop("trace_end", None)
        return out

    def config(self, options: Mapping[str, Any], seed: int):
        from ..migrate import QEMU_MAX_BANDWIDTH, MigrationConfig
        o = dict(options)
        for k in ("mode", "costs", "epoch", "epoch_pages", "checkpoints"):
            o.pop(k, None)
        if "downtime_limit" in o:
            o["downtime_limit"] = o["downtime_limit"] / 1e3
        if "dirty_limit" in o:
            o["dirty_limit_mb"] = o.pop("dirty_limit")
        if "speed" in o:
            o["trace_speed"] = o.pop("speed")
        mb = o.pop("max_bandwidth", QEMU_MAX_BANDWIDTH)
        cfg = MigrationConfig(seed=seed, **o)
        cfg.max_bandwidth = cfg.bandwidth if mb == "link" else mb
        return cfg

    def run(self, options: Mapping[str, Any], seed: int) -> Dict[str, Any]:
        cfg = self.config(options, seed)
        costs = options.get("costs")
        if options.get("mode", "migrate") == "checkpoint":
            from ..migrate.checkpoint import CheckpointConfig, run_checkpoints
            r = run_checkpoints(CheckpointConfig.from_migration(
                cfg, epoch=options.get("epoch"), epoch_pages=options.get("epoch_pages"),
                checkpoints=options.get("checkpoints", 50)), costs)
            return {"verified": r.verified, "checkpoints": r.checkpoints,
                    "pause_p50_s": r.percentile(50), "pause_p99_s": r.percentile(99),
                    "pause_max_s": max(r.pauses, default=0.0),
                    "pages_per_checkpoint": sum(r.pages) / max(1, len(r.pages)),
                    "slowdown": r.slowdown, "total_time_s": r.total_time,
                    "mismatched_pages": len(r.mismatched_gfns), "sim_wall_s": r.wall_time}
        from ..migrate import run
        r = run(cfg, costs)
        n = max(1, len(r.vcpus))
        return {"verified": r.verified, "converged": r.converged, "why": r.why,
                "total_time_s": r.total_time, "downtime_s": r.downtime, "bytes_sent": r.bytes_sent,
                "sent_ratio": r.sent_ratio, "rounds": r.rounds, "progress": r.progress,
                "stall_s_per_vcpu": sum(v.stall_time for v in r.vcpus) / n,
                "throttle_s_per_vcpu": sum(v.throttle_time for v in r.vcpus) / n,
                "ring_full_exits": sum(v.ring_full_exits for v in r.vcpus),
                "postcopy_faults": r.postcopy_faults, "postcopy_stall_s": r.postcopy_stall,
                "final_dirty_rate": r.final_dirty_rate, "mismatched_pages": len(r.mismatched_gfns),
                "sim_wall_s": r.wall_time}


_REGISTRY: Dict[str, Callable[[], Command]] = {"compare": CompareCommand, "migrate": MigrateCommand}


def command(name: str) -> Command:
    if name not in _REGISTRY:
        raise ValueError(f"cannot sweep {name!r}; commands: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


def names() -> List[str]:
    return sorted(_REGISTRY)
