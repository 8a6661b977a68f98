"""Destination == source, page by page: holds for every design, and catches injected kernel bugs."""
from __future__ import annotations

import numpy as np
import pytest

from kvmdirty.migrate import DESIGNS, Costs, MigrationConfig, VerificationError, run
from kvmdirty.migrate.memory import Destination, GuestMemory, MigrationBitmap
from kvmdirty.vm import VM

# Many short rounds over a small guest: every page is re-dirtied after it was sent.
BUSY = dict(memory=32 << 20, vcpus=2, dirty_rate=40e6, bandwidth=60e6, max_bandwidth=60e6,
            ring_entries=1024, reaper_period=0.1, max_time=30)

# Which injected bug each design must expose (the others are races between
# threads, which this single-threaded, deterministic schedule cannot produce).
EXPOSED = {
    "bitmap": ["skip-flush", "unlogged-fault"],
    "clear-log": ["skip-flush", "unlogged-fault"],
    "ring": ["skip-flush", "unlogged-fault", "skip-reset-protect"],
    "indexed-ring": ["skip-flush", "unlogged-fault", "skip-reset-protect"],
    "shared-ring": ["skip-flush", "unlogged-fault", "skip-reset-protect"],
    "switched-bitmap": ["skip-flush", "unlogged-fault"],
    "switched-bitmap-user": ["skip-flush", "unlogged-fault"],
}


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("costs", ["zero", "default"])
def test_destination_equals_source(design, costs):
    c = Costs.zero() if costs == "zero" else Costs.default()
    for seed in range(3):
        res = run(MigrationConfig(design=design, seed=seed, **BUSY), c, check=True)
        assert res.verified and not res.mismatched_gfns
        assert res.rounds >= 2


@pytest.mark.parametrize("design,fault", [(d, f) for d, fs in EXPOSED.items() for f in fs])
def test_injected_bug_fails_the_check(design, fault):
    failed = []
    for seed in range(3):
        res = run(MigrationConfig(design=design, seed=seed, faults=(fault,), **BUSY), Costs.zero())
        if not res.verified:
            failed.append(res.mismatched_gfns)
    assert failed, f"{fault} under {design}: every migration verified"
    with pytest.raises(VerificationError) as e:
        for seed in range(3):
            run(MigrationConfig(design=design, seed=seed, faults=(fault,), **BUSY), Costs.zero(),
                check=True)
    assert e.value.gfns and all(0 <= g < BUSY["memory"] // 4096 for g in e.value.gfns)


def test_mismatch_names_the_gfns():
    """The check itself: a destination page changed behind its back is reported by gfn."""
    vm = VM()
    mem = GuestMemory(vm, 1 << 12, slot_pages=1 << 10)
    v = vm.create_vcpu(0)
    v.run(np.arange(0, 4096, 7, dtype=np.uint64), 5)
    dest = Destination(mem)
    dest.send(np.arange(4096))
    dest.verify()
    v.run(np.array([77, 3000], np.uint64), 9)            # written after being sent
    bad, total = dest.mismatches()
    assert (bad, total) == ([77, 3000], 2)
    with pytest.raises(VerificationError, match="77"):
        dest.verify()


def test_unsent_page_is_a_mismatch():
    vm = VM()
    mem = GuestMemory(vm, 256)
    dest = Destination(mem)
    dest.send(np.arange(255))
    assert dest.mismatches() == ([255], 1)


def test_bitmap_walk_wraps_and_counts():
    m = MigrationBitmap(1000)
    m.merge_gfns(np.array([5, 900, 5, 17]))
    assert m.count == 3
    assert list(m.take(2)) == [5, 17]
    m.merge_gfns(np.array([1]))
    assert list(m.take(10)) == [900, 1]
    assert m.count == 0 and len(m.take(5)) == 0
    words = np.zeros(16, np.uint64)
    words[0] = 0b1011
    assert m.merge_words(0, 1000, words) == 3 and m.count == 3
