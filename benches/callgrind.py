"""Instruction counts of the kernels and of their C baseline, under valgrind's callgrind.

Timings on a shared, noisy machine wobble by tens of percent; the number of
instructions a kernel executes does not.  This script runs each kernel (ours,
then the plain C loop of kvmdirty._cbase on the same data) in a fresh Python
under ``valgrind --tool=callgrind``, with collection switched on only inside
the compiled function that is measured (``--collect-atstart=no
--toggle-collect=<its Cython wrapper>``), so Python's start-up, the data set-up
and the re-dirtying between calls are not counted.  It prints instructions
per page / entry / call for ours and for C, and their ratio.

    python benches/callgrind.py              # every case (a few minutes)
    python benches/callgrind.py --quick      # fewer repetitions, the headline cases
    python benches/callgrind.py -k ring      # cases whose name contains "ring"
    python benches/callgrind.py --json out.json

Run it from a checkout built in place (``python setup.py build_ext --inplace``)
or with kvmdirty installed.  Without valgrind it says so and exits 0 (skipped).
A regression shows up here as more instructions per op, whatever the timings
say; compare against the figures in BENCHMARKS.md ("Instruction counts").
Instruction counts do not see cache misses or atomic latency: the timed
benches (``kvmdirty bench``) remain the measure; this is the noise-free view.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))

PAGES_24G = 24 << 18
WORDS = PAGES_24G // 64
RING_N = 65536
RING_PAGES = 1 << 22

# name: (unit, ops per call, ours toggle patterns, C toggle patterns)
CASES: Dict[str, tuple] = {
    "harvest-clean-24g": ("word", WORDS, ["__pyx_pw_8kvmdirty_7_bitmap_*harvest"],
                          ["__pyx_pw_8kvmdirty_6_cbase_*harvest"]),
    "harvest+to_gfns-0.1%": ("page", PAGES_24G // 1000,
                             ["__pyx_pw_8kvmdirty_7_bitmap_*harvest", "__pyx_pw_8kvmdirty_7_bitmap_*to_gfns"],
                             ["__pyx_pw_8kvmdirty_6_cbase_*harvest_list"]),
    "get_dirty_log-0.1%": ("page", PAGES_24G // 1000, ["__pyx_pw_8kvmdirty_4_mmu_3Mmu_*get_dirty_log",
                                                       "__pyx_pw_8kvmdirty_7_bitmap_*to_gfns"],
                           ["__pyx_pw_8kvmdirty_6_cbase_*harvest_list"]),
    "harvest_gfns-0.1%": ("page", PAGES_24G // 1000, ["__pyx_pw_8kvmdirty_7_bitmap_*harvest_gfns"],
                          ["__pyx_pw_8kvmdirty_6_cbase_*harvest_list"]),
    "to_gfns-10%": ("page", PAGES_24G // 10, ["__pyx_pw_8kvmdirty_7_bitmap_*to_gfns"],
                    ["__pyx_pw_8kvmdirty_6_cbase_*to_gfns"]),
    "to_gfns-50%": ("page", PAGES_24G // 2, ["__pyx_pw_8kvmdirty_7_bitmap_*to_gfns"],
                    ["__pyx_pw_8kvmdirty_6_cbase_*to_gfns"]),
    "ring-collect": ("entry", RING_N, ["__pyx_pw_8kvmdirty_5_ring_9DirtyRing_*collect"],
                     ["__pyx_pw_8kvmdirty_6_cbase_*collect"]),
    "ring-reset-consecutive": ("entry", RING_N, ["__pyx_pw_8kvmdirty_5_ring_9DirtyRing_*reset"],
                               ["__pyx_pw_8kvmdirty_6_cbase_*reset"]),
    "ring-reset-random": ("entry", RING_N, ["__pyx_pw_8kvmdirty_5_ring_9DirtyRing_*reset"],
                          ["__pyx_pw_8kvmdirty_6_cbase_*reset"]),
}
QUICK_CASES = ["harvest-clean-24g", "get_dirty_log-0.1%", "to_gfns-50%", "ring-collect", "ring-reset-random"]


def _find_kvmdirty() -> None:
    """Import kvmdirty as installed, or from the checkout above benches/ when built in place."""
    try:
        import kvmdirty._cbase  # noqa: F401
    except ImportError:
        sys.path.insert(0, os.path.dirname(HERE))
        for m in [m for m in sys.modules if m == "kvmdirty" or m.startswith("kvmdirty.")]:
            del sys.modules[m]
        import kvmdirty._cbase  # noqa: F401


# -- the measured process (under valgrind) ------------------------------------------
def _run_case(case: str, impl: str, reps: int) -> None:
    """Set up ``case``, then call the measured function ``reps`` times (re-dirtying between)."""
    import numpy as np

    from kvmdirty import _bitmap, _cbase, _mmu, _uapi
    from kvmdirty._ring import ENTRY_DTYPE, DirtyRing
    rng = np.random.default_rng(1)

    def pages(density: float) -> np.ndarray:
        n = int(PAGES_24G * density)
        return np.sort(rng.choice(PAGES_24G, n, replace=False)).astype(np.uint64)

    if case == "harvest-clean-24g":
        w, snap, wp = (np.zeros(WORDS, np.uint64) for _ in range(3))
        fn = (lambda: _bitmap.harvest(w, snap, wp, zeroed=True)) if impl == "ours" else \
            (lambda: _cbase.harvest(w, snap, wp))
        for _ in range(reps):
            fn()
        return
    if case in ("harvest+to_gfns-0.1%", "harvest_gfns-0.1%", "get_dirty_log-0.1%"):
        p = pages(1e-3)
        wp = np.full(WORDS, ~np.uint64(0))
        snap, out = np.empty(WORDS, np.uint64), np.empty(len(p), np.uint64)
        if case == "get_dirty_log-0.1%" and impl == "ours":
            import kvmdirty
            vm = kvmdirty.VM()
            vm.set_user_memory_region(0, 0, PAGES_24G << 12, _uapi.MEM_LOG_DIRTY_PAGES)
            v = vm.create_vcpu(0)
            for _ in range(reps):
                v.run(p, 1)
                _bitmap.to_gfns(vm.get_dirty_log(0, snap), 0, out)
            return
        w = np.zeros(WORDS, np.uint64)
        for _ in range(reps):
            _bitmap.set_bits(w, p)
            if impl == "c":
                _cbase.harvest_list(w, None if case == "harvest_gfns-0.1%" else snap, wp, out)
            elif case == "harvest_gfns-0.1%":
                _bitmap.harvest_gfns(w, wp, out=out)
            else:
                _bitmap.harvest(w, snap, wp)
                _bitmap.to_gfns(snap, 0, out)
        return
    if case.startswith("to_gfns-"):
        p = pages(0.1 if case.endswith("10%") else 0.5)
        w = np.zeros(WORDS, np.uint64)
        _bitmap.set_bits(w, p)
        out = np.empty(len(p), np.uint64)
        for _ in range(reps):
            _bitmap.to_gfns(w, 0, out) if impl == "ours" else _cbase.to_gfns(w, out)
        return
    slots = np.full(RING_N, 1, np.uint32)
    if case.endswith("random"):
        offs = np.random.default_rng(0).integers(0, RING_PAGES, RING_N).astype(np.uint64)
    else:
        offs = np.arange(RING_N, dtype=np.uint64)
    if impl == "ours":
        ring = DirtyRing(RING_N)
        bs, bo = np.empty(RING_N, np.uint32), np.empty(RING_N, np.uint64)
        mmu = _mmu.Mmu()
        mmu.set_slots([(1, 0, RING_PAGES, _uapi.MEM_LOG_DIRTY_PAGES, np.full(RING_PAGES >> 6, ~np.uint64(0)),
                        np.zeros(RING_PAGES, np.uint64), None)])
        for _ in range(reps):
            ring.push_many(slots, offs)
            ring.collect(None, bs, bo)
            ring.reset(mmu)
        return
    e = np.zeros(RING_N, ENTRY_DTYPE)
    e["slot"], e["offset"] = slots, offs
    raw = e.view(np.uint8)
    bs, bo = np.empty(RING_N, np.uint32), np.empty(RING_N, np.uint64)
    wp = np.full(RING_PAGES >> 6, ~np.uint64(0))
    for _ in range(reps):
        e["flags"] = 1
        _cbase.collect(raw, 0, bs, bo)
        _cbase.reset(raw, 0, wp, RING_PAGES)


# -- the driver -----------------------------------------------------------------------
def _instructions(case: str, impl: str, patterns: List[str], reps: int, keep: Optional[str]) -> int:
    """Instructions collected inside ``patterns`` over ``reps`` calls (valgrind's totals line)."""
    d = keep or tempfile.mkdtemp(prefix="kvmdirty-callgrind-")
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", case.replace("%", "pct"))    # valgrind expands %
    out = os.path.join(d, f"callgrind.{safe}.{impl}.out")
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--collect-atstart=no"]
    cmd += [f"--toggle-collect={p}" for p in patterns]
    cmd += [sys.executable, os.path.abspath(__file__), "--measure", case, impl, str(reps)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"valgrind failed for {case}/{impl}:\n{r.stderr[-2000:]}")
    total = None
    with open(out) as f:
        for line in f:
            m = re.match(r"(?:totals|summary):\s+(\d+)", line)
            if m:
                total = int(m.group(1))
    if not keep:
        shutil.rmtree(d, ignore_errors=True)
    if not total:
        raise RuntimeError(f"nothing collected for {case}/{impl}: is {patterns} the compiled wrapper's "
                           "symbol? (build with symbols: setup.py build_ext --inplace)")
    return total


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the headline cases, fewer repetitions")
    ap.add_argument("-k", dest="keyword", default=None, help="only cases whose name contains this")
    ap.add_argument("--reps", type=int, default=None, help="calls measured per case (default 20, quick 5)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--keep", default=None, metavar="DIR", help="keep the callgrind output files here")
    ap.add_argument("--measure", nargs=3, metavar=("CASE", "IMPL", "REPS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        case, impl, reps = args.measure
        _find_kvmdirty()
        _run_case(case, impl, int(reps))
        return 0
    if shutil.which("valgrind") is None:
        print("callgrind: skipped: valgrind is not installed (e.g. apt-get install valgrind); "
              "the timed benches (kvmdirty bench) still run without it", file=sys.stderr)
        return 0
    _find_kvmdirty()
    reps = args.reps or (5 if args.quick else 20)
    names = QUICK_CASES if args.quick else list(CASES)
    if args.keyword:
        names = [n for n in names if args.keyword in n]
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
    rows = []
    print(f"{'case':24s} {'unit':6s} {'ours instr/op':>14s} {'C instr/op':>12s} {'ours / C':>9s}")
    for name in names:
        unit, ops, ours_pat, c_pat = CASES[name]
        ours = _instructions(name, "ours", ours_pat, reps, args.keep) / (reps * ops)
        c = _instructions(name, "c", c_pat, reps, args.keep) / (reps * ops)
        rows.append({"case": name, "unit": unit, "ours_per_op": ours, "c_per_op": c, "ratio": ours / c})
        print(f"{name:24s} {unit:6s} {ours:14.2f} {c:12.2f} {ours / c:8.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"reps": reps, "cases": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
