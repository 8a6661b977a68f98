#!/usr/bin/env bash
# Build the compiled core with ThreadSanitizer (setup.py's KVMDIRTY_TSAN=1) in a
# throwaway copy of the tree and run the concurrency, stress and fault tests
# against it with libtsan preloaded.  Any TSan report not suppressed in
# .ci/tsan.supp (each entry has a one-line reason) fails the run.
#
#   .ci/tsan.sh                               # the default test selection
#   .ci/tsan.sh tests/test_ring_threads.py    # extra args replace it (go to pytest)
#
# Environment:
#   KVMDIRTY_TSAN_KEEP=1   keep the build directory (printed) for debugging
#   KVMDIRTY_TSAN_DIR=dir  build in (and keep) this directory; a later run with
#                          the same dir rebuilds only the changed modules
#   PYTHON                 interpreter to use (default: python3)
#
# Only the extensions are instrumented, not CPython: a race is seen when both
# accesses are in our C code (or one is in an instrumented libc call).  Races
# through CPython's own memory accesses are invisible here, not absent.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
start=$(date +%s)
PY=${PYTHON:-python3}
# The interpreter binary itself: a wrapper script (a pyenv shim is bash) would
# run under the preloaded libtsan too, and bash crashes there.
PY=$("$PY" -c 'import sys; print(sys.executable)')

CC=${CC:-gcc}
libtsan=$("$CC" -print-file-name=libtsan.so)
if [ ! -e "$libtsan" ]; then
    echo "tsan: $CC has no libtsan.so ($libtsan); install gcc's libtsan" >&2
    exit 2
fi
libtsan=$(readlink -f "$libtsan")

if [ -n "${KVMDIRTY_TSAN_DIR:-}" ]; then
    work=$KVMDIRTY_TSAN_DIR
    mkdir -p "$work"
    rm -rf "$work/tests"          # deleted tests must not linger
    export KVMDIRTY_TSAN_KEEP=1
else
    work=$(mktemp -d "${TMPDIR:-/tmp}/kvmdirty-tsan.XXXXXX")
fi
cleanup() {
    if [ "${KVMDIRTY_TSAN_KEEP:-0}" = 1 ]; then
        echo "tsan: kept $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

echo "== tsan: copying sources to $work"
tar -C "$root" -cf - \
    --exclude='./build' --exclude='*.so' --exclude='./src/*.c' \
    --exclude='__pycache__' --exclude='.hypothesis' --exclude='.pytest_cache' \
    --exclude='./.git' --exclude='*.egg-info' \
    setup.py pyproject.toml src kvmdirty tests .ci/tsan.supp $( [ -f README.md ] && echo README.md ) \
    | tar -C "$work" -xf -

if ! "$PY" -c "import Cython" 2>/dev/null; then
    echo "== tsan: installing Cython (build requirement)"
    "$PY" -m pip install -q "cython>=3.1"
fi

echo "== tsan: building with KVMDIRTY_TSAN=1"
(cd "$work" && KVMDIRTY_TSAN=1 "$PY" setup.py -q build_ext --inplace -j2 \
     >"$work/build.log" 2>&1) || { tail -40 "$work/build.log"; exit 1; }
tsan_syms=$(nm -D "$work"/kvmdirty/_ring*.so | grep -c __tsan_init || true)
[ "$tsan_syms" -gt 0 ] || { echo "tsan: the extensions were not built with TSan" >&2; exit 1; }

# Reports go to the log (log_path) so pytest's capture cannot hide them;
# exitcode=66 makes a reported race fail the process even when pytest passes.
# report_signal_unsafe=0: CPython's signal handler calls non-async-safe code by design.
export TSAN_OPTIONS="suppressions=$work/.ci/tsan.supp:exitcode=66:halt_on_error=0:second_deadlock_stack=1:report_signal_unsafe=0:history_size=4:log_path=$work/tsan"
export PYTHONMALLOC=malloc
# The concurrency tests scale themselves down under this flag (as under ASan).
export KVMDIRTY_SANITIZER_RUN=1
export PYTHONDONTWRITEBYTECODE=1

tests=("$@")
if [ ${#tests[@]} -eq 0 ]; then
    tests=(tests/test_ring_threads.py tests/test_vm_threads.py tests/test_stress.py
           tests/test_faults.py tests/test_hostile_kernels.py)
fi

echo "== tsan: pytest (LD_PRELOAD=$libtsan)"
cd "$work"
LD_PRELOAD="$libtsan" "$PY" -c "import kvmdirty, sys; \
    assert kvmdirty.__file__.startswith('$work'), kvmdirty.__file__; print('   kvmdirty from', kvmdirty.__file__)"
rc=0
LD_PRELOAD="$libtsan" "$PY" -m pytest -p no:cacheprovider -q -ra "${tests[@]}" 2>&1 | tee "$work/pytest.log" || rc=$?

reports=$(cat "$work"/tsan.* 2>/dev/null | grep -c "WARNING: ThreadSanitizer" || true)
if [ "$reports" -gt 0 ]; then
    echo "== tsan: $reports report(s):" >&2
    cat "$work"/tsan.* | head -200 >&2
    [ "$rc" -ne 0 ] || rc=1
fi
echo "== tsan took $(( $(date +%s) - start )) s (rc=$rc, reports=$reports)"
exit $rc
