"""Random call sequences on the host backend and on the simulator give the same answers.

Hypothesis draws runs, harvests, clears, logging toggles and slot moves;
each call's result (exit, bitmap, or errno) must be the same on both, and so
must guest memory at the end.  The simulator is the reference: it is itself
checked against a naive model and against real KVM elsewhere.
"""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from host_util import requires_host

import kvmdirty
from kvmdirty import KvmError
from kvmdirty.info import host_vm_options
from kvmdirty.vm import MEM_LOG_DIRTY_PAGES as LOG

pytestmark = requires_host

SLOTS = {0: (0, 128), 1: (256, 70)}          # slot: (base gfn, pages)
GPAS = [0, 256, 512, 1024]                   # where slots may move (gfn)

ops = st.one_of(
    st.tuples(st.just("run"), st.integers(0, 1),
              st.lists(st.integers(0, 330) | st.integers(0, 1200), max_size=30),
              st.integers(1, 1 << 40)),
    st.tuples(st.just("get"), st.integers(0, 2)),
    st.tuples(st.just("clear"), st.integers(0, 1), st.sampled_from([0, 64, 3]),
              st.sampled_from([0, 6, 64, 70, 128]), st.integers(0, (1 << 64) - 1)),
    st.tuples(st.just("flags"), st.integers(0, 1), st.booleans()),
    st.tuples(st.just("move"), st.integers(0, 1), st.sampled_from(GPAS)),
)


def apply(vm, vcpus, op):
    try:
        kind = op[0]
        if kind == "run":
            e = vcpus[op[1]].run(np.array(op[2], np.uint64), op[3])
            return ("exit", e.reason, e.writes, e.remaining)
        if kind == "get":
            return ("log", vm.get_dirty_log(op[1]).tolist())
        if kind == "clear":
            vm.clear_dirty_log(op[1], op[2], op[3], np.array([op[4], op[4] >> 3], np.uint64))
            return ("ok",)
        if kind == "flags":
            base, n = vm._kd_where[op[1]]
            vm.set_user_memory_region(op[1], base * 4096, n * 4096, LOG if op[2] else 0)
            return ("ok",)
        if kind == "move":
            _, n = vm._kd_where[op[1]]
            flags = vm._kd_flags[op[1]]
            vm.set_user_memory_region(op[1], op[2] * 4096, n * 4096, flags)
            vm._kd_where[op[1]] = (op[2], n)
            return ("ok",)
    except KvmError as e:
        return ("errno", e.errno)
    raise AssertionError(op)


@settings(max_examples=150, deadline=None)
@given(st.booleans(), st.lists(ops, min_size=4, max_size=25))
def test_host_answers_as_the_simulator(manual, seq):
    vms = [kvmdirty.open_vm("sim", **host_vm_options()), kvmdirty.open_vm("host", **host_vm_options())]
    try:
        vcpus = []
        for vm in vms:
            if manual:
                vm.enable_manual_protect()
            vm._kd_where, vm._kd_flags = dict(SLOTS), {0: LOG, 1: LOG}
            for s, (base, n) in SLOTS.items():
                vm.set_user_memory_region(s, base * 4096, n * 4096, LOG)
            vcpus.append([vm.create_vcpu(0), vm.create_vcpu(1)])
        for op in seq:
            got = []
            for vm, vc in zip(vms, vcpus):
                got.append(apply(vm, vc, op))
                if op[0] == "flags" and got[-1] == ("ok",):
                    vm._kd_flags[op[1]] = LOG if op[2] else 0
            assert got[0] == got[1], op
        for _ in range(2):                   # harvest everything, then nothing is left
            for s in (0, 1):
                assert apply(vms[0], vcpus[0], ("get", s)) == apply(vms[1], vcpus[1], ("get", s)), s
        for s in SLOTS:
            np.testing.assert_array_equal(vms[0].memory(s), vms[1].memory(s))
    finally:
        for vm in vms:
            vm.close()
