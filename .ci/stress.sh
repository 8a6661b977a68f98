#!/usr/bin/env bash
# The long concurrency stress: for every design (bitmap, clear-log, ring and
# the seed-era designs of kvmdirty.seeds), 2 vCPU threads and a collector
# thread, 10^7 guest writes per design (override with KVMDIRTY_STRESS_EVENTS),
# verified with the shadow copy: zero lost, zero duplicated.
#
#   .ci/stress.sh                               # 10^7 writes per design
#   KVMDIRTY_STRESS_EVENTS=1e8 .ci/stress.sh    # a longer soak
#   .ci/stress.sh -k ring                       # extra args go to pytest
#
# Uses the kvmdirty importable from the checkout (build it in place first:
# python setup.py build_ext --inplace) or the installed one.
set -euo pipefail
cd "$(dirname "$0")/.."
export KVMDIRTY_STRESS_EVENTS=${KVMDIRTY_STRESS_EVENTS:-10000000}
start=$(date +%s)
echo "== stress: $KVMDIRTY_STRESS_EVENTS guest writes per design"
python3 -m pytest -p no:cacheprovider -q -s tests/test_stress.py "$@"
# The slow races: ordering bugs that only show when threads meet at the
# ring head (e.g. relaxed_collect), run until caught, bounded in time.
echo "== stress: slow fault-injection races (pytest -m slow)"
python3 -m pytest -p no:cacheprovider -q -m slow tests/test_faults.py
echo "== stress took $(( $(date +%s) - start )) s"
