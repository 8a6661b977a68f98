"""Fuzzing the simulated KVM API (kvmdirty.VM / Vcpu / the seed designs) with arbitrary calls.

A VM of every tracking mode runs a random sequence of calls, each with
arguments that are sometimes valid and sometimes anything at all (huge,
negative, floats, strings, None, arrays of the wrong dtype or shape).  Checks:

* only documented exceptions come out: KvmError (with the kernel's errno),
  TypeError, ValueError, IndexError, OverflowError;
* a failed call changes nothing (slots, memory, bitmaps, caps, vCPUs, stats);
* the shadow-copy no-loss property: a destination copy updated only from
  what the harvests reported (read after the harvest re-protected the pages)
  equals guest memory after a final harvest, whatever happened in between.

User space scribbling garbage into the memory it owns (ring entries, the
seed designs' user-visible bitmaps) is fuzzed in tests/test_fuzz_ring.py and
at the end of this file.

``KVMDIRTY_FUZZ_SCALE`` multiplies every ``max_examples``.
"""
from __future__ import annotations

import errno
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvmdirty
from kvmdirty import KvmError, _bitmap, _uapi
from kvmdirty.vm import MEM_LOG_DIRTY_PAGES as LOG

SCALE = float(os.environ.get("KVMDIRTY_FUZZ_SCALE", "0.5" if os.environ.get("KVMDIRTY_SANITIZER_RUN") else "1"))
ALLOWED = (KvmError, TypeError, ValueError, IndexError, OverflowError)
KNOWN_ERRNOS = {errno.EINVAL, errno.ENOENT, errno.ENXIO, errno.E2BIG, errno.EEXIST, errno.EFAULT,
                errno.EBADF}


def fuzz(n):
    return settings(max_examples=max(5, int(n * SCALE)), deadline=None,
                    suppress_health_check=list(HealthCheck))


try:
    from kvmdirty.seeds import DESIGNS as _SEEDS
    SEED_DESIGNS = sorted(_SEEDS)
except ImportError:         # the seed designs are not built yet
    SEED_DESIGNS = []



MODES = ["bitmap", "manual", "manual-init", "ring"] + SEED_DESIGNS
U64 = (1 << 64) - 1
# Tracked slots: (slot, base gfn, npages).  npages deliberately not multiples of 64.
TRACKED = [(0, 0, 200), (1, 1024, 70)]
UNTRACKED = (2, 4096, 64)       # not logging
SMM = ((1 << 16) | 0, 0, 64)    # address space 1, logging (no guest write reaches it)

garbage = st.one_of(
    st.integers(-(1 << 70), 1 << 70), st.sampled_from([U64, 1 << 64, -1, 1 << 32, (1 << 32) - 1, 1 << 16]),
    st.floats(allow_nan=True), st.none(), st.text(max_size=3), st.booleans(),
    st.builds(lambda n: np.zeros((n, 2), np.uint64), st.integers(0, 3)),
    st.builds(lambda n: np.ones(n), st.integers(0, 3)),
    st.builds(lambda n: np.arange(n, dtype=np.int8) - 3, st.integers(0, 5)),
    st.just(object()), st.just([1, "x"]), st.just(np.uint64(5)), st.just(np.int32(-3)),
)


def slot_arg(data):
    return data.draw(st.one_of(st.sampled_from([0, 1, 2, 9, 1 << 16, 2 << 16, 32763, 32764, 0xFFFF]),
                               garbage), label="slot")


def gfns_arg(data):
    good = st.lists(st.one_of(st.integers(0, 199), st.integers(1024, 1093)), min_size=0, max_size=40)
    return data.draw(st.one_of(good, good.map(lambda l: np.array(l, np.uint64)),
                               st.lists(st.integers(0, 9000), max_size=10), garbage), label="gfns")


def make_vm(mode, log_every_write, protect):
    kw = dict(log_every_write=log_every_write, protect=protect)
    if mode in SEED_DESIGNS:
        kw["design"] = mode
    vm = kvmdirty.VM(**kw)
    if mode == "manual":
        vm.enable_manual_protect(initially_set=False)
    elif mode == "manual-init":
        vm.enable_manual_protect(initially_set=True)
    elif mode == "ring":
        vm.enable_dirty_ring(256)
    for sid, base, n in TRACKED:
        vm.set_user_memory_region(sid, base << 12, n << 12, LOG)
    vm.set_user_memory_region(UNTRACKED[0], UNTRACKED[1] << 12, UNTRACKED[2] << 12, 0)
    vm.set_user_memory_region(SMM[0], SMM[1] << 12, SMM[2] << 12, LOG)
    for i in range(2):
        vm.create_vcpu(i)
    return vm


def vm_state(vm):
    """Everything a failed call must leave alone."""
    slots = sorted((s.slot, s.base_gfn, s.npages, s.flags,
                    None if s.dirty is None else s.dirty.tobytes(),
                    s.values.tobytes(), s.writable.tobytes()) for s in vm.slots.values())
    rings = [(v.id, None if v.dirty_ring is None else
              (v.dirty_ring.dirty_index, v.dirty_ring.reset_index, v.dirty_ring.fetch_index,
               v.dirty_ring.gfns.tobytes())) for v in vm.vcpus.values()]
    return (slots, vm.manual_protect, vm.dirty_ring_size, sorted(vm.vcpus), vm.stats, rings,
            [(v.id, v.remaining) for v in vm.vcpus.values()])


class Harness:
    """The VMM: harvests as the mode prescribes and keeps the destination copy."""

    def __init__(self, vm, mode):
        self.vm, self.mode = vm, mode
        self.shadow = {sid: np.array(vm.memory(sid)) for sid, _b, _n in TRACKED}
        self.pending = []            # ring entries collected, waiting for their reset
        self.seq = 1

    def values(self, n):
        v = np.arange(self.seq, self.seq + n, dtype=np.uint64)
        self.seq += n
        return v

    def copy(self, sid, offs):
        if sid in self.shadow:
            offs = np.asarray(offs, dtype=np.int64)
            offs = offs[(offs >= 0) & (offs < len(self.shadow[sid]))]
            self.shadow[sid][offs] = self.vm.memory(sid)[offs]

    def resync(self, sid=None):
        """Copy whole slots: always safe right after their pages were re-protected."""
        for s in self.shadow:
            if sid is None or s == sid:
                self.shadow[s][:] = self.vm.memory(s)

    def copy_words(self, sid, words, first_page=0):
        self.copy(sid, _bitmap.to_gfns(np.ascontiguousarray(words, dtype=np.uint64), first_page))

    def after_reset(self):
        for sid, offs in self.pending:
            self.copy(sid, offs)
        self.pending = []

    def harvest(self):
        vm = self.vm
        if vm.design is not None:
            for sid, offs in vm.design.harvest().items():
                self.copy(sid, offs)
            # The design's harvest resets every entry collected so far, those a 'collect' /
            # 'fetch' op took earlier included: they are re-protected now, copy them too.
            self.after_reset()
            return
        if vm.dirty_ring_size:
            for v in vm.vcpus.values():
                s, o = v.dirty_ring.collect()
                self.pending += [(int(a), np.array([b])) for a, b in zip(s, o)]
            vm.reset_dirty_rings()
            self.after_reset()
            return
        for sid, _b, n in TRACKED:
            words = vm.get_dirty_log(sid)
            if vm.manual_protect:
                vm.clear_dirty_log(sid, 0, n, words)
            self.copy_words(sid, words)

    def lost(self):
        return {sid: np.flatnonzero(self.shadow[sid] != self.vm.memory(sid)) for sid in self.shadow}


def do_op(vm, h, data):
    """One arbitrary call; returns its name.  Absorbs whatever a successful call reported."""
    vcpus = list(vm.vcpus.values())
    op = data.draw(st.sampled_from([
        "run", "run", "run", "resume", "get", "clear", "reset", "collect", "harvest", "harvest",
        "region", "cap", "check", "vcpu", "write_guest", "memory", "design", "fetch_index"]), label="op")
    if op == "run":
        v = data.draw(st.sampled_from(vcpus))
        gfns = gfns_arg(data)
        value = data.draw(st.one_of(st.just("seq"), garbage), label="value")
        mw = data.draw(st.one_of(st.none(), st.integers(-2, 50), garbage), label="max_writes")
        if value == "seq":
            try:
                value = h.values(len(gfns))
            except TypeError:
                value = 7
        v.run(gfns, value, max_writes=mw)
    elif op == "resume":
        data.draw(st.sampled_from(vcpus)).run(max_writes=data.draw(st.one_of(st.none(), st.integers(1, 20))))
    elif op == "get":
        sid = slot_arg(data)
        words = vm.get_dirty_log(sid)
        if not vm.manual_protect:
            h.copy_words(sid, words)
    elif op == "clear":
        sid = slot_arg(data)
        first = data.draw(st.one_of(st.sampled_from([0, 64, 128, 192, 3]), garbage), label="first")
        num = data.draw(st.one_of(st.sampled_from([0, 64, 70, 136, 200, 8]), garbage), label="num")
        bm = data.draw(st.one_of(st.lists(st.integers(0, U64), max_size=5).map(lambda l: np.array(l, np.uint64)),
                                 garbage), label="bitmap")
        vm.clear_dirty_log(sid, first, num, bm)
        h.copy_words(sid, np.asarray(bm, dtype=np.uint64)[: (int(num) + 63) // 64], int(first))
    elif op == "reset":
        vm.reset_dirty_rings()
        h.after_reset()
    elif op == "collect":
        v = data.draw(st.sampled_from(vcpus))
        if v.dirty_ring is None:
            return op
        s, o = v.dirty_ring.collect(data.draw(st.one_of(st.none(), st.integers(0, 300), garbage)))
        h.pending += [(int(a), np.array([b])) for a, b in zip(s, o)]
    elif op == "harvest":
        h.harvest()
    elif op == "region":
        # Never the tracked slots (their memory is what we compare), anything else goes.
        sid = data.draw(st.one_of(st.sampled_from([2, 3, 5, (1 << 16) | 5, 32764, 2 << 16]), garbage))
        if isinstance(sid, int) and not isinstance(sid, bool) and sid in (0, 1):
            return op
        vm.set_user_memory_region(
            sid, data.draw(st.one_of(st.sampled_from([0, 8192 << 12, 4096 << 12, 1 << 40]), garbage)),
            data.draw(st.one_of(st.sampled_from([0, 4096, 64 << 12, 1 << 43, 100]), garbage)),
            data.draw(st.one_of(st.sampled_from([0, LOG, 2, 4, 3]), garbage)))
    elif op == "cap":
        cap = data.draw(st.one_of(st.sampled_from([_uapi.CAP_DIRTY_LOG_RING, _uapi.CAP_DIRTY_LOG_RING_ACQ_REL,
                                                   _uapi.CAP_MANUAL_DIRTY_LOG_PROTECT2, 0, 12345]), garbage))
        args = data.draw(st.lists(st.one_of(st.sampled_from([0, 1, 3, 4096, 65536, 1 << 20]), garbage),
                                  max_size=5))
        was_manual = vm.manual_protect
        vm.enable_cap(cap, *args)
        if vm.manual_protect != was_manual:
            h.resync()          # nothing was dropped, but be exact about what the mode change means
    elif op == "check":
        r = vm.check_extension(data.draw(st.one_of(st.integers(0, 300), garbage)))
        assert isinstance(r, int) and r >= 0
    elif op == "vcpu":
        vm.create_vcpu(data.draw(st.one_of(st.integers(0, 5), st.just(16383), st.just(16384), garbage)))
    elif op == "write_guest":
        gfns = gfns_arg(data)
        value = data.draw(st.one_of(st.just(h.seq), garbage))
        h.seq += 1
        n = vm.write_guest(gfns, value)
        if vm.dirty_ring_size:
            # KVM cannot log host writes into a ring-only VM (it warns): user space knows what it wrote.
            for gfn in np.asarray(gfns, dtype=np.uint64)[:n]:
                for sid, base, npg in TRACKED:
                    if base <= int(gfn) < base + npg:
                        h.copy(sid, [int(gfn) - base])
    elif op == "memory":
        m = vm.memory(slot_arg(data))
        assert not m.flags.writeable
    elif op == "design" and vm.design is not None:
        design_op(vm, h, data)
    elif op == "fetch_index" and vm.dirty_ring_size:
        # User space owns the fetch index; moving it for real desynchronises the
        # ring (as in KVM), so only invalid values and the current one here.
        v = data.draw(st.sampled_from(vcpus))
        bad = garbage.filter(lambda x: not (isinstance(x, (int, np.integer)) and 0 <= int(x) <= 0xFFFFFFFF))
        cur = st.just(v.dirty_ring.fetch_index)
        v.dirty_ring.fetch_index = data.draw(st.one_of(bad, cur))
    return op


def design_op(vm, h, data):
    d = vm.design
    sid = slot_arg(data)
    name = d.name
    if name == "switched-bitmap":
        what = data.draw(st.sampled_from(["switch", "addresses"]))
        if what == "switch":
            old = d.switch(sid)
            h.copy_words(sid, old)
        else:
            a, b = d.addresses(sid)
            assert not a.flags.writeable and not b.flags.writeable
    elif name == "switched-bitmap-user":
        what = data.draw(st.sampled_from(["switch", "retired"]))
        if what == "switch":
            bm = data.draw(st.one_of(st.integers(0, 6).map(lambda n: np.zeros(n, np.uint64)), garbage))
            if d.switch(sid, bm):
                h.copy_words(sid, d.retired(sid))
        else:
            d.retired(sid)
    elif name == "indexed-ring":
        what = data.draw(st.sampled_from(["fetch", "reset", "ring"]))
        if what == "ring":
            d.ring(data.draw(st.one_of(st.integers(-1, 4), garbage)))
        elif what == "fetch":
            r = d.ring(data.draw(st.sampled_from(sorted(vm.vcpus))))
            s, o = r.fetch(data.draw(st.one_of(st.none(), st.integers(0, 100), garbage)))
            h.pending += [(int(a), np.array([b])) for a, b in zip(s, o)]
        else:
            d.reset_dirty_pages()
            h.after_reset()
    elif name == "shared-ring":
        what = data.draw(st.sampled_from(["collect", "reset"]))
        if what == "collect":
            s, o = d.collect(data.draw(st.one_of(st.none(), st.integers(0, 100), garbage)))
            h.pending += [(int(a), np.array([b])) for a, b in zip(s, o)]
        else:
            d.reset()
            h.after_reset()


@pytest.mark.parametrize("mode", MODES)
@fuzz(30)
@given(data=st.data(), log_every_write=st.booleans(), protect=st.sampled_from(["exact", "range"]))
def test_arbitrary_calls_lose_nothing(mode, data, log_every_write, protect):
    vm = make_vm(mode, log_every_write, protect)
    h = Harness(vm, mode)
    nops = data.draw(st.integers(1, 25), label="nops")
    for _ in range(nops):
        before = vm_state(vm)
        try:
            do_op(vm, h, data)
        except KvmError as e:
            assert e.errno in KNOWN_ERRNOS, e
            assert vm_state(vm) == before, f"a failed call changed the VM: {e!r}"
        except ALLOWED as e:
            assert vm_state(vm) == before, f"a failed call changed the VM: {e!r}"
    # Stop-and-copy: every vCPU is stopped; one last harvest.
    h.harvest()
    lost = h.lost()
    assert all(len(x) == 0 for x in lost.values()), f"lost writes: {lost}"
    # The VM still works normally after whatever happened.
    v = vm.vcpus[0]
    v.run([1, 2, 3], h.values(3), max_writes=None)
    h.harvest()
    assert all(len(x) == 0 for x in h.lost().values())
    vm.close()
    with pytest.raises(KvmError) as e:
        vm.get_dirty_log(0)
    assert e.value.errno == errno.EBADF
