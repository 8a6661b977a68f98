#!/usr/bin/env bash
# Build the compiled core with AddressSanitizer + UndefinedBehaviorSanitizer
# (setup.py's KVMDIRTY_SANITIZE=1) in a throwaway copy of the tree, and run the
# pytest suite against it.  Any sanitizer report fails the run.
#
#   .ci/sanitize.sh                  # the suite less the tool-level tests (below)
#   .ci/sanitize.sh tests            # the whole suite
#   .ci/sanitize.sh tests/test_lifetime.py -k words    # extra args go to pytest
#
# Environment:
#   KVMDIRTY_SANITIZE_KEEP=1   keep the build directory (printed) for debugging
#   KVMDIRTY_SANITIZE_DIR=dir  build in (and keep) this directory; a later run with
#                              the same dir rebuilds only the changed modules
#   PYTHON                     interpreter to use (default: python3)
#
# The working tree is never written to: sources are copied to a temporary
# directory, built in place there, and pytest runs from there (the copy's
# kvmdirty/ comes first on sys.path; the script checks it is the one imported).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
start=$(date +%s)
PY=${PYTHON:-python3}

CC=${CC:-gcc}
libasan=$("$CC" -print-file-name=libasan.so)
if [ ! -e "$libasan" ]; then
    echo "sanitize: $CC has no libasan.so ($libasan); install gcc's libasan" >&2
    exit 2
fi
libasan=$(readlink -f "$libasan")
# libstdc++ preloaded after libasan: ASan's __cxa_throw interceptor must find the
# real one at start-up, or the first C++ exception of a library loaded later
# (pyarrow, matplotlib's extensions) aborts with "CHECK failed ... real___cxa_throw".
libstdcxx=$(readlink -f "$("$CC" -print-file-name=libstdc++.so)")
preload="$libasan $libstdcxx"

if [ -n "${KVMDIRTY_SANITIZE_DIR:-}" ]; then
    work=$KVMDIRTY_SANITIZE_DIR
    mkdir -p "$work"
    rm -rf "$work/tests"          # deleted tests must not linger
    export KVMDIRTY_SANITIZE_KEEP=1
else
    work=$(mktemp -d "${TMPDIR:-/tmp}/kvmdirty-sanitize.XXXXXX")
fi
cleanup() {
    if [ "${KVMDIRTY_SANITIZE_KEEP:-0}" = 1 ]; then
        echo "sanitize: kept $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

echo "== sanitize: copying sources to $work"
# Sources only: no build/, no generated .c, no .so from the working tree.
tar -C "$root" -cf - \
    --exclude='./build' --exclude='*.so' --exclude='./src/*.c' \
    --exclude='__pycache__' --exclude='.hypothesis' --exclude='.pytest_cache' \
    --exclude='./.git' --exclude='*.egg-info' \
    setup.py pyproject.toml src kvmdirty tests examples $( [ -f README.md ] && echo README.md ) \
    | tar -C "$work" -xf -

if ! "$PY" -c "import Cython" 2>/dev/null; then
    echo "== sanitize: installing Cython (build requirement)"
    "$PY" -m pip install -q "cython>=3.1"
fi

echo "== sanitize: building with KVMDIRTY_SANITIZE=1 (ASan + UBSan)"
(cd "$work" && KVMDIRTY_SANITIZE=1 "$PY" setup.py -q build_ext --inplace -j2 \
     >"$work/build.log" 2>&1) || { tail -40 "$work/build.log"; exit 1; }
asan_syms=$(nm -D "$work"/kvmdirty/_bitmap*.so | grep -c __asan_init || true)
[ "$asan_syms" -gt 0 ] || { echo "sanitize: the extensions were not built with ASan" >&2; exit 1; }

# Sanitizer reports are written to fd 2 by the C runtime.  pytest runs with
# --capture=sys (not fd) so they reach the log even when the process aborts;
# the log is scanned afterwards, and halt_on_error makes the run fail anyway.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:allocator_may_return_null=1:print_summary=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:print_summary=1"
export PYTHONMALLOC=malloc
# The sanitizer run is slower: the fuzz and stress tests scale themselves down
# (KVMDIRTY_FUZZ_SCALE / the stress duration default to less under this flag).
export KVMDIRTY_SANITIZER_RUN=1
export PYTHONDONTWRITEBYTECODE=1

echo "== sanitize: pytest (LD_PRELOAD=$preload)"
cd "$work"
LD_PRELOAD="$preload" "$PY" -c "import kvmdirty, sys; \
    assert kvmdirty.__file__.startswith('$work'), kvmdirty.__file__; print('   kvmdirty from', kvmdirty.__file__)"
rc=0
log="$work/pytest.log"
# By default the tool-level tests are left out: the command line, migrate's
# model, sweeps and trace replay reach the compiled core only through calls the
# rest of the suite makes too (with hostile arguments), and under ASan they
# took half the run.  Pass `tests` to run everything.
default=(tests --ignore=tests/test_hostile_cli.py --ignore=tests/test_cli.py
         --ignore=tests/test_replay.py --ignore=tests/test_dirtyrate.py
         --ignore-glob='tests/test_migrate_*.py' --ignore-glob='tests/test_sweep*.py')
[ $# -gt 0 ] || set -- "${default[@]}"
LD_PRELOAD="$preload" "$PY" -m pytest -p no:cacheprovider --capture=sys -q -ra "$@" 2>&1 \
    | tee "$log" || rc=$?

if grep -Eq "ERROR: AddressSanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer" "$log"; then
    echo "== sanitize: sanitizer report(s) found:" >&2
    grep -En -A25 "ERROR: AddressSanitizer|runtime error:" "$log" | head -120 >&2
    [ "$rc" -ne 0 ] || rc=1
fi
echo "== sanitize took $(( $(date +%s) - start )) s (rc=$rc)"
exit $rc
