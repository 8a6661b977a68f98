"""`kvmdirty calibrate`: measure this host's tracking costs and write a cost profile.

Every entry of the cost table is timed here, through kvmdirty's public API:

- on the simulator (kvmdirty.VM): the kernels this project runs (GET, CLEAR,
  ring collect and reset, write faults, TLB flush, log start) and, for the
  user-space side, a word-wise bitmap merge (QEMU's) and a page copy;
- on the real /dev/kvm, when it is usable (kvmdirty.info.kvm_unusable):
  KVM_GET_DIRTY_LOG and KVM_CLEAR_DIRTY_LOG per GiB, the write-protect per
  dirty page of a GET, KVM_RESET_DIRTY_RINGS per entry, a guest write fault,
  enabling logging on a mapped slot, the ioctl round trip and the KVM_RUN
  round trip.  Where both exist the real kernel's number is
  the profile's and the simulator's is kept in the entry's source text,
  unless the real one is not measurable here (0: e.g. a nested host that traps
  every guest write, so a write-protect fault costs no more than a write).

Each entry's ``source`` names the backend, the machine and the command.
Medians of a few repeats; per-unit costs are differences or quotients of
large operations, so timer resolution does not matter.
"""
from __future__ import annotations

import platform
import shlex
import statistics
import sys
import time
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from ..api import PAGE_SIZE
from ..info import kvm_unusable
from ..vm import MEM_LOG_DIRTY_PAGES as LOG
from ..vm import VM
from .costs import COST_DOC, Cost, Costs
from .memory import GIB_PAGES

_CAP_NR_MEMSLOTS = 10
_ABOVE_4G = 1 << 20             # gfn of 4 GiB


def machine() -> str:
    """A short description of this host."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import os
    return f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}"


def _median(fn: Callable[[], object], setup: Optional[Callable[[], object]] = None,
            repeats: int = 5) -> float:
    out = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def _pages(n: int, npages: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(npages, n, replace=False)).astype(np.uint64)


def _ring_costs(vm, v, plan: np.ndarray, repeats: int) -> Dict[str, float]:
    """Collect and reset cost per entry: the vCPU fills its ring with the plan
    (fewer entries than the ring holds), then the ring is harvested, timed."""
    coll, reset = [], []
    for r in range(repeats):
        v.run(plan, r + 1)
        t = time.perf_counter()
        _, offs = v.dirty_ring.collect()
        coll.append((time.perf_counter() - t) / max(1, len(offs)))
        t = time.perf_counter()
        got = vm.reset_dirty_rings()
        reset.append((time.perf_counter() - t) / max(1, got))
    return {"ring_collect_per_entry": statistics.median(coll),
            "ring_reset_per_entry": statistics.median(reset)}


def _fault_cost(vm, v, plan: np.ndarray, repeats: int) -> float:
    """Per write fault: a pass over protected pages minus a pass over the same, writable,
    pages, paired so that drift cancels; the median of the pairs."""
    diffs = []
    for r in range(repeats):
        vm.get_dirty_log(0)                        # protect them again
        t = time.perf_counter()
        v.run(plan, 2 * r + 2)
        fault = time.perf_counter() - t
        t = time.perf_counter()
        v.run(plan, 2 * r + 3)
        diffs.append(fault - (time.perf_counter() - t))
    return max(0.0, statistics.median(diffs)) / len(plan)


def measure_sim(gib: int = 4, k: int = 1 << 15, repeats: int = 5) -> Dict[str, float]:
    """Every cost on the simulator."""
    out: Dict[str, float] = {}
    n = gib * GIB_PAGES
    plan = _pages(k, n)

    vm = VM()
    vm.set_user_memory_region(0, 0, n * PAGE_SIZE, LOG)
    vcpus = [vm.create_vcpu(i) for i in range(4)]
    v = vcpus[0]
    out["ioctl"] = _median(lambda: [vm.check_extension(_CAP_NR_MEMSLOTS) for _ in range(1000)],
                           repeats=repeats) / 1000
    vm.get_dirty_log(0)
    clean = _median(lambda: vm.get_dirty_log(0), repeats=repeats)
    out["get_log_per_gib"] = clean / gib
    dirty = _median(lambda: vm.get_dirty_log(0), setup=lambda: v.run(plan, 1), repeats=repeats)
    out["protect_per_page"] = max(0.0, dirty - clean) / k
    # Faults: fresh (protected) pages vs the same pages again (writable, in the TLB).
    out["wp_fault"] = _fault_cost(vm, v, plan, repeats)
    out["tlb_flush"] = _median(lambda: [vm.mmu.flush_remote_tlbs() for _ in range(1000)],
                               repeats=repeats) / 1000
    empty = np.zeros(0, np.uint64)
    out["vcpu_kick"] = _median(lambda: [v.run(empty) for _ in range(1000)], repeats=repeats) / 1000
    out["ring_full_exit"] = out["vcpu_kick"]
    vm.close()

    # Log start: write-protect a slot whose pages are all mapped writable.
    vm = VM()
    vm.set_user_memory_region(0, 0, GIB_PAGES * PAGE_SIZE, 0)
    vm.create_vcpu(0).run(np.arange(GIB_PAGES, dtype=np.uint64), 1)
    t = time.perf_counter()
    vm.set_user_memory_region(0, 0, GIB_PAGES * PAGE_SIZE, LOG)
    out["log_start_per_gib"] = time.perf_counter() - t
    vm.close()

    vm = VM()
    vm.enable_manual_protect(initially_set=True)
    vm.set_user_memory_region(0, 0, n * PAGE_SIZE, LOG)
    out["get_log_copy_per_gib"] = _median(lambda: vm.get_dirty_log(0), repeats=repeats) / gib
    vm.clear_dirty_log(0, 0, n, np.full(n // 64, ~np.uint64(0)))
    full = np.full(n // 64, ~np.uint64(0))
    out["clear_per_gib"] = _median(lambda: vm.clear_dirty_log(0, 0, n, full), repeats=repeats) / gib
    vm.close()

    vm = VM()
    vm.enable_dirty_ring(1 << 16)
    vm.set_user_memory_region(0, 0, n * PAGE_SIZE, LOG)
    out.update(_ring_costs(vm, vm.create_vcpu(0), plan[: (1 << 16) - 1024], repeats))
    vm.close()

    # QEMU's merge (cpu_physical_memory_sync_dirty_bitmap) is word-wise: OR and count.
    words = np.zeros(n // 64, np.uint64)
    dest = np.zeros(n // 64, np.uint64)

    def merge() -> None:
        np.bitwise_count(words & ~dest).sum()
        np.bitwise_or(dest, words, out=dest)
    out["qemu_sync_per_gib"] = _median(merge, repeats=repeats) / gib
    src = np.ones(1 << 23, np.uint64)          # 64 MiB
    dst = np.empty_like(src)
    out["send_per_byte"] = _median(lambda: np.copyto(dst, src), repeats=repeats) / src.nbytes
    return out


def measure_kvm(gib: int = 4, k: int = 2048, repeats: int = 5) -> Dict[str, float]:
    """The kernel's own costs on /dev/kvm (small dirty counts: the guest may run nested)."""
    from ..kvm import KvmVM
    out: Dict[str, float] = {}
    n = gib * GIB_PAGES
    # Slots start at 4 GiB, above the x86 hole where KvmVM keeps its private slot.
    base = np.uint64(_ABOVE_4G)
    at = _ABOVE_4G * PAGE_SIZE
    plan = _pages(k, n, seed=2) + base

    with KvmVM() as vm:
        vm.set_user_memory_region(0, at, n * PAGE_SIZE, LOG)
        v = vm.create_vcpu(0)
        out["ioctl"] = _median(lambda: [vm.check_extension(_CAP_NR_MEMSLOTS) for _ in range(1000)],
                               repeats=repeats) / 1000
        vm.get_dirty_log(0)
        clean = _median(lambda: vm.get_dirty_log(0), repeats=repeats)
        out["get_log_per_gib"] = clean / gib
        dirty = _median(lambda: vm.get_dirty_log(0), setup=lambda: v.run(plan, 1), repeats=repeats)
        out["protect_per_page"] = max(0.0, dirty - clean) / k
        out["wp_fault"] = _fault_cost(vm, v, _pages(8 * k, n, seed=4) + base, repeats)
        one = plan[:1]
        out["vcpu_kick"] = _median(lambda: [v.run(one, 5) for _ in range(20)], repeats=repeats) / 20
        out["ring_full_exit"] = out["vcpu_kick"]

    # Log start on a fully mapped 1 GiB slot (the guest touches every page first:
    # ~10 s nested) minus the same on an untouched slot (the memslot update itself).
    with KvmVM() as vm:
        size = GIB_PAGES * PAGE_SIZE
        vm.set_user_memory_region(0, at, size, 0)
        vm.set_user_memory_region(1, at + size, size, 0)
        vm.create_vcpu(0).run(np.arange(GIB_PAGES, dtype=np.uint64) + base, 1)
        t = time.perf_counter()
        vm.set_user_memory_region(0, at, size, LOG)
        mapped = time.perf_counter() - t
        t = time.perf_counter()
        vm.set_user_memory_region(1, at + size, size, LOG)
        empty = time.perf_counter() - t
        out["log_start_per_gib"] = mapped - empty if mapped > empty else mapped

    with KvmVM() as vm:
        vm.enable_manual_protect()
        vm.set_user_memory_region(0, at, n * PAGE_SIZE, LOG)
        out["get_log_copy_per_gib"] = _median(lambda: vm.get_dirty_log(0), repeats=repeats) / gib
        full = np.full(n // 64, ~np.uint64(0))
        out["clear_per_gib"] = _median(lambda: vm.clear_dirty_log(0, 0, n, full), repeats=repeats) / gib

    with KvmVM() as vm:
        vm.enable_dirty_ring(1 << 16)
        vm.set_user_memory_region(0, at, n * PAGE_SIZE, LOG)
        out.update(_ring_costs(vm, vm.create_vcpu(0), plan, repeats))
    return out


def measure_host(repeats: int) -> Tuple[Dict[str, float], Optional[str]]:
    """The host kernel's write-protect tracking (userfaultfd-wp + PAGEMAP_SCAN) on real
    hardware: (figures, None), or ({}, why it cannot be measured here)."""
    from ..host import host_unusable
    from ..host.costs import measure_host_costs
    why = host_unusable()
    if why is not None:
        return {}, why
    try:
        return measure_host_costs(repeats=repeats), None
    except OSError as e:
        return {}, f"host tracking measurement failed: {e}"


def calibrate(use_kvm: Optional[bool] = None, command: str = "", repeats: int = 5,
              log: Callable[[str], None] = lambda s: None,
              use_host: bool = True) -> Tuple[Costs, Optional[str]]:
    """Measure; return (the profile, why real KVM was not used or None).

    The host kernel's tracking is measured too (``use_host``): its write-protect
    fault is a real fault on real hardware, so it stands in for the guest
    write fault where /dev/kvm measures less than that (a nested host traps
    every guest write alike); its figures are kept in the profile's ``host`` part.
    """
    host = machine()
    command = command or "kvmdirty calibrate"
    log("measuring the simulator ...")
    sim = measure_sim(repeats=repeats)
    why = None if use_kvm is not False else "--no-kvm"
    kvm: Dict[str, float] = {}
    if use_kvm is not False:
        why = kvm_unusable()
        if why is None:
            log("measuring /dev/kvm ...")
            try:
                kvm = measure_kvm(repeats=repeats)
            except OSError as e:
                why = f"/dev/kvm measurement failed: {e}"
                kvm = {}
        elif use_kvm:
            raise OSError(f"real KVM requested but unusable: {why}")
    hosted: Dict[str, float] = {}
    if use_host:
        log("measuring the host kernel's write-protect tracking ...")
        hosted, host_why = measure_host(repeats)
        if host_why:
            log(f"host kernel tracking not measured: {host_why}")
    entries = {}
    for name in COST_DOC:
        s = f"simulator (kvmdirty.VM) on {host}: {sim[name]:.3g} s"
        host_fault = hosted.get("wp_fault_ns_per_page", 0.0) * 1e-9
        if name == "wp_fault" and host_fault > kvm.get(name, 0.0):
            # A guest write fault (an EPT violation exit, the log, the fix-up) is no cheaper
            # than a page fault of the host kernel: a smaller KVM figure means this host
            # traps every guest write alike (nested), so the real fault stands in for it.
            entries[name] = Cost(host_fault, f"host kernel write-protect fault (userfaultfd-wp) on "
                                             f"{host}: `{command}` (real /dev/kvm measured "
                                             f"{kvm.get(name, 0.0):.3g} s, below a real fault; {s})")
        elif kvm.get(name, 0.0) > 0.0:
            entries[name] = Cost(kvm[name], f"real /dev/kvm on {host}: `{command}` ({s})")
        elif name in kvm:
            # Below this host's resolution (a nested host may trap every write alike).
            entries[name] = Cost(sim[name], f"{s}: `{command}` (real /dev/kvm: no measurable "
                                            f"difference here)")
        else:
            entries[name] = Cost(sim[name], f"{s}: `{command}`")
    return Costs(entries, host, command, hosted), why


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["kvmdirty"] + sys.argv[1:]) if sys.argv else ""
