"""QEMU's pre-copy migration loop over a real tracker, in virtual time.

migration_iteration_run, ram_save_iterate and migration_completion, reduced
to what decides time, bytes and downtime:

- setup (ram_save_setup): every page flagged in the migration bitmap, dirty
  logging started, a first sync;
- each quantum: the vCPUs write (guest.py), the ring reaper may run, and the
  migration thread sends pages from the bitmap walk at min(link,
  max-bandwidth) for the time its syncs and clears leave it;
- every ~100 ms the bandwidth achieved is measured (migration_update_counters)
  and threshold = bandwidth x downtime-limit;
- after each ram_save_iterate (at most 50 ms of sending: MAX_WAIT), when
  the bytes still flagged are at or below the threshold, sync
  (ram_state_pending_exact); if the bytes flagged after it are below the
  threshold: stop the guest, sync once more and send the rest
  (migration_completion).  Downtime = that final sync + the rest on the wire.

A time or round limit ends a migration that does not converge: the guest is
then stopped and copied anyway, so its destination is still verified, and the
result says ``converged=False`` and why.
"""
from __future__ import annotations

import time
from typing import Union

from ..api import PAGE_SIZE
from ..vm import VM
from ..workloads import Workload
from .config import MigrationConfig
from .costs import Costs, resolve
from .memory import Destination, GuestMemory, MigrationBitmap
from .results import MigrationResult, RoundRow, TimelinePoint, VerificationError
from .throttle import AutoConverge, DirtyLimit
from .trackers import make_tracker
from ..units import fmt_rate
from .tracepace import TracePace
from .vcpus import Guest

BANDWIDTH_PERIOD = 0.1      # BUFFER_DELAY: QEMU re-measures bandwidth every 100 ms
ITERATION = 0.05            # MAX_WAIT: ram_save_iterate returns after at most 50 ms of sending
THROTTLE_PERIOD = 1.0       # auto-converge checks at most once per second of syncs


def build(cfg: MigrationConfig, costs: Costs):
    """The VM, its memory, tracker and guest for ``cfg`` (also used by checkpoint.py)."""
    tracker = make_tracker(cfg.design, costs, ring_entries=cfg.ring_entries,
                           reaper_period=cfg.reaper_period, clear_shift=cfg.clear_shift)
    vm = VM(faults=cfg.faults, pml=cfg.pml, **tracker.vm_options())
    tracker.configure(vm)
    mem = GuestMemory(vm, cfg.npages, cfg.slot_pages)
    tracker.attach(mem)
    rates = cfg.vcpu_dirty_rates or [cfg.dirty_rate / cfg.vcpus] * cfg.vcpus
    if cfg.trace_speed is not None:
        pace = TracePace.open(cfg.trace, cfg.vcpus, cfg.trace_speed, cfg.trace_end, cfg.trace_unit)
        if pace.npages > cfg.npages:
            raise ValueError(f"the trace writes page {pace.npages - 1}: the guest needs at least "
                             f"{pace.npages * PAGE_SIZE} bytes of memory")
        guest = Guest(vm, tracker, costs, None, rates, pace)
    else:
        plans = Workload(pattern=cfg.pattern, trace=cfg.trace).plans(cfg.vcpus, cfg.npages, cfg.seed)
        guest = Guest(vm, tracker, costs, plans, [r / PAGE_SIZE for r in rates])
    return vm, mem, tracker, guest


def note_trace(res, guest: Guest) -> None:
    """Say how a timed trace ended: looped, stopped, or neither (the run ended first)."""
    if guest.pace is not None:
        res.trace_laps = guest.pace.laps
        res.trace_stopped = guest.pace.stopped


def run(cfg: MigrationConfig, costs: Union[Costs, str, None] = None, *,
        check: bool = False) -> MigrationResult:
    """Migrate one guest; ``check=True`` raises VerificationError on a destination mismatch."""
    wall = time.perf_counter()
    costs = resolve(costs)
    if cfg.cost_overrides:
        costs = costs.override(cfg.cost_overrides)
    vm, mem, tracker, guest = build(cfg, costs)
    try:
        res = _Precopy(cfg, costs, vm, mem, tracker, guest).run()
    finally:
        vm.close()
    res.wall_time = time.perf_counter() - wall
    note_trace(res, guest)
    if check and not res.verified:
        raise VerificationError(res.mismatched_gfns, len(res.mismatched_gfns))
    return res


class _Precopy:
    def __init__(self, cfg: MigrationConfig, costs: Costs, vm, mem: GuestMemory, tracker,
                 guest: Guest) -> None:
        self.cfg, self.costs, self.vm, self.mem = cfg, costs, vm, mem
        self.tracker, self.guest = tracker, guest
        self.mig = MigrationBitmap(cfg.npages)
        self.dest = Destination(mem)
        self.rate = cfg.send_rate
        if costs.send_per_byte:
            self.rate = min(self.rate, 1.0 / costs.send_per_byte)
        self.t = 0.0
        self.busy = 0.0            # migration thread time owed (syncs, clears)
        self.sent = 0              # bytes
        self.frac = 0.0
        self.rows = []
        self.timeline = []
        self.rounds = 0
        self.threshold = 0.0
        self.bw = 0.0
        self.period = (0.0, 0)     # (start time, bytes sent at start) of the bandwidth period
        self.auto = AutoConverge(tailslow=cfg.tailslow) if cfg.aid == "auto-converge" else None
        self.limit = (DirtyLimit(cfg.dirty_limit_mb, cfg.ring_entries, cfg.vcpus)
                      if cfg.aid == "dirty-limit" else None)
        self.tperiod = (0.0, 0, 0)  # (time, bytes sent, pages newly dirty) since the last throttle check
        self.last_new = (0.0, 0)    # (time, pages newly dirty) at the previous sync
        self.dl_logged_t = 0.0
        self.since_check = 0.0
        self._dl_high = 0           # dirty-limit's trigger count (auto-converge's rule)
        self._sent_since_row = 0
        self.final_rate = 0.0       # bytes/s newly dirty over the last sync period

    # -- the migration thread's operations -----------------------------------
    def _sync(self) -> int:
        before = self.mig.count
        cost, lock, kick = self.tracker.sync(self.mig)
        new = self.mig.count - before
        self.busy += cost
        self.guest.stall_all(kick)
        self.guest.lock_wait(lock)
        return new

    def _send(self, npages: int) -> int:
        g = self.mig.take(npages)
        if len(g):
            cost, lock = self.tracker.before_send(g)
            self.busy += cost
            self.guest.lock_wait(lock)
            self.dest.send(g)
            self.sent += len(g) * PAGE_SIZE
        return len(g)

    def _row(self, new: int, sync_cost: float) -> None:
        if self.rows:
            self.rows[-1].pages_sent = self._sent_since_row
        self._sent_since_row = 0
        bw = self.bw or self.rate
        self.rows.append(RoundRow(self.rounds, self.t, sync_cost, self.mig.count, 0, self.bw,
                                  self.mig.count * PAGE_SIZE / bw))

    def _throttle(self, new: int) -> None:
        """migration_trigger_throttle, in migration_bitmap_sync."""
        t0, sent0, dirty0 = self.tperiod
        dirty = dirty0 + new
        if self.t - t0 < THROTTLE_PERIOD:
            self.tperiod = (t0, sent0, dirty)
            return
        self.tperiod = (self.t, self.sent, 0)
        if self.auto is None and self.limit is None:
            return
        if self.auto is not None:
            if self.auto.check(dirty * PAGE_SIZE, self.sent - sent0):
                self.guest.throttle_pct = self.auto.pct / 100.0
        elif not self.limit.active:
            probe = AutoConverge()
            probe.high = self._dl_high
            if probe.check(dirty * PAGE_SIZE, self.sent - sent0):
                self.limit.start(self.t)
                self.guest.logged()
                self.dl_logged_t = self.t
            self._dl_high = probe.high

    def run(self) -> MigrationResult:
        cfg, guest = self.cfg, self.guest
        # ram_save_setup: all pages to send, logging on, first sync.
        self.mig.set_all()
        self.busy += self.tracker.start()
        before = self.busy
        self._sync()
        self._row(0, self.busy - before)
        why = ""
        converged = False
        while True:
            dt = cfg.quantum
            guest.run(dt)
            cost, lock = self.tracker.tick(self.t + dt)
            guest.lock_wait(lock)
            avail = dt - self.busy
            if avail <= 0:
                self.busy = -avail
            else:
                self.busy = 0.0
                want = avail * self.rate / PAGE_SIZE + self.frac
                n = int(want)
                self.frac = want - n
                self._sent_since_row += self._send(n)
            self.t += dt
            if self.limit is not None and self.limit.due(self.t):
                self.limit.adjust(self.t, guest.logged(), self.t - self.dl_logged_t)
                self.dl_logged_t = self.t
                guest.limit_sleep[:] = self.limit.sleep_us * 1e-6
            p0, b0 = self.period
            if self.t - p0 >= BANDWIDTH_PERIOD - 1e-12:
                self.bw = (self.sent - b0) / (self.t - p0)
                self.threshold = self.bw * cfg.downtime_limit
                self.period = (self.t, self.sent)
                self.timeline.append(TimelinePoint(self.t, self.mig.count, self.sent))
            self.since_check += dt
            if self.since_check < ITERATION - 1e-12:
                continue
            self.since_check = 0.0
            if self.bw and self.mig.count * PAGE_SIZE <= self.threshold:
                before = self.busy
                new = self._sync()
                self.rounds += 1
                self._row(new, self.busy - before)
                self._throttle(new)
                self.final_rate = self._dirty_rate(new)
                if self.mig.count * PAGE_SIZE < self.threshold:
                    converged, why = True, "converged: dirty bytes below bandwidth x downtime-limit"
                    break
                if cfg.postcopy_after and self.rounds >= cfg.postcopy_after:
                    return self._postcopy()
            if self.t >= cfg.max_time - 1e-9:
                why = (f"did not converge: time limit {cfg.max_time:g} s reached after "
                       f"{self.rounds} rounds" + self._rates())
                break
            if cfg.max_rounds and self.rounds >= cfg.max_rounds:
                why = f"did not converge: round limit {cfg.max_rounds} reached" + self._rates()
                break
        return self._complete(converged, why)

    def _rates(self) -> str:
        if not self.rounds:
            return f" (still in the bulk round at {fmt_rate(self.bw)})"
        return (f"; last dirty rate {fmt_rate(self.final_rate)} (new dirty pages per second "
                f"between syncs) vs bandwidth {fmt_rate(self.bw)}")

    def _dirty_rate(self, new: int) -> float:
        t0, _ = self.last_new
        self.last_new = (self.t, new)
        return new * PAGE_SIZE / (self.t - t0) if self.t > t0 else 0.0

    def _postcopy(self) -> MigrationResult:
        """Switch to postcopy: stop, sync, discard; run at the destination, pull and push."""
        from .postcopy import Postcopy
        cfg = self.cfg
        self.guest.stop()
        stop = self.t
        self.rows[-1].pages_sent = self._sent_since_row
        self._sync()
        downtime = self.busy
        self.busy = 0.0
        self.t += downtime
        self.timeline.append(TimelinePoint(self.t, self.mig.count, self.sent))
        pc = Postcopy(self.guest, self.mig, self.dest, self.rate, cfg.postcopy_rtt)
        last = self.t
        while self.mig.count:
            dt = cfg.quantum
            link = pc.run(dt)
            pc.push(max(0.0, dt - link))
            self.t += dt
            if self.t - last >= BANDWIDTH_PERIOD - 1e-12 or not self.mig.count:
                last = self.t
                self.timeline.append(TimelinePoint(self.t, self.mig.count, self.sent + pc.sent))
        bad, total = pc.mismatches()
        st = self.tracker.stats
        return MigrationResult(
            design=self.tracker.name, params=cfg.to_json(), converged=True,
            why=f"postcopy after {self.rounds} rounds: {pc.faults} remote faults",
            total_time=self.t, downtime=downtime, bytes_sent=self.sent + pc.sent,
            guest_bytes=cfg.memory, rounds=self.rounds, verified=total == 0, mismatched_gfns=bad,
            vcpus=self.guest.finish(), table=self.rows, timeline=self.timeline, stop_time=stop,
            tracker={k: float(v) for k, v in st.items()},
            throttle_pct=self.auto.pct if self.auto else 0.0,
            postcopy_faults=pc.faults, postcopy_stall=pc.stall, final_dirty_rate=self.final_rate)

    def _complete(self, converged: bool, why: str) -> MigrationResult:
        """migration_completion: stop the guest, final sync, send the rest."""
        self.guest.stop()
        stop = self.t
        self.rows[-1].pages_sent = self._sent_since_row
        self._sync()
        rest = self.mig.count
        self._send(rest)
        downtime = self.busy + rest * PAGE_SIZE / self.rate
        self.timeline.append(TimelinePoint(self.t, self.mig.count, self.sent))
        end = stop + downtime
        self.timeline.append(TimelinePoint(end, 0, self.sent))
        bad, total = self.dest.mismatches()
        cfg = self.cfg
        st = self.tracker.stats
        return MigrationResult(
            design=self.tracker.name, params=cfg.to_json(), converged=converged, why=why,
            total_time=end, downtime=downtime, bytes_sent=self.sent, guest_bytes=cfg.memory,
            rounds=self.rounds, verified=total == 0, mismatched_gfns=bad,
            vcpus=self.guest.finish(), table=self.rows, timeline=self.timeline, stop_time=stop,
            tracker={k: float(v) for k, v in st.items()},
            throttle_pct=self.auto.pct if self.auto else 0.0,
            final_dirty_rate=self.final_rate)
