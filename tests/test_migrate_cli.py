"""`kvmdirty migrate` and `kvmdirty calibrate`, run for real (python -m kvmdirty), small sizes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import kvmdirty as _pkg
from kvmdirty.migrate import COST_DOC, Costs
from kvmdirty.units import parse_rate, parse_size

PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(_pkg.__file__)))
SMALL = ["--memory", "64M", "--dirty-rate", "40M", "--bandwidth", "400M", "--max-bandwidth", "link",
         "--vcpus", "2"]


def kvmdirty(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = PKG_PARENT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "kvmdirty", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=PKG_PARENT)


def test_migrate_json_sweep():
    p = kvmdirty("migrate", *SMALL, "--designs", "bitmap,clear-log,ring",
                 "--ring-entries", "1024,4096", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    got = [(r["design"], r["params"]["ring_entries"]) for r in out["results"]]
    assert got == [("bitmap", 1024), ("clear-log", 1024), ("ring", 1024), ("ring", 4096)]
    for r in out["results"]:
        assert r["converged"] and r["verified"] and r["mismatched_gfns"] == []
        assert r["bytes_sent"] >= r["guest_bytes"] == 64 << 20
        assert r["table"][0]["pages_dirty"] == (64 << 20) // 4096
        assert len(r["vcpus"]) == 2 and 0 < r["progress"] <= 1.0
    assert set(out["costs"]["costs"]) == set(COST_DOC)


def test_migrate_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib")
    png = tmp_path / "t.png"
    p = kvmdirty("migrate", *SMALL, "--designs", "bitmap,ring", "--plot", str(png))
    assert p.returncode == 0, p.stderr
    assert "round" in p.stdout and "exp. downtime" in p.stdout and "verified" in p.stdout
    assert png.stat().st_size > 10_000


def test_migrate_injected_fault_exits_1():
    p = kvmdirty("migrate", "--memory", "32M", "--dirty-rate", "40M", "--bandwidth", "60M",
                 "--max-bandwidth", "link", "--vcpus", "2", "--fault", "unlogged-fault")
    assert p.returncode == 1
    assert "MISMATCH" in p.stdout and "destination differs" in p.stderr


def test_migrate_checkpoint_mode():
    p = kvmdirty("migrate", "--mode", "checkpoint", "--designs", "bitmap,ring", "--memory", "64M,256M",
                 "--dirty-rate", "20M", "--epoch", "0.05", "--checkpoints", "5", "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)["results"]
    assert [(r["design"], r["params"]["memory"]) for r in res] == [
        ("bitmap", 64 << 20), ("bitmap", 256 << 20), ("ring", 64 << 20), ("ring", 256 << 20)]
    for r in res:
        assert r["checkpoints"] == 5 and r["verified"]
        assert 0 < r["pause_p50"] <= r["pause_p99"] <= r["pause_max"]
        assert r["slowdown"] >= 1.0


def test_migrate_bad_usage():
    assert kvmdirty("migrate", "--designs", "nope").returncode == 2
    p = kvmdirty("migrate", "--designs", "bitmap", "--aid", "dirty-limit", "--memory", "8M")
    assert p.returncode == 2 and "dirty ring" in p.stderr
    assert kvmdirty("migrate", "--cost", "nope=1").returncode == 2


def test_calibrate_without_kvm_and_costs_roundtrip(tmp_path):
    out = tmp_path / "c.json"
    p = kvmdirty("calibrate", "--no-kvm", "--no-host", "--repeats", "1", "--out", str(out))
    assert p.returncode == 0, p.stderr
    c = Costs.load(out)
    assert c.host == {}
    assert set(c.entries) == set(COST_DOC)
    assert all(e.value >= 0 and "simulator" in e.source and "calibrate" in e.source
               for e in c.entries.values())
    p = kvmdirty("migrate", *SMALL, "--costs", str(out), "--cost", "wp_fault=0", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["costs"]["costs"]["wp_fault"]["value"] == 0
    assert r["results"][0]["vcpus"][0]["fault_time"] == 0


def test_shipped_profile_names_machine_and_command():
    c = Costs.default()
    assert c.machine and "kvmdirty calibrate" in c.command
    for name, e in c.entries.items():
        assert "kvmdirty calibrate" in e.source, name


def test_costs_reject_bad_profiles(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text('{"costs": {"ioctl": {"value": 1}}}')
    with pytest.raises(ValueError, match="lacks"):
        Costs.load(f)
    with pytest.raises(ValueError, match="unknown cost"):
        Costs.zero().override({"nope": 1})
    with pytest.raises(ValueError, match=">= 0"):
        Costs.zero().override({"ioctl": -1})


def test_units():
    assert parse_size("24G") == 24 << 30 and parse_size("1T") == 1 << 40
    assert parse_rate("800M") == 800e6 and parse_rate("800MB/s") == 800e6
    assert parse_rate("10Gb/s") == 1.25e9 and parse_rate("10Gbit") == 1.25e9
    assert parse_rate("128MiB/s") == 128 << 20
    for bad in ("x", "10Gb"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_calibrate_measures_the_host_kernel_and_real_kvm_where_usable(tmp_path):
    from kvmdirty.host import host_unusable
    from kvmdirty.info import kvm_unusable
    out = tmp_path / "c.json"
    p = kvmdirty("calibrate", "--repeats", "1", "--out", str(out))
    assert p.returncode == 0, p.stderr
    c = Costs.load(out)
    if host_unusable() is None:
        assert c.host["wp_fault_ns_per_page"] > 0 and c.host["harvest_clean_us_per_gib"] > 0
        # A guest write fault is charged at least what a real host page fault costs.
        assert c.wp_fault >= c.host["wp_fault_ns_per_page"] * 1e-9
        assert "host kernel (userfaultfd-wp" in p.stdout
    else:
        assert c.host == {}
    if kvm_unusable() is None:
        assert c.entries["get_log_per_gib"].source.startswith("real /dev/kvm")
        assert c.entries["ring_reset_per_entry"].source.startswith("real /dev/kvm")
    assert Costs.load(out).to_json() == c.to_json()          # the profile round-trips
