"""Run N vCPUs over their write plans while a collector harvests, and measure it.

Two ways to run the vCPUs:

threads        one Python thread per vCPU (``vcpu.run`` releases the GIL in
               the write loop, so they really run in parallel) and the
               collector in the calling thread, harvesting every ``interval``
               seconds: real concurrency, real races.
deterministic  everything in one thread: each step, every vCPU's chunk of
               ``rate`` writes is cut into slices (``run(max_writes=k)``) that a
               seeded schedule interleaves with each other and with the
               harvests (one every ``period`` steps): the same seed gives the
               same run, write for write.

With a dirty rate (threads only) each vCPU thread is paced in real time
instead: a token bucket (kvmdirty.pacing) earns page writes at its share of
the rate and the thread runs them in batches (``rate`` writes at most), so
the guest dirties ``dirty_rate`` bytes/s whatever the host could do beyond
that, and the result says what it achieved.

clear-log (INITIALLY_SET) takes its first harvest, which returns every page,
before the guest runs: it is counted apart (``initial_pages``), not as pages
the guest dirtied.

Either way a vCPU that exits with DIRTY_RING_FULL (or a seed design's full
exit) makes its own thread harvest every ring, as QEMU's vCPU threads do, and
then resumes.  A run is ``rounds`` rounds; at the end of each one the vCPUs are
stopped and everything is harvested (the selftest's check runs there); the
last one is the migration's stop-and-copy.  Every number in the result is
measured in the run.

Guest memory is laid out as on QEMU's pc machine (``ram_ranges``): RAM from
gfn 0 up to a hole below 4 GiB (the PCI hole, holding the IOAPIC and LAPIC
pages: on real KVM a write there is MMIO, not memory), the rest from 4 GiB
up.  The same slots are created on both backends, so they agree.  Workload
plans name RAM page indices; ``ram_gfns`` maps them to gfns.
"""
from __future__ import annotations

import inspect
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .api import EXIT_BUDGET, EXIT_DIRTY_LOG_FULL, EXIT_DIRTY_RING_FULL, EXIT_HLT, PAGE_SIZE
from .collectors import RING_DESIGNS, Collector, make_collector
from .meter import Meter
from .pacing import TokenBucket, pages_per_s
from .replay import TimedReplay
from .trace import load as load_trace_file
from .verify import Check, FinalValues, SelftestCheck, ShadowCopy
from .workloads import Workload, rates

MODES = ("threads", "deterministic")
CHECKS = ("shadow", "selftest", "both", "none")
RING_KNOBS = ("publish_early", "relaxed_collect")
FULL_EXITS = (EXIT_DIRTY_RING_FULL, EXIT_DIRTY_LOG_FULL)
# A vCPU that keeps exiting "full" without writing after this many harvests is stuck.
_MAX_IDLE_FULL_EXITS = 1000


@dataclass
class RunSpec:
    """What to run.  Sizes are per run; ``writes`` is per vCPU (at the highest rate)."""

    design: str = "bitmap"
    memory: int = 1 << 30
    slots: int = 1
    vcpus: int = 4
    workload: Workload = field(default_factory=Workload)
    writes: int = 100_000
    duration: Optional[float] = None
    rate: Union[int, Sequence[int]] = 1024
    mode: str = "threads"
    period: int = 8
    interval: float = 0.01
    ring_entries: int = 4096
    rounds: int = 1
    check: str = "shadow"
    seed: int = 0
    backend: str = "sim"
    faults: Tuple[str, ...] = ()
    ring_knobs: Tuple[str, ...] = ()
    log_every_write: bool = False
    cpus: Optional[Tuple[int, ...]] = None     # threads: pin every thread of the run to these CPUs
    vcpu_nice: int = 0                         # threads: niceness added to vCPU threads
    trace_speed: Optional[float] = None        # threads: replay a timed trace at its pace x this
    trace_end: Optional[str] = None            # ... a run longer than it: "loop" or "stop"
    trace_unit: str = "pages"                  # a CSV trace's second column: gfns, or "bytes" (gpa)
    dirty_rate: Optional[float] = None         # threads: pace the guest at this many bytes/s (all vCPUs)
    ages: bool = True                          # measure the age of each harvested page

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.check not in CHECKS:
            raise ValueError(f"check must be one of {CHECKS}, got {self.check!r}")
        if self.memory < PAGE_SIZE or self.memory % PAGE_SIZE:
            raise ValueError(f"memory must be a positive multiple of {PAGE_SIZE} bytes")
        if not 1 <= self.slots <= self.memory // PAGE_SIZE:
            raise ValueError("slots must be between 1 and the number of pages")
        if self.vcpus < 1:
            raise ValueError("vcpus must be >= 1")
        if self.rounds < 1:
            raise ValueError("rounds must be >= 1")
        if self.duration is None and self.writes < 1:
            raise ValueError("writes must be >= 1")
        if self.duration is not None:
            if not (math.isfinite(self.duration) and self.duration > 0):
                raise ValueError("duration must be positive")
            if self.mode != "threads":
                raise ValueError("duration needs threads; deterministic runs count writes")
        if self.period < 1 or not (math.isfinite(self.interval) and self.interval > 0):
            raise ValueError("period must be >= 1 step and interval > 0 seconds")
        for k in self.ring_knobs:
            if k not in RING_KNOBS:
                raise ValueError(f"unknown ring knob {k!r}; known: {RING_KNOBS}")
        if self.ring_knobs and self.design != "ring":
            raise ValueError("ring knobs need the ring design")
        if self.cpus is not None and not self.cpus:
            raise ValueError("cpus must name at least one CPU")
        if self.backend not in ("sim", "kvm"):
            raise ValueError(f"backend must be 'sim' or 'kvm', got {self.backend!r}")
        if self.backend == "kvm" and (self.faults or self.ring_knobs or self.log_every_write):
            raise ValueError("fault injection and log_every_write need the simulator")
        if self.trace_speed is not None:
            if self.workload.pattern != "trace":
                raise ValueError("trace_speed replays a timed trace: give the trace file")
            if not (math.isfinite(self.trace_speed) and self.trace_speed > 0):
                raise ValueError(f"trace_speed must be finite and > 0, got {self.trace_speed}")
            if self.mode != "threads":
                raise ValueError("a trace replayed at its pace needs threads (real time)")
        if self.trace_unit != "pages" and self.trace_speed is None:
            raise ValueError("trace_unit applies to a timed trace replayed at its pace")
        if self.trace_end is not None:
            if self.trace_speed is None:
                raise ValueError("trace_end applies to a trace replayed at its pace (trace_speed)")
            if self.trace_end not in ("loop", "stop"):
                raise ValueError(f"trace_end must be 'loop' or 'stop', got {self.trace_end!r}")
        rates(self.rate, self.vcpus)
        if self.dirty_rate is not None:
            if isinstance(self.dirty_rate, bool) or not isinstance(self.dirty_rate, (int, float)):
                raise TypeError(f"dirty_rate must be a number of bytes/s, got {self.dirty_rate!r}")
            if not (math.isfinite(self.dirty_rate) and self.dirty_rate > 0):
                raise ValueError(f"dirty_rate must be finite and > 0 bytes/s, got {self.dirty_rate!r}")
            if self.mode != "threads":
                raise ValueError("a dirty rate is paced in real time: it needs threads "
                                 "(deterministic runs count writes per step)")
            if self.trace_speed is not None:
                raise ValueError("a timed trace sets its own pace: give a dirty rate or a trace speed")


@dataclass
class RunResult:
    """Everything measured in one run (times in seconds unless named _ns)."""

    design: str
    mode: str
    backend: str
    vcpus: int
    memory: int
    pattern: str
    writes: int
    wp_faults: Optional[int]
    pages_harvested: int
    harvest_calls: int
    full_exits: int
    tracking_s: float                  # CPU time of the harvesting threads
    tracking_ns_per_page: Optional[float]
    tracking_wall_s: float             # wall time of the same harvests
    elapsed_s: float
    writes_per_s: float
    check: str
    lost_pages: Optional[int]
    violations: Optional[int]
    unwritten_pages: Optional[int]     # pages not holding what the plans wrote (FinalValues)
    lost: List[str]
    problems: List[str]
    bad_rounds: List[int]              # rounds in which a check found something
    trace_ended: Optional[str] = None  # timed trace: how the replay ended (looped, stopped, ...)
    trace_late_s: Optional[float] = None  # timed trace: worst lateness of a vCPU behind the trace
    # What users feel (kvmdirty.meter; seconds, pages, bytes/s).
    dirty_rate: Optional[float] = None    # requested (bytes/s, whole guest); None: unpaced
    achieved_rate: float = 0.0            # guest writes x 4 KiB per second the vCPUs ran
    dirtied_rate: float = 0.0             # pages_dirtied x 4 KiB per second the vCPUs ran
    guest_s: float = 0.0                  # seconds the vCPUs ran (all rounds)
    stall_total_s: float = 0.0            # vCPU time lost to ring-full exits, all vCPUs
    stall_exits: int = 0
    stall_p50_s: Optional[float] = None   # per exit
    stall_p99_s: Optional[float] = None
    stall_max_s: Optional[float] = None
    harvest_p50_s: Optional[float] = None  # per harvest: the design's calls (wall)
    harvest_p99_s: Optional[float] = None
    harvest_max_s: Optional[float] = None
    pages_per_harvest_p50: Optional[float] = None
    pages_per_harvest_max: Optional[float] = None
    pages_dirtied: int = 0                # distinct pages per harvest, summed; INITIALLY_SET apart
    entries_harvested: int = 0            # = pages_harvested: entries / bits as the design reported
    duplicate_entries: int = 0            # entries naming a page already in the same harvest
    initial_pages: int = 0                # clear-log: pages of the first harvest never written
    initial_harvest_s: Optional[float] = None  # clear-log: that first harvest's wall time
    age_p50_s: Optional[float] = None     # harvested page: first write -> end of its harvest
    age_p99_s: Optional[float] = None
    age_max_s: Optional[float] = None
    age_known: int = 0
    age_unknown: int = 0                  # pages whose dirtying write raced a harvest

    @property
    def ok(self) -> bool:
        return (not self.lost_pages and not self.violations and not self.unwritten_pages
                and not self.problems)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d


#: QEMU pc (i440fx) RAM below 4 GiB: all of it up to 3.5 GiB; 3 GiB once the
#: guest has 3.5 GiB or more (gigabyte-aligned).  The rest starts at 4 GiB.
LOWMEM_SMALL = 0xE000_0000
LOWMEM_LARGE = 0xC000_0000
HIGHMEM_START = 1 << 32


def ram_ranges(memory: int) -> List[Tuple[int, int]]:
    """(base gfn, npages) of guest RAM: below the PCI hole, then from 4 GiB."""
    low = memory if memory < LOWMEM_SMALL else LOWMEM_LARGE
    out = [(0, low // PAGE_SIZE)]
    if memory > low:
        out.append((HIGHMEM_START // PAGE_SIZE, (memory - low) // PAGE_SIZE))
    return out


def ram_gfns(index: np.ndarray, memory: int) -> np.ndarray:
    """The gfns of RAM page indices (``[0, memory // PAGE_SIZE)``) in ``ram_ranges`` order."""
    index = np.asarray(index, dtype=np.uint64)
    ranges = ram_ranges(memory)
    if len(ranges) == 1:
        return index
    low = np.uint64(ranges[0][1])
    return np.where(index >= low, index + np.uint64(ranges[1][0] - ranges[0][1]), index)


def ram_index(gfns: np.ndarray, memory: int) -> np.ndarray:
    """The RAM page indices of RAM gfns (the inverse of ``ram_gfns``), as int64."""
    g = np.asarray(gfns)
    # gfns are below 2**63: a uint64 array is viewed, not copied.
    g = g.view(np.int64) if g.dtype == np.uint64 and g.flags.c_contiguous else g.astype(np.int64)
    ranges = ram_ranges(memory)
    if len(ranges) == 1:
        return g
    low, high = ranges[0][1], ranges[1][0]
    return np.where(g >= high, g - (high - low), g)


def layout(memory: int, nslots: int) -> List[Tuple[int, int, int]]:
    """(slot id, base gfn, npages) for ``nslots`` slots covering the RAM of ``ram_ranges``.

    RAM page indices are cut into ``nslots`` equal pieces; a piece that
    spans the hole is split at it, so there may be one slot more.
    """
    npages = memory // PAGE_SIZE
    ranges = ram_ranges(memory)
    low = ranges[0][1]
    out: List[Tuple[int, int, int]] = []
    for i in range(nslots):
        lo, hi = i * npages // nslots, (i + 1) * npages // nslots
        pieces = [(lo, hi)] if hi <= low or lo >= low else [(lo, low), (low, hi)]
        for a, b in pieces:
            base = a if a < low else a - low + ranges[1][0]
            out.append((len(out), base, b - a))
    return out


def _open_vm(spec: RunSpec, collector: Collector):
    kw = collector.vm_options()
    if spec.backend == "kvm":
        from .kvm import KvmVM
        if kw:
            raise ValueError(f"design {spec.design!r} exists only in the simulator")
        vm = KvmVM()
        top = max(base + n for base, n in (ram_ranges(spec.memory))) * PAGE_SIZE
        if top > vm.guest_phys_limit:
            vm.close()
            raise ValueError(f"memory {spec.memory} needs guest addresses up to {top:#x}; "
                             f"this KVM guest reaches {vm.guest_phys_limit:#x}")
        return vm
    from .vm import VM
    return VM(faults=spec.faults, log_every_write=spec.log_every_write, **kw)


class Runner:
    """One run of a RunSpec; ``run()`` returns the RunResult."""

    def __init__(self, spec: RunSpec, on_progress: Optional[Callable[[float], None]] = None,
                 clock: Callable[[], int] = time.perf_counter_ns) -> None:
        spec.validate()
        self.spec = spec
        self.on_progress = on_progress
        #: every time the meter sees (integer ns); a test may drive it
        self.clock = clock
        # Paced runs: page writes per second per vCPU.
        self.pace: Optional[List[float]] = None
        if spec.dirty_rate is not None:
            self.pace = [pages_per_s(spec.dirty_rate) / spec.vcpus] * spec.vcpus
        self.guest_ns = 0
        self.rates = rates(spec.rate, spec.vcpus)
        top = max(self.rates)
        # Per-vCPU writes in proportion to its rate; the fastest does `writes`.
        self.quota = [max(1, spec.writes * r // top) for r in self.rates]
        self.lock = threading.Lock()
        self.tracking_ns = 0
        self.tracking_wall_ns = 0
        self.calls = 0
        self.pages = 0
        # Per-vCPU counters: each is written by its own vCPU's thread only.
        self.full = [0] * spec.vcpus
        self.done = [0] * spec.vcpus
        self.seq = [0] * spec.vcpus
        self.errors: List[BaseException] = []
        # Per vCPU: the chunk it is running ([gfns, values, writes done]).
        self.current: List[Optional[list]] = [None] * spec.vcpus

    # -- the harvest: every caller goes through here --------------------
    def harvest(self, exited_at: Optional[int] = None) -> int:
        """Harvest every page logged so far (the design's calls, then the checks' copies).

        A vCPU that exited ring-full at clock time ``exited_at`` gets back how
        long it could not run: until this harvest's reset, less the time the
        lock was held meanwhile for bookkeeping that is no part of a design.
        """
        with self.lock:
            meter = self.meter
            # CPU time of this thread: on an oversubscribed host the wall time
            # would also count the time the harvester waited for a CPU.
            c0 = time.thread_time_ns()
            t0 = meter.harvest_begin()
            h = self.collector.harvest()
            t1 = self.clock()
            self.tracking_ns += time.thread_time_ns() - c0
            self.tracking_wall_ns += t1 - t0
            self.calls += 1
            self.pages += sum(len(o) for o in h.values())
            stalled = 0
            if exited_at is not None:
                stalled = t1 - exited_at - meter.held_within(exited_at, t0)
            meter.harvest_end(t0, t1, h)
            # Copy while holding the lock, so an older harvest never overwrites a newer one.
            for c in self.checks:
                c.absorb(h)
            meter.held(t1, self.clock())
        return stalled

    # -- setup ------------------------------------------------------------
    def _setup(self) -> None:
        spec = self.spec
        self.timed: Optional[TimedReplay] = None
        if spec.trace_speed is not None:
            self.timed = TimedReplay(load_trace_file(spec.workload.trace, unit=spec.trace_unit),
                                     spec.vcpus, spec.trace_speed, spec.duration, spec.trace_end)
            if self.timed.npages > spec.memory // PAGE_SIZE:
                raise ValueError(f"the trace writes RAM page {self.timed.npages - 1}: the guest needs "
                                 f"at least {self.timed.npages * PAGE_SIZE} bytes of memory")
            # Progress counts the events the replay will ask for.
            passes = self.timed.run_s / self.timed.length
            if spec.trace_end != "loop":
                passes = min(1.0, passes)
            self.quota = [max(1, int(len(g) * passes)) for _, g in self.timed.shares]
        self.collector = make_collector(spec.design, spec.ring_entries)
        self.vm = _open_vm(spec, self.collector)
        from .vm import MEM_LOG_DIRTY_PAGES
        self.collector.configure(self.vm)
        self.slots = layout(spec.memory, spec.slots)
        for sid, base, n in self.slots:
            self.vm.set_user_memory_region(sid, base * PAGE_SIZE, n * PAGE_SIZE, MEM_LOG_DIRTY_PAGES)
        self.vcpus = [self.vm.create_vcpu(i) for i in range(spec.vcpus)]
        for knob in spec.ring_knobs:
            for v in self.vcpus:
                if not hasattr(v.dirty_ring, knob):
                    raise ValueError(f"this ring has no {knob!r} knob")
                setattr(v.dirty_ring, knob, True)
        self.collector.attach(self.vm, self.slots, self.vcpus)
        self.meter = Meter(
            spec.memory // PAGE_SIZE,
            {sid: int(ram_index(np.array([base]), spec.memory)[0]) for sid, base, _n in self.slots},
            dedupe=spec.design in RING_DESIGNS,          # a page may be in two rings
            initially_set=spec.design == "clear-log",
            ages=spec.ages, clock=self.clock)
        self.budgets = "max_writes" in inspect.signature(self.vcpus[0].run).parameters
        self.per_write_values = spec.backend == "sim"
        if self.timed is None:
            self.plans = spec.workload.plans(spec.vcpus, spec.memory // PAGE_SIZE, spec.seed)
        self.checks: List[Check] = []
        if spec.check in ("shadow", "both"):
            self.checks.append(ShadowCopy(self.vm, self.slots))
        if spec.check in ("selftest", "both"):
            self.checks.append(SelftestCheck(self.vm, self.slots,
                                             initially_set=spec.design == "clear-log"))
        self.final: Optional[FinalValues] = None
        if spec.check != "none":
            # Deterministic runs do every write in this thread, in call order.
            self.final = FinalValues(self.vm, self.slots, spec.vcpus,
                                     ordered=spec.mode == "deterministic")
            self.checks.append(self.final)
        self.schedule = np.random.default_rng([spec.seed, 0x5C4ED])

    # -- guest values ------------------------------------------------------
    def _values(self, i: int, n: int, rnd: int):
        """The selftest writes the round number; otherwise each write is unique."""
        if self.spec.check in ("selftest", "both"):
            return rnd
        tag = (i + 1) << 40
        if self.per_write_values:
            vals = np.arange(self.seq[i], self.seq[i] + n, dtype=np.uint64) + np.uint64(tag + 1)
            self.seq[i] += n
            return vals
        self.seq[i] += 1        # real KVM's guest writes one value per plan
        return tag + self.seq[i]

    # -- running one chunk -----------------------------------------------
    def _chunk(self, i: int, n: int, rnd: int):
        """vCPU i's next ``n`` writes: (gfns, values)."""
        return ram_gfns(self.plans[i].take(n), self.spec.memory), self._values(i, n, rnd)

    def _record(self, i: int, writes: int, token) -> None:
        """The next ``writes`` writes of vCPU i's chunk were done by the run started at ``token``:
        tell the meter and FinalValues."""
        cur = self.current[i]
        if cur is None or writes == 0:
            return
        gfns, values, done = cur
        written = gfns[done:done + writes]
        self.meter.after_run(token, ram_index(written, self.spec.memory))
        if self.final is not None:
            vals = values[done:done + writes] if isinstance(values, np.ndarray) else values
            self.final.wrote(i, written, vals)
        cur[2] = done + writes

    def _run_vcpu(self, i: int, gfns=None, value=None, budget: Optional[int] = None) -> int:
        """Run vCPU i (a new chunk, or resume) up to ``budget`` writes; harvest on full exits."""
        v = self.vcpus[i]
        left = budget
        total = idle = 0
        first = gfns is not None
        if first:
            self.current[i] = [gfns, value, 0]
        while True:
            kw = {"max_writes": left} if left is not None else {}
            token = self.meter.before_run()
            ex = v.run(gfns, value, **kw) if first else v.run(**kw)
            first = False
            self._record(i, ex.writes, token)
            total += ex.writes
            self.done[i] += ex.writes
            if left is not None:
                left -= ex.writes
            if ex.reason == EXIT_HLT and ex.remaining == 0:
                return total
            if ex.reason == EXIT_BUDGET and left == 0:
                return total
            if ex.reason in FULL_EXITS:
                exited = self.clock()
                self.full[i] += 1
                idle = idle + 1 if ex.writes == 0 else 0
                if idle > _MAX_IDLE_FULL_EXITS:
                    raise RuntimeError(f"vCPU {i} keeps exiting {ex.name} after harvests")
                self.meter.stalled(self.harvest(exited_at=exited))
                if left == 0:
                    return total
                continue
            raise RuntimeError(f"vCPU {i} exited with {ex.name} ({ex.remaining} writes left)")

    # -- threads ------------------------------------------------------------
    def _timed_writes(self, i: int, rnd: int, stop: threading.Event) -> None:
        """vCPU i's share of the timed trace in this round's replay window, each write when due."""
        assert self.timed is not None
        n = self.spec.rounds
        lo, hi = (rnd - 1) * self.timed.run_s / n, rnd * self.timed.run_s / n
        mem = self.spec.memory
        self.timed.writes(i, lo, hi, stop,
                          lambda g: self._run_vcpu(i, ram_gfns(g, mem), self._values(i, len(g), rnd)))

    def _paced_writes(self, i: int, quota: int, rnd: int, stop: threading.Event) -> None:
        """vCPU i at its share of the dirty rate: batches as the token bucket allows."""
        assert self.pace is not None
        bucket = TokenBucket(self.pace[i], clock=self.clock)
        while quota > 0 and not stop.is_set():
            most = min(self.rates[i], quota)
            n = bucket.take(most)
            if n == 0:
                stop.wait(bucket.wait_s(most))
                continue
            self._run_vcpu(i, *self._chunk(i, n, rnd))
            quota -= n

    def _vcpu_thread(self, i: int, quota: int, rnd: int, stop: threading.Event,
                     finished: Callable[[], None]) -> None:
        try:
            if self.spec.cpus is not None:
                os.sched_setaffinity(0, self.spec.cpus)     # 0: this thread only
            if self.spec.vcpu_nice:
                # Only this thread: the harvester keeps its cadence on a busy host.
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.spec.vcpu_nice)
            if self.timed is not None:
                self._timed_writes(i, rnd, stop)
            elif self.pace is not None:
                self._paced_writes(i, quota, rnd, stop)
                quota = 0
            while self.timed is None and quota > 0 and not stop.is_set():
                n = min(self.rates[i], quota)
                self._run_vcpu(i, *self._chunk(i, n, rnd))
                quota -= n
        except BaseException as e:      # re-raised by the collector thread
            self.errors.append(e)
            stop.set()
        finally:
            finished()

    def _round_threads(self, quotas: List[int], rnd: int, deadline: Optional[float]) -> None:
        stop, all_done = threading.Event(), threading.Event()
        left = [len(quotas)]
        left_lock = threading.Lock()

        def finished() -> None:
            with left_lock:
                left[0] -= 1
                if left[0] == 0:
                    all_done.set()

        threads = [threading.Thread(target=self._vcpu_thread, args=(i, q, rnd, stop, finished),
                                    name=f"vcpu{i}", daemon=True) for i, q in enumerate(quotas)]
        interval = self.spec.interval
        g0 = time.perf_counter_ns()
        for t in threads:
            t.start()
        try:
            # Harvest an interval after the end of the last harvest (the reaper sleeps
            # between reaps, as QEMU's does); stop at the deadline even when it comes first.
            last = time.perf_counter()
            while True:
                now = time.perf_counter()
                wait = last + interval - now
                if deadline is not None and not stop.is_set():
                    wait = min(wait, deadline - now)
                if all_done.wait(max(0.0, wait)):
                    break
                now = time.perf_counter()
                if now >= last + interval:
                    self.harvest()
                    self._progress(deadline)
                    last = time.perf_counter()
                if deadline is not None and now >= deadline:
                    stop.set()
        finally:
            stop.set()
            for t in threads:
                t.join()
            self.guest_ns += time.perf_counter_ns() - g0
        if self.errors:
            raise self.errors[0]

    # -- deterministic --------------------------------------------------------
    def _round_deterministic(self, quotas: List[int], rnd: int) -> None:
        rng, quotas, step = self.schedule, list(quotas), 0
        while any(quotas):
            slices: Dict[int, List[int]] = {}
            tokens: List[int] = []
            chunks = {}
            for i, q in enumerate(quotas):
                if q == 0:
                    continue
                n = min(self.rates[i], q)
                quotas[i] -= n
                chunks[i] = self._chunk(i, n, rnd)
                k = int(rng.integers(1, 5)) if self.budgets and n > 1 else 1
                cuts = np.sort(rng.choice(np.arange(1, n), size=min(k, n) - 1, replace=False)) \
                    if k > 1 else np.zeros(0, np.int64)
                slices[i] = list(np.diff(np.concatenate([[0], cuts, [n]])).astype(int))
                tokens += [i] * len(slices[i])
            rng.shuffle(tokens)
            at = int(rng.integers(0, len(tokens) + 1)) if step % self.spec.period == self.spec.period - 1 else -1
            for pos, i in enumerate(tokens):
                if pos == at:
                    self.harvest()
                size = slices[i].pop(0)
                if i in chunks:
                    gfns, vals = chunks.pop(i)
                    self._run_vcpu(i, gfns, vals, size if self.budgets else None)
                else:
                    self._run_vcpu(i, budget=size)
            if at == len(tokens):
                self.harvest()
            step += 1
            self._progress(None)

    # -- the whole run ------------------------------------------------------
    def _progress(self, deadline: Optional[float]) -> None:
        if self.on_progress is None:
            return
        if deadline is not None:
            total = self.spec.duration
            frac = 1 - max(0.0, deadline - time.perf_counter()) / total if total else 1.0
            self.on_progress(min(1.0, (self._rounds_done + frac) / self.spec.rounds))
        else:
            self.on_progress(min(1.0, sum(self.done) / max(1, sum(self.quota))))

    def run(self) -> RunResult:
        spec = self.spec
        saved = None
        self.vm = None
        try:
            # Inside the try: a set-up failing after the VM exists closes it.
            self._setup()
            if spec.cpus is not None and spec.mode == "threads":
                saved = os.sched_getaffinity(0)
                os.sched_setaffinity(0, spec.cpus)
            self._rounds_done = 0
            if self.meter.initially_set:
                # INITIALLY_SET: the log starts all ones and nothing is protected.  Take that
                # first harvest (every page: GET, then CLEAR protects them all) before the guest
                # runs, as a migration's first sync does, so it is counted apart exactly and the
                # guest then runs against armed tracking, as it will from there on.
                self.harvest()
            t0 = time.perf_counter()
            for rnd in range(1, spec.rounds + 1):
                quotas = [q * rnd // spec.rounds - q * (rnd - 1) // spec.rounds for q in self.quota]
                if spec.mode == "threads":
                    deadline = None
                    if spec.duration is not None:
                        deadline = time.perf_counter() + spec.duration / spec.rounds
                        quotas = [1 << 62] * spec.vcpus
                    self._round_threads(quotas, rnd, deadline)
                else:
                    g0 = time.perf_counter_ns()
                    self._round_deterministic(quotas, rnd)
                    self.guest_ns += time.perf_counter_ns() - g0
                # vCPUs stopped: drain everything logged in the round.
                self.harvest()
                for c in self.checks:
                    c.end_round(rnd)
                self._rounds_done = rnd
            elapsed = time.perf_counter() - t0
            for c in self.checks:
                c.finish()
            return self._result(elapsed)
        finally:
            if saved is not None:
                os.sched_setaffinity(0, saved)
            if self.vm is not None:
                self.vm.close()

    def _result(self, elapsed: float) -> RunResult:
        spec = self.spec
        stats = getattr(self.vm, "stats", None)
        writes = sum(self.done)
        shadow = next((c for c in self.checks if c.name == "shadow"), None)
        final = self.final
        selftest = next((c for c in self.checks if c.name == "selftest"), None)
        problems = list(self.collector.problems)
        for c in self.checks:
            if getattr(c, "bogus", 0):
                problems.append(f"{c.name}: {c.bogus} harvested entries name no page of any slot")
                break
        lost = [str(x) for c in self.checks for x in c.details]
        m = self.meter.stats()
        guest_s = self.guest_ns / 1e9
        return RunResult(
            design=spec.design, mode=spec.mode, backend=spec.backend, vcpus=spec.vcpus,
            memory=spec.memory, pattern=spec.workload.describe(),
            writes=writes,
            wp_faults=int(stats["faults"]) if stats and "faults" in stats else None,
            pages_harvested=self.pages, harvest_calls=self.calls, full_exits=sum(self.full),
            tracking_s=self.tracking_ns / 1e9,
            # Per page the guest dirtied: clear-log's INITIALLY_SET pages are not dirty pages.
            tracking_ns_per_page=(self.tracking_ns / self.meter.pages_dirtied
                                  if self.meter.pages_dirtied else None),
            tracking_wall_s=self.tracking_wall_ns / 1e9,
            elapsed_s=elapsed, writes_per_s=writes / elapsed if elapsed > 0 else 0.0,
            check=spec.check,
            lost_pages=shadow.count if shadow else None,
            violations=selftest.count if selftest else None,
            unwritten_pages=final.count if final else None,
            lost=lost, problems=problems,
            bad_rounds=sorted({r for c in self.checks for r in c.bad_rounds}),
            trace_ended=self.timed.ended if self.timed else None,
            trace_late_s=max(self.timed.late_s) if self.timed else None,
            dirty_rate=spec.dirty_rate,
            achieved_rate=writes * PAGE_SIZE / guest_s if guest_s > 0 else 0.0,
            dirtied_rate=self.meter.pages_dirtied * PAGE_SIZE / guest_s if guest_s > 0 else 0.0,
            guest_s=guest_s, **m)


def preflight(spec: RunSpec) -> None:
    """Check ``spec`` and set its design up on a VM with no memory, then close it.

    A design's own limits (a ring size it refuses, a backend it does not
    run on) fail here, before any run of a long grid.
    """
    spec.validate()
    collector = make_collector(spec.design, spec.ring_entries)
    vm = _open_vm(spec, collector)
    try:
        collector.configure(vm)
    finally:
        vm.close()


def run(spec: RunSpec, on_progress: Optional[Callable[[float], None]] = None) -> RunResult:
    """Run ``spec`` once and return what was measured."""
    return Runner(spec, on_progress).run()
