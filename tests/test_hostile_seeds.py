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
from kvmdirty.vm import VM

import child

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


# -- indexed-ring: concurrent collectors (issue 10, item 14) ----------------------------

def test_indexed_ring_two_fetchers_get_each_entry_once():
    """Two threads fetching one list are serialised: each entry once, the header stays sane."""
    s = _seeds.IndexedRingSet(4096)
    r = s.add_vcpu(0)
    for trial in range(100):
        for i in range(3000):
            r.push(1, trial * 3000 + i)
        got = [[], []]
        errs = _race(lambda: got[0].append(r.fetch()[1]), lambda: got[1].append(r.fetch()[1]))
        assert not errs, errs
        offs = np.concatenate(got[0] + got[1]).tolist()
        assert sorted(offs) == list(range(trial * 3000, trial * 3000 + 3000)), f"trial {trial}"
        assert r.count == 0
        assert s.reset() == 3000 and r.used == 0


def test_indexed_ring_concurrent_harvests_with_running_vcpu_lose_nothing():
    """A vCPU writes while two collectors harvest: every page reported, never EINVAL, never wedged."""
    vm = _vm("indexed-ring", npages=1 << 13, entries=128)
    d = vm.design
    v = vm.create_vcpu(0)
    plan = BASE_GFN + np.random.default_rng(9).permutation(1 << 13).astype(np.uint64)
    seen = set()
    lock = threading.Lock()
    done = threading.Event()

    def writer():
        try:
            ex = v.run(plan, 1)
            spins = 0
            while not ex.done:
                spins += 1
                assert spins < 10 ** 6, "vCPU wedged in DIRTY_LOG_FULL"
                ex = v.run()
        finally:
            done.set()

    def collector():
        while not done.is_set():
            got = d.harvest().get(0, np.zeros(0, np.uint64))
            with lock:
                seen.update(got.tolist())

    errs = _race(writer, collector, collector)
    assert not errs, errs
    seen.update(d.harvest().get(0, np.zeros(0)).tolist())
    assert seen == set(range(1 << 13))
    for r in d.rings.rings:
        assert r.used == 0 and r.count == 0


def test_indexed_ring_concurrent_resets_keep_the_kernel_indexes():
    """Resets racing each other and fetches: used never exceeds the ring, every reset succeeds."""
    s = _seeds.IndexedRingSet(256)
    r = s.add_vcpu(0)
    total = [0]
    for trial in range(100):
        for i in range(200):
            r.push(0, i)

        def fetch_reset():
            r.fetch(max_count=50)
            n = s.reset()
            assert n >= 0
            total[0] += n

        errs = _race(fetch_reset, fetch_reset, lambda: s.reset())
        assert not errs, errs
        assert 0 <= r.used <= 256
        r.fetch()
        assert s.reset() >= 0 and r.used == 0, trial


@pytest.mark.parametrize("design", ["shared-ring", "indexed-ring"])
def test_ring_design_concurrent_collect_and_reset(design):
    """The design's own collect/reset API from two threads: serialised, nothing lost or doubled."""
    vm = _vm(design, npages=4096, entries=4096)
    d = vm.design
    v = vm.create_vcpu(0)
    for trial in range(60):
        pages = (trial * 50 + np.arange(50)) % 4096
        v.run((BASE_GFN + pages).astype(np.uint64), trial + 1)
        got = []
        errs = _race(lambda: got.append(d.harvest()), lambda: got.append(d.harvest()))
        assert not errs, errs
        offs = [o for h in got for o in h.get(0, np.zeros(0)).tolist()]
        assert sorted(offs) == sorted(pages.tolist()), trial


# -- indexed-ring: failures change nothing, nothing fetched is lost ---------------------

class _Interrupting:
    """A Python reset sink that raises KeyboardInterrupt (a Ctrl-C) on its n-th batch."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __call__(self, slot, first, mask):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return True


def test_indexed_reset_interrupted_in_sink_keeps_every_entry():
    """Ctrl-C inside the sink: no entry freed in any ring (before: freed, never re-protected)."""
    s = _seeds.IndexedRingSet(128)
    rings = [s.add_vcpu(0), s.add_vcpu(1)]
    for r in rings:
        for off in (1, 100, 200):                  # three batches per ring
            r.push(0, off)
        r.fetch()
    with pytest.raises(KeyboardInterrupt):
        s.reset(_Interrupting(4))                  # ring 0's three batches, then ring 1's first
    assert [r.used for r in rings] == [3, 3]
    calls = []
    assert s.reset(lambda *a: calls.append(a)) == 6 and len(calls) == 6
    assert [r.used for r in rings] == [0, 0]


def test_indexed_reset_failure_after_protect_flushes():
    """A reset that re-protected anything flushes TLBs even when it then fails."""
    s = _seeds.IndexedRingSet(128)
    r = s.add_vcpu(0)
    r.push(0, 1)
    r.push(0, 100)
    r.fetch()
    flushes = []
    with pytest.raises(KeyboardInterrupt):
        s.reset(_Interrupting(2), lambda: flushes.append(1))
    assert flushes == [1] and r.used == 2
    assert s.reset(lambda *a: True, lambda: flushes.append(2)) == 2 and flushes == [1, 2]
    assert s.reset(lambda *a: True, lambda: flushes.append(3)) == 0 and flushes == [1, 2]


def test_indexed_harvest_corrupt_header_elsewhere_loses_nothing():
    """A harvest that fails on one ring's header puts every fetch_index back.

    Before the fix the rings fetched before the bad one were consumed and
    their pages never reported.
    """
    vm = _vm("indexed-ring", npages=256, entries=128)
    d = vm.design
    v = vm.create_vcpu(0)
    v.run(np.array([BASE_GFN + 5, BASE_GFN + 6], np.uint64), 1)
    d.vm_ring.fetch_index = 1000                  # (u16)(0 - 1000) entries "available"
    with pytest.raises((ValueError, KvmError)):
        d.harvest()
    assert d.ring(0).count == 2 and d.ring(0).used == 2
    d.vm_ring.fetch_index = 0
    assert sorted(d.harvest()[0].tolist()) == [5, 6]


@pytest.mark.parametrize("failing", ["concatenate", "unique"])
def test_indexed_harvest_memory_error_puts_fetches_back(monkeypatch, failing):
    """MemoryError while assembling the harvest: nothing reset, nothing fetched, all reported later."""
    vm = _vm("indexed-ring", npages=256, entries=128)
    d = vm.design
    v = vm.create_vcpu(0)
    v.run(np.array([BASE_GFN + 5], np.uint64), 1)
    vm.write_guest(np.array([BASE_GFN + 9], np.uint64), 2)

    class NoConcat:
        def __getattr__(self, name):
            if name == failing:
                raise MemoryError
            return getattr(np, name)

    monkeypatch.setattr(_seeds, "np", NoConcat())
    with pytest.raises(MemoryError):
        d.harvest()
    monkeypatch.undo()
    assert d.ring(0).count == 1 and d.vm_ring.count == 1
    assert d.ring(0).used == 1 and d.vm_ring.used == 1          # nothing freed
    assert sorted(d.harvest()[0].tolist()) == [5, 9]


def test_indexed_full_list_republishes_scribbled_avail_index():
    """A user scribble on avail_index of a full list is undone at the next run: no wedge.

    Before the fix avail_index stayed garbage while the list was full (no
    push to rewrite it), so user space could not tell what to fetch.
    """
    vm = _vm("indexed-ring", npages=256, entries=128)
    d = vm.design
    v = vm.create_vcpu(0)
    ex = v.run(BASE_GFN + np.arange(200, dtype=np.uint64), 1)
    assert not ex.done
    r = d.ring(0)
    pushed = r.avail_index
    r.gfns["pad"][0] = (r.gfns["pad"][0] & 0xFFFF0000) | 0x1234      # avail := 0x1234
    assert r.avail_index == 0x1234
    assert not v.run().done                              # still full: exits again
    assert r.avail_index == pushed
    r.fetch()
    assert d.reset_dirty_pages() == pushed
    while not ex.done:
        d.harvest()
        ex = v.run()


# -- indexed-ring: the VM's vCPU table and its limits (issue 10, item 18) ----------------

def test_indexed_vcpu_table_follows_the_vms_max_vcpu_ids():
    """create_vcpu(20000) on a VM that allows it gets its own list (before: raised, vCPU created)."""
    from kvmdirty import limits
    assert _seeds.MAX_VCPU_IDS is limits.MAX_VCPU_IDS
    assert _seeds.IndexedRingSet(128).max_vcpu_ids == limits.MAX_VCPU_IDS
    vm = _vm("indexed-ring", npages=256, entries=128, max_vcpu_ids=1 << 15)
    v = vm.create_vcpu(20000)
    v.run(np.array([BASE_GFN + 3], np.uint64), 1)
    assert vm.design.ring(20000).count == 1 and vm.design.vm_ring.count == 0
    vm2 = _vm("indexed-ring", npages=256, entries=128)
    with pytest.raises(KvmError) as e:
        vm2.create_vcpu(limits.MAX_VCPU_IDS)
    assert e.value.errno == errno.EINVAL and not vm2.vcpus
    with pytest.raises(ValueError):
        vm2.design.ring(limits.MAX_VCPU_IDS)


@pytest.mark.parametrize("bad", [0, -1, 1 << 21, "8", 2.0, True])
def test_indexed_ring_set_bad_max_vcpu_ids(bad):
    with pytest.raises((TypeError, ValueError)):
        _seeds.IndexedRingSet(128, bad)


# -- use after close: every seed ioctl is EBADF (issue 10, item 18) ----------------------

@pytest.mark.parametrize("design", ["indexed-ring", "shared-ring", "switched-bitmap", "switched-bitmap-user"])
def test_seed_ioctls_after_close_are_ebadf(design):
    vm = _vm(design, npages=256)
    d = vm.design
    v = vm.create_vcpu(0)
    v.run(np.array([BASE_GFN + 1], np.uint64), 1)
    vm.close()
    calls = [d.harvest]
    if design == "indexed-ring":
        calls.append(d.reset_dirty_pages)
        assert d.ring(0).fetch()[1].tolist() == [1]     # user space's mapping stays readable
    elif design == "shared-ring":
        calls.append(d.reset)
        assert d.collect()[1].tolist() == [1]
    elif design == "switched-bitmap":
        calls += [lambda: d.switch(0), lambda: d.addresses(0)]
    else:
        calls.append(lambda: d.switch(0, np.zeros(4, np.uint64)))
    for call in calls:
        with pytest.raises(KvmError) as e:
            call()
        assert e.value.errno == errno.EBADF


# -- compiled classes built directly from Python (issue 10, item 2) ----------------------

def test_seed_classes_are_valid_when_built_directly():
    from kvmdirty._ring import DirtyRing
    r = _seeds.IndexedRing(128)
    assert r.push(1, 2) == 0 and r.fetch()[1].tolist() == [2] and r.stats["pushes"] == 1
    s = _seeds.IndexedRingSet(128)
    s.add_vcpu(3).push(0, 7)
    s.ring(3).fetch()
    assert s.reset() == 1 and s._kd_tracker is not None
    ring = DirtyRing(4096)
    t = _seeds.SharedRingTracker(ring)
    assert t.ring is ring and t._kd_tracker is not None
    assert _seeds.push_many_shared(ring, np.zeros(3, np.uint32), np.arange(3, dtype=np.uint64)) == 3


@pytest.mark.parametrize("cls", [_seeds.IndexedRing, _seeds.IndexedRingSet, _seeds.SharedRingTracker])
def test_seed_classes_refuse_half_construction(cls):
    import copy
    import pickle
    with pytest.raises(TypeError):
        cls.__new__(cls)                              # __cinit__ needs its arguments
    with pytest.raises(TypeError):
        cls()
    if cls is _seeds.SharedRingTracker:
        from kvmdirty._ring import DirtyRing
        obj = cls(DirtyRing(4096))
    else:
        obj = cls(128)
    with pytest.raises(TypeError):
        pickle.dumps(obj)                             # raw pointers: no auto-pickle
    with pytest.raises(TypeError):
        copy.copy(obj)


def test_shared_ring_counts_pushes():
    """The shared ring's pushes statistic counts vCPU pushes (it read 0 before)."""
    vm = _vm("shared-ring", npages=256, entries=4096)
    v = vm.create_vcpu(0)
    v.run(BASE_GFN + np.arange(10, dtype=np.uint64), 1)
    assert vm.design.ring.stats["pushes"] == 10


# -- user space scribbling on the indexed lists: a hypothesis fuzzer (issue 10, item 14) --

def _recover_and_drain(vm, d, vcpus, npages):
    """The documented recovery: after a write republishes avail_index, fetch_index := avail_index."""
    for v in vcpus:
        v.run(np.array([BASE_GFN], np.uint64), 0xAA)
    vm.write_guest(np.array([BASE_GFN + 1], np.uint64), 0xAB)
    for r in d.rings.rings:
        r.fetch_index = r.avail_index
        assert r.count == 0
    assert d.reset_dirty_pages() >= 0
    # Now every vCPU must finish a plan bigger than its list: no wedge.
    plan = BASE_GFN + np.arange(npages, dtype=np.uint64)
    for v in vcpus:
        ex = v.run(plan, 0xAC)
        for _ in range(10 * npages):
            if ex.done:
                break
            d.harvest()
            ex = v.run()
        assert ex.done
    d.harvest()
    for r in d.rings.rings:
        assert r.used == 0 and r.count == 0


try:
    from hypothesis import HealthCheck, given, settings, strategies as st
except ImportError:                                      # pragma: no cover
    st = None


if st is not None:
    _scribble = st.one_of(
        st.tuples(st.just("fetch_index"), st.integers(0, 3), st.integers(0, 0xFFFF)),
        st.tuples(st.just("avail_index"), st.integers(0, 3), st.integers(0, 0xFFFF)),
        st.tuples(st.just("slot"), st.integers(0, 3), st.integers(0, 0xFFFFFFFF)),
        st.tuples(st.just("offset"), st.integers(0, 3), st.integers(0, (1 << 64) - 1)),
        st.tuples(st.just("pad"), st.integers(0, 3), st.integers(0, 0xFFFFFFFF)),
        st.tuples(st.just("run"), st.integers(0, 1), st.integers(1, 300)),
        st.tuples(st.just("host"), st.integers(0, 3), st.integers(1, 50)),
        st.tuples(st.just("fetch"), st.integers(0, 3), st.integers(0, 200)),
        st.tuples(st.just("reset"), st.integers(0, 3), st.integers(0, 0)),
        st.tuples(st.just("harvest"), st.integers(0, 3), st.integers(0, 0)),
    )

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(ops=st.lists(_scribble, max_size=40), entry=st.integers(0, 127))
    def test_indexed_ring_survives_any_user_scribble(ops, entry):
        """Whatever user space writes into the header or entries: no crash, the kernel's
        indexes stay in range, every failure changes nothing, and the documented
        recovery always un-wedges every vCPU."""
        npages = 512
        vm = _vm("indexed-ring", npages=npages, entries=128, log_every_write=True)
        d = vm.design
        vcpus = [vm.create_vcpu(0), vm.create_vcpu(1)]
        rings = d.rings.rings                               # vCPU 0, vCPU 1, the VM's
        rng = np.random.default_rng(entry)
        for op, which, arg in ops:
            r = rings[which % len(rings)]
            g = r.gfns
            if op == "fetch_index":
                r.fetch_index = arg
            elif op == "avail_index":
                g["pad"][0] = (int(g["pad"][0]) & 0xFFFF0000) | arg
            elif op in ("slot", "offset", "pad"):
                g[op][entry % len(g)] = arg
            elif op == "run":
                vcpus[which].run(BASE_GFN + rng.integers(0, npages, arg).astype(np.uint64), arg)
            elif op == "host":
                vm.write_guest(BASE_GFN + rng.integers(0, npages, arg).astype(np.uint64), arg)
            elif op == "fetch":
                before = r.fetch_index
                try:
                    got = r.fetch(arg)
                    assert len(got[0]) <= min(arg, r.entries)
                except ValueError:
                    assert r.fetch_index == before             # refused: nothing changed
            elif op in ("reset", "harvest"):
                used = [x.used for x in rings]
                fetch = [x.fetch_index for x in rings]
                try:
                    if op == "reset":
                        n = d.reset_dirty_pages()
                        assert 0 <= n <= sum(used)
                    else:
                        d.harvest()
                except (KvmError, ValueError) as e:
                    if isinstance(e, KvmError):
                        assert e.errno == errno.EINVAL
                    assert [x.used for x in rings] == used       # nothing changed
                    assert [x.fetch_index for x in rings] == fetch
            for x in rings:
                assert 0 <= x.used <= x.entries
        _recover_and_drain(vm, d, vcpus, npages)


# -- asynchronous Ctrl-C: interrupts leave every lock and index consistent -------------

def _interrupt_storm(body, n=300, seed=0):
    """Run body() in a loop in the main thread while another thread sends it n Ctrl-Cs.

    A SIGINT handler raises KeyboardInterrupt only while body() is armed, so
    the test's own loop (an except clause, the jump back) is never hit; an
    interrupt that arrives while disarmed is counted and dropped.
    """
    import _thread
    import random
    import signal
    # interrupt_main reaches the main thread: pytest runs every test there.
    assert threading.current_thread() is threading.main_thread()
    done, go = threading.Event(), threading.Event()
    rnd = random.Random(seed)
    state = {"armed": False, "raised": 0, "dropped": 0}

    def on_sigint(signum, frame):
        if state["armed"]:
            state["armed"] = False
            state["raised"] += 1
            raise KeyboardInterrupt
        state["dropped"] += 1

    def interrupter():
        go.wait()
        for _ in range(n):
            spin_until = rnd.random() * 2e-4
            threading.Event().wait(spin_until)
            _thread.interrupt_main()
        done.set()

    old = signal.signal(signal.SIGINT, on_sigint)
    t = threading.Thread(target=interrupter)
    caught = 0
    try:
        t.start()
        go.set()
        while not done.is_set():
            try:
                state["armed"] = True
                body()
                state["armed"] = False
            except KeyboardInterrupt:
                caught += 1
        state["armed"] = False
        t.join()
        for _ in range(1000):                 # let a last pending interrupt be dropped
            pass
    finally:
        state["armed"] = False
        signal.signal(signal.SIGINT, old)
    assert caught == state["raised"]
    return caught


def _in_thread(fn, timeout=10.0):
    """Call fn in another thread; fail (instead of hanging) if a lock was left held."""
    out, errs = [], []

    def run():
        try:
            out.append(fn())
        except BaseException as e:        # noqa: BLE001
            errs.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "a lock was left held"
    if errs:
        raise errs[0]
    return out[0]


def test_interrupts_during_indexed_harvests_leave_rings_consistent():
    s = _seeds.IndexedRingSet(1024)
    r = s.add_vcpu(0)
    stop = threading.Event()
    pushed = [0]

    def pusher():
        while not stop.is_set():
            if r.push(0, pushed[0] % 4096) >= 0:
                pushed[0] += 1

    p = threading.Thread(target=pusher)
    p.start()
    try:
        caught = _interrupt_storm(lambda: (s.harvest(lambda *a: True), r.fetch(5), s.reset()))
    finally:
        stop.set()
        p.join()
    assert caught > 0
    got = _in_thread(lambda: s.harvest(lambda *a: True))
    assert got is not None and r.used == 0 and r.count == 0
    assert r.fetch_index == r.avail_index == pushed[0] % 65536


def test_interrupts_during_switches_leave_the_pair_consistent():
    vm = _vm("switched-bitmap", npages=4096)
    d = vm.design
    v = vm.create_vcpu(0)
    stop = threading.Event()
    plan = BASE_GFN + np.arange(4096, dtype=np.uint64)

    def writer():
        while not stop.is_set():
            v.run(plan, 1)

    def switch():
        with d._mutex:
            d._switch([0], [d._other[0]], True, False)

    w = threading.Thread(target=writer)
    w.start()
    try:
        caught = _interrupt_storm(switch)
    finally:
        stop.set()
        w.join()
    assert caught > 0
    active, other = _in_thread(lambda: d.addresses(0))
    assert not np.shares_memory(active, other)
    d.harvest()
    v.run(np.array([BASE_GFN + 7], np.uint64), 2)         # the MMU logs into the active bitmap
    assert _in_thread(d.harvest)[0].tolist() == [7]


# -- memory exhaustion ---------------------------------------------------------------------

def test_switched_harvest_memory_error_puts_bits_back(monkeypatch):
    """MemoryError listing the retired pages: the bits go back to the active bitmap, reported next."""
    vm = _vm("switched-bitmap", slots=2, npages=256)
    d = vm.design
    v = vm.create_vcpu(0)
    v.run(np.array([BASE_GFN + 3, BASE_GFN + 256 + 4], np.uint64), 1)

    class NoGfns:
        @staticmethod
        def to_gfns(*a):
            raise MemoryError

    monkeypatch.setattr(_seeds, "_bitmap", NoGfns)
    with pytest.raises(MemoryError):
        d.harvest()
    monkeypatch.undo()
    h = d.harvest()
    assert h[0].tolist() == [3] and h[1].tolist() == [4]


_RLIMIT_SCRIPT = r"""
import resource, sys
import numpy as np
from kvmdirty import _seeds, _uapi
from kvmdirty.vm import VM

vm = VM(design="indexed-ring", design_options={"entries": 4096})
vm.set_user_memory_region(0, 0x100 << 12, 4096 << 12, _uapi.MEM_LOG_DIRTY_PAGES)
v = vm.create_vcpu(0)
v.run(0x100 + np.arange(1000, dtype=np.uint64), 1)
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + (64 << 20), hard))
errors = 0
seen = set()
hog = []
try:
    while True:                       # eat what is left, then call into every seed path
        hog.append(np.ones(1 << 20, np.uint8))
except MemoryError:
    pass
for call in (lambda: _seeds.IndexedRingSet(32768, 1 << 20),
             lambda: [_seeds.IndexedRing(32768) for _ in range(100)],
             lambda: seen.update(vm.design.harvest().get(0, np.zeros(0)).tolist()),
             lambda: vm.create_vcpu(1)):
    try:
        call()
    except MemoryError:
        errors += 1
hog.clear()
resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
seen.update(vm.design.harvest().get(0, np.zeros(0)).tolist())
assert seen == set(range(1000)), "pages lost"
print("ok", errors)
"""


def test_seed_paths_under_rlimit_as():
    """Address space exhausted: every seed call fails cleanly (MemoryError) and nothing is lost."""
    import os
    resource = pytest.importorskip("resource")
    if "asan" in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("RLIMIT_AS cannot be used under AddressSanitizer (it reserves terabytes)")
    out = child.python(_RLIMIT_SCRIPT)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stdout + out.stderr
    assert int(out.stdout.split()[1]) >= 1


# -- callbacks that call back in: refused, never a deadlock or a double free ------------

def test_reset_sink_reentering_reset_or_fetch_is_refused():
    s = _seeds.IndexedRingSet(128)
    r = s.add_vcpu(0)
    for off in (1, 2, 100):
        r.push(0, off)
    r.fetch()
    for reenter in (lambda: s.reset(), lambda: s.harvest(), lambda: s.add_vcpu(1)):
        def sink(slot, first, mask, reenter=reenter):
            reenter()
        with pytest.raises(RuntimeError, match="re-entrant"):
            _in_thread(lambda: s.reset(sink))
        assert r.used == 3                                    # nothing freed
    with pytest.raises(RuntimeError, match="re-entrant"):
        _in_thread(lambda: s.harvest(lambda *a: r.fetch()))  # the harvest holds r's fetch lock
    assert r.used == 3 and r.count == 0
    with pytest.raises(RuntimeError, match="re-entrant"):
        _in_thread(lambda: s.reset(None, lambda: s.reset()))  # from the flush callback
    # The reset above committed before its flush callback failed: each entry freed once.
    assert r.used == 0 and s.reset() == 0


@pytest.mark.parametrize("bad", [None, 1.0, True, "0"])
def test_switched_bitmap_slot_argument_is_validated(bad):
    # Hypothesis found switch(None) / addresses(None) raising a bare KeyError,
    # and a float slot was looked up as the int it equals: every per-slot call
    # refuses a non-integer slot as an ioctl does, before touching anything.
    vm = _vm("switched-bitmap")
    with pytest.raises(TypeError):
        vm.design.switch(bad)
    with pytest.raises(TypeError):
        vm.design.addresses(bad)
    with pytest.raises(TypeError):
        vm.slot_info(bad)
    user = _vm("switched-bitmap-user")
    with pytest.raises(TypeError):
        user.design.switch(bad, np.zeros(4, np.uint64))
    with pytest.raises(TypeError):
        user.design.retired(bad)
