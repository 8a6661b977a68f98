"""A hostile user against the compiled kernels (kvmdirty._bitmap, kvmdirty._ring).

Misuse, racing threads, interrupts (KeyboardInterrupt from a sink), memory
exhaustion (RLIMIT_AS in a subprocess), buffers resized / closed / released
by another thread while a GIL-free loop runs, forged ring entries.  Each
test states the promise it checks: no crash, a clear exception, and no dirty
bit or ring entry dropped on any error path.

Races whose failure mode is a segfault run in a subprocess, so that the old
bug shows up as a failed test rather than a dead test run.
"""
from __future__ import annotations

import os
import subprocess
import threading

import numpy as np
import pytest

from kvmdirty import _bitmap
from kvmdirty._ring import DirtyRing, collect
import child
from ring_model import make_mmu

SANITIZER = bool(os.environ.get("KVMDIRTY_SANITIZER_RUN"))
ALL = 0xFFFFFFFFFFFFFFFF
DIRTY, RESET = 1, 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_py(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter using the kvmdirty under test."""
    return child.python(code, timeout=timeout)


def _pattern(nwords: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.integers(0, 1 << 63, nwords, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, nwords, dtype=np.uint64)
    w[rng.random(nwords) < 0.3] = 0          # some clean words
    return w


# -- buffers must stay exported for the whole GIL-free loop -----------------

_RESIZE_RACE = """
    import threading, numpy as np
    from array import array
    from kvmdirty import _bitmap
    N = 1 << 19
    ROUNDS = {rounds}
    sink = array('Q', [0xFFFFFFFFFFFFFFFF]) * N
    ones = array('Q', [0xFFFFFFFFFFFFFFFF]) * N
    pad = array('Q', [0]) * (1 << 18)
    stop = threading.Event()
    stats = {{"refused": 0, "resized": 0}}

    def resizer():
        while not stop.is_set():
            try:
                sink.extend(pad)          # realloc: the storage may move
                del sink[N:]
                stats["resized"] += 1
            except BufferError:
                stats["refused"] += 1

    t = threading.Thread(target=resizer)
    t.start()
    bad = 0
    try:
        for k in range(ROUNDS):
            sink[0:N] = ones
            words = np.full(N, 0xFFFFFFFFFFFFFFFF, np.uint64)
            {call}
            if any(sink[0:N]):
                bad += 1                   # an and-not went to freed storage
    finally:
        stop.set()
        t.join()
    print("bad", bad, "refused", stats["refused"], "resized", stats["resized"])
    assert bad == 0, bad
    assert stats["refused"] > 0, stats     # resizes during a loop were refused
"""

_CALLS = {
    "harvest": "_bitmap.harvest(words, np.zeros(N, np.uint64), sink)",
    "harvest_gfns": "_bitmap.harvest_gfns(words[: N // 8], sink)",
    "clear_masked": "_bitmap.clear_masked(words, np.full(N, 0xFFFFFFFFFFFFFFFF, np.uint64), 0, None, sink)",
}


@pytest.mark.parametrize("fn", sorted(_CALLS))
def test_buffer_sink_cannot_be_resized_during_the_loop(fn):
    call = _CALLS[fn]
    if fn == "harvest_gfns":
        # A shorter loop (it also builds the gfn list): check the part it protects.
        call += "; sink[N // 8:N] = array('Q', [0]) * (N - N // 8)"
    p = _run_py(_RESIZE_RACE.format(rounds=20 if SANITIZER else 60, call=call))
    assert p.returncode == 0, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])


_CLOSE_RACE = """
    import mmap, threading, time, numpy as np
    from kvmdirty import _bitmap
    N = 1 << 19
    closed = refused = 0
    k = 0
    # {rounds} rounds, and more (up to 10x) until a close was refused at least
    # once: how often the closer lands inside the loop depends on the machine.
    while k < {rounds} or (refused == 0 and k < 10 * {rounds}):
        k += 1
        mm = mmap.mmap(-1, N * 8)
        mm.write(bytes([255]) * (N * 8))
        mv = memoryview(mm).cast('Q')
        words = np.full(N, 0xFFFFFFFFFFFFFFFF, np.uint64)
        go = threading.Event()
        def closer():
            global closed, refused
            go.wait()
            # Staggered starts: some rounds close before the call, some while its loop runs
            # (argument set-up takes longer under a sanitizer).
            time.sleep((k % 8) * 0.0002)
            while True:                   # keep trying until the loop lets go
                try:
                    mv.release()          # the caller's own export ...
                    mm.close()            # ... then the mapping: munmap
                    closed += 1
                    return
                except BufferError:
                    refused += 1
        t = threading.Thread(target=closer)
        t.start()
        go.set()
        try:
            {call}
        except (TypeError, ValueError):
            pass                          # closed before the call began: refused cleanly
        t.join()
    print("closed", closed, "refused", refused)
    assert refused > 0
"""


@pytest.mark.parametrize("fn", sorted(_CALLS))
def test_mmap_sink_cannot_be_closed_during_the_loop(fn):
    call = _CALLS[fn].replace("sink", "mv")
    p = _run_py(_CLOSE_RACE.format(rounds=20 if SANITIZER else 40, call=call))
    assert p.returncode == 0, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])


# -- cdef classes: no half-built objects ------------------------------------

def test_internal_sink_class_refuses_direct_construction():
    with pytest.raises(TypeError):
        _bitmap._Sink()


@pytest.mark.parametrize("cls, args", [(_bitmap.DirtyBitmap, (100,)), (DirtyRing, (128,))])
def test_public_classes_are_valid_or_refused_however_built(cls, args):
    with pytest.raises(TypeError):
        cls.__new__(cls)                    # no size: refused by __cinit__

    class Sub(cls):
        def __init__(self, *a):            # a subclass that "forgets" super().__init__
            pass

    for obj in (cls.__new__(cls, *args), Sub(*args)):
        repr(obj)
        if isinstance(obj, _bitmap.DirtyBitmap):
            obj.set(3)
            assert obj.harvest()[0] == 8 and obj.popcount() == 0
        else:
            obj.push(1, 2)
            assert obj.collect()[1].tolist() == [2] and obj.reset() == 1
    import copy
    with pytest.raises(TypeError):
        copy.copy(cls(*args))
# -- harvest error paths: no bit dropped ------------------------------------

class Boom(Exception):
    pass


def _raising_sink(after: int, exc: type):
    calls = []

    def sink(*batch):
        calls.append(batch)
        if len(calls) > after:
            raise exc("sink failed")
    return sink, calls


_BITMAP_CALLS = {
    "harvest": lambda w, sink: _bitmap.harvest(w, np.zeros(len(w), np.uint64), sink),
    "harvest_zeroed": lambda w, sink: _bitmap.harvest(w, np.zeros(len(w), np.uint64), sink, zeroed=True),
    "harvest_gfns": lambda w, sink: _bitmap.harvest_gfns(w, sink, 1000),
    "clear_masked": lambda w, sink: _bitmap.clear_masked(w, np.full(len(w), 0xF0F0F0F0F0F0F0F0, np.uint64),
                                                         0, None, sink),
    "clear_masked_out": lambda w, sink: _bitmap.clear_masked(w, np.full(len(w), 0xF0F0F0F0F0F0F0F0, np.uint64),
                                                             0, np.zeros(len(w), np.uint64), sink),
}


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt, MemoryError])
@pytest.mark.parametrize("after", [0, 5, 40])
@pytest.mark.parametrize("fn", sorted(_BITMAP_CALLS))
def test_raising_python_sink_puts_every_taken_bit_back(fn, after, exc):
    w = _pattern(200)
    before = w.copy()
    sink, calls = _raising_sink(after, exc)
    with pytest.raises(exc):
        _BITMAP_CALLS[fn](w, sink)
    assert len(calls) == after + 1
    # The oracle: the bitmap is exactly as before (nothing else writes it).
    assert (w == before).all(), np.flatnonzero(w != before)[:10]


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_dirty_bitmap_harvest_with_raising_sink_keeps_the_bits(exc):
    b = _bitmap.DirtyBitmap(64 * 100)
    b.set_many(np.arange(0, 6400, 7))
    before = b.words.copy()
    sink, calls = _raising_sink(3, exc)
    with pytest.raises(exc):
        b.harvest(sink)
    assert (b.words == before).all()
    with pytest.raises(exc):
        b.clear(0, np.full(100, ALL, np.uint64), _raising_sink(3, exc)[0])
    assert (b.words == before).all()
    # And the next harvest, with a sink that works, gets every bit once.
    assert (b.harvest() == before).all() and b.popcount() == 0


@pytest.mark.skipif(SANITIZER, reason="RLIMIT_AS and ASan's shadow memory do not mix")
def test_harvest_gfns_out_of_memory_puts_every_taken_bit_back():
    # 2**22 dirty pages in 2**16 words: the gfn list needs 32 MiB, and the
    # address space is capped so that it cannot grow that far.
    code = """
        import resource, numpy as np
        from kvmdirty import _bitmap
        n = 1 << 16
        words = np.full(n, 0xFFFFFFFFFFFFFFFF, np.uint64)
        words[::3] = 0x5555555555555555
        expect = _bitmap.popcount(words)
        def vm_size():
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmSize:"):
                        return int(line.split()[1]) * 1024
        cap = vm_size() + (8 << 20)
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        try:
            _bitmap.harvest_gfns(words, None, 0)
        except MemoryError:
            print("MemoryError")
        else:
            raise SystemExit("no MemoryError: the cap did not bite")
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
        got = _bitmap.popcount(words)
        print("kept", got, "of", expect)
        assert got == expect
    """
    p = _run_py(code)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    assert "MemoryError" in p.stdout


# -- the ring: user space writes anything into the entries -------------------

def test_forged_reset_flags_count_as_kvm_counts_them():
    # /dev/kvm (Linux 6.18, measured with kvmdirty.kvm.KvmVM): RESET forged
    # on 10 never-pushed entries -> reset counts 10; the vCPU then writes 100
    # pages with no DIRTY_RING_FULL exit, and once they are collected the
    # next reset counts 90 (it starts at entry 10).
    r = DirtyRing(256)
    r.gfns["flags"][0:10] = RESET
    assert r.reset() == 10 and r.reset_index == 10 and r.dirty_index == 0
    assert r.used == 0 and not r.soft_full
    for i in range(100):
        r.push(1, i)
    assert r.used == 90
    s, o = r.collect()
    assert o.tolist() == list(range(100))
    assert r.reset() == 90 and r.reset_index == 100 and r.used == 0
    assert (r.gfns["flags"][:10] == RESET).all()   # left for the next lap, as in KVM
    assert r.push(1, 100) is False


def test_forged_reset_through_the_vm_matches_kvm_and_does_not_wedge():
    import kvmdirty
    from kvmdirty.vm import MEM_LOG_DIRTY_PAGES as LOG
    vm = kvmdirty.VM()
    vm.enable_dirty_ring(256)
    vm.set_user_memory_region(0, 0, 1 << 20, LOG)
    v = vm.create_vcpu(0)
    v.dirty_ring.gfns["flags"][0:10] = RESET
    assert vm.reset_dirty_rings() == 10
    ex = v.run(np.arange(16, 116, dtype=np.uint64), 1)
    assert ex.done and ex.writes == 100       # as /dev/kvm: no exit at all
    resets, runs = 0, 0
    while not ex.done:
        assert ex.name == "DIRTY_RING_FULL"
        runs += 1
        assert runs < 1000, "the vCPU is wedged"
        v.dirty_ring.collect()
        resets += vm.reset_dirty_rings()
        ex = v.run()
    v.dirty_ring.collect()
    resets += vm.reset_dirty_rings()
    assert resets == 90


def test_scribbled_payload_reaches_only_the_bounds_checked_sink():
    from ring_model import ModelRing
    npages = 4096
    mmu, writable = make_mmu(slot_id=1, npages=npages)
    rng = np.random.default_rng(7)
    offsets = np.array([0, 1, 63, 64, 4031, 4095, 4096, 2**63, 2**64 - 1, 2**64 - 63], np.uint64)
    for _ in range(100 if SANITIZER else 400):
        r, m = DirtyRing(256), ModelRing(256)
        g = r.gfns
        n = int(rng.integers(0, 257))
        g["flags"][:n] = RESET                  # forged: nothing was ever pushed
        g["slot"][:] = rng.choice(np.array([1, 1, 1, 0, 2, 0xFFFFFFFF, 0x10001], np.uint32), 256)
        g["offset"][:] = rng.choice(offsets, 256)
        for k, e in enumerate(m.entries):
            e.update(flags=int(g["flags"][k]), slot=int(g["slot"][k]), offset=int(g["offset"][k]))
        expect = writable.copy()

        def protect(slot, first, mask):         # kvm_reset_dirty_gfn's checks
            if slot == 1 and first < npages and first + mask.bit_length() - 1 < npages:
                for bit in range(64):
                    if mask >> bit & 1:
                        expect[(first + bit) >> 6] &= ~np.uint64(1 << ((first + bit) & 63))
        assert r.reset(mmu) == m.reset(protect) == n
        assert (writable == expect).all()
        writable[:] = ~np.uint64(0)


class _Flaky:
    """A Python reset sink that raises on chosen calls and records what it protected."""

    def __init__(self, fail_on, exc=RuntimeError):
        self.calls = 0
        self.fail_on = set(fail_on)
        self.exc = exc
        self.protected = []

    def __call__(self, slot, first, mask):
        self.calls += 1
        if self.calls in self.fail_on:
            raise self.exc("sink failed")
        self.protected.append((slot, first, mask))


def _ring_with_batches(k):
    r = DirtyRing(256)
    for i in range(k):
        r.push(i, 1000 * i)        # one batch per entry (different slots)
    r.collect()
    return r


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_reset_with_raising_sink_offers_every_batch_and_keeps_the_failed_ones(exc):
    r = _ring_with_batches(5)
    sink = _Flaky({2, 4}, exc)
    with pytest.raises(exc) as ei:
        r.reset(sink)
    # Every batch was offered; the two the sink raised on are handed back.
    assert sink.calls == 5
    assert sink.protected == [(0, 0, 1), (2, 2000, 1), (4, 4000, 1)]
    assert ei.value.unprotected_batches == [(1, 1000, 1), (3, 3000, 1)]
    assert r.unprotected_batches == [(1, 1000, 1), (3, 3000, 1)]
    assert r.reset_index == 5 and r.used == 0           # the entries are free (as in KVM)
    # A reset without a sink protects nothing and keeps them ...
    assert r.reset() == 0 and len(r.unprotected_batches) == 2
    # ... the next one with a sink protects them first.
    ok = _Flaky(())
    assert r.reset(ok) == 0
    assert ok.protected == [(1, 1000, 1), (3, 3000, 1)] and r.unprotected_batches == []


def test_reset_left_unprotected_batches_reach_the_mmu_at_the_next_reset():
    mmu, writable = make_mmu(slot_id=1, npages=4096)
    r = DirtyRing(256)
    r.push(1, 70)
    r.push(1, 3000)
    r.collect()
    sink = _Flaky({1, 2}, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        r.reset(sink)
    assert writable[1] == ALL and writable[3000 >> 6] == ALL    # not protected yet
    assert r.reset(mmu) == 0
    assert not (int(writable[1]) >> 6) & 1 and not (int(writable[3000 >> 6]) >> (3000 & 63)) & 1


# -- concurrent collectors and resetters on one ring -------------------------

def _race(fn, nthreads=4, rounds=200):
    errors, results = [], []
    barrier = threading.Barrier(nthreads)

    def worker():
        barrier.wait()
        for _ in range(rounds):
            try:
                results.append(fn())
            except RuntimeError as e:
                assert "already" in str(e) or "in use" in str(e), e
                errors.append(e)
            except BaseException as e:          # pragma: no cover - reported
                errors.append(e)
                raise
    ts = [threading.Thread(target=worker) for _ in range(nthreads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return results, errors


def _producer(r, total, stop):
    pushed = 0
    while pushed < total and not stop.is_set():
        k = r.push_many(np.full(min(64, total - pushed), 1, np.uint32),
                        np.arange(pushed, pushed + min(64, total - pushed), dtype=np.uint64))
        pushed += k


@pytest.mark.parametrize("foreign", [False, True])
def test_concurrent_collectors_are_refused_cleanly(foreign):
    total = 20000 if SANITIZER else 100000
    r = DirtyRing(4096)
    stop = threading.Event()
    p = threading.Thread(target=_producer, args=(r, total, stop))
    p.start()
    fetch = [0]
    got = []

    def collect_once():
        if foreign:
            # Each thread reads the shared fetch index: if two collected at
            # once they would both report the same entries.
            s, o, f = collect(r.gfns, fetch[0])
            fetch[0] = f
        else:
            s, o = r.collect()
        got.append(o.copy())
        r.reset()
        return len(o)

    errors = []
    try:
        # A collect is a few hundred nanoseconds with the GIL released for
        # part of it: race again (the same ring, the same checks) until two
        # collectors have overlapped at least once.
        for _attempt in range(10):
            _, errors = _race(collect_once, rounds=400 if SANITIZER else 2000)
            if errors:
                break
    finally:
        stop.set()
        p.join()
    assert all(isinstance(e, RuntimeError) for e in errors)
    seen = np.sort(np.concatenate(got)) if got else np.zeros(0, np.uint64)
    # Two collectors at once would both report the entries they read before
    # either stored RESET: no entry may be seen twice.
    assert (np.diff(seen.astype(np.int64)) > 0).all(), "an entry was collected twice"
    if not foreign:
        # The ring's own fetch index: exactly a prefix of what was pushed.
        assert (seen == np.arange(len(seen), dtype=np.uint64)).all()
    assert errors, "the collectors never overlapped: the test did not race"


def test_concurrent_resets_are_serialised_or_refused():
    r = DirtyRing(4096)

    def push_collect_reset():
        try:
            r.push_many(np.ones(100, np.uint32), np.arange(100, dtype=np.uint64))
        except RuntimeError:
            pass
        try:
            r.collect()
        except RuntimeError:
            pass
        return r.reset()

    results, errors = _race(push_collect_reset, rounds=300)
    assert all(isinstance(e, RuntimeError) for e in errors)
    r.collect()
    total = sum(results) + r.reset()
    assert total == r.stats["pushes"] == r.reset_index and r.used == 0
    assert r.stats["resets"] == total


def test_close_while_another_thread_collects_is_refused_or_after():
    for _ in range(50):
        r = DirtyRing(65536)
        r.push_many(np.ones(65536, np.uint32), np.arange(65536, dtype=np.uint64))
        t = threading.Thread(target=r.collect)
        t.start()
        try:
            r.close()
        except RuntimeError:
            pass                                   # refused: the collect is running
        t.join()


def test_foreign_collect_holds_the_buffer_export():
    code = """
        import mmap, threading, numpy as np
        from kvmdirty._ring import collect, ENTRY_DTYPE
        N = 65536
        refused = 0
        for k in range(30):
            mm = mmap.mmap(-1, N * 16)
            a = np.frombuffer(mm, ENTRY_DTYPE)
            a["flags"] = 1
            del a
            go = threading.Event()
            def closer():
                global refused
                go.wait()
                try:
                    mm.close()
                except BufferError:
                    refused += 1
            t = threading.Thread(target=closer)
            t.start()
            go.set()
            try:
                collect(mm, 0)
            except ValueError:
                pass                      # closed before the call began
            t.join()
        print("refused", refused)
    """
    p = _run_py(code)
    assert p.returncode == 0, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])


# -- interrupts and writers racing an error path ------------------------------

def test_ctrl_c_from_another_thread_inside_the_sink_puts_the_bits_back():
    import _thread
    w = _pattern(500, seed=3)
    before = w.copy()
    calls = [0]

    def sink(word, mask):
        calls[0] += 1
        if calls[0] == 3:
            t = threading.Thread(target=_thread.interrupt_main)
            t.start()
            t.join()                 # the signal is pending: it fires in this frame
        for _ in range(1000):        # give the eval loop its chance
            pass

    with pytest.raises(KeyboardInterrupt) as ei:
        _bitmap.harvest_gfns(w, sink)
    assert "sink" in [e.name for e in ei.traceback]      # it fired inside the sink
    assert (w == before).all()


@pytest.mark.parametrize("fn", ["harvest", "harvest_gfns", "clear_masked"])
def test_error_path_keeps_bits_a_vcpu_sets_meanwhile(fn):
    n = 4096
    w = _pattern(n, seed=5)
    before = w.copy()
    stop = threading.Event()
    set_by_writer = np.zeros(n, np.uint64)
    rng = np.random.default_rng(9)
    nrs = rng.integers(0, n * 64, 200_000, dtype=np.uint64)

    def writer():
        for chunk in np.array_split(nrs, 400):
            if stop.is_set():
                break
            _bitmap.set_bits(w, chunk)
            _bitmap.set_bits(set_by_writer, chunk)

    t = threading.Thread(target=writer)
    t.start()
    sink, calls = _raising_sink(300, Boom)
    try:
        with pytest.raises(Boom):
            _BITMAP_CALLS[fn](w, sink)
    finally:
        stop.set()
        t.join()
    # Nothing was consumed: every bit from before, and every bit the writer set.
    assert (w == (before | set_by_writer)).all()


# -- bad buffers: a clear exception, before any C loop ------------------------

def _bad_words():
    ro = np.zeros(8, np.uint64)
    ro.flags.writeable = False
    raw = np.zeros(8 * 8 + 8, np.uint8)
    misaligned = raw[1:1 + 64].view(np.uint64)
    released = memoryview(np.zeros(8, np.uint64))
    released.release()
    return {"readonly": ro, "misaligned": misaligned, "released": released,
            "bytes": bytes(64), "int32": np.zeros(16, np.int32), "strided": np.zeros(16, np.uint64)[::2],
            "2d": np.zeros((2, 4), np.uint64), "list": [0] * 8, "none": None}


@pytest.mark.parametrize("kind", sorted(_bad_words()))
@pytest.mark.parametrize("fn", ["harvest", "clear_masked", "harvest_gfns", "popcount", "to_gfns", "set_bits"])
def test_bad_words_buffers_raise_cleanly(fn, kind):
    bad = _bad_words()[kind]
    good = np.zeros(8, np.uint64)
    calls = {
        "harvest": lambda: _bitmap.harvest(bad, good),
        "clear_masked": lambda: _bitmap.clear_masked(bad, np.zeros(8, np.uint64)),
        "harvest_gfns": lambda: _bitmap.harvest_gfns(bad),
        "popcount": lambda: _bitmap.popcount(bad),
        "to_gfns": lambda: _bitmap.to_gfns(bad),
        "set_bits": lambda: _bitmap.set_bits(bad, np.zeros(1, np.uint64)),
    }
    if kind == "readonly" and fn in ("popcount", "to_gfns"):
        calls[fn]()                       # read-only use: accepted
        return
    with pytest.raises((TypeError, ValueError, BufferError)):
        calls[fn]()


@pytest.mark.parametrize("kind", ["readonly", "misaligned", "released", "bytes", "int32", "short"])
def test_bad_sink_buffers_raise_before_any_bit_is_taken(kind):
    w = _pattern(8)
    before = w.copy()
    bad = _bad_words().get(kind, np.zeros(2, np.uint64))
    for call in (lambda: _bitmap.harvest(w, np.zeros(8, np.uint64), bad),
                 lambda: _bitmap.harvest_gfns(w, bad),
                 lambda: _bitmap.clear_masked(w, np.full(8, ALL, np.uint64), 0, None, bad)):
        with pytest.raises((TypeError, ValueError)):
            call()
        assert (w == before).all()


def test_aliased_buffers_do_not_crash():
    w = _pattern(64)
    _bitmap.harvest(w, w)                  # snapshot is the bitmap itself
    w2 = _pattern(64)
    _bitmap.harvest(w2, np.zeros(64, np.uint64), w2)    # and the sink
    w3 = _pattern(64)
    _bitmap.clear_masked(w3, w3, 0, w3, w3)
