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
import sys
import textwrap
import threading
from array import array

import numpy as np
import pytest

from kvmdirty import _bitmap
from kvmdirty._ring import ENTRY_DTYPE, DirtyRing, collect
from ring_model import make_mmu

SANITIZER = bool(os.environ.get("KVMDIRTY_SANITIZER_RUN"))
ALL = 0xFFFFFFFFFFFFFFFF
DIRTY, RESET = 1, 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_py(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter using this checkout's kvmdirty."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


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
    import mmap, threading, numpy as np
    from kvmdirty import _bitmap
    N = 1 << 19
    closed = refused = 0
    for k in range({rounds}):
        mm = mmap.mmap(-1, N * 8)
        mm.write(bytes([255]) * (N * 8))
        mv = memoryview(mm).cast('Q')
        words = np.full(N, 0xFFFFFFFFFFFFFFFF, np.uint64)
        go = threading.Event()
        def closer():
            global closed, refused
            go.wait()
            try:
                mv.release()              # the caller's own export ...
                mm.close()                # ... then the mapping: munmap
                closed += 1
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
    if SANITIZER:
        pytest.skip("RLIMIT_AS and ASan's shadow memory do not mix")
    p = _run_py(code)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    assert "MemoryError" in p.stdout
