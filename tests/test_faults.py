"""Each deliberate ordering bug is caught by the verifier; with none, nothing is reported.

Bugs that lose writes on every interleaving run deterministically (one
thread, seeded schedule).  Races run in real threads pinned to one CPU: the
harvester then preempts a vCPU at a random point of its write loop each time
it wakes, which opens the race window on nearly every harvest, and the check
runs at the stop-and-copy of each of many rounds, so a miss needs every round
to miss.
"""
from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

import pytest

from kvmdirty.collectors import all_designs
from kvmdirty.runner import RunSpec, run
from kvmdirty.vm import FAULTS
from kvmdirty.workloads import Workload

DESIGNS = all_designs()
RINGS = [d for d in DESIGNS if d == "ring" or d.endswith("-ring")]
ONE_CPU = (min(os.sched_getaffinity(0)),)


def det(design: str, **kw) -> RunSpec:
    base = dict(design=design, memory=16 << 20, vcpus=2, writes=40_000, rate=256, period=2,
                mode="deterministic", check="both", rounds=4, seed=7)
    base.update(kw)
    return RunSpec(**base)


def racy(design: str, **kw) -> RunSpec:
    base = dict(design=design, memory=16 << 20, vcpus=2, mode="threads", rate=8192,
                interval=0.0002, check="shadow", cpus=ONE_CPU, seed=3,
                workload=Workload("hotcold", hot_fraction=0.02))
    base.update(kw)
    return RunSpec(**base)


def caught(r) -> bool:
    return bool(r.lost_pages or r.violations or r.problems)


def lost_within(spec: RunSpec, attempts: int = 6):
    """Run a racy spec (a fresh seed each time) until it loses a write; the last run.

    These bugs need a thread preempted at one exact point, so how often a round
    shows them depends on the machine's timing (much rarer under ASan): trying
    again, rather than one long fixed run, keeps the test fast where the bug is
    frequent and still certain where it is rare."""
    for k in range(attempts):
        r = run(dataclasses.replace(spec, seed=spec.seed + k))
        if r.lost_pages:
            break
    return r


def test_every_fault_has_a_test():
    covered = {"skip-flush", "unlogged-fault", "skip-reset-protect",
               "flush-before-protect", "no-flush-wait"}
    assert covered == set(FAULTS)


# -- off: nothing reported ---------------------------------------------------
@pytest.mark.parametrize("design", DESIGNS)
def test_no_fault_nothing_reported_deterministic(design):
    r = run(det(design))
    assert (r.lost_pages, r.violations, r.problems) == (0, 0, [])
    assert r.writes == 2 * 40_000 and r.pages_harvested > 0


@pytest.mark.parametrize("design", DESIGNS)
def test_no_fault_nothing_reported_threads(design):
    r = run(det(design, mode="threads", check="shadow", rate=4096, interval=0.001,
                writes=200_000, rounds=3))
    assert (r.lost_pages, r.problems) == (0, []), r.lost[:3]


# -- deterministic faults ------------------------------------------------------
@pytest.mark.parametrize("design", DESIGNS)
def test_skip_flush_caught(design):
    # Harvests re-protect but never flush: the vCPU keeps writing through its stale TLB.
    r = run(det(design, faults=("skip-flush",)))
    assert r.lost_pages > 0 and r.violations > 0
    assert r.lost[0].startswith("round ")


@pytest.mark.parametrize("design", DESIGNS)
def test_unlogged_fault_caught(design):
    r = run(det(design, faults=("unlogged-fault",)))
    assert r.lost_pages > 0 and r.violations > 0


@pytest.mark.parametrize("design", RINGS)
def test_skip_reset_protect_caught(design):
    # Reset hands entries back without re-protecting: rewrites of harvested pages go unlogged.
    r = run(det(design, faults=("skip-reset-protect",)))
    assert r.lost_pages > 0 and r.violations > 0


def test_fault_results_are_reproducible():
    a = run(det("bitmap", faults=("skip-flush",)))
    b = run(det("bitmap", faults=("skip-flush",)))
    assert (a.lost_pages, a.violations, a.lost) == (b.lost_pages, b.violations, b.lost)


# -- races: real threads --------------------------------------------------------
@pytest.mark.parametrize("design", ["bitmap", "clear-log"])
def test_flush_before_protect_caught(design):
    # A vCPU refills its TLB from a still-writable SPTE between the flush and
    # the protect; its later writes through that entry are never logged.
    r = lost_within(racy(design, faults=("flush-before-protect",), duration=0.4, rounds=40))
    assert r.lost_pages > 0, "no loss in 6 runs of 40 rounds"
    assert r.bad_rounds


def test_no_flush_wait_caught(tmp_path):
    # Each page is written twice in a row: the second write hits the TLB and is
    # the page's last.  If the harvester preempts the vCPU between its request
    # check and that store and does not wait for the flush, it copies the page
    # before the store lands, and nothing logs the store.
    trace = tmp_path / "pairs.npy"
    np.save(trace, np.repeat(np.arange(16 << 8, dtype=np.uint64), 2))
    r = lost_within(racy("bitmap", faults=("no-flush-wait",), duration=0.8, rounds=80,
                         workload=Workload("trace", trace=str(trace))))
    assert r.lost_pages > 0, "no loss in 6 runs of 80 rounds"


def test_racy_setup_clean_without_faults(tmp_path):
    trace = tmp_path / "pairs.npy"
    np.save(trace, np.repeat(np.arange(16 << 8, dtype=np.uint64), 2))
    for wl in (Workload("trace", trace=str(trace)), Workload("hotcold", hot_fraction=0.02)):
        r = run(racy("bitmap", duration=0.2, rounds=10, workload=wl))
        assert (r.lost_pages, r.problems) == (0, [])


@pytest.mark.skipif("ring" not in DESIGNS, reason="kvmdirty._ring is not built")
def test_publish_early_caught():
    # DIRTY is visible before slot/offset: the reaper harvests the previous lap's page.
    # On one CPU the reaper preempts a vCPU at a random point each time it
    # wakes, and a pusher spends most of its time between the early DIRTY and
    # the payload, so nearly every round loses a page -- also under
    # ThreadSanitizer, where on two CPUs the slowed reaper rarely reaches the
    # ring head while a push is under way.
    r = lost_within(racy("ring", ring_knobs=("publish_early",), duration=0.2, rounds=10,
                         workload=Workload("uniform"), memory=64 << 20))
    assert r.lost_pages > 0, "no loss in 6 runs of 10 rounds"


@pytest.mark.skipif("ring" not in DESIGNS, reason="kvmdirty._ring is not built")
def test_ring_clean_threads():
    r = run(racy("ring", duration=0.2, rounds=10, cpus=None, workload=Workload("uniform"),
                 memory=64 << 20))
    assert (r.lost_pages, r.problems) == (0, [])


def _sequence_survives(relaxed: bool, total: int) -> bool:
    """A producer thread pushes sequence numbers while this thread collects.

    Returns whether every number was collected once, in order.  The relaxed
    collector reads the payload before the flag, so at the ring head it can
    hand out an entry's previous lap: one number twice, a new one never.
    """
    import threading

    from kvmdirty._ring import DirtyRing

    ring = DirtyRing(256)
    ring.relaxed_collect = relaxed
    seen = []
    done = threading.Event()

    def producer():
        seq = np.arange(total, dtype=np.uint64)
        slots = np.zeros(total, np.uint32)
        pos = 0
        while pos < total:
            pos += ring.push_many(slots[pos:pos + 64], seq[pos:pos + 64])
            ring.reset()
        done.set()

    t = threading.Thread(target=producer)
    t.start()
    while not done.is_set():
        seen.append(ring.collect()[1])
    t.join()
    seen.append(ring.collect()[1])
    got = np.concatenate(seen)
    return bool(len(got) == total and (got == np.arange(total, dtype=np.uint64)).all())


@pytest.mark.skipif("ring" not in DESIGNS, reason="kvmdirty._ring is not built")
def test_correct_collect_keeps_the_sequence():
    assert _sequence_survives(relaxed=False, total=200_000)


@pytest.mark.slow
@pytest.mark.skipif("ring" not in DESIGNS, reason="kvmdirty._ring is not built")
def test_relaxed_collect_caught_eventually():
    """x86 never reorders loads with loads, so relaxed_collect's hoisted payload
    load only bites when the collector waits at the ring head exactly while the
    entry is published: seen within seconds to a minute here, too slow and too
    variable for the default run (run it with `pytest -m slow`, as .ci/stress.sh does)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if not _sequence_survives(relaxed=True, total=400_000):
            return
    pytest.fail("relaxed_collect was not caught within 120 s")
