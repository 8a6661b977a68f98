"""Hypothesis state machine: the simulated VM's bitmap logging against tests/model.py."""
import numpy as np
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import kvmdirty
from kvmdirty import _bitmap
from model import LOG, ModelVM

SLOT_IDS = st.sampled_from([0, 1, 2, 7, 32763, 32764, 1 << 16, (1 << 16) | 3, 2 << 16])
GPAS = st.sampled_from([0, 64 << 12, 100 << 12, 1000 << 12, 4097, 1 << 30])
SIZES = st.sampled_from([0, 4096, 63 << 12, 64 << 12, 130 << 12, 200 << 12, 100])


def errno_of(call):
    try:
        return 0, call()
    except kvmdirty.KvmError as e:
        return e.errno, None


def pages_of(words, first=0):
    return {first + int(g) for g in _bitmap.to_gfns(np.asarray(words, dtype=np.uint64))}


class VMvsModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.vm = kvmdirty.VM()
        self.model = ModelVM()
        self.vcpu = self.vm.create_vcpu(0)
        self.value = 1

    @rule(slot=SLOT_IDS, gpa=GPAS, size=SIZES, flags=st.sampled_from([0, LOG, LOG | 4]))
    def set_region(self, slot, gpa, size, flags):
        err, _ = errno_of(lambda: self.vm.set_user_memory_region(slot, gpa, size, flags))
        assert err == self.model.set_region(slot, gpa, size, flags)

    @rule(flags=st.sampled_from([0, 1, 2, 3, 4]))
    def manual(self, flags):
        err, _ = errno_of(lambda: self.vm.enable_cap(kvmdirty._uapi.CAP_MANUAL_DIRTY_LOG_PROTECT2, flags))
        assert err == self.model.enable_manual(flags)

    @rule(gfns=st.lists(st.integers(0, 1400), max_size=60))
    def run(self, gfns):
        self.value += 1
        ex = self.vcpu.run(np.array(gfns, dtype=np.uint64), self.value)
        want = self.model.write(gfns, self.value)
        assert ex.writes == want
        if ex.name == "MMIO":
            self.vcpu.run(np.zeros(0, np.uint64))   # drop the rest of the plan
        else:
            assert ex.done and want == len(gfns)

    @rule(slot=SLOT_IDS)
    def get_log(self, slot):
        err, words = errno_of(lambda: self.vm.get_dirty_log(slot))
        merr, mpages = self.model.get_log(slot)
        assert err == merr
        if not err:
            assert pages_of(words) == mpages

    @rule(slot=SLOT_IDS, first=st.sampled_from([0, 64, 128, 3]), num=st.sampled_from([0, 64, 70, 200, 1 << 20]),
          seed=st.integers(0, 2**32 - 1))
    def clear_log(self, slot, first, num, seed):
        rng = np.random.default_rng(seed)
        n = (num + 63) // 64 if num < 1 << 20 else 1
        words = rng.integers(0, 2**64, size=n, dtype=np.uint64, endpoint=False)
        if num % 64 and n:
            words[-1] &= np.uint64((1 << (num % 64)) - 1)
        err, _ = errno_of(lambda: self.vm.clear_dirty_log(slot, first, num, words))
        assert err == self.model.clear_log(slot, first, num, pages_of(words, first))

    @invariant()
    def memory_matches(self):
        for sid, s in self.model.slots.items():
            mem = self.vm.memory(sid)
            assert len(mem) == s.npages
            for page, value in s.values.items():
                assert mem[page] == value


TestVMvsModel = VMvsModel.TestCase
TestVMvsModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
