"""Concurrency stress: 2 vCPU threads write while a collector thread harvests, for every design.

Nothing may be lost or duplicated.  Each guest write stores a distinct value
(vCPU id << 40 | sequence number); the collector keeps a destination copy of
guest memory updated only from harvested pages, read after the harvest has
re-protected them (kvmdirty.verify.ShadowCopy when it exists).  At the end the
vCPUs are stopped, one last harvest is copied, and the copy must equal guest
memory.  For the ring designs every entry pushed must be collected exactly
once, and KVM_RESET_DIRTY_RINGS must reset exactly what was collected.

Size: by default (CI) each design runs rounds of 10^6 guest writes (all to
logged pages, each round a new seed) for ``KVMDIRTY_STRESS_SECONDS`` (6 s; 1.5 s
under the sanitizer), so the whole file takes about a minute on 2 cores.
With ``KVMDIRTY_STRESS_EVENTS=N`` each design runs one round of N writes
instead, however long it takes: ``.ci/stress.sh`` does 10^7.
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

import kvmdirty
from kvmdirty import _bitmap
from kvmdirty.api import EXIT_DIRTY_LOG_FULL, EXIT_DIRTY_RING_FULL
from kvmdirty.vm import MEM_LOG_DIRTY_PAGES as LOG

SANITIZER = bool(os.environ.get("KVMDIRTY_SANITIZER_RUN"))
EVENTS = int(float(os.environ.get("KVMDIRTY_STRESS_EVENTS", "0")))
#: A round that takes longer than this is a hang (a stuck flush, a vCPU never let out of FULL).
HANG_SECONDS = float(os.environ.get("KVMDIRTY_STRESS_HANG_SECONDS", "120"))
SECONDS = float(os.environ.get("KVMDIRTY_STRESS_SECONDS", "1.5" if SANITIZER else "6"))
ROUND = 1_000_000
NPAGES = (1 << 16) + 3          # not a multiple of 64, as the kernel selftest does
CHUNK = 1 << 14
RING_ENTRIES = 4096
SLOT = 0

try:
    from kvmdirty.seeds import DESIGNS as _SEEDS
    SEED_DESIGNS = sorted(_SEEDS)
except ImportError:
    SEED_DESIGNS = []
HAVE_RING = __import__("importlib").util.find_spec("kvmdirty._ring") is not None
DESIGNS = ["bitmap", "clear-log"] + (["ring"] if HAVE_RING else []) + SEED_DESIGNS

try:
    from kvmdirty.verify import ShadowCopy
except ImportError:             # pragma: no cover - before kvmdirty.verify existed
    ShadowCopy = None


class _Shadow:
    """A minimal ShadowCopy, used only if kvmdirty.verify is missing."""

    def __init__(self, vm, slots):
        self.vm = vm
        self.dest = {sid: np.array(vm.memory(sid)) for sid, _b, _n in slots}
        self.bogus = 0
        self.count = 0

    def absorb(self, harvest):
        for sid, offs in harvest.items():
            ok = offs < len(self.dest[sid])
            self.bogus += int((~ok).sum())
            offs = offs[ok]
            self.dest[sid][offs] = self.vm.memory(sid)[offs]

    def finish(self):
        self.count = sum(int((self.dest[s] != self.vm.memory(s)).sum()) for s in self.dest)


class Harvester:
    """One design's harvest, as a VMM does it; counts what it saw."""

    def __init__(self, design):
        self.design = design
        self.collected = 0       # ring entries collected
        self.reset = 0           # entries KVM_RESET_DIRTY_RINGS reported
        self.harvests = 0
        self.pages = 0

    def make_vm(self):
        if self.design in SEED_DESIGNS:
            vm = kvmdirty.VM(design=self.design)
        else:
            vm = kvmdirty.VM()
            if self.design == "clear-log":
                vm.enable_manual_protect(initially_set=True)
            elif self.design == "ring":
                vm.enable_dirty_ring(RING_ENTRIES)
        vm.set_user_memory_region(SLOT, 0, NPAGES << 12, LOG)
        self.vm = vm
        return vm

    def __call__(self):
        vm, d = self.vm, self.design
        self.harvests += 1
        if d == "bitmap":
            offs = _bitmap.to_gfns(vm.get_dirty_log(SLOT))
        elif d == "clear-log":
            words = vm.get_dirty_log(SLOT)
            offs = _bitmap.to_gfns(words)
            if len(offs):
                vm.clear_dirty_log(SLOT, 0, NPAGES, words)
        elif d == "ring":
            parts = []
            for v in list(vm.vcpus.values()):
                s, o = v.dirty_ring.collect()
                assert (s == SLOT).all()
                parts.append(o)
            offs = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
            self.collected += len(offs)
            n = vm.reset_dirty_rings()
            assert n == len(offs), f"KVM_RESET_DIRTY_RINGS reset {n}, {len(offs)} were collected"
            self.reset += n
        else:
            h = vm.design.harvest()
            offs = np.concatenate([np.asarray(o, np.uint64) for o in h.values()]) if h else np.zeros(0, np.uint64)
            assert set(h) <= {SLOT}
        self.pages += len(offs)
        return {SLOT: np.asarray(offs, dtype=np.uint64)}


def run_stress(design, events, seed=1):
    h = Harvester(design)
    vm = h.make_vm()
    vcpus = [vm.create_vcpu(i) for i in range(2)]
    shadow = (ShadowCopy or _Shadow)(vm, [(SLOT, 0, NPAGES)])
    stop = threading.Event()
    kick = threading.Event()
    errors = []
    full_exits = [0, 0]
    per_vcpu = events // 2

    def guest(v):
        try:
            rng = np.random.default_rng(seed * 100 + v.id)
            hot = rng.integers(0, NPAGES, 512)      # a hot set keeps TLB entries live
            done = 0
            while done < per_vcpu:
                n = min(CHUNK, per_vcpu - done)
                gfns = np.where(rng.random(n) < 0.5, rng.choice(hot, n),
                                rng.integers(0, NPAGES, n)).astype(np.uint64)
                vals = (np.uint64(v.id + 1) << np.uint64(40)) + np.arange(done, done + n, dtype=np.uint64)
                ex = v.run(gfns, vals)
                while not ex.done:
                    assert ex.reason in (EXIT_DIRTY_RING_FULL, EXIT_DIRTY_LOG_FULL), ex
                    full_exits[v.id] += 1
                    kick.set()                       # QEMU: a full ring triggers a harvest
                    time.sleep(0.0005)
                    ex = v.run()
                done += n
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    def collector():
        try:
            while not stop.is_set():        # harvest back to back: as many races as possible
                shadow.absorb(h())
                kick.clear()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    col = threading.Thread(target=collector, name="collector", daemon=True)
    threads = [threading.Thread(target=guest, args=(v,), name=f"vcpu{v.id}", daemon=True) for v in vcpus]
    t0 = time.perf_counter()
    col.start()
    for t in threads:
        t.start()
    deadline = t0 + HANG_SECONDS * max(1, events / 1e7)
    for t in threads:
        t.join(max(0.0, deadline - time.perf_counter()))
    stop.set()
    col.join(max(1.0, deadline - time.perf_counter()))
    stuck = [t.name for t in threads + [col] if t.is_alive()]
    assert not stuck, f"{design}: {stuck} still running after {time.perf_counter() - t0:.0f} s " \
                      f"(writes so far {vm.stats['writes']}, full exits {full_exits}, harvests {h.harvests})"
    assert not errors, errors
    shadow.absorb(h())                  # stop-and-copy: vCPUs stopped, one last harvest
    shadow.finish()
    elapsed = time.perf_counter() - t0
    stats = vm.stats
    result = dict(design=design, writes=stats["writes"], dirty_logged=stats["dirty_logged"],
                  harvests=h.harvests, pages=h.pages, lost=shadow.count, bogus=shadow.bogus,
                  full_exits=sum(full_exits), seconds=round(elapsed, 2))
    if design == "ring":
        pushes = sum(v.dirty_ring.stats["pushes"] for v in vcpus)
        result.update(pushes=pushes, collected=h.collected, reset=h.reset)
        # Every entry pushed was collected exactly once and reset exactly once.
        assert h.collected == pushes == h.reset, result
        assert all(v.dirty_ring.used == 0 for v in vcpus)
    vm.close()
    return result


@pytest.mark.parametrize("design", DESIGNS)
def test_stress_no_loss(design, request):
    t0 = time.perf_counter()
    rounds, total = 0, 0
    while True:
        events = EVENTS or ROUND
        r = run_stress(design, events, seed=rounds + 1)
        rounds += 1
        total += r["writes"]
        print(r)
        assert r["writes"] == (events // 2) * 2
        assert r["harvests"] >= 2, r
        assert r["bogus"] == 0, r
        assert r["lost"] == 0, f"lost writes: {r}"
        if EVENTS or time.perf_counter() - t0 >= SECONDS:
            break
    request.node.user_properties.append(("stress_events", total))
    print(f"{design}: {total} writes in {rounds} rounds, {time.perf_counter() - t0:.1f} s, nothing lost")
