"""The envelope every command's ``--json`` shares: schema, metadata, scenario.

``kvmdirty compare --json`` and ``kvmdirty migrate --json`` both print::

    {"schema": "kvmdirty.results/1",
     "command": "compare" | "migrate",
     "meta": {"kvmdirty", "python", "numpy", "kernel", "os", "machine", "cpu",
              "cpus", "loadavg", "backend", "time", "units"},
     "scenario": {"name", "about", <every parameter: one value, or the list swept>,
                  "swept": [the parameters given as lists]},
     "results": [one object per run], ...}

``meta.time`` is ``"real"`` (compare: measured on this host's clock) or
``"virtual"`` (migrate: charged from a cost table); ``meta.units`` says what
the numbers in the results are in, so a sweep over both reads them alike.
"""
from __future__ import annotations

import contextlib
import os
import platform
from typing import Any, Dict, Mapping, Optional, Sequence

SCHEMA = "kvmdirty.results/1"

#: The units of every number in a command's JSON (names ending in _s are seconds, etc.).
UNITS: Dict[str, str] = {
    "*_s": "seconds",
    "*_ns": "nanoseconds",
    "memory, *_bytes, bytes_*": "bytes (binary sizes on the command line: 4G = 4 GiB)",
    "*_rate, bandwidth": "bytes per second (decimal on the command line: 800M = 800 MB/s)",
    "pages, *_pages, entries": "4 KiB guest pages",
    "interval": "seconds (milliseconds on the command line)",
}


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def metadata(backend: str, time_base: str) -> Dict[str, Any]:
    """What produced the numbers: versions, this machine and kernel, the backend, the units."""
    import numpy

    from . import __version__
    load = None
    with contextlib.suppress(OSError, AttributeError):
        load = [round(x, 2) for x in os.getloadavg()]
    return {"kvmdirty": __version__, "python": platform.python_version(),
            "numpy": numpy.__version__, "kernel": platform.release(), "os": platform.system(),
            "machine": platform.machine(), "cpu": _cpu_model(), "cpus": os.cpu_count(),
            "loadavg": load, "backend": backend, "time": time_base, "units": dict(UNITS)}


def scenario(parameters: Mapping[str, Any], swept: Sequence[str] = (), *, name: Optional[str] = None,
             about: Optional[str] = None) -> Dict[str, Any]:
    """The scenario object: ``parameters`` (a list for each name in ``swept``), named or not."""
    out: Dict[str, Any] = {"name": name, "about": about}
    out.update(parameters)
    out["swept"] = list(swept)
    return out


def envelope(command: str, backend: str, time_base: str, scen: Mapping[str, Any]) -> Dict[str, Any]:
    """The keys every command's JSON starts with."""
    return {"schema": SCHEMA, "command": command, "meta": metadata(backend, time_base),
            "scenario": dict(scen)}
