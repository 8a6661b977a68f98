"""A harvest that fails part-way never drops the pages it already took.

get_dirty_log clears the bitmap in the kernel and a ring collect marks its
entries RESET: whatever a harvest took before an error (or Ctrl-C) must come
out of the next harvest (issue 10's "bits taken are never dropped", for the
collectors of the runner).
"""
from __future__ import annotations

import numpy as np
import pytest

from kvmdirty.collectors import make_collector
from kvmdirty.vm import MEM_LOG_DIRTY_PAGES as LOG, VM

SLOTS = [(0, 0, 256), (1, 1024, 256)]


def _vm(design):
    vm = VM()
    c = make_collector(design, 256)
    c.configure(vm)
    for sid, base, n in SLOTS:
        vm.set_user_memory_region(sid, base * 4096, n * 4096, LOG)
    return vm, c


class _FailOnce:
    """Raises KeyboardInterrupt from the first call of `name`, then delegates."""

    def __init__(self, inner, name):
        self._inner, self._name, self._armed = inner, name, True

    def __getattr__(self, attr):
        f = getattr(self._inner, attr)
        if attr != self._name:
            return f

        def call(*a, **k):
            if self._armed:
                self._armed = False
                raise KeyboardInterrupt
            return f(*a, **k)
        return call


@pytest.mark.parametrize("design", ["bitmap", "clear-log"])
def test_bitmap_harvest_failing_on_the_second_slot_keeps_the_first(design):
    vm, c = _vm(design)
    v = vm.create_vcpu(0)
    v.run(np.array([3, 7, 1024 + 5], dtype=np.uint64), 1)
    real = vm.get_dirty_log
    calls = []

    class Proxy:
        def __getattr__(self, attr):
            return getattr(vm, attr)

        def get_dirty_log(self, sid, out=None):
            calls.append(sid)
            if sid == 1 and calls.count(1) == 1:
                raise KeyboardInterrupt          # after slot 0's bitmap was taken and cleared
            return real(sid, out)

    c.attach(Proxy(), SLOTS, [v])
    with pytest.raises(KeyboardInterrupt):
        c.harvest()
    h = c.harvest()
    if design == "bitmap":
        assert sorted(h[0].tolist()) == [3, 7] and h[1].tolist() == [5]
    else:                                         # INITIALLY_SET: every page, once
        assert sorted(h[0].tolist()) == list(range(256)) == sorted(h[1].tolist())
    assert all(len(o) == 0 for o in c.harvest().values())


def test_ring_harvest_failing_on_the_second_vcpu_keeps_the_first():
    vm, c = _vm("ring")
    a, b = vm.create_vcpu(0), vm.create_vcpu(1)
    a.run(np.array([3, 7], dtype=np.uint64), 1)
    b.run(np.array([1024 + 5], dtype=np.uint64), 2)

    class V:
        def __init__(self, v, fail):
            self.dirty_ring = _FailOnce(v.dirty_ring, "collect") if fail else v.dirty_ring

    c.attach(vm, SLOTS, [V(a, False), V(b, True)])
    with pytest.raises(KeyboardInterrupt):
        c.harvest()                               # vCPU 0's entries were collected (RESET)
    h = c.harvest()
    assert sorted(h[0].tolist()) == [3, 7] and h[1].tolist() == [5]
    assert c.problems == []                       # reset count matched everything collected
    a.run(np.array([3], dtype=np.uint64), 3)      # re-armed: logged again
    assert c.harvest()[0].tolist() == [3]
