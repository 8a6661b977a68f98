"""Run the atheris harness for a few seconds (skipped cleanly when atheris is not installed)."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("atheris")

HERE = os.path.dirname(os.path.abspath(__file__))
SECONDS = int(os.environ.get("KVMDIRTY_ATHERIS_SECONDS", "8"))


def test_atheris_kernels(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(HERE, "fuzz_kernels.py"),
                        f"-max_total_time={SECONDS}", "-rss_limit_mb=4096", "-print_final_stats=1"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=SECONDS * 10 + 60,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    crashes = sorted(x.name for x in tmp_path.iterdir() if x.name.startswith(("crash-", "timeout-", "oom-")))
    assert p.returncode == 0 and not crashes, (crashes, p.stderr[-4000:])
