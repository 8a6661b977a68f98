"""Peers, on the same data in the same run: bitmap scan and gfn extraction, and the ring.

Bitmap (a 24 GiB slot, 6,291,456 pages, densities 0.01% .. 50%):
  ours      kvmdirty._bitmap.to_gfns / harvest (clean scan)
  numpy     the best plain-numpy ways: non-zero words then unpackbits ("nzwords"),
            or unpack the whole bitmap ("unpack"); the report takes the faster
  bitarray  zero-copy bitarray over the words: search(1) / any()
  roaring   pyroaring.BitMap: extraction (to_array) alone, and with the cost of
            adding the dirty pages to it first ("add+extract")
  python    a pure-Python loop over the words (skipped above 1% in quick mode)
Ring (65536 entries, one slot): kvmdirty._ring.DirtyRing against a pure-Python
ring with the same push/collect/reset semantics (flags life cycle 0 -> DIRTY ->
RESET -> 0, in-order harvest, KVM's 64-page coalescing on reset), as a list of
tuples and as two collections.deque.

Groups: peers-scan, peers-gfns-<density>, peers-ring-<op>; extra_info: impl, ops, unit.
Peer packages (bitarray, pyroaring) are optional: their benchmarks skip without them.
"""
from __future__ import annotations

import array
from collections import deque

import numpy as np
import pytest

from conftest import PAGES_24G, QUICK, dirty_pages, dirty_words, rounds, set_ops
from kvmdirty import _bitmap

WORDS = PAGES_24G // 64
DENSITIES = {"0.01%": 1e-4, "0.1%": 1e-3, "1%": 1e-2, "10%": 0.1, "50%": 0.5}


def _count(density: float) -> int:
    return int(PAGES_24G * density)


def _impl(benchmark, impl, ops, unit, **info):
    set_ops(benchmark, ops, unit, impl=impl, **info)


# -- the plain-numpy peers ----------------------------------------------------
def numpy_gfns_nzwords(words: np.ndarray) -> np.ndarray:
    """Non-zero words, then unpack only those: best when sparse."""
    nz = np.flatnonzero(words)
    bits = np.unpackbits(words[nz].view(np.uint8), bitorder="little").reshape(-1, 64)
    r, c = np.nonzero(bits)
    return nz[r].astype(np.uint64) * np.uint64(64) + c.astype(np.uint64)


def numpy_gfns_unpack(words: np.ndarray) -> np.ndarray:
    """Unpack every bit, then flatnonzero: best when dense."""
    return np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little")).astype(np.uint64)


def python_gfns(words: np.ndarray) -> list:
    out = []
    append = out.append
    for i, w in enumerate(words.tolist()):
        base = i << 6
        while w:
            low = w & -w
            append(base + low.bit_length() - 1)
            w ^= low
    return out


# -- clean scan: is anything dirty? (a clean 24 GiB slot) -----------------------
@pytest.mark.benchmark(group="peers-scan")
def test_scan_clean_ours_harvest(benchmark):
    words, snap, writable = (np.zeros(WORDS, np.uint64) for _ in range(3))
    _impl(benchmark, "ours", WORDS, "word")
    assert benchmark(_bitmap.harvest, words, snap, writable, zeroed=True) == 0


@pytest.mark.benchmark(group="peers-scan")
def test_scan_clean_numpy(benchmark):
    words = np.zeros(WORDS, np.uint64)
    _impl(benchmark, "numpy", WORDS, "word")
    assert len(benchmark(np.flatnonzero, words)) == 0


@pytest.mark.benchmark(group="peers-scan")
def test_scan_clean_bitarray(benchmark):
    bitarray = pytest.importorskip("bitarray").bitarray
    ba = bitarray(buffer=np.zeros(WORDS, np.uint64), endian="little")
    _impl(benchmark, "bitarray", WORDS, "word")
    assert not benchmark(ba.any)


@pytest.mark.benchmark(group="peers-scan")
def test_scan_clean_python(benchmark):
    words = np.zeros(WORDS, np.uint64)
    _impl(benchmark, "python", WORDS, "word")
    assert benchmark.pedantic(python_gfns, args=(words,), rounds=rounds(10, 2)) == []


# -- gfn extraction at each density ------------------------------------------
def _gfns_case(benchmark, density_name, impl):
    n = _count(DENSITIES[density_name])
    benchmark.group = f"peers-gfns-{density_name}"
    _impl(benchmark, impl, n, "page", density=density_name, dirty=n)
    return dirty_words(PAGES_24G, n), dirty_pages(PAGES_24G, n)


def _rounds_for(n: int, full: int = 50, quick: int = 5) -> int:
    return max(3, rounds(full, quick) // (1 + n // 200_000))


@pytest.mark.parametrize("density", list(DENSITIES))
def test_gfns_ours(benchmark, density):
    words, pages = _gfns_case(benchmark, density, "ours")
    got = benchmark.pedantic(_bitmap.to_gfns, args=(words,), rounds=_rounds_for(len(pages), 200, 20),
                             iterations=1, warmup_rounds=1)
    assert np.array_equal(got, pages)


@pytest.mark.parametrize("density", list(DENSITIES))
def test_gfns_ours_into(benchmark, density):
    """to_gfns into a caller-owned array reused from call to call (out=): no allocation."""
    words, pages = _gfns_case(benchmark, density, "ours-into")
    out = np.empty(len(pages), np.uint64)
    got = benchmark.pedantic(_bitmap.to_gfns, args=(words, 0, out), rounds=_rounds_for(len(pages), 200, 20),
                             iterations=1, warmup_rounds=1)
    assert np.array_equal(got, pages)


@pytest.mark.parametrize("density", list(DENSITIES))
@pytest.mark.parametrize("way", ["nzwords", "unpack"])
def test_gfns_numpy(benchmark, density, way):
    words, pages = _gfns_case(benchmark, density, "numpy")
    benchmark.extra_info["variant"] = way
    fn = numpy_gfns_nzwords if way == "nzwords" else numpy_gfns_unpack
    got = benchmark.pedantic(fn, args=(words,), rounds=_rounds_for(len(pages)), warmup_rounds=1)
    assert np.array_equal(got, pages)


@pytest.mark.parametrize("density", list(DENSITIES))
def test_gfns_bitarray(benchmark, density):
    bitarray = pytest.importorskip("bitarray").bitarray
    words, pages = _gfns_case(benchmark, density, "bitarray")
    ba = bitarray(buffer=words, endian="little")

    def run():
        return np.fromiter(ba.search(1), np.uint64, count=ba.count(1))

    got = benchmark.pedantic(run, rounds=_rounds_for(len(pages), 20, 3), warmup_rounds=1)
    assert np.array_equal(got, pages)


@pytest.mark.parametrize("density", list(DENSITIES))
@pytest.mark.parametrize("way", ["extract", "add+extract"])
def test_gfns_roaring(benchmark, density, way):
    """pyroaring: the dirty set must first be added (as faults would), then listed."""
    BitMap = pytest.importorskip("pyroaring").BitMap
    words, pages = _gfns_case(benchmark, density, "roaring")
    benchmark.extra_info["variant"] = way
    raw = pages.astype(np.uint32).tobytes()

    def add_extract():
        bm = BitMap(array.array("I", raw))
        return np.frombuffer(bm.to_array(), np.uint32)

    if way == "extract":
        bm = BitMap(array.array("I", raw))

        def run():
            return np.frombuffer(bm.to_array(), np.uint32)
    else:
        run = add_extract
    got = benchmark.pedantic(run, rounds=_rounds_for(len(pages)), warmup_rounds=1)
    assert np.array_equal(got, pages)


@pytest.mark.parametrize("density", list(DENSITIES))
def test_gfns_python(benchmark, density):
    n = _count(DENSITIES[density])
    if QUICK and DENSITIES[density] > 0.01:
        pytest.skip("pure-Python loop above 1% density is skipped in quick mode (seconds per call)")
    words, pages = _gfns_case(benchmark, density, "python")
    got = benchmark.pedantic(python_gfns, args=(words,), rounds=rounds(5, 2) if n < 100_000 else 1)
    assert len(got) == len(pages)


# -- ring: ours against a pure-Python ring -------------------------------------
DIRTY, RESET = 1, 2
M64 = (1 << 64) - 1
RING_N = 1 << 16
RING_SLOT_PAGES = 1 << 22          # 16 GiB slot for random offsets


class ListRing:
    """A pure-Python dirty ring: a list of (flags, slot, offset) tuples, KVM's indexes and rules."""

    def __init__(self, entries: int) -> None:
        self.size = entries
        self.mask = entries - 1
        self.ring = [(0, 0, 0)] * entries
        self.dirty_index = self.reset_index = self.fetch_index = 0

    def push(self, slot: int, offset: int) -> bool:
        if self.dirty_index - self.reset_index >= self.size:
            raise RuntimeError("ring full")
        self.ring[self.dirty_index & self.mask] = (DIRTY, slot, offset)
        self.dirty_index += 1
        return self.dirty_index - self.reset_index >= self.size - 64

    def push_many(self, slots, offsets) -> int:
        n = 0
        for s, o in zip(slots, offsets):
            self.push(s, o)
            n += 1
        return n

    def collect(self):
        ring, mask, i = self.ring, self.mask, self.fetch_index
        slots, offs = [], []
        while True:
            f, s, o = ring[i & mask]
            if f != DIRTY:
                break
            slots.append(s)
            offs.append(o)
            ring[i & mask] = (RESET, s, o)
            i += 1
        self.fetch_index = i
        return slots, offs

    def reset(self, sink=None) -> int:
        ring, mask, i = self.ring, self.mask, self.reset_index
        count, cur_slot, cur_off, bits = 0, 0, 0, 0
        while i != self.dirty_index:
            f, s, o = ring[i & mask]
            if not f & RESET:
                break
            ring[i & mask] = (0, s, o)
            i += 1
            count += 1
            if bits and s == cur_slot:
                d = o - cur_off
                if 0 <= d < 64:
                    bits |= 1 << d
                    continue
                if -64 < d < 0 and ((bits << -d) & M64) >> -d == bits:
                    cur_off, bits = o, ((bits << -d) & M64) | 1
                    continue
            if bits and sink is not None:
                sink(cur_slot, cur_off, bits)
            cur_slot, cur_off, bits = s, o, 1
        if bits and sink is not None:
            sink(cur_slot, cur_off, bits)
        self.reset_index = i
        return count


class DequeRing(ListRing):
    """The same semantics over two deques: pushed (DIRTY) and harvested (RESET) entries."""

    def __init__(self, entries: int) -> None:
        self.size = entries
        self.pushed: deque = deque()
        self.harvested: deque = deque()

    def push(self, slot: int, offset: int) -> bool:
        used = len(self.pushed) + len(self.harvested)
        if used >= self.size:
            raise RuntimeError("ring full")
        self.pushed.append((slot, offset))
        return used + 1 >= self.size - 64

    def collect(self):
        got = list(self.pushed)
        self.harvested.extend(got)
        self.pushed.clear()
        return [s for s, _ in got], [o for _, o in got]

    def reset(self, sink=None) -> int:
        h, count, cur_slot, cur_off, bits = self.harvested, 0, 0, 0, 0
        while h:
            s, o = h.popleft()
            count += 1
            if bits and s == cur_slot:
                d = o - cur_off
                if 0 <= d < 64:
                    bits |= 1 << d
                    continue
                if -64 < d < 0 and ((bits << -d) & M64) >> -d == bits:
                    cur_off, bits = o, ((bits << -d) & M64) | 1
                    continue
            if bits and sink is not None:
                sink(cur_slot, cur_off, bits)
            cur_slot, cur_off, bits = s, o, 1
        if bits and sink is not None:
            sink(cur_slot, cur_off, bits)
        return count


def _ring_data(pattern: str):
    slots = np.ones(RING_N, np.uint32)
    if pattern == "consecutive":
        offs = np.arange(RING_N, dtype=np.uint64)
    else:
        offs = np.random.default_rng(0).integers(0, RING_SLOT_PAGES, RING_N).astype(np.uint64)
    return slots, offs


def _make_ring(impl: str):
    if impl == "ours":
        from kvmdirty._ring import DirtyRing
        return DirtyRing(RING_N)
    return ListRing(RING_N) if impl == "python-list" else DequeRing(RING_N)


def _ring_args(impl, slots, offs):
    return (slots, offs) if impl == "ours" else (slots.tolist(), offs.tolist())


RING_IMPLS = ["ours", "python-list", "python-deque"]


def _ring_rounds(impl):
    return rounds(100, 10) if impl == "ours" else rounds(8, 2)


@pytest.mark.parametrize("impl", RING_IMPLS)
def test_ring_push(benchmark, impl):
    ring = _make_ring(impl)
    args = _ring_args(impl, *_ring_data("consecutive"))
    benchmark.group = "peers-ring-push"
    _impl(benchmark, impl.split("-")[0], RING_N, "entry", variant=impl)

    def drain():
        ring.collect()
        ring.reset()

    benchmark.pedantic(ring.push_many, args=args, setup=drain, rounds=_ring_rounds(impl))


@pytest.mark.parametrize("impl", RING_IMPLS)
def test_ring_collect(benchmark, impl):
    ring = _make_ring(impl)
    args = _ring_args(impl, *_ring_data("consecutive"))
    benchmark.group = "peers-ring-collect"
    _impl(benchmark, impl.split("-")[0], RING_N, "entry", variant=impl)
    if impl == "ours":
        bs, bo = np.empty(RING_N, np.uint32), np.empty(RING_N, np.uint64)
        run, run_args = ring.collect, (None, bs, bo)
    else:
        run, run_args = ring.collect, ()

    def setup():
        ring.reset()
        ring.push_many(*args)

    benchmark.pedantic(run, args=run_args, setup=setup, rounds=_ring_rounds(impl))


@pytest.mark.parametrize("pattern", ["consecutive", "random"])
@pytest.mark.parametrize("impl", RING_IMPLS)
def test_ring_reset(benchmark, impl, pattern):
    """Reset with coalescing into (slot, base, mask) batches, no write-protect sink (both sides)."""
    ring = _make_ring(impl)
    args = _ring_args(impl, *_ring_data(pattern))
    benchmark.group = f"peers-ring-reset-{pattern}"
    _impl(benchmark, impl.split("-")[0], RING_N, "entry", variant=impl, pattern=pattern)

    def setup():
        ring.push_many(*args)
        ring.collect()

    got = benchmark.pedantic(ring.reset, setup=setup, rounds=_ring_rounds(impl))
    assert got == RING_N


def test_python_rings_agree_with_ours():
    """The pure-Python peers really have the same semantics (collect order, reset count, batches)."""
    from kvmdirty._ring import DirtyRing
    rng = np.random.default_rng(3)
    offs = np.concatenate([np.arange(100, 300), rng.integers(0, 5000, 300), np.arange(90, 40, -1)])
    slots = np.where(np.arange(len(offs)) % 97 == 0, 2, 1).astype(np.uint32)
    offs = offs.astype(np.uint64)
    ours = DirtyRing(1024)
    ours.push_many(slots, offs)
    s0, o0 = ours.collect()
    batches0 = []
    ours.reset(lambda s, f, m: batches0.append((s, f, m)))
    for cls in (ListRing, DequeRing):
        r = cls(1024)
        r.push_many(slots.tolist(), offs.tolist())
        s1, o1 = r.collect()
        assert list(s0) == s1 and list(o0) == o1
        batches1 = []
        assert r.reset(lambda s, f, m: batches1.append((s, f, m))) == len(offs)
        assert batches1 == batches0
