"""The cost table: virtual seconds charged for each tracking operation.

The mechanism runs for real on the simulator; only *time* is modelled, and
every charge comes from one :class:`Costs` entry.  A profile (JSON) records,
for each number, its value, where it was measured and with which command;
``kvmdirty calibrate`` writes one, ``migrate --costs FILE`` reads one, and
``--cost NAME=SECONDS`` overrides single entries.  The shipped default
profile (``default_costs.json`` next to this file) was measured by
``kvmdirty calibrate`` on the machine it names.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

DEFAULT_PROFILE = Path(__file__).with_name("default_costs.json")

#: name -> what the number is (seconds per unit given in the name).
COST_DOC: Dict[str, str] = {
    "ioctl": "one ioctl round trip into the kernel and back (fixed part of every tracking ioctl)",
    "get_log_per_gib": "KVM_GET_DIRTY_LOG per GiB of memslot: scan and exchange the bitmap words",
    "get_log_copy_per_gib": "KVM_GET_DIRTY_LOG with manual protect per GiB: copy the bitmap",
    "protect_per_page": "write-protecting one harvested dirty page (GET or CLEAR)",
    "clear_per_gib": "KVM_CLEAR_DIRTY_LOG per GiB of the range cleared: scan the mask words",
    "ring_collect_per_entry": "user space harvesting one dirty-ring entry into its bitmap",
    "ring_reset_per_entry": "KVM_RESET_DIRTY_RINGS per entry, its re-protect included",
    "tlb_flush": "one remote TLB flush (after a harvest that protected pages)",
    "wp_fault": "a guest write fault that logs a page (exit, log, make writable, re-enter)",
    "ring_full_exit": "a KVM_EXIT_DIRTY_RING_FULL exit to user space and re-entry",
    "vcpu_kick": "kicking a vCPU out of the guest and back (a KVM_RUN round trip)",
    "log_start_per_gib": "enabling dirty logging on a fully mapped memslot per GiB (write-protects it); "
                         "also the bound on protecting a densely dirty range",
    "qemu_sync_per_gib": "QEMU merging a slot's dirty bitmap into the migration bitmap, per GiB",
    "send_per_byte": "migration thread CPU per byte sent (caps the send rate at 1/this)",
}


@dataclass
class Cost:
    """One entry: its value in seconds and where the value came from."""

    value: float
    source: str = "unset"

    def to_json(self) -> Dict[str, Any]:
        return {"value": self.value, "source": self.source}


@dataclass
class Costs:
    """The cost table (seconds).  Build with :meth:`load`, :meth:`default` or :meth:`zero`."""

    entries: Dict[str, Cost] = field(default_factory=dict)
    machine: str = ""
    command: str = ""
    #: the host kernel's own write-protect tracking, measured by calibrate
    #: (kvmdirty.host.costs: units in the keys); reference figures, not charged
    host: Dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.entries) - set(COST_DOC)
        if unknown:
            raise ValueError(f"unknown cost names {sorted(unknown)}; known: {sorted(COST_DOC)}")
        missing = set(COST_DOC) - set(self.entries)
        if missing:
            raise ValueError(f"cost profile lacks {sorted(missing)}")
        for name, c in self.entries.items():
            if not (isinstance(c.value, (int, float)) and c.value >= 0.0):
                raise ValueError(f"cost {name} must be a number >= 0 seconds, got {c.value!r}")

    def __getattr__(self, name: str) -> float:
        # Attribute access for the model: costs.wp_fault -> seconds.
        entries = self.__dict__.get("entries")
        if entries is not None and name in entries:
            return float(entries[name].value)
        raise AttributeError(name)

    def override(self, values: Mapping[str, float], source: str = "command line") -> "Costs":
        """A copy with some entries replaced."""
        new = {k: Cost(v.value, v.source) for k, v in self.entries.items()}
        for k, v in values.items():
            if k not in COST_DOC:
                raise ValueError(f"unknown cost {k!r}; known: {', '.join(sorted(COST_DOC))}")
            new[k] = Cost(float(v), source)
        return Costs(new, self.machine, self.command, dict(self.host))

    @classmethod
    def zero(cls) -> "Costs":
        """Every tracking operation free (the closed-form model's assumption)."""
        return cls({k: Cost(0.0, "zero") for k in COST_DOC}, "none", "Costs.zero()")

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Costs":
        """Read a profile written by :meth:`save` (``kvmdirty calibrate``)."""
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not a JSON cost profile: {e}") from None
        if not isinstance(d, dict) or not isinstance(d.get("costs"), dict):
            raise ValueError(f"{path}: a cost profile has a 'costs' object")
        entries = {}
        for k, v in d["costs"].items():
            if not isinstance(v, dict) or "value" not in v:
                raise ValueError(f"{path}: cost {k!r} needs a 'value'")
            entries[k] = Cost(v["value"], str(v.get("source", "")))
        host = d.get("host_kernel") or {}
        if not isinstance(host, dict) or not all(isinstance(v, (int, float)) for v in host.values()):
            raise ValueError(f"{path}: 'host_kernel' must map names to numbers")
        return cls(entries, str(d.get("machine", "")), str(d.get("command", "")),
                   {k: float(v) for k, v in host.items()})

    @classmethod
    def default(cls) -> "Costs":
        """The shipped profile (measured; see its 'machine' and 'command')."""
        return cls.load(DEFAULT_PROFILE)

    def to_json(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"machine": self.machine, "command": self.command,
                             "costs": {k: dict(self.entries[k].to_json(), what=COST_DOC[k])
                                       for k in COST_DOC}}
        if self.host:
            d["host_kernel"] = dict(self.host)
        return d

    def save(self, path: Union[str, Path]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, indent=2)
            f.write("\n")

    def values(self) -> Dict[str, float]:
        return {k: float(v.value) for k, v in self.entries.items()}


def resolve(costs: Optional[Union["Costs", str, Path]]) -> Costs:
    """None -> the shipped default; a path -> that profile; a Costs -> itself."""
    if costs is None:
        return Costs.default()
    if isinstance(costs, Costs):
        return costs
    return Costs.load(costs)
