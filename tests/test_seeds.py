"""The seed-era designs: each through its own API, then through a VM's write loop."""
from __future__ import annotations

import errno
import threading

import numpy as np
import pytest

from kvmdirty import _seeds, _uapi
from kvmdirty.api import EXIT_DIRTY_LOG_FULL, EXIT_DIRTY_RING_FULL
from kvmdirty.errors import KvmError
from kvmdirty.seeds import DESIGNS, create_design
from kvmdirty.vm import VM
from ring_model import make_mmu

LOG = _uapi.MEM_LOG_DIRTY_PAGES
BASE_GFN = 0x100


def _vm(design, npages=4096, entries=None, **vm_opts):
    if entries is None:
        vm = VM(design=design, **vm_opts)
    else:
        # VM() takes no design options yet: install the design as VM.__init__ does.
        vm = VM(**vm_opts)
        vm.design = create_design(design, vm, entries=entries)
        vm.design_name = design
    vm.set_user_memory_region(0, BASE_GFN << 12, npages << 12, LOG)
    return vm


# -- indexed ring (seeds 000/002) ------------------------------------------------

def test_indexed_header_overlays_entry_zero_pad():
    s = _seeds.IndexedRingSet(128)
    r = s.add_vcpu(0)
    assert s.add_vcpu(0) is r
    r.push(1, 10)
    r.push(1, 11)
    assert r.avail_index == 2 and r.fetch_index == 0 and r.count == 2
    assert r.gfns["pad"][0] == 2                        # avail in the low u16
    slots, offs = r.fetch()
    assert slots.tolist() == [1, 1] and offs.tolist() == [10, 11]
    assert r.gfns["pad"][0] == 2 | (2 << 16) and r.count == 0
    assert r.gfns["slot"][0] == 1 and r.gfns["offset"][1] == 11


def test_indexed_reset_reprotects_fetched_entries_only():
    mmu, w = make_mmu(slot_id=1, npages=256)
    s = _seeds.IndexedRingSet(128)
    r = s.add_vcpu(3)
    for off in (1, 2, 3, 200):
        r.push(1, off)
    r.fetch(max_count=3)
    assert r.used == 4
    assert s.reset(mmu) == 3
    assert ~w[0] == 0b1110 and ~w[3] == 0 and r.used == 1
    assert r.stats["batches"] == 1 and s.reset(mmu) == 0


def test_indexed_u16_indexes_wrap():
    s = _seeds.IndexedRingSet(128)
    r = s.add_vcpu(0)
    seen = 0
    for lap in range(700):                              # 70,000 entries: the u16 header wraps
        for i in range(100):
            assert r.push(2, seen + i) in (0, 1)
        _, offs = r.fetch()
        assert offs.tolist() == list(range(seen, seen + 100))
        seen += 100
        assert s.reset() == 100
    assert r.avail_index == seen % 65536 == r.fetch_index and r.used == 0


def test_indexed_full_then_refused():
    s = _seeds.IndexedRingSet(128)
    r = s.add_vcpu(0)
    got = [r.push(0, i) for i in range(130)]
    assert got[:63] == [0] * 63 and got[63:128] == [1] * 65 and got[128:] == [-1, -1]
    assert r.stats["overflows"] == 2 and r.used == 128


def test_indexed_corrupt_header_is_refused():
    s = _seeds.IndexedRingSet(128)
    r = s.add_vcpu(0)
    for i in range(5):
        r.push(0, i)
    r.fetch_index = 50                                  # beyond what the kernel pushed
    before = r.used
    assert s.reset() == -1 and r.used == before
    with pytest.raises(ValueError, match="corrupt"):
        r.fetch()                                       # (u16)(5 - 50) > entries
    r.fetch_index = 0
    assert r.fetch()[1].tolist() == [0, 1, 2, 3, 4] and s.reset() == 5


@pytest.mark.parametrize("entries", [64, 100, 65536, 1 << 16, "128"])
def test_indexed_bad_sizes(entries):
    with pytest.raises((ValueError, TypeError)):
        _seeds.IndexedRingSet(entries)


def test_indexed_vm_exits_dirty_log_full_and_resumes():
    vm = _vm("indexed-ring", entries=128)
    d = vm.design
    v = vm.create_vcpu(0)
    plan = np.arange(BASE_GFN, BASE_GFN + 1000, dtype=np.uint64)
    harvested = set()
    ex = v.run(plan, 1)
    exits = 0
    while not ex.done:
        assert ex.reason == EXIT_DIRTY_LOG_FULL
        exits += 1
        slots, offs = d.ring(0).fetch()
        assert (slots == 0).all()
        harvested.update(offs.tolist())
        assert d.reset_dirty_pages() == len(offs)
        ex = v.run()
    harvested.update(d.harvest().get(0, np.zeros(0)).tolist())
    assert exits >= 1000 // 128 and harvested == set(range(1000))


def test_indexed_host_writes_go_to_the_vm_ring():
    vm = _vm("indexed-ring")
    vm.create_vcpu(0)
    assert vm.write_guest(np.array([BASE_GFN + 7, BASE_GFN + 9]), 5) == 2
    assert vm.design.vm_ring.count == 2 and vm.design.ring(0).count == 0
    assert vm.design.harvest()[0].tolist() == [7, 9]


def test_indexed_reset_with_fetch_beyond_pushed_is_einval():
    vm = _vm("indexed-ring")
    vm.create_vcpu(0)
    vm.design.ring(0).fetch_index = 9
    with pytest.raises(KvmError) as e:
        vm.design.reset_dirty_pages()
    assert e.value.errno == errno.EINVAL


# -- shared ring -------------------------------------------------------------------

def test_shared_ring_vm_two_vcpus_in_threads_lose_nothing():
    vm = _vm("shared-ring", npages=1 << 14, entries=256)
    d = vm.design
    vcpus = [vm.create_vcpu(i) for i in range(2)]
    rng = np.random.default_rng(1)
    plans = [BASE_GFN + rng.permutation(1 << 13).astype(np.uint64) + i * (1 << 13) for i in range(2)]
    full_exits = [0, 0]

    def run(i):
        ex = vcpus[i].run(plans[i], i + 1)
        while not ex.done:
            assert ex.reason == EXIT_DIRTY_RING_FULL
            full_exits[i] += 1
            ex = vcpus[i].run()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    seen = set()
    while any(t.is_alive() for t in threads):
        for sid, offs in d.harvest().items():
            seen.update(offs.tolist())
    for t in threads:
        t.join()
    seen.update(d.harvest().get(0, np.zeros(0)).tolist())
    assert seen == set(range(1 << 14)) and sum(full_exits) > 0


def test_shared_ring_push_many_from_two_threads():
    from kvmdirty._ring import DirtyRing
    ring = DirtyRing(1 << 16)
    n = 30000
    offs = [np.arange(n, dtype=np.uint64) + i * n for i in range(2)]
    ts = [threading.Thread(target=_seeds.push_many_shared,
                           args=(ring, np.full(n, i, np.uint32), offs[i])) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    slots, got = ring.collect()
    assert sorted(got.tolist()) == list(range(2 * n)) and ring.stats["pushes"] == 2 * n
    for i in range(2):      # each writer's entries stay in its own order
        mine = got[slots == i]
        assert (np.diff(mine.astype(np.int64)) > 0).all()


def test_shared_tracker_rejects_non_rings():
    with pytest.raises(TypeError):
        _seeds.SharedRingTracker(object())


# -- switched bitmaps (seed 003) ------------------------------------------------------

def test_switched_bitmap_switch_returns_old_and_new_writes_go_to_new():
    vm = _vm("switched-bitmap", npages=256)
    d = vm.design
    v = vm.create_vcpu(0)
    v.run(np.array([BASE_GFN + 1, BASE_GFN + 70], np.uint64), 1)
    active, old = d.addresses(0)
    assert active[0] == 2 and active[1] == 1 << 6
    retired = d.switch(0)
    assert retired[0] == 2 and not retired.flags.writeable
    v.run(np.array([BASE_GFN + 1, BASE_GFN + 5], np.uint64), 2)      # page 1 faults again
    active, old = d.addresses(0)
    assert active[0] == 0b100010 and old[1] == 1 << 6
    assert d.harvest()[0].tolist() == [1, 5]
    assert d.harvest()[0].tolist() == []


def test_switched_bitmap_user_variant_clean_returns_zero():
    vm = _vm("switched-bitmap-user", npages=256)
    d = vm.design
    v = vm.create_vcpu(0)
    mine = np.zeros(4, np.uint64)
    assert d.switch(0, mine) == 0 and d.retired(0) is None
    v.run(np.array([BASE_GFN + 3], np.uint64), 1)
    assert d.switch(0, mine) == 1
    assert d.retired(0)[0] == 8 and mine[0] == 0
    v.run(np.array([BASE_GFN + 3], np.uint64), 2)
    assert mine[0] == 8                                   # re-protected: logged into the new one
    with pytest.raises(KvmError) as e:
        d.switch(0, mine)                                 # the active bitmap itself
    assert e.value.errno == errno.EBUSY
    with pytest.raises(ValueError):
        d.switch(0, np.zeros(1, np.uint64))               # too small
    with pytest.raises(TypeError):
        d.switch(0, np.zeros(4, np.int32))
    with pytest.raises(KvmError):
        d.switch(5, np.zeros(4, np.uint64))


def test_protect_bitmap_counts_and_drops():
    mmu, w = make_mmu(slot_id=1, npages=128)
    words = np.array([0b101, 0, 1 << 63], np.uint64)
    assert _seeds.protect_bitmap(words, mmu, 1) == (3, 2, 1)   # word 2 is past the slot end
    assert ~w[0] == 0b101


# -- seed 004: range write-protect -------------------------------------------------------

def test_range_protect_covers_first_to_last_set_bit():
    mmu, w = make_mmu(slot_id=1, npages=256)
    mmu.protect_range = True
    assert mmu.protect(1, 64, (1 << 3) | (1 << 10))
    assert ~w[1] == sum(1 << b for b in range(3, 11)) and ~w[0] == 0


@pytest.mark.parametrize("design", ["kvm", "shared-ring"])
def test_range_protect_causes_extra_faults_but_loses_nothing(design):
    """A page dirtied after the harvest but before the reset sits between two batch bits.

    Range protect re-protects it too: its next write faults again (an extra
    fault and a duplicate entry), but nothing is lost.
    """
    faults = {}
    for protect in ("exact", "range"):
        if design == "kvm":
            vm = VM(protect=protect)
            vm.enable_dirty_ring(4096)
            vm.set_user_memory_region(0, BASE_GFN << 12, 256 << 12, LOG)
            v = vm.create_vcpu(0)
            collect, reset = v.dirty_ring.collect, vm.reset_dirty_rings
        else:
            vm = _vm(design, npages=256, protect=protect)
            v = vm.create_vcpu(0)
            collect, reset = vm.design.collect, vm.design.reset
        v.run(np.array([BASE_GFN + 2, BASE_GFN + 60], np.uint64), 1)
        assert collect()[1].tolist() == [2, 60]
        v.run(np.array([BASE_GFN + 30], np.uint64), 2)          # entry 30 stays DIRTY
        assert reset() == 2                                      # batch (2, bits 0 and 58)
        before = v.stats["faults"]
        v.run(np.array([BASE_GFN + 30], np.uint64), 3)
        faults[protect] = v.stats["faults"] - before
        offs = collect()[1].tolist()
        assert set(offs) == {30} and len(offs) == 1 + faults[protect]
        assert vm.memory(0)[30] == 3
    assert faults == {"exact": 0, "range": 1}


# -- every design through a VM: every write logged, nothing lost, nothing invented --------

@pytest.mark.parametrize("design", sorted(DESIGNS))
@pytest.mark.parametrize("log_every_write", [False, True])
def test_every_design_logs_every_written_page_each_phase(design, log_every_write):
    opts = {"entries": 1024} if "ring" in design else {}
    vm = _vm(design, npages=3000, log_every_write=log_every_write, **opts)
    vcpus = [vm.create_vcpu(i) for i in range(2)]
    rng = np.random.default_rng(7)
    for phase in range(1, 8):
        written = set()
        got = set()
        for v in vcpus:
            plan = (BASE_GFN + rng.integers(0, 3000, 700)).astype(np.uint64)
            written.update((plan - BASE_GFN).tolist())
            ex = v.run(plan, phase)
            while not ex.done:
                assert ex.reason in (EXIT_DIRTY_LOG_FULL, EXIT_DIRTY_RING_FULL)
                got.update(vm.design.harvest().get(0, np.zeros(0)).tolist())
                ex = v.run()
        got.update(vm.design.harvest().get(0, np.zeros(0)).tolist())
        assert got == written, (phase, sorted(written - got)[:5], sorted(got - written)[:5])
        mem = vm.memory(0)
        assert (mem[sorted(written)] == phase).all()


def test_create_design_unknown_name():
    with pytest.raises(ValueError):
        create_design("nope", VM())
