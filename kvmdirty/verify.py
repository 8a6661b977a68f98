"""No-loss verifiers: nothing the guest writes may be missed by a harvest.

Two checks, both fed by the runner with every harvest (``absorb``), told when
a round ends with the vCPUs stopped (``end_round``), and asked for the verdict
at the end (``finish``):

ShadowCopy (the migration check, as QEMU uses the log)
    A destination copy of guest memory, taken whole at the start and then
    updated only from harvested pages, read after the harvest has re-protected
    them.  At the end the vCPUs are stopped, a last harvest is copied (the
    stop-and-copy), and every page whose destination value differs from guest
    memory is a lost write, reported with its gfn and both values.  The
    runner stops the vCPUs at the end of every round, so the comparison is
    made at each round's end, where a migration could have finished.  Values
    must be distinct per write (the runner writes sequence numbers) for every
    lost write to be visible.

SelftestCheck (the kernel selftest's per-iteration check, dirty_log_test.c)
    The guest writes the round number.  At the end of each round (vCPUs
    stopped, everything harvested) every page is checked: a page reported
    dirty in the round must hold the round number; a page not reported must
    hold a smaller one.  As the selftest does, a reported page holding 0 is
    tolerated in round 1 with INITIALLY_SET (every page starts reported).
    The runner stops and drains every vCPU before the check, so the selftest's
    ring tolerance (the last page of a harvest holding an older value) is
    not needed.

FinalValues (the backend check: did the guest write what the plans say?)
    Independent of any harvest.  The runner reports every write it was told
    was done (``wrote``: the vCPU, the gfns in plan order, their values).  At
    each round's end (vCPUs stopped) every page must hold what the plans
    leave there: a page no plan wrote in the round keeps its value from the
    round before; a page written holds a value one of the writes could have
    left.  With ``ordered`` (one thread ran everything, so the order of the
    calls is the order of the writes) that is the last write; with
    concurrent vCPUs it is one of the last values each vCPU wrote there (a
    vCPU's own writes are ordered; two vCPUs' writes to one page are not).
    This catches a backend that writes the wrong pages, misses planned
    writes or writes where no plan went, which "harvested pages match memory"
    cannot see.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

SlotSpec = Tuple[int, int, int]      # (slot id, base gfn, npages)

#: At most this many findings are kept in detail (all are counted).
MAX_DETAILS = 20


@dataclass(frozen=True)
class LostPage:
    """A write the destination never received."""

    gfn: int
    guest: int            # the value in guest memory
    copy: int             # the value in the destination copy
    round: int = 1        # the round whose stop-and-copy found it

    def __str__(self) -> str:
        return (f"round {self.round}: gfn {self.gfn:#x}: guest has {self.guest:#x}, "
                f"copy has {self.copy:#x}")


@dataclass(frozen=True)
class Violation:
    """A page breaking the selftest's rule in one round."""

    round: int
    gfn: int
    value: int
    reported: bool

    def __str__(self) -> str:
        if self.reported:
            return f"round {self.round}: gfn {self.gfn:#x} reported dirty but holds {self.value}"
        return f"round {self.round}: gfn {self.gfn:#x} not reported but holds {self.value}"


@dataclass(frozen=True)
class UnwrittenPage:
    """A page whose final value is not what the plans' writes leave there."""

    gfn: int
    guest: int            # the value in guest memory
    expected: int         # a value the plans could have left (the last write, or the old value)
    round: int = 1

    def __str__(self) -> str:
        return (f"round {self.round}: gfn {self.gfn:#x}: guest has {self.guest:#x}, "
                f"the plans leave {self.expected:#x}")


class Check:
    """What the runner calls; see the module docstring."""

    name = ""
    slots: Dict[int, Tuple[int, int]] = {}
    bogus = 0                           # harvested entries naming no page of any slot

    def absorb(self, harvest: Dict[int, np.ndarray]) -> None:
        """Take one harvest: each slot's in-range offsets go to _take, the rest are counted."""
        for sid, offs in harvest.items():
            if sid not in self.slots:
                self.bogus += len(offs)
                continue
            offs, bad = _valid(offs, self.slots[sid][1])
            self.bogus += bad
            self._take(sid, offs)

    def _take(self, sid: int, offs: np.ndarray) -> None:
        pass

    def end_round(self, rnd: int) -> None:
        pass

    def finish(self) -> None:
        pass

    @property
    def count(self) -> int:
        """Findings (lost pages or violations); 0 means nothing was lost."""
        return 0

    @property
    def details(self) -> list:
        return []

    #: Rounds in which the check found something.
    bad_rounds: List[int] = []


def _valid(offs: np.ndarray, npages: int) -> Tuple[np.ndarray, int]:
    """Offsets inside the slot, and how many were not (a broken log can report anything)."""
    offs = np.asarray(offs, dtype=np.uint64)
    ok = offs < np.uint64(npages)
    if ok.all():
        return offs, 0
    return offs[ok], int(len(offs) - ok.sum())


class ShadowCopy(Check):
    name = "shadow"

    def __init__(self, vm, slots: Sequence[SlotSpec]) -> None:
        self.vm = vm
        self.slots = {sid: (base, n) for sid, base, n in slots}
        # The first full pass of a migration: everything, before the guest runs.
        self.dest = {sid: np.array(vm.memory(sid), dtype=np.uint64) for sid in self.slots}
        self.copied = 0
        self.bogus = 0                  # entries naming no page of any slot
        self.lost: List[LostPage] = []
        self._lost_count = 0
        self.bad_rounds: List[int] = []     # rounds whose stop-and-copy found a difference
        self._seen = {sid: np.zeros(n, dtype=bool) for sid, (_b, n) in self.slots.items()}

    def _take(self, sid: int, offs: np.ndarray) -> None:
        # Read after the harvest re-protected the pages: a later write is logged again.
        self.dest[sid][offs] = self.vm.memory(sid)[offs]
        self.copied += len(offs)

    def end_round(self, rnd: int) -> None:
        """vCPUs stopped, last harvest copied: the destination must equal guest memory now.

        Checked at every round's end (a migration could finish there); a page
        is counted once however many rounds it stays wrong.
        """
        for sid, (base, _n) in self.slots.items():
            mem = np.asarray(self.vm.memory(sid))
            diff = np.flatnonzero(self.dest[sid] != mem)
            if len(diff) == 0:
                continue
            if not self.bad_rounds or self.bad_rounds[-1] != rnd:
                self.bad_rounds.append(rnd)
            new = diff[~self._seen[sid][diff]]
            self._seen[sid][new] = True
            self._lost_count += len(new)
            for off in new[: max(0, MAX_DETAILS - len(self.lost))]:
                self.lost.append(LostPage(base + int(off), int(mem[off]),
                                          int(self.dest[sid][off]), rnd))

    @property
    def count(self) -> int:
        return self._lost_count

    @property
    def details(self) -> list:
        return self.lost


class SelftestCheck(Check):
    name = "selftest"

    def __init__(self, vm, slots: Sequence[SlotSpec], *, initially_set: bool = False) -> None:
        self.vm = vm
        self.slots = {sid: (base, n) for sid, base, n in slots}
        self.initially_set = initially_set
        self.reported = {sid: np.zeros(n, dtype=bool) for sid, _b, n in slots}
        self.bogus = 0
        self.rounds = 0
        self.violations: List[Violation] = []
        self.bad_rounds: List[int] = []
        self._count = 0

    def _take(self, sid: int, offs: np.ndarray) -> None:
        self.reported[sid][offs] = True

    def end_round(self, rnd: int) -> None:
        """Check round ``rnd`` (1-based: the guest wrote the value ``rnd``) and start the next."""
        self.rounds += 1
        it = np.uint64(rnd)
        for sid, (base, _n) in self.slots.items():
            mem = np.asarray(self.vm.memory(sid))
            rep = self.reported[sid]
            bad_rep = rep & (mem != it)
            if rnd == 1 and self.initially_set:
                bad_rep &= mem != 0
            bad_unrep = ~rep & (mem >= it)
            for mask, reported in ((bad_rep, True), (bad_unrep, False)):
                idx = np.flatnonzero(mask)
                self._count += len(idx)
                if len(idx) and (not self.bad_rounds or self.bad_rounds[-1] != rnd):
                    self.bad_rounds.append(rnd)
                for off in idx[: max(0, MAX_DETAILS - len(self.violations))]:
                    self.violations.append(Violation(rnd, base + int(off), int(mem[off]), reported))
            rep[:] = False

    @property
    def count(self) -> int:
        return self._count

    @property
    def details(self) -> list:
        return self.violations


# A vCPU's record of writes is folded to "last value per page" past this many.
_FOLD_AT = 1 << 20


class _Stream:
    """Writes of one ordered stream as (gfns, values) as given; folds to the last value per page.

    Folded parts hold FinalValues' dense page numbers (slots laid end to end)
    instead of gfns; ``last`` returns dense pages.
    """

    def __init__(self, owner: "FinalValues") -> None:
        self.owner = owner
        self.parts: List[Tuple[np.ndarray, np.ndarray]] = []
        self.size = 0

    def add(self, gfns: np.ndarray, values) -> None:
        self.parts.append((gfns, values))
        self.size += len(gfns)
        if self.size > _FOLD_AT and len(self.parts) > 1:
            self.parts = [self.last()]
            self.size = len(self.parts[0][0])

    def last(self) -> Tuple[np.ndarray, np.ndarray]:
        """(dense pages, values): each page once, with the value of its last write."""
        if not self.parts:
            return np.zeros(0, np.intp), np.zeros(0, np.uint64)
        folded = self.parts[0] if self.parts[0][0].dtype == np.intp else None
        fresh = self.parts[1:] if folded is not None else self.parts
        g = np.concatenate([x[0] for x in fresh]) if fresh else np.zeros(0, np.uint64)
        v = np.concatenate([np.broadcast_to(np.asarray(x[1], dtype=np.uint64), x[0].shape)
                            for x in fresh]) if fresh else np.zeros(0, np.uint64)
        p, v = self.owner._dense(g, v)
        if folded is not None:
            p, v = np.concatenate([folded[0], p]), np.concatenate([folded[1], v])
        return self.owner._last(p, v)


class FinalValues(Check):
    name = "final"

    def __init__(self, vm, slots: Sequence[SlotSpec], vcpus: int, *, ordered: bool) -> None:
        self.vm = vm
        self.slots = {sid: (base, n) for sid, base, n in slots}
        self.ordered = ordered
        self.nvcpus = vcpus
        # Dense page numbers: slot after slot, in order of base gfn.
        order = sorted(self.slots.items(), key=lambda kv: kv[1][0])
        self._bases = np.array([b for _s, (b, _n) in order], dtype=np.uint64)
        self._sizes = np.array([n for _s, (_b, n) in order], dtype=np.uint64)
        starts = np.concatenate([[0], np.cumsum(self._sizes)]).astype(np.intp)
        self._starts = starts[:-1]
        self._dense_of = {sid: int(starts[k]) for k, (sid, _bn) in enumerate(order)}
        # Scratch for "latest write per page" (np.maximum.at: defined for repeated
        # pages, unlike fancy assignment); all -1 between uses.  One lock: vCPU
        # threads may fold their streams at the same time.
        self._scratch = np.full(int(starts[-1]), -1, dtype=np.int64)
        self._scratch_lock = threading.Lock()
        self.expect = {sid: np.array(vm.memory(sid), dtype=np.uint64) for sid in self.slots}
        self._streams = [_Stream(self) for _ in range(1 if ordered else vcpus)]
        self._seen = {sid: np.zeros(n, dtype=bool) for sid, (_b, n) in self.slots.items()}
        self.unwritten: List[UnwrittenPage] = []
        self.bad_rounds: List[int] = []
        self._count = 0

    def absorb(self, harvest: Dict[int, np.ndarray]) -> None:
        """Harvests say nothing about what the guest wrote."""

    def _last(self, pages: np.ndarray, values: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        pos = np.arange(len(pages), dtype=np.int64)
        with self._scratch_lock:
            np.maximum.at(self._scratch, pages, pos)
            win = self._scratch[pages] == pos       # exactly one write per page wins
            self._scratch[pages] = -1
        return pages[win], values[win]

    def wrote(self, vcpu: int, gfns: np.ndarray, values) -> None:
        """vCPU ``vcpu`` did these writes, in this order (``values``: one per gfn, or one for all).

        Cheap (the work is done when folding or at the round's end), since
        it runs between a vCPU's runs.  The arrays are kept, not copied: the
        caller must not modify them afterwards (the runner's plan chunks are
        never modified).  Each vCPU's calls come from one thread at a time;
        in ``ordered`` mode all calls come from one thread, in the order the
        writes happened.
        """
        g = np.asarray(gfns, dtype=np.uint64)
        v = values if np.ndim(values) == 0 else np.asarray(values, dtype=np.uint64)
        if np.ndim(v) and np.shape(v) != g.shape:
            raise ValueError(f"{np.shape(v)} values for {g.shape} gfns")
        self._streams[0 if self.ordered else vcpu].add(g, v)

    def _dense(self, g: np.ndarray, v: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Dense page numbers of gfns; writes outside every slot (MMIO) leave no memory and are dropped."""
        k = np.searchsorted(self._bases, g, side="right").astype(np.intp) - 1
        inside = k >= 0
        kk = np.where(inside, k, 0)
        off = g - self._bases[kk]
        inside &= off < self._sizes[kk]
        return (self._starts[kk] + off.astype(np.intp))[inside], v[inside]

    def end_round(self, rnd: int) -> None:
        last = [s.last() for s in self._streams]
        p = np.concatenate([x[0] for x in last])
        v = np.concatenate([x[1] for x in last])
        self._streams = [_Stream(self) for _ in self._streams]
        for sid, (base, n) in self.slots.items():
            start = self._dense_of[sid]
            mem = np.asarray(self.vm.memory(sid))
            sel = (p >= start) & (p < start + n)
            off = p[sel] - start
            val = v[sel]
            touched = np.zeros(n, dtype=bool)
            touched[off] = True
            good = np.zeros(n, dtype=bool)
            good[off[mem[off] == val]] = True
            expected = self.expect[sid].copy()
            expected[off] = val                      # one value the writes could leave, for reports
            bad = np.flatnonzero(np.where(touched, ~good, mem != self.expect[sid]))
            if len(bad) and (not self.bad_rounds or self.bad_rounds[-1] != rnd):
                self.bad_rounds.append(rnd)
            new = bad[~self._seen[sid][bad]]
            self._seen[sid][new] = True
            self._count += len(new)
            for o in new[: max(0, MAX_DETAILS - len(self.unwritten))]:
                self.unwritten.append(UnwrittenPage(base + int(o), int(mem[o]), int(expected[o]), rnd))
            self.expect[sid] = np.array(mem, dtype=np.uint64)

    @property
    def count(self) -> int:
        return self._count

    @property
    def details(self) -> list:
        return self.unwritten
