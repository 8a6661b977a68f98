"""A sweep specification: the command, its fixed options, the axes of the grid.

A spec is a TOML (or YAML) file, or the same thing built from the command line::

    command = "compare"          # or "migrate"
    seed = 0                     # base seed; each cell derives its own from it
    [fixed]                      # options every cell gets
    memory = "1G"
    writes = 200000
    [axes]                       # one list per swept option; the grid is their product
    design = ["bitmap", "clear-log", "ring"]
    ring_entries = [1024, 4096]
    interval = { range = [5, 50, 15] }       # start, stop (exclusive), step
    trace = { glob = "traces/*.npz" }        # every file matching, sorted
    [outputs]
    dir = "sweep-results"
    objective = "tracking_s"     # what --summarize minimises (prefix "-" to maximise)
    constraints = ["lost_pages <= 0"]

Option names are those of the command's Python API (``kvmdirty.sweep.commands``
lists them); dashes and underscores are the same.
"""
from __future__ import annotations

import glob as _glob
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

_CONSTRAINT = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(<=|>=|==|!=|<|>)\s*(\S+)\s*$")


def option_name(name: str) -> str:
    """Canonical option name: lower case, dashes as underscores."""
    return name.strip().lower().replace("-", "_")


@dataclass(frozen=True)
class Constraint:
    """``metric OP value``: a cell is feasible when every constraint holds."""

    metric: str
    op: str
    value: float

    @classmethod
    def parse(cls, text: str) -> "Constraint":
        m = _CONSTRAINT.match(text)
        if not m:
            raise ValueError(f"not a constraint: {text!r} (try 'downtime_s <= 0.3')")
        try:
            value = float(m.group(3))
        except ValueError:
            raise ValueError(f"constraint {text!r}: {m.group(3)!r} is not a number") from None
        return cls(m.group(1), m.group(2), value)

    def holds(self, row: Mapping[str, Any]) -> bool:
        v = row.get(self.metric)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return False
        v = float(v)
        return {"<=": v <= self.value, ">=": v >= self.value, "<": v < self.value,
                ">": v > self.value, "==": v == self.value, "!=": v != self.value}[self.op]

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"


@dataclass
class Spec:
    """What to sweep.  ``axes`` maps an option to its list of values, in order."""

    command: str
    fixed: Dict[str, Any] = field(default_factory=dict)
    axes: Dict[str, List[Any]] = field(default_factory=dict)
    seed: int = 0
    out: str = "sweep-results"
    objective: Optional[str] = None
    constraints: List[Constraint] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.command, str) or not self.command:
            raise ValueError("the spec needs a command ('compare' or 'migrate')")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        self.fixed = {option_name(k): v for k, v in self.fixed.items()}
        axes = {}
        for k, values in self.axes.items():
            name = option_name(k)
            if name in self.fixed:
                raise ValueError(f"{name!r} is both fixed and an axis")
            if not values:
                raise ValueError(f"axis {name!r} has no values")
            axes[name] = list(values)
        self.axes = axes
        if "seed" in self.axes or "seed" in self.fixed:
            raise ValueError("seed is derived per cell from the spec's seed; do not sweep it")

    @property
    def size(self) -> int:
        """Cells in the full grid (before the command drops options that do not apply)."""
        return math.prod(len(v) for v in self.axes.values())


def axis_values(name: str, raw: Any, base_dir: str = ".") -> List[Any]:
    """An axis as a list: a list, a scalar, ``{range = [a, b, step]}`` or ``{glob = pattern}``."""
    if isinstance(raw, Mapping):
        if set(raw) == {"range"}:
            r = list(raw["range"])
            if len(r) not in (2, 3) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                               for x in r):
                raise ValueError(f"axis {name!r}: range needs [start, stop] or [start, stop, step]")
            start, stop = r[0], r[1]
            step = r[2] if len(r) == 3 else 1
            if not step or not all(math.isfinite(x) for x in (start, stop, step)):
                raise ValueError(f"axis {name!r}: range step must be non-zero and finite")
            n = math.ceil((stop - start) / step)
            if n <= 0:
                raise ValueError(f"axis {name!r}: empty range {r}")
            if n > 1_000_000:
                raise ValueError(f"axis {name!r}: range of {n} values is too long")
            vals = [start + i * step for i in range(n)]
            return [int(v) if all(isinstance(x, int) for x in (start, step)) else v for v in vals]
        if set(raw) == {"glob"}:
            pattern = os.path.join(base_dir, os.path.expanduser(str(raw["glob"])))
            files = sorted(_glob.glob(pattern))
            if not files:
                raise ValueError(f"axis {name!r}: no file matches {raw['glob']!r}")
            return files
        raise ValueError(f"axis {name!r}: a table must be {{range = [...]}} or {{glob = '...'}}")
    if isinstance(raw, (list, tuple)):
        return list(raw)
    return [raw]


def from_mapping(data: Mapping[str, Any], base_dir: str = ".") -> Spec:
    """A Spec from a parsed TOML/YAML document (paths are relative to ``base_dir``)."""
    known = {"command", "seed", "fixed", "axes", "outputs"}
    extra = set(data) - known
    if extra:
        raise ValueError(f"unknown spec keys: {', '.join(sorted(extra))} (known: {', '.join(sorted(known))})")
    outputs = dict(data.get("outputs") or {})
    bad = set(outputs) - {"dir", "objective", "constraints"}
    if bad:
        raise ValueError(f"unknown [outputs] keys: {', '.join(sorted(bad))}")
    axes = {k: axis_values(k, v, base_dir) for k, v in (data.get("axes") or {}).items()}
    constraints = outputs.get("constraints") or []
    if isinstance(constraints, str):
        constraints = [constraints]
    out = outputs.get("dir", "sweep-results")
    return Spec(command=data.get("command", ""), fixed=dict(data.get("fixed") or {}), axes=axes,
                seed=data.get("seed", 0),
                out=out if os.path.isabs(out) else os.path.join(base_dir, out),
                objective=outputs.get("objective"),
                constraints=[Constraint.parse(c) for c in constraints])


def load(path: str) -> Spec:
    """Read a spec file: ``.toml``, or ``.yaml``/``.yml`` (needs PyYAML)."""
    ext = os.path.splitext(path)[1].lower()
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"cannot read spec {path!r}: {e.strerror}") from None
    if ext == ".toml":
        try:
            import tomllib
        except ImportError:                     # Python < 3.11
            import tomli as tomllib             # type: ignore[no-redef]
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid TOML: {e}") from None
    elif ext in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: YAML specs need PyYAML (pip install pyyaml)") from None
        try:
            data = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from None
    else:
        raise ValueError(f"{path}: a spec is a .toml or .yaml file")
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: the spec must be a table of keys")
    return from_mapping(data, base_dir=os.path.dirname(os.path.abspath(path)))


def parse_assignments(items: Sequence[str], *, lists: bool) -> Dict[str, Any]:
    """``name=value`` (or ``name=v1,v2`` when ``lists``) from the command line."""
    out: Dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"expected NAME=VALUE, got {item!r}")
        vals = [_scalar(v) for v in value.split(",")] if lists else _scalar(value)
        out[option_name(name)] = vals
    return out


def _scalar(text: str) -> Any:
    t = text.strip()
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    return t
