"""Hypothesis state machine: DirtyRing against the naive model in tests/ring_model.py."""
from __future__ import annotations

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvmdirty._ring import DirtyRing, RingFullError
from ring_model import ModelRing

slots = st.integers(0, 3)
offsets = st.one_of(st.integers(0, 300), st.integers(0, 2**64 - 1))


class RingMachine(RuleBasedStateMachine):
    @initialize(entries=st.sampled_from([128, 256]), cdl=st.sampled_from([0, 32]))
    def create(self, entries, cdl):
        self.ring = DirtyRing(entries, cpu_dirty_log_size=cdl)
        self.model = ModelRing(entries, cdl)

    @rule(slot=slots, offset=offsets)
    def push(self, slot, offset):
        expect = self.model.push(slot, offset)
        if expect is None:
            try:
                self.ring.push(slot, offset)
            except RingFullError:
                return
            raise AssertionError("push into a full ring did not raise")
        assert self.ring.push(slot, offset) is expect

    @rule(items=st.lists(st.tuples(slots, offsets), max_size=150))
    def push_many(self, items):
        pushed = 0
        for s, o in items:
            if self.model.push(s, o) is None:
                break
            pushed += 1
        a_s = np.array([s for s, _ in items], np.uint32)
        a_o = np.array([o for _, o in items], np.uint64)
        assert self.ring.push_many(a_s, a_o) == pushed

    @rule(max_count=st.one_of(st.none(), st.integers(0, 300)), into=st.booleans())
    def collect(self, max_count, into):
        es, eo = self.model.collect(max_count)
        if into:
            n = self.ring.entries + 3
            s, o = self.ring.collect(max_count, np.zeros(n, np.uint32), np.zeros(n, np.uint64))
        else:
            s, o = self.ring.collect(max_count)
        assert s.tolist() == es and o.tolist() == eo

    @rule()
    def reset(self):
        expect = []
        n = self.model.reset(lambda *b: expect.append(b))
        got = []
        assert self.ring.reset(lambda *b: got.append(b)) == n
        assert got == expect

    @rule(index=st.integers(0, 255), flags=st.integers(0, 2**32 - 1))
    def scribble_flags(self, index, flags):
        # User space writes garbage into an entry's flags: the ring must stay safe.
        index %= self.ring.entries
        self.ring.gfns["flags"][index] = flags
        self.model.entries[index]["flags"] = flags

    @rule(k=st.integers(1, 300))
    def forge_reset(self, k):
        # User space marks the next k entries from reset_index harvested, pushed
        # or not: reset must walk them as KVM does (reset_index may pass dirty_index).
        for i in range(k):
            idx = (self.model.reset_index + i) % self.ring.entries
            self.ring.gfns["flags"][idx] = 2
            self.model.entries[idx]["flags"] = 2

    @invariant()
    def same_state(self):
        r, m = self.ring, self.model
        assert r.used == m.used and r.dirty_index == m.dirty_index % 2**32
        assert r.reset_index == m.reset_index % 2**32 and r.fetch_index == m.fetch_index % 2**32
        assert r.soft_full == (m.used >= m.soft_limit)
        g = r.gfns
        assert g["flags"].tolist() == [e["flags"] for e in m.entries]
        assert g["slot"].tolist() == [e["slot"] for e in m.entries]
        assert g["offset"].tolist() == [e["offset"] for e in m.entries]


TestRingMachine = RingMachine.TestCase
TestRingMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
