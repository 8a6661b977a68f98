"""The verifiers on hand-made harvests: they report exactly the writes a harvest missed."""
from __future__ import annotations

import numpy as np

from kvmdirty import _bitmap
from kvmdirty import verify
from kvmdirty.verify import FinalValues, LostPage, SelftestCheck, ShadowCopy, UnwrittenPage
from kvmdirty.vm import MEM_LOG_DIRTY_PAGES, VM

NPAGES = 200           # not a multiple of 64
BASE = 1000            # slot base gfn


def make_vm():
    vm = VM()
    vm.set_user_memory_region(0, BASE * 4096, NPAGES * 4096, MEM_LOG_DIRTY_PAGES)
    return vm, vm.create_vcpu(0), [(0, BASE, NPAGES)]


def harvest(vm):
    return {0: _bitmap.to_gfns(vm.get_dirty_log(0), 0)}


def test_shadow_complete_harvests_lose_nothing():
    vm, v, slots = make_vm()
    c = ShadowCopy(vm, slots)
    v.run(np.array([BASE + 1, BASE + 5, BASE + 199]), np.array([11, 55, 99], dtype=np.uint64))
    c.absorb(harvest(vm))
    v.run(np.array([BASE + 5]), 56)
    c.absorb(harvest(vm))
    c.end_round(1)
    assert c.count == 0 and c.lost == [] and c.bad_rounds == []
    assert c.copied == 4


def test_shadow_reports_a_missed_page_with_gfn_and_values():
    vm, v, slots = make_vm()
    c = ShadowCopy(vm, slots)
    v.run(np.array([BASE + 3, BASE + 70]), np.array([7, 8], dtype=np.uint64))
    h = harvest(vm)
    h[0] = h[0][h[0] != 70]            # the harvest "forgets" page 70
    c.absorb(h)
    c.end_round(1)
    assert c.count == 1
    assert c.lost == [LostPage(BASE + 70, 8, 0, 1)]
    assert "gfn 0x42e" in str(c.lost[0])
    c.end_round(2)                      # still wrong, counted once
    assert c.count == 1 and c.bad_rounds == [1, 2]


def test_shadow_ignores_bogus_entries_but_counts_them():
    vm, _v, slots = make_vm()
    c = ShadowCopy(vm, slots)
    c.absorb({0: np.array([NPAGES + 5], np.uint64), 9: np.array([1], np.uint64)})
    assert c.bogus == 2
    c.end_round(1)
    assert c.count == 0


def test_selftest_rules():
    vm, v, slots = make_vm()
    c = SelftestCheck(vm, slots)
    v.run(np.array([BASE + 1, BASE + 2]), 1)
    c.absorb(harvest(vm))
    c.end_round(1)
    assert c.count == 0
    v.run(np.array([BASE + 2, BASE + 3]), 2)
    h = harvest(vm)
    c.absorb({0: h[0][h[0] != 3]})      # page 3 written in round 2 but not reported
    c.absorb({0: np.array([1], np.uint64)})   # page 1 reported but holds 1, not 2
    c.end_round(2)
    assert c.count == 2 and c.bad_rounds == [2]
    kinds = {(x.gfn - BASE, x.reported, x.value) for x in c.violations}
    assert kinds == {(3, False, 2), (1, True, 1)}


def test_selftest_tolerates_zero_in_round_one_with_initially_set():
    vm = VM()
    vm.enable_manual_protect(initially_set=True)
    vm.set_user_memory_region(0, 0, NPAGES * 4096, MEM_LOG_DIRTY_PAGES)
    v = vm.create_vcpu(0)
    slots = [(0, 0, NPAGES)]
    strict, tolerant = SelftestCheck(vm, slots), SelftestCheck(vm, slots, initially_set=True)
    v.run(np.array([4]), 1)
    words = vm.get_dirty_log(0)                # every page reported
    h = {0: _bitmap.to_gfns(words, 0)}
    vm.clear_dirty_log(0, 0, NPAGES, words)
    for c in (strict, tolerant):
        c.absorb(h)
        c.end_round(1)
    assert tolerant.count == 0
    assert strict.count == NPAGES - 1


# -- FinalValues: what the plans wrote must be in guest memory ------------------
def test_final_values_exact_order_passes_and_catches_each_kind_of_wrong_page():
    vm, v, slots = make_vm()
    c = FinalValues(vm, slots, 2, ordered=True)
    g = np.array([BASE + 1, BASE + 2, BASE + 1])
    v.run(g, np.array([10, 20, 11], dtype=np.uint64))
    c.wrote(0, g, np.array([10, 20, 11], dtype=np.uint64))
    c.wrote(1, np.array([BASE + 9]), 5)            # a write the backend "forgot"
    v.run(np.array([BASE + 30]), 7)                # a write no plan made
    c.end_round(1)
    assert c.count == 2 and c.bad_rounds == [1]
    assert {(u.gfn, u.guest, u.expected) for u in c.unwritten} == {(BASE + 9, 0, 5), (BASE + 30, 7, 0)}
    assert isinstance(c.unwritten[0], UnwrittenPage) and "plans leave" in str(c.unwritten[0])
    # Next round starts from what memory holds; the bad pages are not counted again.
    c.end_round(2)
    assert c.count == 2 and c.bad_rounds == [1]


def test_final_values_ordered_needs_the_last_write_unordered_accepts_any_vcpus_last():
    for ordered, expect_bad in ((True, 1), (False, 0)):
        vm, v, slots = make_vm()
        c = FinalValues(vm, slots, 2, ordered=ordered)
        # Memory ends with vCPU 0's value although vCPU 1 wrote last in call
        # order: only concurrent vCPUs may end like that.
        c.wrote(0, np.array([BASE + 4]), 1)
        c.wrote(1, np.array([BASE + 4]), 2)
        v.run(np.array([BASE + 4]), 1)
        c.end_round(1)
        assert c.count == expect_bad, ordered


def test_final_values_a_vcpus_own_writes_are_ordered():
    vm, v, slots = make_vm()
    c = FinalValues(vm, slots, 2, ordered=False)
    c.wrote(0, np.array([BASE + 4, BASE + 4]), np.array([1, 2], dtype=np.uint64))
    v.run(np.array([BASE + 4]), 1)                 # its earlier value: never a final one
    c.end_round(1)
    assert c.count == 1


def test_final_values_fold_keeps_the_last_write(monkeypatch):
    monkeypatch.setattr(verify, "_FOLD_AT", 4)
    vm, v, slots = make_vm()
    c = FinalValues(vm, slots, 1, ordered=True)
    rng = np.random.default_rng(5)
    for _ in range(40):
        g = (BASE + rng.integers(0, 8, 3)).astype(np.uint64)
        vals = rng.integers(1, 1000, 3).astype(np.uint64)
        v.run(g, vals)
        c.wrote(0, g, vals)
    assert len(c._streams[0].parts) < 40           # folded on the way
    c.end_round(1)
    assert c.count == 0
