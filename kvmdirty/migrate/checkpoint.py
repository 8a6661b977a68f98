"""Checkpointing (COLO / Remus; seed 002's use case) over a real tracker, in virtual time.

The guest runs an epoch (``epoch`` seconds, or until it has dirtied
``epoch_pages`` pages, whichever comes first), then is paused: its vCPUs are
kicked out, the tracker harvests (and, for clear-log, clears) the dirty pages,
they are copied to the secondary at min(link, max-bandwidth), and the guest
resumes.  The pause is what users feel; this reports it per checkpoint.

Verified after every checkpoint: each page the guest wrote in the epoch (known
from the workload plans, independently of the tracker) and each page sent has
the same value at the secondary as at the primary; with the initial equality
(both start zeroed) that is the whole memory.  At the end every page is compared.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np

from ..api import PAGE_SIZE
from .config import MigrationConfig
from .costs import Costs, resolve
from .memory import Destination, MigrationBitmap
from .precopy import build, note_trace
from .results import CheckpointResult, VerificationError
from ..units import fmt_bytes, fmt_rate, fmt_time


@dataclass
class CheckpointConfig:
    migration: MigrationConfig
    epoch: Optional[float] = 0.1          # seconds of guest time per epoch (None: pages only)
    epoch_pages: Optional[int] = None     # pause once the guest has dirtied this many pages
    checkpoints: int = 50

    def __post_init__(self) -> None:
        if self.epoch is None and self.epoch_pages is None:
            raise ValueError("a checkpoint needs an epoch length or a dirty-page bound")
        if self.epoch is not None and self.epoch <= 0:
            raise ValueError("epoch must be > 0 seconds")
        if self.epoch_pages is not None and self.epoch_pages < 1:
            raise ValueError("epoch_pages must be >= 1")
        if self.checkpoints < 1:
            raise ValueError("checkpoints must be >= 1")

    @classmethod
    def from_migration(cls, cfg: MigrationConfig, *, epoch: Optional[float] = None,
                       epoch_pages: Optional[int] = None, checkpoints: int = 50) -> "CheckpointConfig":
        if epoch is None and epoch_pages is None:
            epoch = 0.1
        return cls(cfg, epoch, epoch_pages, checkpoints)


# A page-bounded epoch still ends: after this many seconds the guest is paused anyway.
MAX_EPOCH = 60.0


def run_checkpoints(cc: CheckpointConfig, costs: Union[Costs, str, None] = None, *,
                    check: bool = False) -> CheckpointResult:
    """Run ``cc.checkpoints`` epochs; ``check=True`` raises VerificationError on a mismatch."""
    wall = time.perf_counter()
    cfg = cc.migration
    costs = resolve(costs)
    if cfg.cost_overrides:
        costs = costs.override(cfg.cost_overrides)
    vm, mem, tracker, guest = build(cfg, costs)
    try:
        res = _run(cc, costs, mem, tracker, guest)
    finally:
        vm.close()
    res.wall_time = time.perf_counter() - wall
    note_trace(res, guest)
    if check and not res.verified:
        raise VerificationError(res.mismatched_gfns, len(res.mismatched_gfns))
    return res


def _run(cc: CheckpointConfig, costs: Costs, mem, tracker, guest) -> CheckpointResult:
    cfg = cc.migration
    rate = cfg.send_rate if not costs.send_per_byte else min(cfg.send_rate, 1 / costs.send_per_byte)
    mig = MigrationBitmap(cfg.npages)
    dest = Destination(mem)
    dest.received[:] = True            # primary and secondary both start zeroed
    tracker.start()
    tracker.sync(mig)                  # what logging start reports (INITIALLY_SET: every page)
    tracker.before_send(mig.take(mig.count))   # is cleared, as if sent: both sides are equal
    guest.record = []
    q = min(cfg.quantum, cc.epoch or cfg.quantum)
    pauses: List[float] = []
    pages: List[int] = []
    guest_time = 0.0
    bad: List[int] = []
    for _ in range(cc.checkpoints):
        t, dirtied = 0.0, 0
        limit = cc.epoch if cc.epoch is not None else MAX_EPOCH
        while t < limit - 1e-12:
            dt = min(q, limit - t)
            guest.run(dt)
            t += dt
            _, lock = tracker.tick(guest_time + t)
            guest.lock_wait(lock)
            if cc.epoch_pages is not None:
                dirtied += int(guest.logged().sum())
                if dirtied >= cc.epoch_pages:
                    break
        guest_time += t
        # Pause: kick the vCPUs out, harvest, copy, resume.
        cost, _, _ = tracker.sync(mig)
        gfns = mig.take(mig.count)
        clear, _ = tracker.before_send(gfns)
        dest.send(gfns)
        pause = costs.vcpu_kick + cost + clear + len(gfns) * PAGE_SIZE / rate
        pauses.append(pause)
        pages.append(len(gfns))
        written = np.concatenate(guest.record) if guest.record else np.zeros(0, np.uint64)
        guest.record = []
        touched = np.unique(np.concatenate([written.astype(np.int64), gfns.astype(np.int64)]))
        if not bad:
            bad = _check(dest, mem, touched)
    if not bad:
        bad, _ = dest.mismatches()
    stats = guest.finish()
    total = guest_time + sum(pauses)
    done = sum(v.writes for v in stats)
    wanted = sum(guest.rates) * total
    return CheckpointResult(
        design=tracker.name, params=dict(cfg.to_json(), epoch=cc.epoch, epoch_pages=cc.epoch_pages,
                                         checkpoints=cc.checkpoints),
        checkpoints=len(pauses), pauses=pauses, pages=pages, guest_time=guest_time,
        total_time=total, slowdown=wanted / done if done else float("inf"),
        verified=not bad, mismatched_gfns=bad, vcpus=stats)


def _check(dest: Destination, mem, gfns: np.ndarray) -> List[int]:
    """gfns (sorted) whose secondary value differs from the primary's."""
    out: List[int] = []
    for sid, first, part in mem.split(gfns):
        diff = dest.values[part] != mem.values(sid)[part - first]
        out.extend(int(g) for g in part[diff][:64])
    return out


def format_checkpoints(results: Sequence[CheckpointResult]) -> str:
    from .command import _table
    rows = [("design", "ring", "memory", "dirty", "epoch", "ckpts", "pause p50", "pause p99",
             "pause max", "pages/ckpt", "slowdown", "verified", "wall")]
    for r in results:
        p = r.params
        ep = (f"{p['epoch']:g} s" if p["epoch"] else "") + \
             (f" / {p['epoch_pages']} pages" if p["epoch_pages"] else "")
        rows.append((r.design, str(p["ring_entries"]) if r.design == "ring" else "-",
                     fmt_bytes(p["memory"]), fmt_rate(p["dirty_rate"]), ep.strip(" /"),
                     str(r.checkpoints), fmt_time(r.percentile(50)), fmt_time(r.percentile(99)),
                     fmt_time(max(r.pauses)), f"{np.mean(r.pages):.0f}", f"{r.slowdown:.3f}x",
                     "ok" if r.verified else "MISMATCH", f"{r.wall_time:.1f} s"))
    return _table(rows)


__all__ = ["CheckpointConfig", "run_checkpoints", "format_checkpoints"]
