"""Tables, target checks and plots of a benchmark run (the JSON pytest-benchmark writes).

Used by ``kvmdirty bench``; importable on its own to re-render a saved run:

    from kvmdirty import benchreport
    rep = benchreport.build(json.load(open("docs/bench/results.json"))["raw"])
    print(benchreport.markdown(rep))

Every figure of a report comes from one run.  Costs are per operation (the
``ops`` a benchmark records in extra_info: pages, entries, words or calls),
from the median of the rounds (``stat="min"`` for the fastest round).
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, Iterable, List, Optional, Tuple

Record = Dict[str, Any]

# -- reading the pytest-benchmark JSON ------------------------------------------


def records(raw: Dict[str, Any], stat: str = "median") -> List[Record]:
    """One flat record per benchmark: name, file, group, extra, per-call seconds, ops, ns per op."""
    out = []
    for b in raw.get("benchmarks", []):
        st = b.get("stats") or {}
        if not st or stat not in st:
            continue
        extra = dict(b.get("extra_info") or {})
        ops = extra.get("ops")
        if not ops and extra.get("ns_per_entry"):
            # bench_ring.py records ns_per_entry (mean-based): recover its entry count.
            ops = max(1, round(st["mean"] * 1e9 / extra["ns_per_entry"]))
        ops = int(ops or 1)
        fullname = b.get("fullname", b.get("name", ""))
        out.append({
            "name": b.get("name", ""),
            "fullname": fullname,
            "file": fullname.split("::")[0].rsplit("/", 1)[-1],
            "group": b.get("group") or "",
            "extra": extra,
            "seconds": st[stat],
            "rounds": st.get("rounds"),
            "ops": ops,
            "unit": extra.get("unit") or ("entry" if extra.get("ns_per_entry") else
                                          "op" if extra.get("ops") else "call"),
            "ns": st[stat] * 1e9 / ops,
        })
    return out


def _find(recs: Iterable[Record], pattern: str) -> Optional[Record]:
    """The first record whose 'file::name' matches ``pattern`` (a regex searched for)."""
    rx = re.compile(pattern)
    for r in recs:
        if rx.search(f"{r['file']}::{r['name']}"):
            return r
    return None


def _best(recs: Iterable[Record], pattern: str) -> Optional[Record]:
    rx = re.compile(pattern)
    found = [r for r in recs if rx.search(f"{r['file']}::{r['name']}")]
    return min(found, key=lambda r: r["ns"]) if found else None


# -- targets -----------------------------------------------------------------

def _check(what: str, rec: Optional[Record], limit: Optional[float] = None, *, unit: str = "ns",
           per_call: bool = False, vs: Optional[Record] = None, ratio_min: Optional[float] = None,
           vs_name: str = "") -> Dict[str, Any]:
    """One target row: the value (ns per op, or per call), a limit and/or a ratio to another record."""
    row: Dict[str, Any] = {"target": what, "measured": None, "limit": limit, "unit": unit,
                           "ratio": None, "ratio_min": ratio_min, "vs": vs_name, "ok": None,
                           "bench": rec["fullname"] if rec else None}
    if rec is None or (ratio_min is not None and vs is None):
        row["note"] = "not measured in this run"
        return row
    value = rec["seconds"] * 1e9 if per_call else rec["ns"]
    scale = {"ns": 1.0, "us": 1e-3}[unit]
    row["measured"] = value * scale
    ok = True
    if limit is not None:
        ok = ok and row["measured"] <= limit
    if vs is not None:
        other = vs["seconds"] * 1e9 if per_call else vs["ns"]
        row["ratio"] = other / value if value else math.inf
        if ratio_min is not None:
            ok = ok and row["ratio"] >= ratio_min
    row["ok"] = ok
    return row


def targets(recs: List[Record]) -> List[Dict[str, Any]]:
    """The issue's targets, each checked on figures of this run."""
    rows = []
    clean = _find(recs, r"bench_bitmap\.py::test_harvest_clean_24g")
    kvm_get = _find(recs, r"bench_kvm\.py::test_kvm_get_dirty_log_clean_24g")
    rows.append(_check("bitmap harvest, clean 24 GiB slot (us/call)", clean, 40, unit="us", per_call=True))
    rows.append(_check("  ... vs this machine's KVM_GET_DIRTY_LOG, same size", clean, None, unit="us",
                       per_call=True, vs=kvm_get, ratio_min=3, vs_name="KVM_GET_DIRTY_LOG"))
    np_sparse = _find(recs, r"bench_bitmap\.py::test_numpy_harvest_then_to_gfns_sparse")
    for label, pat in (("harvest + to_gfns", r"bench_bitmap\.py::test_harvest_then_to_gfns_sparse"),
                       ("harvest_gfns (fused)", r"bench_bitmap\.py::test_harvest_gfns_sparse")):
        rec = _find(recs, pat)
        rows.append(_check(f"{label}, 0.1% of 24 GiB dirty (us/call)", rec, 200, unit="us", per_call=True))
        rows.append(_check("  ... vs plain numpy", rec, None, unit="us", per_call=True, vs=np_sparse,
                           ratio_min=10, vs_name="numpy"))
    for d in ("0.01%", "0.1%", "1%", "10%", "50%"):
        ours = _find(recs, rf"bench_peers\.py::test_gfns_ours\[{re.escape(d)}\]")
        npy = _best(recs, rf"bench_peers\.py::test_gfns_numpy\[.*-{re.escape(d)}\]")
        rows.append(_check(f"to_gfns vs best numpy, {d} dirty (ns/page)", ours, None, vs=npy, ratio_min=10,
                           vs_name="numpy (best way)"))
        into = _find(recs, rf"bench_peers\.py::test_gfns_ours_into\[{re.escape(d)}\]")
        if into is not None:
            rows.append(_check(f"  ... into a reused array (out=), {d} dirty (ns/page)", into, None, vs=npy,
                               ratio_min=10, vs_name="numpy (best way)"))
    push = _find(recs, r"bench_ring\.py::test_push_batched") or \
        _find(recs, r"bench_peers\.py::test_ring_push\[ours\]")
    coll = _find(recs, r"bench_ring\.py::test_collect") or \
        _find(recs, r"bench_peers\.py::test_ring_collect\[ours\]")
    rows.append(_check("ring push (batched) (ns/entry)", push, 2))
    rows.append(_check("ring collect (ns/entry)", coll, 2))
    for pat, lim in (("consecutive", 4), ("random", 10)):
        rec = _find(recs, rf"bench_ring\.py::test_reset_with_masked_protect\[{pat}\]") or \
            _find(recs, rf"bench_vm\.py::test_reset_dirty_rings\[{pat}\]")
        rows.append(_check(f"ring reset, {pat} offsets (ns/entry)", rec, lim))
    rows.append(_check("write loop, TLB hit (ns/write)", _find(recs, r"bench_guest\.py::test_write_loop_tlb_hits"), 5))
    rows.append(_check("write loop, fault into bitmap (ns/write)",
                       _find(recs, r"bench_guest\.py::test_write_loop_faults_into_bitmap"), 25))
    ring_fault = _find(recs, r"bench_(guest|ring)\.py::test_.*fault.*ring")
    if ring_fault is not None:
        rows.append(_check("write loop, fault into ring (ns/write)", ring_fault, 25))
    rows.append(_check("Python overhead: collect of one entry (us/call)",
                       _find(recs, r"bench_vm\.py::test_overhead_collect_one$"), 0.7, unit="us", per_call=True))
    rows.append(_check("Python overhead: get_dirty_log, 1-page slot (us/call)",
                       _find(recs, r"bench_vm\.py::test_overhead_get_dirty_log_1page"), 1, unit="us",
                       per_call=True))
    return rows


# -- ours / the C baseline (benches/bench_cbase.py) -------------------------------

#: (what, kind, our benchmark, the C baseline's, target: ours / C at most, or None).
#: kind "kernel" (a compiled primitive) or "api" (what a user calls, through the VM).
C_PAIRS: List[Tuple[str, str, str, str, Optional[float]]] = [
    ("harvest, clean 24 GiB slot", "kernel", r"bench_bitmap\.py::test_harvest_clean_24g",
     r"bench_cbase\.py::test_c_harvest_clean_24g", 1.2),
    ("get_dirty_log, clean 24 GiB slot, new array", "api", r"bench_vm\.py::test_get_dirty_log_clean_24g$",
     r"bench_cbase\.py::test_c_harvest_clean_24g", None),
    ("get_dirty_log, clean 24 GiB slot, out=", "api", r"bench_vm\.py::test_get_dirty_log_clean_24g_into",
     r"bench_cbase\.py::test_c_harvest_clean_24g", 1.2),
    ("harvest + to_gfns, 0.1% of 24 GiB, new arrays", "kernel",
     r"bench_bitmap\.py::test_harvest_then_to_gfns_sparse$", r"bench_cbase\.py::test_c_harvest_list_sparse\[snapshot\]", None),
    ("harvest + to_gfns, 0.1% of 24 GiB, reused buffers", "kernel",
     r"bench_bitmap\.py::test_harvest_then_to_gfns_sparse_into", r"bench_cbase\.py::test_c_harvest_list_sparse\[snapshot\]", 1.5),
    ("harvest_gfns (fused), 0.1% of 24 GiB, new array", "kernel", r"bench_bitmap\.py::test_harvest_gfns_sparse$",
     r"bench_cbase\.py::test_c_harvest_list_sparse\[fused\]", None),
    ("harvest_gfns (fused), 0.1% of 24 GiB, out=", "kernel", r"bench_bitmap\.py::test_harvest_gfns_sparse_into",
     r"bench_cbase\.py::test_c_harvest_list_sparse\[fused\]", 1.5),
    ("get_dirty_log -> to_gfns, 0.1% of 24 GiB, new arrays", "api", r"bench_vm\.py::test_get_dirty_log_to_gfns_24g$",
     r"bench_cbase\.py::test_c_harvest_list_sparse\[snapshot\]", None),
    ("get_dirty_log -> to_gfns, 0.1% of 24 GiB, out= on both", "api",
     r"bench_vm\.py::test_get_dirty_log_to_gfns_24g_into", r"bench_cbase\.py::test_c_harvest_list_sparse\[snapshot\]", 1.5),
] + [
    (f"to_gfns, {d} dirty, {way}", "kernel", rf"bench_peers\.py::test_gfns_ours{sfx}\[{re.escape(d)}\]",
     rf"bench_cbase\.py::test_c_to_gfns\[{re.escape(d)}\]", lim if sfx else None)
    for d, lim in (("0.01%", None), ("0.1%", None), ("1%", None), ("10%", 1.2), ("50%", 1.2))
    for sfx, way in (("", "new array"), ("_into", "out="))
] + [
    ("ring collect, 65,536 entries, out=", "kernel", r"bench_ring\.py::test_collect$",
     r"bench_cbase\.py::test_c_collect", 1.5),
    ("ring collect, 65,536 entries, new arrays", "kernel", r"bench_ring\.py::test_collect_fresh",
     r"bench_cbase\.py::test_c_collect", None),
    ("ring reset + masked protect, consecutive", "kernel",
     r"bench_ring\.py::test_reset_with_masked_protect\[consecutive\]", r"bench_cbase\.py::test_c_reset\[consecutive\]", None),
    ("ring reset + masked protect, random offsets", "kernel",
     r"bench_ring\.py::test_reset_with_masked_protect\[random\]", r"bench_cbase\.py::test_c_reset\[random\]", 1.5),
] + [
    (f"ring harvest (collect + KVM_RESET_DIRTY_RINGS), {p}, {way}", "api",
     rf"bench_vm\.py::test_ring_harvest{sfx}\[{p}\]", rf"bench_cbase\.py::test_c_ring_harvest\[{p}\]", None)
    for p in ("consecutive", "random") for sfx, way in (("", "new arrays"), ("_into", "out="))
]


def vs_c(recs: List[Record]) -> List[Dict[str, Any]]:
    """Every kernel and API row beside its plain-C baseline from the same run: ours / C (lower is better)."""
    rows = []
    for what, kind, ours_pat, c_pat, limit in C_PAIRS:
        ours, c = _find(recs, ours_pat), _find(recs, c_pat)
        if ours is None and c is None:
            continue
        # Both sides handle the same data per call (same sizes, same dirty pages): the
        # ratio is of times per call; per-op figures use the C side's op count and unit.
        ref = c or ours
        unit, ops = ref["unit"], ref["ops"]
        per_op = (lambda r: r["seconds"] * 1e9 / ops)
        ratio = ours["seconds"] / c["seconds"] if ours and c and c["seconds"] else None
        rows.append({"what": what, "kind": kind, "unit": unit,
                     "ours_ns": per_op(ours) if ours else None, "c_ns": per_op(c) if c else None,
                     "ratio": ratio, "limit": limit,
                     "ok": None if ratio is None or limit is None else ratio <= limit,
                     "bench": ours["fullname"] if ours else None, "c_bench": c["fullname"] if c else None})
    return rows


# -- peers ----------------------------------------------------------------------

def peers(recs: List[Record]) -> Dict[str, Any]:
    """Per-op cost of every implementation, and peer / ours ratios, per peer group."""
    groups: Dict[str, Dict[str, Record]] = {}
    for r in recs:
        if r["file"] != "bench_peers.py":
            continue
        impl = r["extra"].get("impl", "?")
        variant = r["extra"].get("variant")
        label = impl
        if impl == "roaring" and variant:
            label = f"roaring {variant}"
        elif impl == "python" and variant:
            label = variant
        elif impl == "numpy":
            label = "numpy (best way)"
        cur = groups.setdefault(r["group"], {}).get(label)
        if cur is None or r["ns"] < cur["ns"]:            # numpy: the best of its ways
            groups[r["group"]][label] = r
    out = {}
    for g, impls in sorted(groups.items(), key=lambda kv: _group_key(kv[0])):
        ours = impls.get("ours")
        out[g] = {label: {"ns_per_op": r["ns"], "unit": r["unit"],
                          "ratio_vs_ours": (r["ns"] / ours["ns"]) if ours and ours["ns"] else None,
                          "variant": r["extra"].get("variant"), "bench": r["fullname"]}
                  for label, r in sorted(impls.items(), key=lambda kv: (kv[0] != "ours", kv[0]))}
    return out


def _group_key(g: str):
    m = re.match(r"peers-gfns-([\d.]+)%", g)
    return (1, float(m.group(1)), g) if m else (0 if g == "peers-scan" else 2, 0.0, g)


# -- simulator vs real KVM -------------------------------------------------------

_KVM_PAIRS = [
    ("KVM_GET_DIRTY_LOG, clean 24 GiB", "call", r"bench_vm\.py::test_get_dirty_log_clean_24g",
     r"bench_kvm\.py::test_kvm_get_dirty_log_clean_24g"),
    ("  (our kernel: harvest, clean 24 GiB)", "call", r"bench_bitmap\.py::test_harvest_clean_24g",
     r"bench_kvm\.py::test_kvm_get_dirty_log_clean_24g"),
    ("KVM_GET_DIRTY_LOG, 0.1% of 24 GiB dirty", "call", r"bench_vm\.py::test_get_dirty_log_dirty_24g",
     r"bench_kvm\.py::test_kvm_get_dirty_log_dirty_24g"),
    ("KVM_CLEAR_DIRTY_LOG, 0.1% of 24 GiB", "call", r"bench_vm\.py::test_clear_dirty_log_24g$",
     r"bench_kvm\.py::test_kvm_clear_dirty_log_24g$"),
    ("KVM_CLEAR_DIRTY_LOG, clean 24 GiB", "call", r"bench_vm\.py::test_clear_dirty_log_clean_24g",
     r"bench_kvm\.py::test_kvm_clear_dirty_log_clean_24g"),
    ("KVM_RESET_DIRTY_RINGS, consecutive", "entry", r"bench_vm\.py::test_reset_dirty_rings\[consecutive\]",
     r"bench_kvm\.py::test_kvm_reset_dirty_rings\[consecutive\]"),
    ("KVM_RESET_DIRTY_RINGS, random", "entry", r"bench_vm\.py::test_reset_dirty_rings\[random\]",
     r"bench_kvm\.py::test_kvm_reset_dirty_rings\[random\]"),
    ("ring harvest (collect + reset), consecutive", "entry", r"bench_vm\.py::test_ring_harvest\[consecutive\]",
     r"bench_kvm\.py::test_kvm_ring_harvest\[consecutive\]"),
    ("ring harvest (collect + reset), random", "entry", r"bench_vm\.py::test_ring_harvest\[random\]",
     r"bench_kvm\.py::test_kvm_ring_harvest\[random\]"),
]


def kvm_pairs(recs: List[Record]) -> List[Dict[str, Any]]:
    rows = []
    for label, unit, sim_pat, kvm_pat in _KVM_PAIRS:
        sim, kvm = _find(recs, sim_pat), _find(recs, kvm_pat)
        if sim is None and kvm is None:
            continue
        per = (lambda r: r["seconds"] * 1e6) if unit == "call" else (lambda r: r["ns"])
        rows.append({"what": label, "unit": "us/call" if unit == "call" else "ns/entry",
                     "sim": per(sim) if sim else None, "kvm": per(kvm) if kvm else None,
                     "kvm_over_sim": (per(kvm) / per(sim)) if sim and kvm else None})
    return rows


# -- sweeps ---------------------------------------------------------------------

def sweeps(recs: List[Record]) -> Dict[str, Any]:
    """Harvest cost grids (us per harvest) by kind, size and dirty count; crossover per size."""
    grid: Dict[str, Dict[int, Dict[int, float]]] = {"bitmap": {}, "ring": {}}
    for r in recs:
        if r["file"] != "bench_sweeps.py" or r["extra"].get("kind") not in ("bitmap", "ring"):
            continue
        e = r["extra"]
        grid.setdefault(e["kind"], {}).setdefault(int(e["gib"]), {})[int(e["dirty"])] = r["seconds"] * 1e6
    kvm_clean = {int(r["extra"]["gib"]): r["seconds"] * 1e6 for r in recs
                 if r["file"] == "bench_kvm.py" and r["group"] == "sweep-kvm-get-clean"}
    ours_clean = {int(r["extra"]["gib"]): r["seconds"] * 1e6 for r in recs
                  if r["file"] == "bench_sweeps.py" and r["group"] == "sweep-clean"}
    cross = {}
    for gib in sorted(set(grid["bitmap"]) & set(grid["ring"])):
        cross[gib] = crossover(grid["bitmap"][gib], grid["ring"][gib])
    return {"grid_us": grid, "kvm_get_clean_us": kvm_clean, "ours_clean_us": ours_clean, "crossover": cross}


def crossover(bitmap: Dict[int, float], ring: Dict[int, float]) -> Dict[str, Any]:
    """The dirty count where the ring stops being cheaper than the bitmap (log-log interpolation).

    ``{"pages": n, "kind": "between"}``, or "ring-always" (ring cheaper at every
    measured count: the crossover is above the largest), or "bitmap-always".
    """
    counts = sorted(set(bitmap) & set(ring))
    if not counts:
        return {"pages": None, "kind": "unknown"}
    diff = [(n, math.log(ring[n]) - math.log(bitmap[n])) for n in counts]
    if all(d < 0 for _, d in diff):
        return {"pages": None, "kind": "ring-always", "above": counts[-1]}
    if diff[0][1] >= 0:
        return {"pages": None, "kind": "bitmap-always", "below": counts[0]}
    for (n0, d0), (n1, d1) in zip(diff, diff[1:]):
        if d0 < 0 <= d1:
            t = -d0 / (d1 - d0)
            return {"pages": int(round(math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0))))),
                    "kind": "between", "between": [n0, n1]}
    return {"pages": None, "kind": "unknown"}


# -- the whole report --------------------------------------------------------------

def build(raw: Dict[str, Any], stat: str = "median") -> Dict[str, Any]:
    recs = records(raw, stat)
    return {
        "stat": stat,
        "targets": targets(recs),
        "vs_c": vs_c(recs),
        "peers": peers(recs),
        "kvm": kvm_pairs(recs),
        "sweeps": sweeps(recs),
        "all": [{"bench": r["fullname"], "group": r["group"], "ns_per_op": r["ns"], "unit": r["unit"],
                 "us_per_call": r["seconds"] * 1e6, "ops": r["ops"], "rounds": r["rounds"]} for r in recs],
    }


def _fmt(v: Optional[float], digits: int = 3) -> str:
    if v is None:
        return "-"
    if v == 0 or not math.isfinite(v):
        return str(v)
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def _ratio(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.2g}x" if v < 0.1 else f"{v:.1f}x" if v < 100 else f"{v:,.0f}x"


def markdown(rep: Dict[str, Any], *, plots: Iterable[Tuple[str, str]] = ()) -> str:
    """The report as Markdown tables (targets, peers, real KVM, sweeps, every benchmark)."""
    L: List[str] = []
    L.append(f"### Targets (each figure from this run; {rep['stat']} of the rounds)\n")
    L.append("| target | measured | limit | ratio | needed | status |")
    L.append("| --- | ---: | ---: | ---: | ---: | --- |")
    for t in rep["targets"]:
        status = "not measured" if t["ok"] is None else ("met" if t["ok"] else "**short**")
        lim = "-" if t["limit"] is None else f"<= {_fmt(t['limit'])} {t['unit']}"
        need = "-" if t["ratio_min"] is None else f">= {t['ratio_min']:g}x vs {t['vs']}"
        L.append(f"| {t['target']} | {_fmt(t['measured'])} {t['unit'] if t['measured'] is not None else ''} "
                 f"| {lim} | {_ratio(t['ratio'])} | {need} | {status} |")
    if rep.get("vs_c"):
        L.append("\n### Ours vs the plain C loop (benches/bench_cbase.py, same run; ours / C, lower is better)\n")
        L.append("| operation | kind | unit | ours (ns/unit) | C (ns/unit) | ours / C | target | status |")
        L.append("| --- | --- | --- | ---: | ---: | ---: | ---: | --- |")
        for c in rep["vs_c"]:
            status = ("-" if c["limit"] is None else "not measured") if c["ok"] is None else \
                ("met" if c["ok"] else "**short**")
            lim = "-" if c["limit"] is None else f"<= {c['limit']:g}x"
            ratio = "-" if c["ratio"] is None else f"{c['ratio']:.2f}x"
            L.append(f"| {c['what']} | {c['kind']} | {c['unit']} | {_fmt(c['ours_ns'])} | {_fmt(c['c_ns'])} | "
                     f"{ratio} | {lim} | {status} |")
    if rep["peers"]:
        L.append("\n### Peers, same data (ns per op; ratio = peer / ours, higher is better for ours)\n")
        labels = sorted({lab for g in rep["peers"].values() for lab in g}, key=lambda s: (s != "ours", s))
        L.append("| case | unit | " + " | ".join(labels) + " |")
        L.append("| --- | --- | " + " | ".join("---:" for _ in labels) + " |")
        for g, impls in rep["peers"].items():
            unit = next(iter(impls.values()))["unit"]
            cells = []
            for lab in labels:
                c = impls.get(lab)
                if c is None:
                    cells.append("-")
                elif lab == "ours":
                    cells.append(_fmt(c["ns_per_op"]))
                else:
                    cells.append(f"{_fmt(c['ns_per_op'])} ({_ratio(c['ratio_vs_ours'])})")
            L.append(f"| {g.replace('peers-', '')} | {unit} | " + " | ".join(cells) + " |")
    if rep["kvm"]:
        L.append("\n### Simulator vs this machine's real KVM (same slot sizes and dirty counts)\n")
        L.append("| operation | unit | simulator | real KVM | KVM / simulator |")
        L.append("| --- | --- | ---: | ---: | ---: |")
        for k in rep["kvm"]:
            L.append(f"| {k['what']} | {k['unit']} | {_fmt(k['sim'])} | {_fmt(k['kvm'])} | {_ratio(k['kvm_over_sim'])} |")
    sw = rep["sweeps"]
    if any(sw["grid_us"].values()):
        counts = sorted({n for kind in sw["grid_us"].values() for row in kind.values() for n in row})
        L.append("\n### Harvest cost (us per harvest) by memory size and dirty pages: bitmap / ring\n")
        L.append("| GiB | " + " | ".join(f"{n:,}" for n in counts) + " | ring cheaper below |")
        L.append("| ---: | " + " | ".join("---:" for _ in counts) + " | ---: |")
        for gib in sorted(set(sw["grid_us"].get("bitmap", {})) | set(sw["grid_us"].get("ring", {}))):
            b = sw["grid_us"].get("bitmap", {}).get(gib, {})
            r = sw["grid_us"].get("ring", {}).get(gib, {})
            cells = [f"{_fmt(b.get(n))} / {_fmt(r.get(n))}" for n in counts]
            c = sw["crossover"].get(gib, {})
            cx = {"between": lambda: f"{c['pages']:,} pages",
                  "ring-always": lambda: f"> {c['above']:,} (ring always cheaper)",
                  "bitmap-always": lambda: f"< {c['below']:,} (bitmap always cheaper)"}.get(
                c.get("kind"), lambda: "-")()
            L.append(f"| {gib} | " + " | ".join(cells) + f" | {cx} |")
        if sw.get("ours_clean_us") or sw["kvm_get_clean_us"]:
            sizes = sorted(set(sw.get("ours_clean_us", {})) | set(sw["kvm_get_clean_us"]))
            L.append("\nClean slot, us per call: our harvest kernel / real KVM_GET_DIRTY_LOG (KVM / ours)\n")
            L.append("| GiB | " + " | ".join(str(g) for g in sizes) + " |")
            L.append("| --- | " + " | ".join("---:" for _ in sizes) + " |")
            o, k = sw.get("ours_clean_us", {}), sw["kvm_get_clean_us"]
            L.append("| ours / KVM | " + " | ".join(
                f"{_fmt(o.get(g))} / {_fmt(k.get(g))}" + (f" ({_ratio(k[g] / o[g])})" if g in o and g in k else "")
                for g in sizes) + " |")
    cg = rep.get("callgrind")
    if cg:
        L.append("\n### Instruction counts (valgrind callgrind: noise-free; `python benches/callgrind.py`)\n")
        if cg.get("skipped"):
            L.append(f"Not measured: {cg['skipped']}.")
        else:
            L.append(f"Instructions executed inside the measured call, per op, over {cg.get('reps')} calls "
                     "(set-up and Python start-up not counted). They do not see cache misses or atomic "
                     "latency: the timings above remain the measure; a regression shows up here even "
                     "when timings wobble.\n")
            L.append("| case | unit | ours instr/op | C instr/op | ours / C |")
            L.append("| --- | --- | ---: | ---: | ---: |")
            for c in cg.get("cases", []):
                L.append(f"| {c['case']} | {c['unit']} | {c['ours_per_op']:.2f} | {c['c_per_op']:.2f} | "
                         f"{c['ratio']:.2f}x |")
    for title, path in plots:
        L.append(f"\n![{title}]({path})")
    L.append("\n<details><summary>Every benchmark of the run</summary>\n")
    L.append("| benchmark | group | per op | unit | us per call | rounds |")
    L.append("| --- | --- | ---: | --- | ---: | ---: |")
    for a in rep["all"]:
        L.append(f"| {a['bench']} | {a['group']} | {_fmt(a['ns_per_op'])} ns | {a['unit']} | "
                 f"{_fmt(a['us_per_call'])} | {a['rounds']} |")
    L.append("\n</details>")
    return "\n".join(L) + "\n"


# -- plots --------------------------------------------------------------------

def plot(rep: Dict[str, Any], out_dir: str) -> List[Tuple[str, str]]:
    """PNG plots into out_dir; returns (title, file name) pairs.  Raises ImportError without matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import os

    made = []
    sw = rep["sweeps"]
    grid = sw["grid_us"]
    if grid.get("bitmap") or grid.get("ring"):
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
        ax = axes[0]
        counts = sorted({n for kind in grid.values() for row in kind.values() for n in row})
        fixed_n = 4096 if 4096 in counts else (counts[len(counts) // 2] if counts else None)
        for kind, style in (("bitmap", "o-"), ("ring", "s-")):
            xs = sorted(g for g, row in grid.get(kind, {}).items() if fixed_n in row)
            ax.plot(xs, [grid[kind][g][fixed_n] for g in xs], style, label=f"{kind} ({fixed_n:,} dirty)")
        if sw.get("ours_clean_us"):
            xs = sorted(sw["ours_clean_us"])
            ax.plot(xs, [sw["ours_clean_us"][g] for g in xs], "v:", label="our harvest kernel, clean")
        if sw["kvm_get_clean_us"]:
            xs = sorted(sw["kvm_get_clean_us"])
            ax.plot(xs, [sw["kvm_get_clean_us"][g] for g in xs], "^--", label="real KVM_GET_DIRTY_LOG, clean")
        ax.set(xscale="log", yscale="log", xlabel="memory (GiB)", ylabel="us per harvest",
               title="Harvest cost vs memory size")
        ax.set_xticks(sorted({g for kind in grid.values() for g in kind}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.legend(fontsize=8)
        ax = axes[1]
        sizes = sorted(set(grid.get("bitmap", {})) & set(grid.get("ring", {})))
        fixed_g = 16 if 16 in sizes else (sizes[len(sizes) // 2] if sizes else None)
        for kind, style in (("bitmap", "o-"), ("ring", "s-")):
            row = grid.get(kind, {}).get(fixed_g, {})
            xs = sorted(row)
            ax.plot(xs, [row[n] for n in xs], style, label=f"{kind} ({fixed_g} GiB)")
        ax.set(xscale="log", yscale="log", xlabel="dirty pages per harvest", ylabel="us per harvest",
               title="Harvest cost vs dirty pages")
        ax.legend(fontsize=8)
        ax = axes[2]
        xs, ys, lo = [], [], []
        for g, c in sorted(sw["crossover"].items()):
            if c.get("kind") == "between":
                xs.append(g)
                ys.append(c["pages"])
            elif c.get("kind") == "ring-always":
                lo.append((g, c["above"]))
        if xs:
            ax.plot(xs, ys, "o-", label="crossover (ring cheaper below)")
        if lo:
            ax.plot([g for g, _ in lo], [n for _, n in lo], "^", label="ring cheaper at every count (>)")
        ax.set(xscale="log", yscale="log", xlabel="memory (GiB)", ylabel="dirty pages",
               title="Where the ring stops being cheaper")
        ax.set_xticks(sorted(sw["crossover"]) or [1])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "sweeps.png"), dpi=90)
        plt.close(fig)
        made.append(("Harvest cost: memory size, dirty pages, crossover", "sweeps.png"))
    vc = [c for c in rep.get("vs_c", []) if c["ratio"] is not None]
    if vc:
        fig, ax = plt.subplots(figsize=(12, 0.32 * len(vc) + 1.2))
        ys = list(range(len(vc)))[::-1]
        colors = ["tab:green" if c["ok"] else "tab:red" if c["ok"] is False else "tab:gray" for c in vc]
        ax.barh(ys, [c["ratio"] for c in vc], color=colors)
        for y, c in zip(ys, vc):
            if c["limit"] is not None:
                ax.plot([c["limit"], c["limit"]], [y - 0.4, y + 0.4], "k-", lw=2)
        ax.axvline(1.0, color="k", lw=0.8, ls=":")
        ax.set_yticks(ys)
        ax.set_yticklabels([f"{c['what']} ({c['kind']})" for c in vc], fontsize=7)
        ax.set(xlabel="ours / plain C loop (same run; black tick = target)",
               title="Every kernel and API path against its C baseline")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "vs_c.png"), dpi=90)
        plt.close(fig)
        made.append(("Ours / C baseline per kernel and API path", "vs_c.png"))
    dens = [(g, impls) for g, impls in rep["peers"].items() if g.startswith("peers-gfns-")]
    if dens:
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
        ax = axes[0]
        labels = sorted({lab for _, impls in dens for lab in impls}, key=lambda s: (s != "ours", s))
        x = [float(g.rsplit("-", 1)[1].rstrip("%")) for g, _ in dens]
        for lab in labels:
            pts = [(xi, impls[lab]["ns_per_op"]) for xi, (_, impls) in zip(x, dens) if lab in impls]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if lab == "ours" else ".--", label=lab)
        ax.set(xscale="log", yscale="log", xlabel="dirty (% of a 24 GiB slot)", ylabel="ns per dirty page",
               title="Bitmap -> gfn list: ours vs peers")
        ax.legend(fontsize=8)
        ax = axes[1]
        ring = [(g, impls) for g, impls in rep["peers"].items() if g.startswith("peers-ring-")]
        if ring:
            names = [g.replace("peers-ring-", "") for g, _ in ring]
            impls_all = sorted({lab for _, impls in ring for lab in impls}, key=lambda s: (s != "ours", s))
            w = 0.8 / max(1, len(impls_all))
            for i, lab in enumerate(impls_all):
                ax.bar([j + i * w for j in range(len(ring))],
                       [impls.get(lab, {}).get("ns_per_op", 0) for _, impls in ring], w, label=lab)
            ax.set_xticks([j + w * (len(impls_all) - 1) / 2 for j in range(len(ring))])
            ax.set_xticklabels(names, fontsize=8)
            ax.set(yscale="log", ylabel="ns per entry", title="Dirty ring: ours vs pure Python")
            lo, hi = ax.get_ylim()
            ax.set_ylim(lo, hi * 20)
            ax.legend(fontsize=8, loc="upper center", ncol=len(impls_all))
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "peers.png"), dpi=90)
        plt.close(fig)
        made.append(("Peers: gfn extraction by density, ring operations", "peers.png"))
    return made
