"""Large guests: a simulated 64 GiB guest (16.7 M pages), and KVM's memslot limits.

The 64 GiB guest is created, 1 M random pages are dirtied by a vCPU, and the
dirty log is harvested (bitmap and ring); our structures must stay under
1 GiB of resident memory, measured as VmRSS growth of this process
(/proc/self/status).  What we hold per 64 GiB slot: guest memory as one u64
per page (128 MiB, touched by the writes), the SPTE W bits, the dirty bitmap
and each vCPU's TLB bitmap (2 MiB each).

Limits, with the kernel's errno (EINVAL) and checked before anything is
allocated: KVM_MEM_MAX_NR_PAGES (2^31 - 1 pages per slot), slot ids below
KVM_USER_MEM_SLOTS (32764), address spaces below 2 (x86: normal + SMM).
"""
from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from kvm_util import requires_kvm

import kvmdirty
from kvmdirty import KvmError, _bitmap
from kvmdirty.limits import ADDRESS_SPACES, MEM_MAX_NR_PAGES, USER_MEM_SLOTS
from kvmdirty.vm import MEM_LOG_DIRTY_PAGES as LOG

GiB = 1 << 30
PAGES_64G = (64 * GiB) >> 12          # 16,777,216
DIRTY = 1 << 20
RSS_LIMIT = GiB
SANITIZER = bool(os.environ.get("KVMDIRTY_SANITIZER_RUN"))


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _report(request, name, value):
    request.node.user_properties.append((name, value))
    print(f"{name}: {value / (1 << 20):.1f} MiB")


def test_64gib_guest_bitmap(request):
    base = rss()
    vm = kvmdirty.VM()
    vm.set_user_memory_region(0, 0, 64 * GiB, LOG)
    v = vm.create_vcpu(0)
    created = rss() - base
    rng = np.random.default_rng(64)
    gfns = rng.integers(0, PAGES_64G, DIRTY, dtype=np.uint64)
    ex = v.run(gfns, np.arange(1, DIRTY + 1, dtype=np.uint64))
    assert ex.done
    words = vm.get_dirty_log(0)
    assert len(words) == PAGES_64G // 64
    pages = _bitmap.to_gfns(words)
    expect = np.unique(gfns)
    assert np.array_equal(pages, expect)
    # Re-protected: a second harvest is empty, the same writes fault and are logged again.
    assert _bitmap.popcount(vm.get_dirty_log(0)) == 0
    v.run(gfns[:1000], 7)
    assert np.array_equal(_bitmap.to_gfns(vm.get_dirty_log(0)), np.unique(gfns[:1000]))
    mem = vm.memory(0)
    last = {}
    for i in range(DIRTY - 1, DIRTY - 2000, -1):
        last.setdefault(int(gfns[i]), i + 1)
    for g, val in list(last.items())[:200]:
        assert int(mem[g]) == (7 if g in set(gfns[:1000].tolist()) else val)
    grown = rss() - base
    _report(request, "rss_64gib_created", created)
    _report(request, "rss_64gib_bitmap", grown)
    assert grown < RSS_LIMIT, f"{grown / GiB:.2f} GiB resident for a 64 GiB guest"
    vm.close()


@pytest.mark.skipif(not __import__("importlib").util.find_spec("kvmdirty._ring"), reason="no kvmdirty._ring")
def test_64gib_guest_ring(request):
    """The same guest with a dirty ring: no bitmap at all; harvest in ring-sized batches."""
    base = rss()
    vm = kvmdirty.VM()
    vm.enable_dirty_ring(65536)
    vm.set_user_memory_region(0, 0, 64 * GiB, LOG)
    v = vm.create_vcpu(0)
    rng = np.random.default_rng(65)
    n = DIRTY // 4 if SANITIZER else DIRTY
    gfns = rng.integers(0, PAGES_64G, n, dtype=np.uint64)
    seen = []
    ex = v.run(gfns, 1)
    while True:
        s, o = v.dirty_ring.collect()
        seen.append(o)
        assert vm.reset_dirty_rings() == len(o)
        if ex.done:
            break
        ex = v.run()
    got = np.unique(np.concatenate(seen))
    assert np.array_equal(got, np.unique(gfns))
    grown = rss() - base
    _report(request, "rss_64gib_ring", grown)
    assert grown < RSS_LIMIT
    vm.close()


# -- memslot limits -------------------------------------------------------------------

LIMIT_CASES = [
    # (slot, gpa, size) -> errno or None (accepted)
    ("too many pages", 0, 0, (MEM_MAX_NR_PAGES + 1) << 12, errno.EINVAL),
    ("way too many pages", 0, 0, 1 << 60, errno.EINVAL),
    ("last slot id", USER_MEM_SLOTS - 2, 0, 1 << 12, None),
    ("slot id = KVM_USER_MEM_SLOTS", USER_MEM_SLOTS, 0, 1 << 12, errno.EINVAL),
    ("slot id 0xffff", 0xFFFF, 0, 1 << 12, errno.EINVAL),
    ("address space 1 (SMM)", 1 << 16, 0, 1 << 12, None),
    ("address space 2", ADDRESS_SPACES << 16, 0, 1 << 12, errno.EINVAL),
    ("address space 0xffff", 0xFFFF << 16, 0, 1 << 12, errno.EINVAL),
    ("gpa + size wraps", 0, (1 << 64) - (1 << 12), 2 << 12, errno.EINVAL),
]


@pytest.mark.parametrize("name,slot,gpa,size,err", LIMIT_CASES, ids=[c[0] for c in LIMIT_CASES])
def test_memslot_limits(name, slot, gpa, size, err):
    vm = kvmdirty.VM()
    base = rss()
    if err is None:
        vm.set_user_memory_region(slot, gpa, size, LOG)
        assert slot in vm.slots
        vm.get_dirty_log(slot)
        vm.set_user_memory_region(slot, gpa, 0, 0)
    else:
        with pytest.raises(KvmError) as e:
            vm.set_user_memory_region(slot, gpa, size, LOG)
        assert e.value.errno == err
        assert not vm.slots
    assert rss() - base < 64 << 20        # refused before allocating anything


@pytest.mark.parametrize("slot,err", [(USER_MEM_SLOTS, errno.EINVAL), (ADDRESS_SPACES << 16, errno.EINVAL),
                                      (USER_MEM_SLOTS - 2, errno.ENOENT), (1 << 16, errno.ENOENT)])
def test_dirty_log_slot_limits(slot, err):
    vm = kvmdirty.VM()
    for call in (lambda: vm.get_dirty_log(slot), lambda: vm.clear_dirty_log(slot, 0, 64, np.zeros(1, np.uint64))):
        with pytest.raises(KvmError) as e:
            call()
        assert e.value.errno == err


@pytest.mark.skipif(SANITIZER, reason="a 16 GiB lazily-zeroed allocation under ASan is pointless")
def test_largest_slot_is_accepted_lazily(request):
    """2^31 - 1 pages (8 TiB) is the largest slot KVM takes; we take it without touching it."""
    vm = kvmdirty.VM()
    base = rss()
    try:
        vm.set_user_memory_region(0, 0, MEM_MAX_NR_PAGES << 12, LOG)
    except MemoryError:
        # A strict overcommit policy refuses 16 GiB of address space: then the
        # refusal must be clean (nothing registered, the VM still usable).
        assert not vm.slots
        vm.set_user_memory_region(0, 0, 1 << 20, LOG)
        return
    v = vm.create_vcpu(0)
    top = MEM_MAX_NR_PAGES - 1
    assert v.run([0, top], 5).done
    assert _bitmap.to_gfns(vm.get_dirty_log(0)).tolist() == [0, top]
    grown = rss() - base
    _report(request, "rss_8tib_slot", grown)
    assert grown < RSS_LIMIT
    vm.close()


@pytest.mark.kvm
@requires_kvm
@pytest.mark.parametrize("name,slot,gpa,size,err", [c for c in LIMIT_CASES if c[4] is not None],
                         ids=[c[0] for c in LIMIT_CASES if c[4] is not None])
def test_memslot_limits_match_real_kvm(name, slot, gpa, size, err):
    from kvmdirty.kvm import KvmVM
    with KvmVM() as vm:
        with pytest.raises(KvmError) as e:
            vm.set_user_memory_region(slot, gpa, size, LOG)
        assert e.value.errno == err
