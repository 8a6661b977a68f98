#!/usr/bin/env bash
# CI smoke run of the benchmark suite: every benchmark body runs once, untimed
# (--benchmark-disable), in quick mode, so the benches cannot rot.  Peers whose
# optional packages are missing (bench extra) and /dev/kvm benchmarks skip with
# their reason.  Then `kvmdirty bench`'s report code renders a tiny real run.
# Needs the package installed (pip install ".[test]" at least).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
repo=$PWD
export KVMDIRTY_BENCH_QUICK=1
out=$(mktemp -d)
# An installed kvmdirty (CI) must be imported from site-packages, not from this
# source tree (it has no compiled core): run from elsewhere.  A tree built in
# place (setup.py build_ext --inplace) is imported from here.
if (cd / && python -c "import kvmdirty") 2>/dev/null; then
    pytest=(pytest); rundir=$out
else
    pytest=(python -m pytest); rundir=$repo
fi
echo "== bench smoke: pytest benches --benchmark-disable"
"${pytest[@]}" benches --benchmark-disable -q -p no:cacheprovider
echo "== bench smoke: kvmdirty bench report (one small group, timed)"
(cd "$rundir" && python -m kvmdirty.bench --quick --benches "$repo/benches" --out "$out" \
    -k "overhead or scan_clean") >"$out/stdout" 2>"$out/stderr" || { cat "$out/stderr" "$out/stdout"; exit 1; }
test -s "$out/results.json" && test -s "$out/report.md"
grep -q "Python overhead" "$out/report.md"
rm -rf "$out"
echo "== bench smoke took $(( $(date +%s) - start )) s"
