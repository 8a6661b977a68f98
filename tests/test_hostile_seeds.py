"""The seed-era designs used as a hostile user would: racing threads, misuse,
interrupts, use after close, forged ring headers, memory exhaustion.

Each test states the promise it checks: no crash, no lost write, no wedge,
and a failed call changes nothing.
"""
from __future__ import annotations

import errno
import sys
import threading

import numpy as np
import pytest

from kvmdirty import _seeds, _uapi
from kvmdirty.errors import KvmError
from kvmdirty.seeds import create_design
from kvmdirty.vm import VM

LOG = _uapi.MEM_LOG_DIRTY_PAGES
BASE_GFN = 0x100


@pytest.fixture(autouse=True)
def _fast_thread_switches():
    """Make the GIL change hands every microsecond, so Python-level windows really race."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def _vm(design, slots=1, npages=256, entries=None, **vm_opts):
    opts = {} if entries is None else {"entries": entries}
    vm = VM(design=design, design_options=opts or None, **vm_opts)
    for s in range(slots):
        vm.set_user_memory_region(s, (BASE_GFN + s * npages) << 12, npages << 12, LOG)
    return vm


def _race(*fns, trials=1):
    """Run the callables in threads started together by a barrier; return their exceptions."""
    errors = []
    barrier = threading.Barrier(len(fns))

    def body(fn):
        try:
            barrier.wait()
            fn()
        except BaseException as e:        # noqa: BLE001 - reported to the test
            errors.append(e)

    ts = [threading.Thread(target=body, args=(f,)) for f in fns]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return errors


# -- switched-bitmap: concurrent switches (issue 10, item 4) ---------------------------

def test_switched_bitmap_concurrent_switches_never_share_active_and_spare():
    """Two threads switching one slot at once must not both take the spare.

    Before the fix both took it: active and spare became one array, the next
    switch zeroed the live bitmap and every write since was lost.
    """
    vm = _vm("switched-bitmap", npages=4096)
    d = vm.design
    v = vm.create_vcpu(0)
    rng = np.random.default_rng(3)
    for trial in range(200):
        errs = _race(lambda: d.switch(0), lambda: d.switch(0))
        assert not errs, errs
        active, old = d.addresses(0)
        assert not np.shares_memory(active, old), f"trial {trial}: active is the spare"
        pages = rng.choice(4096, 20, replace=False)
        v.run((BASE_GFN + pages).astype(np.uint64), trial)
        got = set(d.harvest()[0].tolist())
        assert set(pages.tolist()) <= got, f"trial {trial}: lost {sorted(set(pages.tolist()) - got)}"


def test_switched_bitmap_harvest_races_switch_and_writes_oracle():
    """A vCPU writes in a thread while two threads harvest/switch: every written page is reported."""
    vm = _vm("switched-bitmap", npages=1 << 14)
    d = vm.design
    v = vm.create_vcpu(0)
    plan = BASE_GFN + np.random.default_rng(5).permutation(1 << 14).astype(np.uint64)
    seen = set()
    lock = threading.Lock()
    done = threading.Event()

    def writer():
        try:
            for i in range(0, len(plan), 512):
                v.run(plan[i:i + 512], 1)
        finally:
            done.set()

    def collector():
        while not done.is_set():
            got = d.harvest().get(0, np.zeros(0, np.uint64))
            with lock:
                seen.update(got.tolist())

    errs = _race(writer, collector, collector)
    assert not errs, errs
    seen.update(d.harvest()[0].tolist())
    assert seen == set(range(1 << 14))


def test_switched_bitmap_user_one_bitmap_for_two_slots_is_refused():
    """One user bitmap may not become the active bitmap of two slots (EBUSY), nor overlap one."""
    vm = _vm("switched-bitmap-user", slots=2, npages=256)
    d = vm.design
    v = vm.create_vcpu(0)
    v.run(np.array([BASE_GFN + 1, BASE_GFN + 256 + 2], np.uint64), 1)
    shared = np.zeros(8, np.uint64)
    assert d.switch(0, shared[:4]) == 1
    with pytest.raises(KvmError) as e:
        d.switch(1, shared[:4])                       # the same array
    assert e.value.errno == errno.EBUSY
    with pytest.raises(KvmError) as e:
        d.switch(1, shared[2:6])                      # overlapping words
    assert e.value.errno == errno.EBUSY
    assert d.retired(1) is None                       # nothing switched
    assert d.switch(1, shared[4:8]) == 1              # disjoint: fine
    v.run(np.array([BASE_GFN + 3, BASE_GFN + 256 + 4], np.uint64), 2)
    h = d.harvest()
    assert h[0].tolist() == [3] and h[1].tolist() == [4]


def test_switched_bitmap_user_concurrent_switch_same_bitmap_two_slots():
    """Racing threads offering one bitmap to two slots: at most one wins, no page is lost."""
    vm = _vm("switched-bitmap-user", slots=2, npages=256)
    d = vm.design
    v = vm.create_vcpu(0)
    for trial in range(100):
        pages = [BASE_GFN + trial % 256, BASE_GFN + 256 + (trial * 7) % 256]
        v.run(np.array(pages, np.uint64), trial)
        shared = np.zeros(4, np.uint64)
        wins = []
        errs = _race(lambda: wins.append(d.switch(0, shared)), lambda: wins.append(d.switch(1, shared)))
        assert len(errs) + len(wins) == 2 and all(isinstance(e, KvmError) for e in errs), errs
        assert len(wins) == 1, (trial, wins, errs)
        # Whatever was switched is reported once: the retired bitmaps plus the next harvest.
        got = {0: set(), 1: set()}
        for s in (0, 1):
            r = d.retired(s)
            if r is not None:
                got[s].update(int(i) for i in np.flatnonzero(np.unpackbits(r.view(np.uint8), bitorder="little")))
        for s, offs in d.harvest().items():
            got[s].update(offs.tolist())
        assert pages[0] - BASE_GFN in got[0] and pages[1] - BASE_GFN - 256 in got[1], trial


@pytest.mark.parametrize("design", ["switched-bitmap", "switched-bitmap-user"])
def test_switched_harvest_racing_slot_deletion_loses_nothing(design):
    """A harvest racing a memslot deletion either switches every slot or none, never drops pages.

    Before the fix the harvest switched slot 0, then failed on the deleted
    slot 1 (ENOENT / KeyError) and slot 0's pages were never reported.
    """
    vm = _vm(design, slots=2, npages=256)
    d = vm.design
    v = vm.create_vcpu(0)
    for trial in range(150):
        page = trial % 256
        v.run(np.array([BASE_GFN + page], np.uint64), trial + 1)
        got = []

        def harvest():
            got.append(d.harvest())

        def delete():
            vm.set_user_memory_region(1, (BASE_GFN + 256) << 12, 0, LOG)

        errs = _race(harvest, delete)
        assert not errs, (trial, errs)
        vm.set_user_memory_region(1, (BASE_GFN + 256) << 12, 256 << 12, LOG)
        reported = set(got[0].get(0, np.zeros(0)).tolist()) | set(d.harvest()[0].tolist())
        assert page in reported, f"trial {trial}: page {page} lost"


