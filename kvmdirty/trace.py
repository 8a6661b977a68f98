"""Timed dirty-page traces: the file format, loading, and replay at the recorded pace.

A trace is a list of events ``(t_ns, gfn[, vcpu])``: page ``gfn`` of guest
memory was written at time ``t_ns`` (nanoseconds from the start).  A
recorded trace (``kvmdirty record``) has one event per page per sampling
interval in which the page was written — the first write of each interval,
stamped with the end of the interval — because that is what the host
kernel's harvest can see.  A synthetic or CSV trace may have one event per
write.

File formats
    ``.npz`` (numpy.savez_compressed), arrays:
        t_ns   uint64, non-decreasing
        gfn    uint64, guest frame numbers (page index from 0)
        vcpu   uint32, optional: the thread / vCPU that wrote
        meta   a 0-d string array holding a JSON object: at least
               ``format`` ("kvmdirty-trace"), ``version`` (1), ``page_size``,
               ``memory_bytes`` (guest memory the gfns live in),
               ``interval_ns`` (sampling interval; null when each event is
               one write), ``workload``, ``kernel``, ``source``; a recorded
               trace adds ``regions`` (how process mappings were laid out in
               guest-physical space) and ``samples``.
    ``.csv``: a header line ``t_ns,gfn`` or ``t_ns,gfn,vcpu`` (with
        ``unit="bytes"`` the second column is a guest-physical address,
        header ``t_ns,gpa``); one event per line, decimal or 0x hex.
        Memory size is one page past the highest gfn unless given.

Replay
    :func:`schedule` turns a trace into batches per (time, vCPU), due at
    ``t_ns / speed``; :func:`replay` runs them on vCPUs, sleeping until each
    batch is due.  A run longer than the trace must say what happens at
    its end: ``at_end="loop"`` (start again, times shifted by the trace's
    length) or ``"stop"``; the result says which happened, so it is never
    silent.
"""
from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

FORMAT = "kvmdirty-trace"
VERSION = 1
PAGE_SIZE = 4096
AT_END = ("loop", "stop")


@dataclass
class Trace:
    """Events (t_ns, gfn[, vcpu]) sorted by time, and the trace's metadata."""

    t_ns: np.ndarray
    gfn: np.ndarray
    vcpu: Optional[np.ndarray] = None
    meta: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.t_ns = _ints(self.t_ns, "t_ns", np.uint64)
        self.gfn = _ints(self.gfn, "gfn", np.uint64)
        if self.t_ns.shape != self.gfn.shape:
            raise ValueError(f"t_ns and gfn differ in length ({len(self.t_ns)} != {len(self.gfn)})")
        if self.vcpu is not None:
            self.vcpu = _ints(self.vcpu, "vcpu", np.uint32)
            if self.vcpu.shape != self.gfn.shape:
                raise ValueError("vcpu and gfn differ in length")
        if len(self.t_ns) > 1 and (np.diff(self.t_ns.astype(np.int64)) < 0).any():
            order = np.argsort(self.t_ns, kind="stable")
            self.t_ns, self.gfn = self.t_ns[order], self.gfn[order]
            if self.vcpu is not None:
                self.vcpu = self.vcpu[order]
        meta = {"format": FORMAT, "version": VERSION, "page_size": PAGE_SIZE,
                "interval_ns": None, "workload": None, "kernel": None, "source": None}
        meta.update(self.meta)
        if meta["page_size"] != PAGE_SIZE:
            raise ValueError(f"page_size {meta['page_size']} is not supported (only {PAGE_SIZE})")
        top = int(self.gfn.max()) + 1 if len(self.gfn) else 0
        if meta.get("memory_bytes") is None:
            meta["memory_bytes"] = max(top, 1) * PAGE_SIZE
        if meta["memory_bytes"] < top * PAGE_SIZE:
            raise ValueError(f"gfn {top - 1} lies beyond memory_bytes {meta['memory_bytes']}")
        self.meta = meta

    @property
    def npages(self) -> int:
        """Pages of guest memory the trace's gfns live in."""
        return int(self.meta["memory_bytes"]) // PAGE_SIZE

    @property
    def duration_ns(self) -> int:
        """Length of the trace: its recorded duration, else the last event's time."""
        d = self.meta.get("duration_ns")
        last = int(self.t_ns[-1]) if len(self.t_ns) else 0
        return max(int(d) if d is not None else 0, last)

    @property
    def interval_ns(self) -> Optional[int]:
        v = self.meta.get("interval_ns")
        return None if v is None else int(v)

    def __len__(self) -> int:
        return len(self.gfn)

    def save(self, path: str) -> None:
        """Write the trace as .npz (see the module docstring); the file is replaced atomically."""
        arrays = {"t_ns": self.t_ns, "gfn": self.gfn,
                  "meta": np.array(json.dumps(self.meta, sort_keys=True))}
        if self.vcpu is not None:
            arrays["vcpu"] = self.vcpu
        tmp = f"{path}.tmp{os.getpid()}.npz"
        try:
            np.savez_compressed(tmp, **arrays)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _ints(a: Any, name: str, dtype) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "ui":
        raise TypeError(f"{name} must hold integers, not {arr.dtype}")
    if arr.size and arr.dtype.kind == "i" and int(arr.min()) < 0:
        raise ValueError(f"{name} must be non-negative")
    return np.ascontiguousarray(arr, dtype=dtype)


def load(path: str, *, unit: str = "pages", memory_bytes: Optional[int] = None) -> Trace:
    """A trace from .npz or .csv (see the module docstring); ValueError saying what is wrong."""
    if unit not in ("pages", "bytes"):
        raise ValueError(f"unit must be 'pages' or 'bytes', not {unit!r}")
    if str(path).endswith(".npz"):
        if unit != "pages":
            raise ValueError(f"{path}: an .npz trace holds gfns; unit 'bytes' is for CSV")
        with np.load(path, allow_pickle=False) as z:
            missing = {"t_ns", "gfn", "meta"} - set(z.files)
            if missing:
                raise ValueError(f"{path}: not a kvmdirty trace (missing {sorted(missing)})")
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path}: format is {meta.get('format')!r}, not {FORMAT!r}")
            if meta.get("version") != VERSION:
                raise ValueError(f"{path}: trace version {meta.get('version')} (this reads {VERSION})")
            if memory_bytes is not None:
                meta["memory_bytes"] = memory_bytes
            return Trace(z["t_ns"], z["gfn"], z["vcpu"] if "vcpu" in z.files else None, meta)
    return _load_csv(path, unit, memory_bytes)


def _load_csv(path: str, unit: str, memory_bytes: Optional[int]) -> Trace:
    with open(path, newline="") as f:
        rows = csv.reader(line for line in f if line.strip() and not line.lstrip().startswith("#"))
        try:
            header = [h.strip().lower() for h in next(rows)]
        except StopIteration:
            raise ValueError(f"{path}: empty trace (a header t_ns,gfn[,vcpu] is needed)") from None
        second = "gpa" if unit == "bytes" else "gfn"
        if header not in ([ "t_ns", second], ["t_ns", second, "vcpu"]):
            raise ValueError(f"{path}: header must be 't_ns,{second}' or 't_ns,{second},vcpu', "
                             f"got {','.join(header)!r}")
        cols: List[List[int]] = [[] for _ in header]
        for lineno, row in enumerate(rows, 2):
            if len(row) != len(header):
                raise ValueError(f"{path}:{lineno}: {len(row)} fields, expected {len(header)}")
            try:
                for c, v in zip(cols, row):
                    c.append(int(v.strip(), 0))
            except ValueError:
                raise ValueError(f"{path}:{lineno}: not an integer in {row!r}") from None
    for name, c in zip(header, cols):
        if c and min(c) < 0:
            raise ValueError(f"{path}: negative {name}")
    gfn = np.array(cols[1], dtype=np.uint64)
    if unit == "bytes":
        gfn >>= np.uint64(12)
    meta = {"source": os.path.basename(str(path)), "memory_bytes": memory_bytes,
            "duration_ns": int(max(cols[0])) if cols[0] else 0}
    return Trace(np.array(cols[0], dtype=np.uint64), gfn,
                 np.array(cols[2], dtype=np.uint32) if len(cols) == 3 else None, meta)


def is_timed(path: str) -> bool:
    """Whether ``path`` is in this timed format (.npz / .csv), not a bare list of pages (.npy / text)."""
    return os.path.splitext(str(path))[1].lower() in (".npz", ".csv")


# -- replay ---------------------------------------------------------------
@dataclass(frozen=True)
class Batch:
    """Writes due at ``due_ns`` (replay time, after --speed) for one vCPU."""

    due_ns: int
    vcpu: int
    gfns: np.ndarray
    lap: int            # 0 for the first pass over the trace, 1 after one loop, ...


def schedule(trace: Trace, *, vcpus: int = 1, speed: float = 1.0,
             run_ns: Optional[int] = None, at_end: Optional[str] = None) -> Iterator[Batch]:
    """The trace's events as batches per (time, vCPU), in time order, due at t_ns / speed.

    Events of a trace without a vCPU column go to vCPU 0 when ``vcpus`` is
    1, else round-robin by page (gfn % vcpus, so each page has one writer,
    as a guest thread owns its data).  A trace with one must have ids below
    ``vcpus``.  ``run_ns`` (replay time) beyond the trace needs ``at_end``:
    "loop" replays it again shifted by its duration, "stop" ends at its end.
    """
    if not speed > 0:
        raise ValueError(f"speed must be > 0, got {speed}")
    if vcpus < 1:
        raise ValueError("vcpus must be >= 1")
    if at_end is not None and at_end not in AT_END:
        raise ValueError(f"at_end must be one of {AT_END}, not {at_end!r}")
    length = max(trace.duration_ns, 1)
    if run_ns is not None and run_ns > length / speed and at_end is None:
        raise ValueError(f"the run ({run_ns / 1e9:.3f} s) is longer than the trace at speed {speed:g} "
                         f"({length / speed / 1e9:.3f} s): choose to loop or to stop at its end")
    if trace.vcpu is not None and len(trace.vcpu) and int(trace.vcpu.max()) >= vcpus:
        raise ValueError(f"the trace has vCPU {int(trace.vcpu.max())}, the run only {vcpus}")
    owner = trace.vcpu if trace.vcpu is not None else \
        (trace.gfn % np.uint64(vcpus)).astype(np.uint32) if vcpus > 1 else np.zeros(len(trace), np.uint32)
    # Batch boundaries: a new (time, vcpu) pair.
    key_change = np.ones(len(trace), bool)
    if len(trace) > 1:
        key_change[1:] = (trace.t_ns[1:] != trace.t_ns[:-1])
    starts = np.flatnonzero(key_change)
    ends = np.append(starts[1:], len(trace))
    lap = 0
    while True:
        for s, e in zip(starts, ends):
            t = int(trace.t_ns[s]) + lap * length
            due = int(t / speed)
            if run_ns is not None and due >= run_ns:    # the run is [0, run_ns)
                return
            own = owner[s:e]
            for v in np.unique(own):
                yield Batch(due, int(v), trace.gfn[s:e][own == v], lap)
        if run_ns is None or at_end != "loop" or len(trace) == 0:
            return
        lap += 1


def split(trace: Trace, vcpus: int, speed: float = 1.0) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Each vCPU's share of one pass: (due seconds, float64; gfns, uint64), in time order.

    The same assignment as :func:`schedule` (the trace's vCPU column, or one
    writer per page).  Replayers consume these by their own clocks.
    """
    due: List[List[float]] = [[] for _ in range(vcpus)]
    gfns: List[List[np.ndarray]] = [[] for _ in range(vcpus)]
    for b in schedule(trace, vcpus=vcpus, speed=speed):
        due[b.vcpu].extend([b.due_ns / 1e9] * len(b.gfns))
        gfns[b.vcpu].append(b.gfns)
    return [(np.asarray(d, np.float64),
             np.concatenate(g).astype(np.uint64) if g else np.zeros(0, np.uint64))
            for d, g in zip(due, gfns)]


@dataclass
class ReplayResult:
    writes: int
    batches: int
    laps: int                 # passes over the trace started
    elapsed_s: float
    late_s: float             # how far behind its due time the latest batch started
    ended: str                # "trace end", "looped", "stopped at trace end", "run time reached"


def replay(trace: Trace, vcpus: Sequence[Any], *, speed: float = 1.0,
           run_s: Optional[float] = None, at_end: Optional[str] = None, value: int = 1,
           clock: Callable[[], float] = time.monotonic,
           sleep: Callable[[float], None] = time.sleep) -> ReplayResult:
    """Run the trace on ``vcpus`` (objects with ``run(gfns, value)``) at its recorded pace.

    Each batch runs when due (``t_ns / speed`` after the start); a batch
    that is late runs at once (``late_s`` reports the worst lag).  The
    vCPUs are driven from this thread in time order.
    """
    run_ns = None if run_s is None else int(run_s * 1e9)
    t0 = clock()
    writes = batches = laps = 0
    late = 0.0
    for b in schedule(trace, vcpus=len(vcpus), speed=speed, run_ns=run_ns, at_end=at_end):
        wait = b.due_ns / 1e9 - (clock() - t0)
        if wait > 0:
            sleep(wait)
        else:
            late = max(late, -wait)
        vcpus[b.vcpu].run(b.gfns, value)
        writes += len(b.gfns)
        batches += 1
        laps = max(laps, b.lap + 1)
    elapsed = clock() - t0
    length_s = trace.duration_ns / speed / 1e9
    if run_ns is None:
        ended = "trace end"
    elif run_s <= length_s:
        ended = "run time reached"
    else:
        ended = "looped" if at_end == "loop" else "stopped at trace end"
    return ReplayResult(writes, batches, laps, elapsed, late, ended)
