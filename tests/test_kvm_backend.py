"""The real /dev/kvm backend (kvmdirty.kvm): bitmaps, manual protect, rings, exits, errno.

Guest instructions are slow on nested hosts (~4 us each, six per write), so
plans are a few thousand writes at most. Skipped, with the reason, where
/dev/kvm is missing or unusable.
"""
from __future__ import annotations

import errno

import numpy as np
import pytest

from kvm_util import bitmap_gfns, reference_collect, requires_kvm, ring_capable

pytestmark = [pytest.mark.kvm, requires_kvm]

from kvmdirty import _uapi, guest  # noqa: E402
from kvmdirty.api import EXIT_BUDGET, EXIT_DIRTY_RING_FULL, EXIT_HLT, Exit  # noqa: E402

EXIT_MMIO = _uapi.EXIT_MMIO
from kvmdirty.errors import KvmError  # noqa: E402

LOG = _uapi.MEM_LOG_DIRTY_PAGES
BASE = 0x100000                    # slot 1 starts at 1 MiB: gfn 0x100
BASE_GFN = BASE >> 12
SLOT_PAGES = 1024                  # 4 MiB


def _needs_ring():
    why = ring_capable()
    if why:
        pytest.skip(why)


@pytest.fixture
def vm():
    from kvmdirty.kvm import KvmVM
    with KvmVM() as v:
        yield v


def _plan(n, pages=SLOT_PAGES, seed=0, replace=False):
    rng = np.random.default_rng(seed)
    return rng.choice(pages, n, replace=replace).astype(np.uint64)


# -- bitmap path ------------------------------------------------------------
def test_get_dirty_log_names_exactly_the_written_pages(vm):
    vm.set_user_memory_region(1, BASE, SLOT_PAGES * 4096, LOG)
    v = vm.create_vcpu(0)
    offs = _plan(500)
    assert v.run(offs + BASE_GFN, 0xABCD) == Exit(EXIT_HLT, 500, 0)
    bm = vm.get_dirty_log(1)
    assert bm.dtype == np.uint64 and bm.shape == (SLOT_PAGES // 64,)
    assert np.array_equal(bitmap_gfns(bm), np.sort(offs))
    assert not vm.get_dirty_log(1).any()                 # GET cleared and re-protected
    mem = vm.memory(1)
    assert mem.shape == (SLOT_PAGES,) and not mem.flags.writeable
    assert np.all(mem[offs] == 0xABCD)
    assert np.count_nonzero(mem) == 500


def test_rewrites_after_get_are_logged_again(vm):
    vm.set_user_memory_region(1, BASE, SLOT_PAGES * 4096, LOG)
    v = vm.create_vcpu(0)
    v.run(np.arange(64, dtype=np.uint64) + BASE_GFN, 1)
    vm.get_dirty_log(1)
    v.run(np.array([BASE_GFN + 3, BASE_GFN + 3, BASE_GFN + 700]), 2)
    assert bitmap_gfns(vm.get_dirty_log(1)).tolist() == [3, 700]
    assert vm.memory(1)[3] == 2 and vm.memory(1)[4] == 1


def test_bitmap_words_for_a_slot_not_a_multiple_of_64_pages(vm):
    vm.set_user_memory_region(2, 0, 67 * 4096, LOG)      # 67 pages: two words
    v = vm.create_vcpu(0)
    v.run(np.array([0, 66]), 5)
    bm = vm.get_dirty_log(2)
    assert bm.shape == (2,) and bitmap_gfns(bm).tolist() == [0, 66]


def test_two_slots_log_separately_and_the_guest_slot_never_shows(vm):
    vm.set_user_memory_region(1, BASE, SLOT_PAGES * 4096, LOG)
    vm.set_user_memory_region(3, 16 << 20, 512 * 4096, LOG)
    v = vm.create_vcpu(0)
    a, b = _plan(100, seed=1), _plan(50, pages=512, seed=2)
    v.run(np.concatenate([a + BASE_GFN, b + (16 << 20 >> 12)]), 9)
    assert np.array_equal(bitmap_gfns(vm.get_dirty_log(1)), np.sort(a))
    assert np.array_equal(bitmap_gfns(vm.get_dirty_log(3)), np.sort(b))
    with pytest.raises(KvmError) as e:
        vm.get_dirty_log(vm.private_slot)                # never logged
    assert e.value.errno == errno.ENOENT


def test_unlogged_slot_then_logging_turned_on(vm):
    vm.set_user_memory_region(1, BASE, SLOT_PAGES * 4096, 0)
    v = vm.create_vcpu(0)
    v.run(np.array([BASE_GFN + 1]), 1)
    vm.set_user_memory_region(1, BASE, SLOT_PAGES * 4096, LOG)   # flags change
    assert not vm.get_dirty_log(1).any()
    v.run(np.array([BASE_GFN + 1, BASE_GFN + 2]), 2)
    assert bitmap_gfns(vm.get_dirty_log(1)).tolist() == [1, 2]
    assert vm.memory(1)[1] == 2                          # same memory kept


def test_moved_slot_keeps_memory_and_logs_relative_offsets(vm):
    vm.set_user_memory_region(1, BASE, SLOT_PAGES * 4096, LOG)
    v = vm.create_vcpu(0)
    v.run(np.array([BASE_GFN + 5]), 42)
    vm.set_user_memory_region(1, 8 << 20, SLOT_PAGES * 4096, LOG)   # move
    assert vm.memory(1)[5] == 42
    v.run(np.array([(8 << 20 >> 12) + 9]), 43)
    assert 9 in bitmap_gfns(vm.get_dirty_log(1)).tolist()
    assert vm.memory(1)[9] == 43


# -- manual protect -----------------------------------------------------------
def test_manual_protect_initially_set(vm):
    vm.enable_manual_protect(initially_set=True)
    npages = 1000                                        # not a multiple of 64
    vm.set_user_memory_region(1, BASE, npages * 4096, LOG)
    v = vm.create_vcpu(0)
    first = vm.get_dirty_log(1)
    assert bitmap_gfns(first).tolist() == list(range(npages))     # all ones, tail bits clear
    assert np.array_equal(vm.get_dirty_log(1), first)  # GET does not clear with manual protect
    vm.clear_dirty_log(1, 0, npages, first)
    assert not vm.get_dirty_log(1).any()
    offs = _plan(300, pages=npages, seed=3)
    v.run(offs + BASE_GFN, 7)
    bm = vm.get_dirty_log(1)
    assert np.array_equal(bitmap_gfns(bm), np.sort(offs))
    # Clear half of them: only the other half stays.
    half = np.zeros_like(bm)
    keep = np.sort(offs)[::2]
    for o in keep:
        half[int(o) // 64] |= np.uint64(1 << (int(o) % 64))
    vm.clear_dirty_log(1, 0, npages, half)
    assert np.array_equal(bitmap_gfns(vm.get_dirty_log(1)), np.setdiff1d(np.sort(offs), keep))


def test_manual_protect_without_initially_set_starts_clean(vm):
    vm.enable_manual_protect()
    vm.set_user_memory_region(1, BASE, SLOT_PAGES * 4096, LOG)
    v = vm.create_vcpu(0)
    assert not vm.get_dirty_log(1).any()
    v.run(np.array([BASE_GFN + 64, BASE_GFN + 130]), 1)
    bm = vm.get_dirty_log(1)
    assert bitmap_gfns(bm).tolist() == [64, 130]
    vm.clear_dirty_log(1, 64, 128, bm[1:3])              # first_page 64: words 1..2
    assert not vm.get_dirty_log(1).any()


# -- ring path ----------------------------------------------------------------
def test_ring_collects_every_write_in_order(vm):
    _needs_ring()
    vm.enable_dirty_ring(4096)
    vm.set_user_memory_region(1, BASE, SLOT_PAGES * 4096, LOG)
    v = vm.create_vcpu(0)
    ring = v.dirty_ring
    assert ring.entries == 4096 and ring.fetch_index == 0
    offs = _plan(600, seed=4, replace=True)              # repeats included
    assert v.run(offs + BASE_GFN, 3).done
    ref_slots, ref_offs = reference_collect(ring)
    assert ring.used == 600
    slots, got = ring.collect()
    assert slots.dtype == np.uint32 and got.dtype == np.uint64
    assert got.tolist() == ref_offs == offs.tolist()     # this host logs every emulated write
    assert set(slots.tolist()) == set(ref_slots) == {1}
    assert ring.fetch_index == 600
    assert vm.reset_dirty_rings() == 600
    assert ring.used == 0 and vm.reset_dirty_rings() == 0
    assert np.all(vm.memory(1)[offs] == 3)


def test_ring_collect_max_count_and_partial_reset(vm):
    _needs_ring()
    vm.enable_dirty_ring(512)
    vm.set_user_memory_region(1, BASE, SLOT_PAGES * 4096, LOG)
    v = vm.create_vcpu(0)
    offs = _plan(100, seed=5)
    v.run(offs + BASE_GFN, 1)
    s, o = v.dirty_ring.collect(max_count=30)
    assert o.tolist() == offs[:30].tolist()
    assert vm.reset_dirty_rings() == 30                  # only harvested entries are reset
    assert v.dirty_ring.used == 70
    s, o = v.dirty_ring.collect()
    assert o.tolist() == offs[30:].tolist()
    assert vm.reset_dirty_rings() == 70


def test_ring_entries_name_the_slot_and_offset(vm):
    _needs_ring()
    vm.enable_dirty_ring(256)
    vm.set_user_memory_region(1, BASE, SLOT_PAGES * 4096, LOG)
    vm.set_user_memory_region(7, 32 << 20, 64 * 4096, LOG)
    vm.set_user_memory_region(8, 48 << 20, 64 * 4096, 0)           # not logged
    v = vm.create_vcpu(0)
    v.run(np.array([BASE_GFN + 2, (32 << 20 >> 12) + 63, (48 << 20 >> 12) + 1, BASE_GFN]), 1)
    s, o = v.dirty_ring.collect()
    assert list(zip(s.tolist(), o.tolist())) == [(1, 2), (7, 63), (1, 0)]


def test_ring_full_harvest_reset_resume_accounts_for_every_write(vm):
    _needs_ring()
    entries = 256
    vm.enable_dirty_ring(entries)
    vm.set_user_memory_region(1, BASE, SLOT_PAGES * 4096, LOG)
    v = vm.create_vcpu(0)
    offs = _plan(1000, seed=6, replace=True)
    exits = [v.run(offs + BASE_GFN, 11)]
    assert exits[0].reason == EXIT_DIRTY_RING_FULL
    # At or after the soft limit (entries - 64), never past the ring's end.
    assert entries - 64 <= exits[0].writes <= entries
    harvested = []
    while not exits[-1].done:
        e = exits[-1]
        assert e.reason in (EXIT_DIRTY_RING_FULL, EXIT_HLT)
        assert v.dirty_ring.used <= entries
        s, o = v.dirty_ring.collect()
        harvested += o.tolist()
        assert vm.reset_dirty_rings() == len(o)
        exits.append(v.run())
        assert len(exits) < 50
    harvested += v.dirty_ring.collect()[1].tolist()
    assert sum(e.writes for e in exits) == 1000
    assert [e.remaining for e in exits][-1] == 0
    assert all(a.remaining - b.writes == b.remaining for a, b in zip(exits, exits[1:]))
    assert harvested == offs.tolist()                    # one entry per write, in order
    assert np.all(vm.memory(1)[offs] == 11)


def test_ring_full_without_reset_keeps_exiting(vm):
    _needs_ring()
    vm.enable_dirty_ring(256)
    vm.set_user_memory_region(1, BASE, SLOT_PAGES * 4096, LOG)
    v = vm.create_vcpu(0)
    e = v.run(_plan(300, seed=7) + BASE_GFN, 1)
    assert e.reason == EXIT_DIRTY_RING_FULL
    again = v.run()
    assert again == Exit(EXIT_DIRTY_RING_FULL, 0, e.remaining)
    v.dirty_ring.collect()
    assert vm.reset_dirty_rings() == e.writes
    assert v.run() == Exit(EXIT_HLT, e.remaining, 0)


def test_ring_only_vm_has_no_bitmaps(vm):
    _needs_ring()
    vm.enable_dirty_ring(256)
    vm.set_user_memory_region(1, BASE, SLOT_PAGES * 4096, LOG)
    for call in (lambda: vm.get_dirty_log(1),
                 lambda: vm.clear_dirty_log(1, 0, 64, np.zeros(1, np.uint64))):
        with pytest.raises(KvmError) as e:
            call()
        assert e.value.errno == errno.ENXIO


# -- exits and resumption -----------------------------------------------------
def test_write_outside_every_slot_exits_mmio_and_resumes(vm):
    vm.set_user_memory_region(1, BASE, SLOT_PAGES * 4096, LOG)
    v = vm.create_vcpu(0)
    hole = 0x4000                                        # gfn 0x4000 = 64 MiB: no slot there
    e = v.run(np.array([BASE_GFN, BASE_GFN + 1, hole, BASE_GFN + 2]), 5)
    # KVM retires an MMIO write before the exit (user space "performs" it): counted as done.
    assert e == Exit(EXIT_MMIO, 3, 1)
    info = v.exit_info()
    assert info["phys_addr"] == hole << 12 and info["is_write"] and info["len"] == 8
    assert info["data"] == (5).to_bytes(8, "little")
    assert v.run() == Exit(EXIT_HLT, 1, 0)
    assert bitmap_gfns(vm.get_dirty_log(1)).tolist() == [0, 1, 2]


def test_max_writes_budget_then_resume(vm):
    vm.set_user_memory_region(1, BASE, SLOT_PAGES * 4096, LOG)
    v = vm.create_vcpu(0)
    offs = _plan(100, seed=8)
    assert v.run(offs + BASE_GFN, 1, max_writes=40) == Exit(EXIT_BUDGET, 40, 60)
    assert v.remaining == 60
    assert np.array_equal(bitmap_gfns(vm.get_dirty_log(1)), np.sort(offs[:40]))
    assert v.run(max_writes=100) == Exit(EXIT_HLT, 60, 0)
    assert v.run() == Exit(EXIT_HLT, 0, 0)               # nothing left
    assert np.array_equal(bitmap_gfns(vm.get_dirty_log(1)), np.sort(offs[40:]))


def test_plan_larger_than_guest_memory_chunk(vm, monkeypatch):
    monkeypatch.setattr(guest, "PLAN_CAPACITY", 70)      # force several chunks
    vm.set_user_memory_region(1, BASE, SLOT_PAGES * 4096, LOG)
    v = vm.create_vcpu(0)
    offs = _plan(300, seed=9)
    assert v.run(offs + BASE_GFN, 4, max_writes=101) == Exit(EXIT_BUDGET, 101, 199)
    assert v.run() == Exit(EXIT_HLT, 199, 0)
    assert np.array_equal(bitmap_gfns(vm.get_dirty_log(1)), np.sort(offs))


def test_new_plan_replaces_an_unfinished_one(vm):
    vm.set_user_memory_region(1, BASE, SLOT_PAGES * 4096, LOG)
    v = vm.create_vcpu(0)
    v.run(np.arange(10, dtype=np.uint64) + BASE_GFN, 1, max_writes=3)
    assert v.run(np.array([BASE_GFN + 500]), 2) == Exit(EXIT_HLT, 1, 0)
    assert bitmap_gfns(vm.get_dirty_log(1)).tolist() == [0, 1, 2, 500]


def test_empty_plan_and_default_value(vm):
    vm.set_user_memory_region(1, BASE, SLOT_PAGES * 4096, LOG)
    v = vm.create_vcpu(0)
    assert v.run(np.zeros(0, np.uint64), 1) == Exit(EXIT_HLT, 0, 0)
    assert v.run([BASE_GFN + 1]) == Exit(EXIT_HLT, 1, 0)            # value defaults to 0
    assert vm.memory(1)[1] == 0 and bitmap_gfns(vm.get_dirty_log(1)).tolist() == [1]


def test_two_vcpus(vm):
    vm.set_user_memory_region(1, BASE, SLOT_PAGES * 4096, LOG)
    a, b = vm.create_vcpu(0), vm.create_vcpu(1)
    a.run(np.array([BASE_GFN + 1]), 1)
    b.run(np.array([BASE_GFN + 2]), 2)
    assert bitmap_gfns(vm.get_dirty_log(1)).tolist() == [1, 2]


def test_ring_size_is_read_as_u32_like_the_kernel(vm):
    """Issue 10 item 11: KVM takes 2**32 + 64 KiB as a 64 KiB ring; KvmVM passes the
    value through and maps the ring the kernel made (before: create_vcpu failed)."""
    _needs_ring()
    vm.enable_cap(RING if vm.check_extension(RING) else _uapi.CAP_DIRTY_LOG_RING, (1 << 32) + 65536)
    vm.set_user_memory_region(1, BASE, SLOT_PAGES * 4096, LOG)
    v = vm.create_vcpu(0)
    assert v.dirty_ring.entries == 65536 // 16
    assert v.run(np.array([BASE_GFN + 3]), 1).done
    assert v.dirty_ring.collect()[1].tolist() == [3]


# -- errno of the real kernel ---------------------------------------------------
Z = np.zeros(2, np.uint64)
RING = _uapi.CAP_DIRTY_LOG_RING_ACQ_REL
M2 = _uapi.CAP_MANUAL_DIRTY_LOG_PROTECT2
MB = 1 << 20


def _manual_slot(vm, size=MB, flags=LOG):
    vm.enable_manual_protect()
    vm.set_user_memory_region(0, 0, size, flags)


# (name, steps before the failing call, the failing call, errno). Measured on
# Linux 6.18 (x86-64); these are what the simulator must return as well.
ERRNO_CASES = [
    ("ring size 0", None, lambda vm: vm.enable_cap(RING, 0), errno.EINVAL),
    ("ring size not a power of two", None, lambda vm: vm.enable_cap(RING, 4096 + 16), errno.EINVAL),
    ("ring smaller than a page", None, lambda vm: vm.enable_cap(RING, 2048), errno.EINVAL),
    ("ring of 128 entries", None, lambda vm: vm.enable_dirty_ring(128), errno.EINVAL),
    ("ring above 65536 entries", None, lambda vm: vm.enable_dirty_ring(1 << 17), errno.E2BIG),
    ("ring after a vCPU exists", lambda vm: vm.create_vcpu(0),
     lambda vm: vm.enable_dirty_ring(256), errno.EINVAL),
    ("ring enabled twice", lambda vm: vm.enable_dirty_ring(256),
     lambda vm: vm.enable_dirty_ring(256), errno.EINVAL),
    ("ring plain, then ACQ_REL", lambda vm: vm.enable_cap(_uapi.CAP_DIRTY_LOG_RING, 4096),
     lambda vm: vm.enable_cap(RING, 4096), errno.EINVAL),
    ("manual protect flag bit 2", None, lambda vm: vm.enable_cap(M2, 4), errno.EINVAL),
    ("INITIALLY_SET without ENABLE", None, lambda vm: vm.enable_cap(M2, 2), errno.EINVAL),
    ("enable an unknown cap", None, lambda vm: vm.enable_cap(9999, 0), errno.EINVAL),
    ("clear: first_page not a multiple of 64", _manual_slot,
     lambda vm: vm.clear_dirty_log(0, 3, 64, Z), errno.EINVAL),
    ("clear: unaligned first_page before the slot lookup", lambda vm: vm.enable_manual_protect(),
     lambda vm: vm.clear_dirty_log(5, 3, 64, Z), errno.EINVAL),
    ("clear: past the slot's end", _manual_slot,
     lambda vm: vm.clear_dirty_log(0, 192, 128, Z), errno.EINVAL),
    ("clear: first_page > npages", _manual_slot,
     lambda vm: vm.clear_dirty_log(0, 320, 0, Z), errno.EINVAL),
    ("clear: num_pages % 64 short of the end", _manual_slot,
     lambda vm: vm.clear_dirty_log(0, 0, 10, Z), errno.EINVAL),
    ("clear: non-logging slot", lambda vm: _manual_slot(vm, flags=0),
     lambda vm: vm.clear_dirty_log(0, 0, 64, Z), errno.ENOENT),
    ("clear: no such slot", lambda vm: vm.enable_manual_protect(),
     lambda vm: vm.clear_dirty_log(5, 0, 64, Z), errno.ENOENT),
    ("clear: slot id out of range", lambda vm: vm.enable_manual_protect(),
     lambda vm: vm.clear_dirty_log(40000, 0, 64, Z), errno.EINVAL),
    ("clear: bitmap shorter than num_pages", lambda vm: _manual_slot(vm, 8 * MB),
     lambda vm: vm.clear_dirty_log(0, 0, 2048, Z), errno.EFAULT),
    ("get: non-logging slot", lambda vm: vm.set_user_memory_region(0, 0, MB, 0),
     lambda vm: vm.get_dirty_log(0), errno.ENOENT),
    ("get: no such slot", None, lambda vm: vm.get_dirty_log(3), errno.ENOENT),
    ("get: slot id 40000", None, lambda vm: vm.get_dirty_log(40000), errno.EINVAL),
    ("get: slot id 32764 (KVM_USER_MEM_SLOTS)", None, lambda vm: vm.get_dirty_log(32764), errno.EINVAL),
    ("get: address space 1", None, lambda vm: vm.get_dirty_log(1 << 16), errno.EINVAL),
    ("get: ring-only VM", lambda vm: (vm.enable_dirty_ring(256), vm.set_user_memory_region(0, 0, MB, LOG)),
     lambda vm: vm.get_dirty_log(0), errno.ENXIO),
    ("get: ring-only VM, bad slot id (ENXIO first)", lambda vm: vm.enable_dirty_ring(256),
     lambda vm: vm.get_dirty_log(40000), errno.ENXIO),
    ("clear: ring-only VM", lambda vm: (vm.enable_dirty_ring(256), _manual_slot(vm)),
     lambda vm: vm.clear_dirty_log(0, 0, 64, Z), errno.ENXIO),
    ("reset without a ring", None, lambda vm: vm.reset_dirty_rings(), errno.EINVAL),
    ("slot overlapping another", lambda vm: vm.set_user_memory_region(0, 0, MB, 0),
     lambda vm: vm.set_user_memory_region(1, MB // 2, MB, 0), errno.EEXIST),
    ("move a slot onto another", lambda vm: (vm.set_user_memory_region(0, 0, MB, 0),
                                             vm.set_user_memory_region(1, MB, MB, 0)),
     lambda vm: vm.set_user_memory_region(0, MB, MB, 0), errno.EEXIST),
    ("grow an existing slot", lambda vm: vm.set_user_memory_region(0, 0, MB, 0),
     lambda vm: vm.set_user_memory_region(0, 0, 2 * MB, 0), errno.EINVAL),
    ("shrink an existing slot", lambda vm: vm.set_user_memory_region(0, 0, MB, 0),
     lambda vm: vm.set_user_memory_region(0, 0, MB // 2, 0), errno.EINVAL),
    ("toggle READONLY on a live slot", lambda vm: vm.set_user_memory_region(0, 0, MB, 0),
     lambda vm: vm.set_user_memory_region(0, 0, MB, _uapi.MEM_READONLY), errno.EINVAL),
    ("delete a slot that does not exist", None,
     lambda vm: vm.set_user_memory_region(7, 0, 0, 0), errno.EINVAL),
    ("delete a slot twice", lambda vm: (vm.set_user_memory_region(0, 0, MB, 0),
                                        vm.set_user_memory_region(0, 0, 0, 0)),
     lambda vm: vm.set_user_memory_region(0, 0, 0, 0), errno.EINVAL),
    ("unaligned guest_phys_addr", None, lambda vm: vm.set_user_memory_region(0, 0x800, MB, 0), errno.EINVAL),
    ("unaligned memory_size", None, lambda vm: vm.set_user_memory_region(0, 0, MB + 100, 0), errno.EINVAL),
    ("slot id 32764", None, lambda vm: vm.set_user_memory_region(32764, 0, MB, 0), errno.EINVAL),
    ("unknown slot flag", None, lambda vm: vm.set_user_memory_region(0, 0, MB, 0x80), errno.EINVAL),
    ("address space 1 (no SMM here)", None,
     lambda vm: vm.set_user_memory_region(1 << 16, 0, MB, 0), errno.EINVAL),
    ("guest_phys_addr + size wraps", None,
     lambda vm: vm.set_user_memory_region(0, (1 << 64) - 4096, MB, 0), errno.EINVAL),
    ("more than KVM_MEM_MAX_NR_PAGES pages", None,
     lambda vm: vm.set_user_memory_region(0, 0, 1 << 43, 0), errno.EINVAL),
    ("vCPU id twice", lambda vm: vm.create_vcpu(0), lambda vm: vm.create_vcpu(0), errno.EEXIST),
    ("vCPU id 4096", None, lambda vm: vm.create_vcpu(4096), errno.EINVAL),
]


@pytest.mark.parametrize("name,setup,call,err", ERRNO_CASES, ids=[c[0] for c in ERRNO_CASES])
def test_real_kernel_errno(vm, name, setup, call, err):
    if setup is not None:
        setup(vm)
    with pytest.raises(KvmError) as e:
        call(vm)
    assert e.value.errno == err, f"{name}: {e.value}"


# Calls the kernel accepts (some of which one might expect to fail).
OK_CASES = [
    ("ring of 65536 entries", None, lambda vm: vm.enable_dirty_ring(65536)),
    ("ring after a slot exists", lambda vm: vm.set_user_memory_region(0, 0, MB, LOG),
     lambda vm: vm.enable_dirty_ring(256)),
    ("manual protect with flags 0", None, lambda vm: vm.enable_cap(M2, 0)),
    ("manual protect after a vCPU exists", lambda vm: vm.create_vcpu(0),
     lambda vm: vm.enable_manual_protect()),
    ("manual protect twice", lambda vm: vm.enable_manual_protect(),
     lambda vm: vm.enable_manual_protect(True)),
    ("manual protect and ring together", lambda vm: vm.enable_dirty_ring(256),
     lambda vm: vm.enable_manual_protect()),
    ("clear without manual protect", lambda vm: vm.set_user_memory_region(0, 0, MB, LOG),
     lambda vm: vm.clear_dirty_log(0, 0, 64, Z)),
    ("clear first_page == npages, 0 pages", _manual_slot, lambda vm: vm.clear_dirty_log(0, 256, 0, Z)),
    ("clear a 3-page slot to its end", lambda vm: _manual_slot(vm, 3 * 4096),
     lambda vm: vm.clear_dirty_log(0, 0, 3, Z)),
    ("reset with a ring and no vCPU", lambda vm: vm.enable_dirty_ring(256),
     lambda vm: vm.reset_dirty_rings()),
    ("move a logging slot", lambda vm: vm.set_user_memory_region(0, 0, MB, LOG),
     lambda vm: vm.set_user_memory_region(0, MB, MB, LOG)),
    ("delete a logging slot, flags ignored", lambda vm: vm.set_user_memory_region(0, 0, MB, LOG),
     lambda vm: vm.set_user_memory_region(0, 0, 0, LOG)),
    ("READONLY slot", None, lambda vm: vm.set_user_memory_region(0, 0, MB, _uapi.MEM_READONLY)),
]


@pytest.mark.parametrize("name,setup,call", OK_CASES, ids=[c[0] for c in OK_CASES])
def test_real_kernel_accepts(vm, name, setup, call):
    if setup is not None:
        setup(vm)
    call(vm)


def test_failed_calls_change_nothing(vm):
    vm.set_user_memory_region(0, 0, MB, LOG)
    with pytest.raises(KvmError):
        vm.set_user_memory_region(0, 0, 2 * MB, LOG)
    with pytest.raises(KvmError):
        vm.set_user_memory_region(1, MB // 2, MB, LOG)
    v = vm.create_vcpu(0)
    v.run(np.array([3]), 1)
    assert bitmap_gfns(vm.get_dirty_log(0)).tolist() == [3]
    assert vm.memory(0).shape == (256,)
    with pytest.raises(KvmError):
        vm.memory(1)


# -- guest program's own slot ---------------------------------------------------
def test_guest_slot_is_reserved(vm):
    with pytest.raises(KvmError) as e:
        vm.set_user_memory_region(vm.private_slot, 0, MB, 0)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(KvmError) as e:                   # overlaps the guest's private memory
        vm.set_user_memory_region(0, guest.PRIVATE_GPA, MB, 0)
    assert e.value.errno == errno.EEXIST
    v = vm.create_vcpu(0)
    with pytest.raises(ValueError):
        v.run(np.array([guest.PRIVATE_GFN_FIRST]), 1)
    with pytest.raises(ValueError):
        v.run(np.array([guest.GUEST_GFN_LIMIT]), 1)


def test_guest_code_matches_its_listing():
    assert guest.CODE[:3] == b"\x48\x8b\x16" and guest.CODE[guest.HLT_OFFSET] == 0xF4
    assert guest.writes_done(guest.PRIVATE_GPA + 0x0A, 5, 8) == 4     # stored, rcx not yet decremented
    assert guest.writes_done(guest.PRIVATE_GPA + 0x11, 5, 8) == 3     # after dec
    assert guest.writes_done(guest.PRIVATE_GPA + 0x07, 5, 8) == 3     # store not yet retired
    assert guest.writes_done(guest.PRIVATE_GPA + guest.HLT_OFFSET, 0, 8) == 8


# -- bad input: TypeError / ValueError before any syscall ----------------------
@pytest.mark.parametrize("args,exc", [
    (("1", 0, MB), TypeError), ((1.0, 0, MB), TypeError), ((True, 0, MB), TypeError),
    ((-1, 0, MB), ValueError), ((1 << 32, 0, MB), ValueError), ((0, -4096, MB), ValueError),
    ((0, 0, 1 << 64), ValueError), ((0, 0, MB, 1 << 32), ValueError), ((0, 0, MB, None), TypeError),
])
def test_set_user_memory_region_bad_arguments(vm, args, exc):
    with pytest.raises(exc):
        vm.set_user_memory_region(*args)


def test_bad_arguments_elsewhere(vm):
    vm.enable_manual_protect()
    vm.set_user_memory_region(0, 0, MB, LOG)
    v = vm.create_vcpu(0)
    for bad, exc in ((np.zeros((2, 2), np.uint64), ValueError), (np.array([1.5]), TypeError),
                     (np.array([-1]), ValueError), (np.array(["abc"]), TypeError)):
        with pytest.raises(exc):
            v.run(bad, 1)
    with pytest.raises(ValueError):
        v.run(np.array([1]), -1)
    with pytest.raises(ValueError):
        v.run(value=3)
    with pytest.raises(ValueError):
        v.run(np.array([1]), 1, max_writes=0)
    with pytest.raises(TypeError):
        vm.clear_dirty_log(0, 0, 64, np.array([1.0]))
    with pytest.raises(ValueError):
        vm.clear_dirty_log(0, 0, 64, np.zeros((1, 1), np.uint64))
    with pytest.raises(ValueError):
        vm.clear_dirty_log(0, 0, 1 << 32, Z)             # num_pages is a u32
    with pytest.raises(ValueError):
        vm.clear_dirty_log(0, 0, 64, np.array([-1]))
    with pytest.raises(TypeError):
        vm.get_dirty_log("0")
    with pytest.raises(ValueError):
        vm.enable_dirty_ring(-1)
    with pytest.raises(TypeError):
        vm.enable_cap(RING, "4096")
    with pytest.raises(ValueError):
        vm.enable_cap(RING, 1, 2, 3, 4, 5)
    with pytest.raises(ValueError):
        vm.create_vcpu(-1)
    assert v.run(np.array([1]), 1).done                  # and the VM still works


# -- info and the factory -------------------------------------------------------
def test_kvm_info_reports_this_host():
    from kvmdirty.info import format_info, kvm_info
    d = kvm_info()
    assert d["available"] and d["api_version"] == 12
    assert d["dirty_ring_max_entries"] * 16 == d["dirty_ring_max_bytes"]
    assert d["nr_memslots"] > 1 and d["max_vcpus"] >= 1
    text = format_info(d)
    assert "dirty ring max entries" in text and "MANUAL_DIRTY_LOG_PROTECT2" in text


def test_kvm_info_unavailable_reason(tmp_path):
    from kvmdirty.info import format_info, kvm_info
    d = kvm_info(str(tmp_path / "nope"))
    assert not d["available"]
    assert format_info(d).startswith("unavailable: cannot open")
    assert format_info(kvm_info("/dev/null")).startswith("unavailable: /dev/null is not a KVM device")


def test_open_vm_factory():
    from kvmdirty.kvm import KvmVM, open_vm
    with open_vm("kvm") as vm:
        assert isinstance(vm, KvmVM)
    with pytest.raises(ValueError):
        open_vm("qemu")


def test_kvm_vm_satisfies_the_shared_protocols(vm):
    from kvmdirty.api import VcpuProtocol, VMProtocol, DirtyRingView
    assert isinstance(vm, VMProtocol)
    assert isinstance(vm.create_vcpu(0), VcpuProtocol)
    _needs_ring()
    from kvmdirty.kvm import KvmVM
    with KvmVM() as r:
        r.enable_dirty_ring(256)
        assert isinstance(r.create_vcpu(0).dirty_ring, DirtyRingView)


def test_concurrent_collectors_take_each_entry_once(vm):
    """Two threads collecting one real ring: every entry reported exactly once
    (unserialised, both read the same fetch_index and reported entries twice)."""
    import threading
    _needs_ring()
    vm.enable_dirty_ring(4096)
    vm.set_user_memory_region(1, BASE, SLOT_PAGES * 4096, LOG)
    v = vm.create_vcpu(0)
    ring = v.dirty_ring
    for rep in range(3):
        plan = BASE_GFN + _plan(1000, seed=rep)
        assert v.run(plan, rep + 1).done
        got = [[], []]
        go = threading.Barrier(2)

        def collector(k):
            go.wait()
            while True:
                _s, offs = ring.collect(1)
                if len(offs) == 0:
                    return
                got[k].extend(offs.tolist())

        ts = [threading.Thread(target=collector, args=(k,)) for k in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        both = sorted(got[0] + got[1])
        assert both == sorted((plan - BASE_GFN).tolist())
        assert vm.reset_dirty_rings() == 1000


def test_ctrl_c_during_kvm_run_keeps_the_position(vm):
    """SIGINT while the guest runs: KeyboardInterrupt from run(), `remaining` says
    where the vCPU stopped (it kept the whole plan before), run() finishes the rest."""
    import signal
    import threading
    vm.set_user_memory_region(1, BASE, 16 * MB, LOG)
    v = vm.create_vcpu(0)
    plan = (BASE_GFN + np.arange(4096, dtype=np.uint64)).repeat(2)     # 8192 writes, one burst
    main = threading.main_thread().ident
    timer = threading.Timer(0.03, signal.pthread_kill, (main, signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            v.run(plan, 3)
            timer.join()                   # the guest finished first: wait for the signal here
    finally:
        timer.cancel()
    left = v.remaining
    assert 0 <= left < plan.size
    ex = v.run()
    assert ex.reason == EXIT_HLT and ex.writes == left and v.remaining == 0
    assert (vm.memory(1)[:4096] == 3).all()
