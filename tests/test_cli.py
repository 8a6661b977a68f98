"""The `kvmdirty` command, run for real (python -m kvmdirty) with small sizes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import kvmdirty as _pkg
from kvmdirty.cli import main, parse_size
from kvmdirty.collectors import BASE_DESIGNS, all_designs

SMALL = ["--memory", "8M", "--vcpus", "2", "--writes", "20000"]
# Where the kvmdirty under test lives: site-packages once installed, the
# checkout when built in place (never the bare source tree, which has no core).
PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(_pkg.__file__)))


def kvmdirty(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = PKG_PARENT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "kvmdirty", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=PKG_PARENT)


def test_compare_json_covers_every_design():
    p = kvmdirty("compare", *SMALL, "--json")
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""                    # no progress bar when not a terminal / --json
    out = json.loads(p.stdout)
    assert out["ok"] is True
    assert [r["design"] for r in out["results"]] == all_designs()
    sc = out["scenario"]
    assert sc["memory"] == 8 << 20 and sc["vcpus"] == 2 and sc["writes"] == 20000
    for r in out["results"]:
        assert r["writes"] == 40000
        assert r["lost_pages"] == 0 and r["ok"] is True
        assert r["pages_harvested"] > 0 and r["harvest_calls"] >= 1
        assert r["wp_faults"] > 0 and r["tracking_s"] > 0 and r["writes_per_s"] > 0
        assert r["tracking_ns_per_page"] > 0
        assert r["full_exits"] >= 0


def test_compare_options_reach_the_run(tmp_path):
    trace = tmp_path / "t.txt"
    trace.write_text("\n".join(str(i % 100) for i in range(500)))
    p = kvmdirty("compare", *SMALL, "--json", "--deterministic", "--designs", "bitmap,ring",
                 "--pattern", "trace", "--trace", str(trace), "--ring-entries", "512",
                 "--seed", "9", "--check", "both", "--rate", "100,50")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    sc = out["scenario"]
    assert (sc["mode"], sc["seed"], sc["ring_entries"], sc["rounds"]) == ("deterministic", 9, 512, 8)
    assert sc["workload"]["pattern"] == "trace"
    assert [r["design"] for r in out["results"]] == ["bitmap", "ring"]
    for r in out["results"]:
        assert r["writes"] == 20000 + 10000
        assert r["violations"] == 0 and r["lost_pages"] == 0
        # 100 distinct pages: at most 100 per harvest.
        assert 0 < r["pages_harvested"] <= 100 * r["harvest_calls"]


def test_compare_deterministic_json_repeats():
    args = ("compare", *SMALL, "--json", "--deterministic", "--designs", "bitmap,clear-log")
    a, b = (json.loads(kvmdirty(*args).stdout)["results"] for _ in range(2))
    keys = ("writes", "wp_faults", "pages_harvested", "harvest_calls", "full_exits")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]


def test_compare_table():
    p = kvmdirty("compare", *SMALL, "--designs", "bitmap,clear-log", "--pattern", "hotcold",
                 "--hot-fraction", "0.2")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert "8 MiB guest, 2 vCPUs, hotcold" in lines[0]
    head = " ".join(lines[1:3])                     # names, then units
    assert "lost" in head and "WP" in head and "ns per" in head and "stall" in head and "ms" in head
    rows = [line.split() for line in lines if len(line.split()) > 3
            and line.split()[1] in ("bitmap", "clear-log")]
    assert sorted(r[1] for r in rows) == ["bitmap", "clear-log"]
    assert all(r[-1] == "0" for r in rows)          # lost pages


@pytest.mark.parametrize("args,msg", [
    (["--designs", "nope"], "unknown design"),
    (["--memory", "1000"], "multiple of 4096"),
    (["--duration", "1", "--deterministic"], "duration needs threads"),
])
def test_compare_errors_exit_2(args, msg, capsys):
    assert main(["compare", *SMALL[:4], *args]) == 2
    assert msg in capsys.readouterr().err


def test_usage_errors():
    p = kvmdirty("compare", "--memory", "lots")
    assert p.returncode == 2 and "not a size" in p.stderr
    p = kvmdirty("compare", "--writes", "10", "--duration", "1")
    assert p.returncode == 2
    assert kvmdirty().returncode == 2


def test_list_designs(capsys):
    assert main(["compare", "--list-designs"]) == 0
    assert capsys.readouterr().out.split() == all_designs()


def test_info_subcommand_exists(capsys):
    rc = main(["info"])
    out = capsys.readouterr()
    try:
        import kvmdirty.info  # noqa: F401
    except ImportError:
        assert rc == 1 and "not available" in out.err
    else:
        assert rc in (0, 1)


def test_parse_size():
    assert parse_size("4G") == 4 << 30
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("1.5k") == 1536
    assert parse_size("65536") == 65536


def _kvm_usable() -> bool:
    try:
        from kvmdirty.kvm import KvmVM
        KvmVM().close()
        return True
    except (ImportError, OSError):
        return False


@pytest.mark.kvm
@pytest.mark.skipif(not _kvm_usable(), reason="/dev/kvm is missing or unusable here")
def test_compare_on_real_kvm():
    p = kvmdirty("compare", "--backend", "kvm", "--memory", "4M", "--vcpus", "2",
                 "--writes", "1000", "--ring-entries", "1024", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert [r["design"] for r in out["results"]] == [d for d in all_designs() if d in BASE_DESIGNS]
    for r in out["results"]:
        assert r["backend"] == "kvm" and r["writes"] == 2000 and r["lost_pages"] == 0
        assert r["wp_faults"] is None          # real KVM does not count them for us
