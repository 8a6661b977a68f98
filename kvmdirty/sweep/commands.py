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
from typing import Any, Callable, Dict, Iterable, List, Mapping

from ..units import parse_size


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
            "writes": _int,
            "duration": lambda n, v: _float(n, v),
            "rate": _int,
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
        if out["design"] != "ring":
            out.pop("ring_entries", None)
        if "trace" in out:
            out["pattern"] = "trace"          # a trace file is its own pattern
        pattern = out.get("pattern", "uniform")
        for opt, used_by in (("hot_fraction", "hotcold"), ("hot_share", "hotcold"),
                             ("stride", "strided"), ("zipf_s", "zipf"), ("trace", "trace")):
            if pattern != used_by:
                out.pop(opt, None)
        return out

    def spec(self, options: Mapping[str, Any], seed: int):
        from ..runner import RunSpec
        from ..workloads import Workload
        o = dict(options)
        wl = {k: o.pop(k) for k in ("pattern", "hot_fraction", "hot_share", "stride", "zipf_s", "trace")
              if k in o}
        if "interval" in o:
            o["interval"] = o["interval"] / 1e3           # ms on the command line
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


_REGISTRY: Dict[str, Callable[[], Command]] = {"compare": CompareCommand}


def command(name: str) -> Command:
    if name not in _REGISTRY:
        raise ValueError(f"cannot sweep {name!r}; commands: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


def names() -> List[str]:
    return sorted(_REGISTRY)
