"""Concurrency: producers push (GIL released) while a collector collects and resets."""
from __future__ import annotations

import os
import threading
import time

import numpy as np

from kvmdirty._ring import DirtyRing
from ring_model import make_mmu

# 2 writers: 1.2 million entries in all (a tenth under a sanitizer: TSan is ~10x slower).
PER_WRITER = 60_000 if os.environ.get("KVMDIRTY_SANITIZER_RUN") else 600_000
CHUNK = 700


def _writer(ring: DirtyRing, wid: int, errors: list) -> None:
    try:
        slots = np.full(PER_WRITER, wid, np.uint32)
        seq = np.arange(PER_WRITER, dtype=np.uint64)
        pos = 0
        while pos < PER_WRITER:
            end = min(pos + CHUNK, PER_WRITER)
            k = ring.push_many(slots[pos:end], seq[pos:end])
            pos += k
            if k == 0:
                time.sleep(0)          # ring full: let the collector run
    except BaseException as e:          # pragma: no cover - reported below
        errors.append(e)


def test_two_writers_one_collector_nothing_lost_or_duplicated():
    mmu, _ = make_mmu(slot_id=1, npages=1 << 20)
    rings = [DirtyRing(4096), DirtyRing(4096)]
    errors: list = []
    writers = [threading.Thread(target=_writer, args=(r, i + 1, errors)) for i, r in enumerate(rings)]
    expect = [0, 0]
    bs, bo = np.empty(4096, np.uint32), np.empty(4096, np.uint64)
    for t in writers:
        t.start()
    deadline = time.monotonic() + 120
    while (expect[0] < PER_WRITER or expect[1] < PER_WRITER) and time.monotonic() < deadline:
        for i, r in enumerate(rings):
            s, o = r.collect(out_slots=bs, out_offsets=bo)
            n = len(o)
            if n:
                # In order, each sequence number exactly once, and never another writer's.
                assert (s == i + 1).all()
                assert o[0] == expect[i] and (np.diff(o.astype(np.int64)) == 1).all(), (i, expect[i], o[:5])
                expect[i] += n
            assert r.reset(mmu) == n
    for t in writers:
        t.join(60)
    assert not errors and expect == [PER_WRITER, PER_WRITER]
    for r in rings:
        st = r.stats
        assert st["pushes"] == st["collected"] == st["resets"] == PER_WRITER
        assert r.used == 0 and st["overflows"] == 0


def test_shared_collector_and_resetter_threads_on_one_ring():
    # Producer, collector and resetter in three threads on the same ring.
    ring = DirtyRing(1024)
    total = 200_000
    got = []
    stop = threading.Event()

    def collector():
        nxt = 0
        while nxt < total:
            s, o = ring.collect()
            if len(o):
                assert o[0] == nxt and (np.diff(o.astype(np.int64)) == 1).all()
                nxt += len(o)
        got.append(nxt)

    def resetter():
        while not stop.is_set():
            ring.reset()
        ring.reset()

    threads = [threading.Thread(target=collector), threading.Thread(target=resetter)]
    for t in threads:
        t.start()
    seq = np.arange(total, dtype=np.uint64)
    slots = np.zeros(total, np.uint32)
    pos = 0
    while pos < total:
        pos += ring.push_many(slots[pos:pos + 256], seq[pos:pos + 256]) or (time.sleep(0) or 0)
    threads[0].join(60)
    stop.set()
    threads[1].join(60)
    assert got == [total] and ring.stats["resets"] == total and ring.used == 0
