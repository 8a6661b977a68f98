"""What the guest and the harvester feel in one run, measured as it happens.

The runner calls a :class:`Meter` around every ``vcpu.run`` and every
harvest; ``Meter.stats()`` gives the run's figures (seconds, pages):

stall      per ring-full exit (DIRTY_RING_FULL, or a seed design's
           DIRTY_LOG_FULL): from the exit to the moment the harvest it
           triggered has reset the rings (the vCPU can run again).  Time the
           harvester's lock was held by the verifier's bookkeeping (not part
           of any design) is taken out.
harvest    per harvest: the design's own calls (collect + reset, GET, GET +
           CLEAR), wall time.
pages      per harvest: the distinct pages the guest really dirtied (a page
           in two vCPUs' rings counts once; pages reported only because
           clear-log starts with INITIALLY_SET are counted apart).
age        per harvested page: from the first write that dirtied it (since
           it was last harvested) to the end of the harvest that handed it
           to user space.  A write's time is the start of the ``vcpu.run``
           call that did it (a batch: microseconds in paced runs).  Ages are
           taken on a sample of pages, every AGE_SAMPLE-th page by number
           (so a batch costs one gather over an eighth of its writes), which
           any write pattern not aligned to 8 pages covers without bias.

Page stamps and harvests race (vCPU threads write while a harvest runs).
A harvest is bracketed by a generation count (odd while it runs) and stamps
``hgen[page]`` on every page it takes.  A vCPU stamps the pages its run
wrote after the run; if a harvest overlapped the run, a page that such a
harvest took may have been written before it (then it is clean now) or
after (dirty again): its stamp is dropped and its age, at its next harvest,
is counted as unknown rather than guessed.  So every age reported is the
age of a real write, and ``age_unknown`` says how many were not known.
"""
from __future__ import annotations

import collections
import time
from typing import Callable, Deque, Dict, Mapping, Optional, Tuple

import numpy as np

from .samples import Samples

_NS = 1e-9

#: Ages are measured on the pages whose number is a multiple of this (a power of two).
AGE_SAMPLE = 8


class Meter:
    """Stall, harvest, page and age measurements of one run.

    ``npages`` RAM pages; ``ram_base`` maps a memslot id to the RAM index of
    its first page; ``dedupe``: harvests may name a page twice (rings);
    ``initially_set``: the first harvest reports every page (clear-log);
    ``ages``: stamp pages to measure their age (costs one gather/scatter per
    batch), on every ``age_sample``-th page (1: every page).
    """

    def __init__(self, npages: int, ram_base: Mapping[int, int], *, dedupe: bool = False,
                 initially_set: bool = False, ages: bool = True, age_sample: int = AGE_SAMPLE,
                 clock: Callable[[], int] = time.perf_counter_ns) -> None:
        if age_sample < 1 or age_sample & (age_sample - 1):
            raise ValueError(f"age_sample must be a power of two, got {age_sample}")
        self._mask = age_sample - 1
        self.clock = clock
        self.ram_base = dict(ram_base)
        self.dedupe = dedupe
        self.initially_set = initially_set
        self.ages = ages
        self.gen = 0                       # odd while a harvest runs
        self._since = np.zeros(npages, np.int64) if ages else None   # 0 = no stamp
        self._hgen = np.zeros(npages, np.int32) if ages else None   # harvest generation
        self._written = np.zeros(npages, bool) if initially_set else None
        self._origin = clock() - 1         # stamps are clock - origin: never 0
        self._overhead: Deque[Tuple[int, int]] = collections.deque(maxlen=64)
        self.stall = Samples()
        self.latency = Samples()
        self.pages = Samples()
        self.age = Samples()
        self.age_unknown = 0
        self.entries = 0                   # entries / bits harvested, as the design reported them
        self.distinct = 0                  # ... counting a page once per harvest
        self.initial_pages = 0             # clear-log: INITIALLY_SET pages never written
        self.initial_harvest_ns: Optional[int] = None
        self.harvests = 0

    # -- vCPU side -----------------------------------------------------------
    def before_run(self) -> Tuple[int, int]:
        """Call just before ``vcpu.run``; hand the token to ``after_run``."""
        return self.gen, self.clock()

    def after_run(self, token: Tuple[int, int], ram_index: np.ndarray) -> None:
        """The run that started at ``token`` wrote the RAM pages ``ram_index``."""
        if len(ram_index) == 0:
            return
        written = self._written            # the first harvest drops it: read it once
        if written is not None:
            written[ram_index] = True
        if self._since is None:
            return
        if self._mask:
            ram_index = ram_index[(ram_index & self._mask) == 0]
        g0, t = token
        since = self._since
        fresh = ram_index[since[ram_index] == 0]
        if len(fresh) == 0:
            return
        since[fresh] = t - self._origin
        if self.gen != g0 or g0 & 1:
            # A harvest overlapped: drop the stamps of pages such a harvest took.
            taken = fresh[self._hgen[fresh] >= (g0 | 1)]
            since[taken] = 0

    def stalled(self, ns: int) -> None:
        """A vCPU could not run for ``ns`` after a ring-full exit."""
        self.stall.add(max(0, ns))

    # -- harvest side (the caller holds the harvest lock) ----------------------
    def harvest_begin(self) -> int:
        self.gen += 1
        return self.clock()

    def harvest_end(self, t0: int, t1: int, harvest: Mapping[int, np.ndarray]) -> None:
        """The harvest that ran from ``t0`` to ``t1`` (clock ns) returned ``harvest``."""
        parts = [np.asarray(offs, dtype=np.int64) + self.ram_base[sid]
                 for sid, offs in harvest.items() if len(offs)]
        idx = np.concatenate(parts) if len(parts) > 1 else (parts[0] if parts else np.zeros(0, np.int64))
        self.entries += int(idx.size)
        if self.dedupe and idx.size:
            idx = np.unique(idx)
        self.distinct += int(idx.size)
        first_initial = self.initially_set and self.harvests == 0
        dirtied = idx
        if first_initial:
            assert self._written is not None
            dirtied = idx[self._written[idx]]
            self.initial_pages = int(idx.size - dirtied.size)
            self.initial_harvest_ns = t1 - t0
            self._written = None
        else:
            self.latency.add(t1 - t0)
            self.pages.add(dirtied.size)
        if self._since is not None and idx.size:
            if self._mask:
                idx = idx[(idx & self._mask) == 0]
                dirtied = dirtied[(dirtied & self._mask) == 0]
            self._hgen[idx] = self.gen
            st = self._since[dirtied]
            known = st[st != 0]
            self.age.extend((t1 - self._origin) - known)
            self.age_unknown += int(dirtied.size - known.size)
            self._since[idx] = 0
        self.harvests += 1
        self.gen += 1

    def held(self, a: int, b: int) -> None:
        """The harvest lock was held from ``a`` to ``b`` for bookkeeping, not by a design."""
        if b > a:
            self._overhead.append((a, b))

    def held_within(self, a: int, b: int) -> int:
        """Bookkeeping time (``held``) inside [a, b]."""
        return sum(max(0, min(b, y) - max(a, x)) for x, y in self._overhead)

    # -- the figures ------------------------------------------------------------
    @property
    def pages_dirtied(self) -> int:
        """Pages the guest really dirtied, once per harvest (INITIALLY_SET pages not counted)."""
        return self.distinct - self.initial_pages

    def stats(self) -> Dict[str, Optional[float]]:
        """The run's figures, flat: seconds (``_s``) and pages."""
        st, lat, pg, age = (self.stall.summary(_NS), self.latency.summary(_NS),
                            self.pages.summary(), self.age.summary(_NS))
        return {
            "stall_total_s": st["total"] or 0.0, "stall_exits": st["n"],
            "stall_p50_s": st["p50"], "stall_p99_s": st["p99"], "stall_max_s": st["max"],
            "harvest_p50_s": lat["p50"], "harvest_p99_s": lat["p99"], "harvest_max_s": lat["max"],
            "pages_per_harvest_p50": pg["p50"], "pages_per_harvest_max": pg["max"],
            "pages_dirtied": self.pages_dirtied, "entries_harvested": self.entries,
            "duplicate_entries": self.entries - self.distinct,
            "initial_pages": self.initial_pages,
            "initial_harvest_s": None if self.initial_harvest_ns is None else self.initial_harvest_ns * _NS,
            "age_p50_s": age["p50"], "age_p99_s": age["p99"], "age_max_s": age["max"],
            "age_known": age["n"], "age_unknown": self.age_unknown,
        }
