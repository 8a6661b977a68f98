"""A hostile user of the simulated VM: misuse, races, interrupts, memory exhaustion, fork, close mid-call.

Every test here states the promise it checks: no crash, no hang, no lost
write, and a failed call changes nothing.  Crash- and hang-prone checks run
in a subprocess with a timeout so that a regression fails instead of killing
or wedging the test run.
"""
import errno
import os
import subprocess
import sys
import threading
from array import array

import numpy as np
import pytest

import kvmdirty
from kvmdirty import KvmError, _mmu, _uapi
from kvmdirty.vm import MEM_LOG_DIRTY_PAGES as LOG

import child

MiB = 1 << 20
RING = _uapi.CAP_DIRTY_LOG_RING_ACQ_REL


def run_script(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter using this kvmdirty; fail (not hang) on timeout."""
    try:
        return child.python(code, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"hung for {timeout} s; output so far: {e.stdout!r} {e.stderr!r}")


def lock_is_free(vm) -> bool:
    lock = vm.slots_lock
    return lock.readers == 0 and not lock.writer


def close_within(vm, seconds: float = 10.0) -> bool:
    t = threading.Thread(target=vm.close, daemon=True)
    t.start()
    t.join(seconds)
    return not t.is_alive()


def race(n_threads, target, *args):
    """Start n_threads at once (barrier); return each one's result or exception."""
    barrier = threading.Barrier(n_threads)
    out = [None] * n_threads

    def body(i):
        barrier.wait()
        try:
            out[i] = target(i, *args)
        except BaseException as e:         # noqa: BLE001 - the race's outcome
            out[i] = e

    ts = [threading.Thread(target=body, args=(i,)) for i in range(n_threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out


@pytest.fixture
def fast_switching():
    """Switch threads every microsecond so that Python-level check-then-act windows really race."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


# -- compiled classes cannot be built in a crashing state (item 2) ----------------

def test_compiled_classes_refuse_direct_construction_or_are_valid():
    r = run_script("""
        import numpy as np
        from kvmdirty import _mmu
        from kvmdirty import _uapi
        mmu = _mmu.Mmu()                      # valid on its own
        mmu.flush_remote_tlbs()
        assert mmu.host_write(np.arange(3, dtype=np.uint64), 1) == 0
        assert mmu.protect(0, 0, 1) is False
        core = mmu.new_vcpu(0)
        assert core.run(np.arange(3, dtype=np.uint64), 1)[0] == _uapi.EXIT_MMIO   # no slot
        mmu.set_slots([(0, 0, 64, 0, np.zeros(1, np.uint64), np.zeros(64, np.uint64), None)])
        assert core.run(np.arange(3, dtype=np.uint64), 1)[0] == _uapi.EXIT_HLT
        for make in (lambda: _mmu.VcpuCore(mmu, 0), lambda: _mmu.VcpuCore(mmu, 0, None),
                     lambda: _mmu.SlotLock(mmu, None), lambda: _mmu._ReadSide(mmu, None),
                     lambda: _mmu._WriteSide(mmu, None)):
            try:
                obj = make()
            except TypeError:
                continue
            obj.run(np.arange(3, dtype=np.uint64), 1)   # if built, it must be usable
        print("ok")
    """, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])


# -- MemoryError changes nothing (item 3) -----------------------------------------

def vm_state(vm):
    return (sorted((s.slot, s.base_gfn, s.npages, s.flags, None if s.dirty is None else s.dirty.tobytes(),
                    s.values.tobytes(), s.writable.tobytes()) for s in vm.slots.values()),
            sorted(vm.vcpus), vm.dirty_ring_size, vm.mmu.nslots, vm.mmu.nvcpus)


CHANGES = [
    ("create", lambda vm: vm.set_user_memory_region(3, 64 * MiB, 2 * MiB, LOG)),
    ("create in address space 1", lambda vm: vm.set_user_memory_region((1 << 16) | 3, 0, MiB, LOG)),
    ("move", lambda vm: vm.set_user_memory_region(1, 96 * MiB, MiB, 0)),
    ("logging on", lambda vm: vm.set_user_memory_region(1, 16 * MiB, MiB, LOG)),
    ("delete", lambda vm: vm.set_user_memory_region(1, 16 * MiB, 0, 0)),
    ("create vCPU", lambda vm: vm.create_vcpu(7)),
]


@pytest.mark.parametrize("name,change", CHANGES, ids=[c[0] for c in CHANGES])
def test_injected_allocation_failure_at_every_step_changes_nothing(name, change):
    k = 1
    while True:
        vm = kvmdirty.VM()
        vm.set_user_memory_region(0, 0, 4 * MiB, LOG)
        vm.set_user_memory_region(1, 16 * MiB, MiB, 0)
        vs = [vm.create_vcpu(i) for i in range(2)]
        for v in vs:
            v.run(np.arange(0, 1024, 7, dtype=np.uint64), 5)
        before = vm_state(vm)
        _mmu._inject_alloc_failure(k)
        try:
            change(vm)
        except MemoryError:
            assert vm_state(vm) == before, f"allocation {k} failed and changed the VM"
            ok = False
        else:
            ok = True
        finally:
            pending = _mmu._inject_alloc_failure(0)
        # Whatever happened, the VM works: runs, harvests, closes.
        for v in vs:
            assert v.run(np.arange(0, 1024, 3, dtype=np.uint64), 6).done
        assert lock_is_free(vm)
        kvmdirty._bitmap.to_gfns(vm.get_dirty_log(0))
        vm.close()
        if ok and pending:
            break                      # the call needed fewer than k allocations
        assert k < 64
        k += 1
    assert k > 1 or name == "delete", "the change never allocated through the checked allocator"


@pytest.mark.skipif(bool(os.environ.get("KVMDIRTY_SANITIZER_RUN")),
                    reason="ASan reserves terabytes of shadow address space: RLIMIT_AS cannot be applied")
def test_memory_error_under_rlimit_as_changes_nothing():
    # 64 vCPUs and a 64 GiB slot: the slot's memory fits under the limit; the
    # old code's per-vCPU TLB bitmaps (2 MiB each) did not, and failed half-way.
    r = run_script("""
        import resource, numpy as np, kvmdirty
        from kvmdirty.vm import MEM_LOG_DIRTY_PAGES as LOG
        vm = kvmdirty.VM()
        vm.set_user_memory_region(0, 0, 1 << 24, LOG)
        vs = [vm.create_vcpu(i) for i in range(64)]
        for v in vs[:4]:
            v.run(np.arange(0, 4096, 5, dtype=np.uint64), 1)
        def vmsize():
            for line in open("/proc/self/status"):
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
        npages = 1 << 24
        need = npages * 8 + 2 * (npages // 8)         # values + W bits + dirty bitmap
        lim = vmsize() + need + (48 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (lim, resource.RLIM_INFINITY))
        before = sorted(vm.slots)
        try:
            vm.set_user_memory_region(1, 1 << 40, npages << 12, LOG)
            outcome = "created"
            assert sorted(vm.slots) == [0, 1]
        except MemoryError:
            outcome = "refused"
            assert sorted(vm.slots) == before, sorted(vm.slots)
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        for v in vs:
            assert v.run(np.array([1, 2, (1 << 28) + 5], np.uint64), 2).writes >= 2
        kvmdirty._bitmap.to_gfns(vm.get_dirty_log(0))
        vm.close()
        print(outcome)
    """, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() in ("created", "refused")


# -- reset_dirty_rings failing part-way still flushes (item 5) --------------------

def ring_vm(nvcpus=2, entries=4096):
    vm = kvmdirty.VM()
    vm.enable_dirty_ring(entries)
    vm.set_user_memory_region(0, 0, 4 * MiB, LOG)
    return vm, [vm.create_vcpu(i) for i in range(nvcpus)]


def test_reset_with_a_closed_ring_still_flushes_tlbs():
    vm, (v0, v1) = ring_vm()
    v0.run(np.array([10, 11], np.uint64), 1)
    v1.run(np.array([20], np.uint64), 1)
    v0.dirty_ring.collect()
    v1.dirty_ring.collect()
    v1.dirty_ring.close()                      # the user closed one vCPU's ring
    with pytest.raises(ValueError):
        vm.reset_dirty_rings()
    # Ring 0 was reset (pages 10, 11 re-protected): v0's TLB must not let a write through unlogged.
    v0.run(np.array([10], np.uint64), 2)
    slots, offsets = v0.dirty_ring.collect()
    assert offsets.tolist() == [10], "a write through a stale TLB entry was not logged"


def test_concurrent_resets_are_serialised(fast_switching):
    for trial in range(60):
        vm, vs = ring_vm(nvcpus=4)
        for v in vs:
            v.run(np.arange(v.id * 200, v.id * 200 + 150, dtype=np.uint64), 1)
        harvested = sum(len(v.dirty_ring.collect()[1]) for v in vs)
        out = race(3, lambda i: vm.reset_dirty_rings())
        errors = [o for o in out if isinstance(o, BaseException)]
        assert not errors, f"trial {trial}: {errors}"
        assert sum(out) == harvested
        vm.close()


# -- check-then-act under KVM's locks (item 6) -------------------------------------

def test_enable_ring_vs_create_vcpu(fast_switching):
    for trial in range(200):
        vm = kvmdirty.VM()
        out = race(2, lambda i: vm.enable_dirty_ring(4096) if i == 0 else vm.create_vcpu(0))
        ring_ok, vcpu = not isinstance(out[0], BaseException), out[1]
        assert not isinstance(vcpu, BaseException), vcpu
        if ring_ok:
            assert vcpu.dirty_ring is not None, f"trial {trial}: ring-only VM with a ring-less vCPU"
        else:
            assert isinstance(out[0], KvmError) and out[0].errno == errno.EINVAL
            assert vm.dirty_ring_size == 0


def test_overlapping_slots_race(fast_switching):
    for trial in range(200):
        vm = kvmdirty.VM()
        out = race(2, lambda i: vm.set_user_memory_region(i, (i * 2) * MiB, 4 * MiB, 0))
        ok = [o for o in out if not isinstance(o, BaseException)]
        assert len(ok) == 1, f"trial {trial}: {out}"
        assert all(o.errno == errno.EEXIST for o in out if isinstance(o, BaseException))
        assert len(vm.slots) == 1


def test_create_same_vcpu_id_race(fast_switching):
    for trial in range(200):
        vm = kvmdirty.VM()
        out = race(3, lambda i: vm.create_vcpu(0))
        ok = [o for o in out if not isinstance(o, BaseException)]
        assert len(ok) == 1, f"trial {trial}: {out}"
        assert all(o.errno == errno.EEXIST for o in out if isinstance(o, BaseException))
        assert vm.mmu.nvcpus == 1


def test_stats_while_vcpus_are_created(fast_switching):
    vm = kvmdirty.VM(max_vcpus=4096)
    stop = threading.Event()
    errors = []

    def reader():
        while not stop.is_set():
            try:
                vm.stats
            except Exception as e:             # noqa: BLE001
                errors.append(e)
                return

    t = threading.Thread(target=reader)
    t.start()
    for i in range(3000):
        vm.create_vcpu(i)
    stop.set()
    t.join()
    assert not errors, errors[0]


# -- the ring size is a u32 (item 11) -----------------------------------------------

def test_ring_size_is_read_as_u32():
    vm = kvmdirty.VM()
    vm.enable_cap(RING, (1 << 32) + 65536)     # /dev/kvm: a 64 KiB ring
    assert vm.dirty_ring_size == 65536
    vm2 = kvmdirty.VM()
    with pytest.raises(KvmError) as e:
        vm2.enable_cap(RING, 1 << 32)           # truncates to 0
    assert e.value.errno == errno.EINVAL


# -- interrupts (item 12) -------------------------------------------------------------

KVMDIRTY_DIR = os.path.dirname(os.path.abspath(kvmdirty.__file__))


class Interrupter:
    """A trace function raising KeyboardInterrupt at the k-th point of kvmdirty's Python code.

    Points are where CPython 3.11 checks for signals, or next to them:
    function entry (RESUME) and the start of each statement (just after the
    previous statement's calls returned).  A line visited again in the same
    frame is skipped: those are a with-statement's or try's exit sequence,
    which CPython runs without checking for signals (only a tracer could
    raise there), or loop back-edges already covered by their first visit.
    """

    def __init__(self, k):
        self.k = k
        self.fired = False
        self.seen = set()

    def __call__(self, frame, event, arg):
        if self.fired:
            return None
        if event == "call":
            if not frame.f_code.co_filename.startswith(KVMDIRTY_DIR):
                return None
        elif event == "line":
            key = (id(frame), frame.f_lineno)
            if key in self.seen:
                return self
            self.seen.add(key)
        else:
            return self
        self.k -= 1
        if self.k == 0:
            self.fired = True
            raise KeyboardInterrupt
        return self

    def run(self, fn):
        sys.settrace(self)
        try:
            return fn()
        finally:
            sys.settrace(None)


def interrupted_everywhere(make, call, check, limit=400):
    """Interrupt ``call(obj)`` at its 1st, 2nd, ... line until it completes; check after each."""
    for k in range(1, limit):
        obj = make()
        it = Interrupter(k)
        try:
            it.run(lambda: call(obj))
        except KeyboardInterrupt:
            assert it.fired
        check(obj, it.fired)
        if not it.fired:
            return k
    pytest.fail("the call never completed")


def _base_vm():
    vm = kvmdirty.VM()
    vm.set_user_memory_region(0, 0, 4 * MiB, LOG)
    v = vm.create_vcpu(0)
    v.run(np.arange(0, 1000, 3, dtype=np.uint64), 1)
    return vm


def _consistent(vm, fired):
    assert lock_is_free(vm)
    assert sorted(vm.slots) == sorted(s for s in vm.slots)            # no phantom entries
    assert vm.mmu.nslots == len(vm.slots)
    assert vm.mmu.nvcpus == len(vm.vcpus)
    if not vm.closed:
        for v in vm.vcpus.values():
            v.run(np.arange(0, 500, 7, dtype=np.uint64), 2)
    assert close_within(vm), "vm.close() hung after an interrupt"


INTERRUPTED = [
    ("create slot", lambda vm: vm.set_user_memory_region(5, 64 * MiB, MiB, LOG)),
    ("move slot", lambda vm: vm.set_user_memory_region(0, 64 * MiB, 4 * MiB, LOG)),
    ("delete slot", lambda vm: vm.set_user_memory_region(0, 0, 0, 0)),
    ("create vCPU", lambda vm: vm.create_vcpu(3)),
    ("get dirty log", lambda vm: vm.get_dirty_log(0)),
    ("run", lambda vm: vm.vcpus[0].run(np.arange(100, dtype=np.uint64), 9)),
    ("write_guest", lambda vm: vm.write_guest([1, 2, 3], 4)),
    ("user lock", lambda vm: _hold_read(vm)),
    ("close", lambda vm: vm.close()),
]


def _hold_read(vm):
    with vm.slots_lock.read():
        vm.stats


@pytest.mark.parametrize("name,call", INTERRUPTED, ids=[c[0] for c in INTERRUPTED])
def test_interrupt_at_every_line_leaves_the_vm_consistent(name, call):
    interrupted_everywhere(_base_vm, call, _consistent)


def test_interrupted_slot_change_is_all_or_nothing():
    def check(vm, fired):
        s = vm.slots.get(5)
        assert s is None or (s.base_gfn == (64 * MiB) >> 12 and vm.mmu.overlaps(6, s.base_gfn, 1))
        # The slot is usable iff it is there.
        v = vm.vcpus[0]
        e = v.run(np.array([(64 * MiB >> 12) + 1], np.uint64), 3)
        assert (e.name == "HLT") == (s is not None)
        assert close_within(vm)
    interrupted_everywhere(_base_vm, lambda vm: vm.set_user_memory_region(5, 64 * MiB, MiB, LOG), check)


def test_interrupted_run_keeps_the_vcpu_position():
    plan = np.arange(0, 3000, dtype=np.uint64)

    def make():
        vm = kvmdirty.VM()
        vm.set_user_memory_region(0, 0, 16 * MiB, LOG)
        vm.create_vcpu(0)
        return vm

    def check(vm, fired):
        v = vm.vcpus[0]
        written = int((vm.memory(0)[: len(plan)] == 7).sum())
        if v.remaining or written:
            assert v.remaining == len(plan) - written, (v.remaining, written)
        e = v.run() if v.remaining else None
        if e is not None:
            assert e.done and e.writes == len(plan) - written
        if written or e is not None:
            assert vm.stats["writes"] == len(plan), "writes were replayed or lost"
        assert close_within(vm)

    interrupted_everywhere(make, lambda vm: vm.vcpus[0].run(plan, 7), check)


def test_sigint_storm_never_wedges_the_vm():
    """SIGINT delivered at random moments to a thread doing VM calls, hundreds of times."""
    import signal
    # Signals are delivered to the main thread: pytest runs every test there.
    assert threading.current_thread() is threading.main_thread()
    vm = kvmdirty.VM()
    vm.set_user_memory_region(0, 0, 4 * MiB, LOG)
    v = vm.create_vcpu(0)
    rng = np.random.default_rng(5)
    main = threading.get_ident()
    interrupts = 0
    armed = [False]

    def handler(sig, frame):
        # Raise only inside the trial: a signal handled late (after it) is ignored.
        if armed[0]:
            armed[0] = False
            raise KeyboardInterrupt

    old = signal.signal(signal.SIGINT, handler)
    try:
        for trial in range(300):
            delay = float(rng.uniform(0, 0.002))
            timer = threading.Timer(delay, signal.pthread_kill, (main, signal.SIGINT))
            armed[0] = True
            try:
                timer.start()
                k = trial % 4
                for _ in range(5):
                    if k == 0:
                        vm.set_user_memory_region(1, 64 * MiB, MiB, LOG)
                        vm.set_user_memory_region(1, 64 * MiB, 0, 0)
                    elif k == 1:
                        v.run(rng.integers(0, 1024, 2000).astype(np.uint64), trial)
                    elif k == 2:
                        vm.get_dirty_log(0)
                    else:
                        with vm.slots_lock.read():
                            pass
                timer.join()
            except KeyboardInterrupt:
                interrupts += 1
            finally:
                armed[0] = False
                timer.join()
            assert lock_is_free(vm)
            assert vm.mmu.nslots == len(vm.slots)
    finally:
        signal.signal(signal.SIGINT, old)
    if 1 in vm.slots:
        vm.set_user_memory_region(1, 64 * MiB, 0, 0)
    assert v.run(np.arange(10, dtype=np.uint64), 1).done
    assert close_within(vm)
    assert interrupts > 0


# -- fork while another thread is inside a VM call (item 13) ----------------------------

def test_fork_during_a_vm_call_gives_eio_and_never_hangs():
    r = run_script("""
        import errno, os, threading, numpy as np, kvmdirty
        from kvmdirty.vm import MEM_LOG_DIRTY_PAGES as LOG
        vm = kvmdirty.VM()
        vm.set_user_memory_region(0, 0, 64 << 20, LOG)
        v = vm.create_vcpu(0)
        plan = np.random.default_rng(1).integers(0, 16384, 30_000_000).astype(np.uint64)
        t = threading.Thread(target=v.run, args=(plan, 1))
        t.start()
        while vm.slots_lock.readers == 0:
            pass                                   # the vCPU is inside its run
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                for call in (lambda: vm.create_vcpu(1), lambda: v.run([1], 1),
                             lambda: vm.get_dirty_log(0),
                             lambda: vm.set_user_memory_region(1, 1 << 30, 4096, 0)):
                    try:
                        call()
                        code = 3
                    except kvmdirty.KvmError as e:
                        if e.errno != errno.EIO:
                            code = 4
                vm.close()                          # must not wait for the parent's thread
                vm.close()
            except BaseException as e:
                print(repr(e))
                code = 5
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        t.join()
        vm.close()
        print(os.waitstatus_to_exitcode(status))
    """, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "0", r.stdout


# -- scale: slots and TLBs (items 16, 17) ------------------------------------------------

def test_all_32764_slots_with_4_vcpus():
    # 4 vCPUs and KVM's maximum of slots; the old table rebuild was quadratic
    # (4,000 slots took 40 s).  A generous bound: this takes a few seconds.
    import time
    vm = kvmdirty.VM()
    vs = [vm.create_vcpu(i) for i in range(4)]
    t0 = time.perf_counter()
    for i in range(32764):
        vm.set_user_memory_region(i, i * 8192, 4096, LOG if i % 2 else 0)
    took = time.perf_counter() - t0
    assert len(vm.slots) == 32764 and vm.mmu.nslots == 32764
    with pytest.raises(KvmError) as e:
        vm.set_user_memory_region(100, 8192 * 101, 4096, 0)       # move onto slot 101
    assert e.value.errno == errno.EEXIST
    gfns = np.arange(0, 32764 * 2, 2, dtype=np.uint64)
    for v in vs:
        assert v.run(gfns, 1).done
    assert len(kvmdirty._bitmap.to_gfns(vm.get_dirty_log(1))) == 1
    assert took < 120, f"{took:.1f} s for 32,764 slots"


TLB_RSS_SCRIPT = """
    import sys, numpy as np, kvmdirty
    from kvmdirty.vm import MEM_LOG_DIRTY_PAGES as LOG
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096
    vm = kvmdirty.VM()
    vm.set_user_memory_region(0, 0, 1 << 40, LOG)         # 1 TiB
    vs = [vm.create_vcpu(i) for i in range(NVCPUS)]
    plan = (np.arange(64, dtype=np.uint64) * np.uint64(1 << 22))
    before = rss()
    for _ in range(4):                                     # run, harvest (flush), run again
        for v in vs:
            v.run(plan, 1)
        vm.get_dirty_log(0)
    print(rss() - before)
"""


def test_tlb_memory_follows_what_is_cached():
    # The same pages written by 1 and by 8 vCPUs: guest memory (and its
    # transparent huge pages) is the same; the difference is the 7 extra TLBs,
    # which cache 64 pages each.  The old per-vCPU TLB bitmap of a 1 TiB slot
    # was 32 MiB, made resident by fills and flushes: +224 MiB here.
    grown = {}
    for n in (1, 8):
        r = run_script(TLB_RSS_SCRIPT.replace("NVCPUS", str(n)), timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        grown[n] = int(r.stdout.strip())
    extra = (grown[8] - grown[1]) >> 20
    assert extra < 32, f"7 more vCPUs cost {extra} MiB of RSS ({grown})"


def test_tlb_chunks_are_freed_by_a_flush():
    vm = kvmdirty.VM()
    vm.set_user_memory_region(0, 0, 1 << 36, LOG)
    v = vm.create_vcpu(0)
    v.run(np.arange(0, 1 << 24, 1 << 18, dtype=np.uint64), 1)        # 64 pages in 64 chunks
    assert v.core.tlb_chunks == 64
    vm.get_dirty_log(0)                                              # harvest: flush request
    v.run(np.array([5], np.uint64), 1)                              # honoured on entry
    assert v.core.tlb_chunks == 1


# -- one validator for every entry point (item 18) ---------------------------------------

def test_run_with_bad_budget_keeps_the_current_plan():
    vm = _base_vm()
    v = vm.vcpus[0]
    v.run(np.arange(50, dtype=np.uint64), 1, max_writes=10)
    assert v.remaining == 40
    for bad, exc in ((1 << 64, ValueError), (0, ValueError), (-1, ValueError), (1.5, TypeError),
                     ("3", TypeError), (True, TypeError)):
        with pytest.raises(exc):
            v.run(np.arange(7, dtype=np.uint64), 1, max_writes=bad)
        assert v.remaining == 40
    assert v.run().done


def test_negative_values_are_refused_like_a_negative_scalar():
    vm = _base_vm()
    v = vm.vcpus[0]
    with pytest.raises(ValueError):
        v.run([1, 2], -1)
    with pytest.raises(ValueError):
        v.run([1, 2], np.array([5, -1]))
    with pytest.raises(ValueError):
        v.run([1, 2], [5, -1])
    assert vm.memory(0)[2] == 0


@pytest.mark.parametrize("bad,exc", [("5", TypeError), (1.9, TypeError), (True, TypeError),
                                     (-1, ValueError), (1 << 64, ValueError), (None, TypeError)])
def test_write_guest_value_is_validated(bad, exc):
    vm = _base_vm()
    with pytest.raises(exc):
        vm.write_guest([1], bad)
    assert vm.memory(0)[1] == 0


def test_numpy_integers_are_accepted_everywhere():
    vm = kvmdirty.VM()
    vm.set_user_memory_region(np.uint32(0), np.uint64(0), np.int64(MiB), np.uint32(LOG))
    v = vm.create_vcpu(np.int32(0))
    v.run(np.array([3], np.uint64), np.uint64(2), max_writes=np.int64(5))
    assert kvmdirty._bitmap.to_gfns(vm.get_dirty_log(np.uint32(0))).tolist() == [3]
    v.run(np.array([3], np.uint64), 4)
    vm.enable_manual_protect()
    assert vm.clear_dirty_log(np.int16(0), np.uint8(0), np.uint16(64), np.ones(1, np.uint64)) in (0, 1)
    assert vm.memory(np.uint32(0))[3] == 4


def _backends():
    out = [pytest.param("sim", id="sim")]
    from kvm_util import KVM_UNUSABLE as reason
    out.append(pytest.param("kvm", id="kvm", marks=pytest.mark.skipif(bool(reason), reason=str(reason))))
    return out


# (entry point, call with the bad value substituted)
ENTRY_POINTS = [
    ("region.slot", lambda vm, v, x: vm.set_user_memory_region(x, 0, MiB, 0)),
    ("region.gpa", lambda vm, v, x: vm.set_user_memory_region(5, x, MiB, 0)),
    ("region.size", lambda vm, v, x: vm.set_user_memory_region(5, 1 << 32, x, 0)),
    ("region.flags", lambda vm, v, x: vm.set_user_memory_region(5, 1 << 32, MiB, x)),
    ("get_dirty_log.slot", lambda vm, v, x: vm.get_dirty_log(x)),
    ("clear.slot", lambda vm, v, x: vm.clear_dirty_log(x, 0, 64, np.zeros(1, np.uint64))),
    ("clear.first_page", lambda vm, v, x: vm.clear_dirty_log(0, x, 64, np.zeros(1, np.uint64))),
    ("clear.num_pages", lambda vm, v, x: vm.clear_dirty_log(0, 0, x, np.zeros(1, np.uint64))),
    ("create_vcpu.id", lambda vm, v, x: vm.create_vcpu(x)),
    ("enable_cap.cap", lambda vm, v, x: vm.enable_cap(x, 1)),
    ("enable_cap.arg", lambda vm, v, x: vm.enable_cap(_uapi.CAP_MANUAL_DIRTY_LOG_PROTECT2, x)),
    ("enable_dirty_ring.entries", lambda vm, v, x: vm.enable_dirty_ring(x)),
    ("check_extension.cap", lambda vm, v, x: vm.check_extension(x)),
    ("run.value", lambda vm, v, x: v.run(np.array([1], np.uint64), x)),
    ("run.max_writes", lambda vm, v, x: v.run(np.array([1], np.uint64), 1, max_writes=x)),
]
BAD_INPUTS = [("str", "5", TypeError), ("float", 1.9, TypeError), ("bool", True, TypeError),
              ("negative", -1, ValueError), ("2**64", 1 << 64, ValueError)]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("entry,call", ENTRY_POINTS, ids=[e[0] for e in ENTRY_POINTS])
def test_same_bad_input_same_exception_on_every_backend(backend, entry, call):
    vm = kvmdirty.open_vm(backend)
    try:
        vm.set_user_memory_region(0, 0, MiB, LOG)
        v = vm.create_vcpu(0)
        for name, bad, exc in BAD_INPUTS:
            if entry == "run.max_writes" and "max_writes" not in v.run.__code__.co_varnames:
                pytest.skip("this backend's run has no budget")
            with pytest.raises(exc):
                call(vm, v, bad)
    finally:
        vm.close()


def test_plan_inputs_are_validated_identically():
    vm = _base_vm()
    v = vm.vcpus[0]
    for bad, exc in (("abc", TypeError), (np.ones(3), TypeError), ([1.5], TypeError),
                     (np.zeros((2, 2), np.uint64), ValueError), ([1, -1], ValueError),
                     (np.array([True]), TypeError), (b"\x01", TypeError)):
        with pytest.raises(exc):
            v.run(bad, 1)
        with pytest.raises(exc):
            vm.write_guest(bad, 1)


# -- closed VM mid-call, buffer lifetime --------------------------------------------------

def test_close_during_a_run_waits_then_refuses():
    vm = kvmdirty.VM()
    vm.set_user_memory_region(0, 0, 64 * MiB, LOG)
    v = vm.create_vcpu(0)
    plan = np.random.default_rng(2).integers(0, 16384, 3_000_000).astype(np.uint64)
    t = threading.Thread(target=v.run, args=(plan, 1))
    t.start()
    while vm.slots_lock.readers == 0 and t.is_alive():
        pass
    assert close_within(vm, 60)
    t.join()
    assert v.remaining == 0                      # the run in progress finished
    for call in (lambda: v.run([1], 1), lambda: vm.get_dirty_log(0), lambda: vm.write_guest([1], 1),
                 lambda: vm.create_vcpu(1), lambda: vm.reset_dirty_rings()):
        with pytest.raises(KvmError) as e:
            call()
        assert e.value.errno == errno.EBADF


def test_plan_buffer_cannot_be_resized_while_a_vcpu_runs_it():
    vm = kvmdirty.VM()
    vm.set_user_memory_region(0, 0, 64 * MiB, LOG)
    v = vm.create_vcpu(0)
    plan = array("Q", np.random.default_rng(3).integers(0, 16384, 2_000_000).tolist())
    t = threading.Thread(target=v.run, args=(plan, 1))
    t.start()
    resized = 0
    while t.is_alive():
        try:
            plan.extend(range(1000))
            resized += 1
        except BufferError:
            pass
    t.join()
    assert v.remaining == 0
    assert vm.stats["writes"] == 2_000_000


def test_slots_and_vcpus_views_are_read_only():
    vm = _base_vm()
    with pytest.raises(TypeError):
        vm.slots[0] = None
    with pytest.raises(TypeError):
        del vm.vcpus[0]
    with pytest.raises(Exception):
        vm.slots[0].values = np.zeros(1, np.uint64)
    assert vm.vcpus[0].run([1], 1).done


def test_set_dirty_keeps_the_replaced_bitmap_alive_while_vcpus_may_write_it():
    """set_dirty drops the caller's last reference to the old bitmap while a vCPU runs.

    The MMU must keep it until a completed remote flush: under the sanitizer
    build a write through the freed buffer is a heap-use-after-free report.
    """
    vm = kvmdirty.VM()
    vm.set_user_memory_region(0, 0, 256 * MiB, LOG)
    v = vm.create_vcpu(0)
    nw = (256 * MiB >> 12) >> 6
    plan = np.random.default_rng(4).integers(0, 65536, 3_000_000).astype(np.uint64)
    t = threading.Thread(target=v.run, args=(plan, 1))
    t.start()
    swaps = 0
    while t.is_alive():
        with vm.slots_lock.read():
            vm.mmu.set_dirty(0, np.zeros(nw, np.uint64))
            vm.mmu.protect(0, 0, ~0 & ((1 << 64) - 1))
            if swaps % 8 == 7:
                vm.mmu.flush_remote_tlbs()
        swaps += 1
    t.join()
    assert v.remaining == 0 and swaps > 0
