"""Bitmap kernels on a 24 GiB slot (6,291,456 pages), against plain numpy.

Run: pytest benches/bench_bitmap.py --benchmark-only
Each benchmark records `ops` (pages or words handled) in extra_info so that
per-operation costs can be derived.
"""
import numpy as np
import pytest

from conftest import DIRTY_24G, PAGES_24G, dirty_pages
from kvmdirty import _bitmap as b

PAGES = 6_291_456                # 24 GiB of 4 KiB pages
WORDS = PAGES // 64


@pytest.fixture(scope="module")
def sparse_pages():
    rng = np.random.default_rng(1)
    return np.sort(rng.choice(PAGES, PAGES // 1000, replace=False)).astype(np.uint64)


class Turns:
    """The 0.1% harvest cases dirty two page sets in turn (conftest.dirty_pages seeds 1
    and 2, as bench_cbase.py and bench_vm.py): a fixed set would let the branch
    predictor learn where the dirty words are, and a reused snapshot always
    holds the other set's words.  ``setup`` dirties the next set; ``last`` is it."""

    def __init__(self, words):
        self.words, self.sets, self.turn = words, [dirty_pages(PAGES_24G, DIRTY_24G, seed=s) for s in (1, 2)], 0

    def setup(self):
        self.turn ^= 1
        return _dirty(self.words, self.sets[self.turn])

    @property
    def last(self):
        return self.sets[self.turn]


def test_harvest_clean_24g(benchmark):
    words, snap, writable = (np.zeros(WORDS, np.uint64) for _ in range(3))
    benchmark.extra_info["ops"] = WORDS
    benchmark(b.harvest, words, snap, writable, zeroed=True)


def test_popcount_clean_24g(benchmark):
    words = np.zeros(WORDS, np.uint64)
    benchmark(b.popcount, words)


def _dirty(words, pages):
    b.set_bits(words, pages)
    return (words,), {}


def test_harvest_then_to_gfns_sparse(benchmark):
    """KVM_GET_DIRTY_LOG's harvest (snapshot + masked protect), then the gfn list."""
    words, writable = np.zeros(WORDS, np.uint64), np.full(WORDS, ~np.uint64(0))

    def run(w):
        snap = np.zeros(WORDS, np.uint64)
        b.harvest(w, snap, writable, zeroed=True)
        return b.to_gfns(snap)

    t = Turns(words)
    benchmark.extra_info["ops"] = DIRTY_24G
    got = benchmark.pedantic(run, setup=t.setup, rounds=200)
    assert (got == t.last).all()


def test_harvest_then_to_gfns_sparse_into(benchmark):
    """The same into caller-owned buffers reused from call to call (snapshot and gfn list)."""
    words, writable = np.zeros(WORDS, np.uint64), np.full(WORDS, ~np.uint64(0))
    snap, out = np.empty(WORDS, np.uint64), np.empty(DIRTY_24G, np.uint64)

    def run(w):
        b.harvest(w, snap, writable)
        return b.to_gfns(snap, 0, out)

    t = Turns(words)
    benchmark.extra_info["ops"] = DIRTY_24G
    got = benchmark.pedantic(run, setup=t.setup, rounds=200)
    assert (got == t.last).all()


def test_harvest_gfns_sparse_into(benchmark):
    """The fused kernel into a caller-owned gfn array, reused."""
    words, writable = np.zeros(WORDS, np.uint64), np.full(WORDS, ~np.uint64(0))
    out = np.empty(DIRTY_24G, np.uint64)
    t = Turns(words)
    benchmark.extra_info["ops"] = DIRTY_24G
    got = benchmark.pedantic(lambda w: b.harvest_gfns(w, writable, out=out), setup=t.setup, rounds=200)
    assert (got == t.last).all()


def test_harvest_gfns_sparse(benchmark):
    """The fused kernel: exchange, protect and list in one pass."""
    words, writable = np.zeros(WORDS, np.uint64), np.full(WORDS, ~np.uint64(0))
    t = Turns(words)
    benchmark.extra_info["ops"] = DIRTY_24G
    got = benchmark.pedantic(lambda w: b.harvest_gfns(w, writable), setup=t.setup, rounds=200)
    assert (got == t.last).all()


def numpy_harvest_to_gfns(words, writable):
    """The best plain-numpy way: find non-zero words, take them, unpack their bits."""
    nz = np.flatnonzero(words)
    masks = words[nz]
    words[nz] = 0
    writable[nz] &= ~masks
    bits = np.unpackbits(masks.view(np.uint8), bitorder="little").reshape(-1, 64)
    r, c = np.nonzero(bits)
    return nz[r].astype(np.uint64) * np.uint64(64) + c.astype(np.uint64)


def test_numpy_harvest_then_to_gfns_sparse(benchmark):
    words, writable = np.zeros(WORDS, np.uint64), np.full(WORDS, ~np.uint64(0))
    t = Turns(words)
    benchmark.extra_info["ops"] = DIRTY_24G
    got = benchmark.pedantic(lambda w: numpy_harvest_to_gfns(w, writable), setup=t.setup, rounds=50)
    assert (got == t.last).all()


def test_to_gfns_sparse(benchmark, sparse_pages):
    words = np.zeros(WORDS, np.uint64)
    b.set_bits(words, sparse_pages)
    benchmark.extra_info["ops"] = len(sparse_pages)
    benchmark(b.to_gfns, words)


def test_clear_masked_sparse(benchmark, sparse_pages):
    words, masks = np.zeros(WORDS, np.uint64), np.zeros(WORDS, np.uint64)
    b.set_bits(masks, sparse_pages)
    writable = np.full(WORDS, ~np.uint64(0))
    benchmark.extra_info["ops"] = WORDS
    benchmark.pedantic(lambda w: b.clear_masked(w, masks, 0, None, writable),
                       setup=lambda: _dirty(words, sparse_pages), rounds=100)
