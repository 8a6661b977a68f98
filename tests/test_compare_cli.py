"""`kvmdirty compare` as a decision tool, run for real (small guest, short runs)."""
from __future__ import annotations

import json
import os

import pytest

from kvmdirty.cli import main
from kvmdirty.comparecolumns import COLUMNS
from test_cli import kvmdirty

GRID = ["--memory", "16M", "--vcpus", "2", "--designs", "bitmap,ring", "--dirty-rate", "20M",
        "--ring-entries", "256,1024", "--interval", "5,50", "--duration", "0.1"]


def test_grid_with_repeats_json():
    p = kvmdirty("compare", *GRID, "--repeat", "2", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["command"] == "compare" and out["meta"]["backend"] == "sim"
    assert out["scenario"]["swept"] == ["ring_entries", "interval"]
    assert len(out["cells"]) == 2 + 4 and len(out["results"]) == 12
    for r in out["results"]:
        assert r["ok"] and r["dirty_rate"] == 20e6 and r["achieved_rate"] > 0
        assert r["guest_s"] == pytest.approx(0.1, rel=0.5)
        assert r["setting"]["design"] == r["design"]
    rings = [c for c in out["cells"] if c["setting"]["design"] == "ring"]
    assert {(c["setting"]["ring_entries"], c["setting"]["interval"]) for c in rings} == \
        {(256, 0.005), (256, 0.05), (1024, 0.005), (1024, 0.05)}
    assert [c["rank"] for c in out["cells"]] == list(range(1, 7))
    assert set(out["best"]) == {"bitmap", "ring"}


def test_grid_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib")
    png = tmp_path / "grid.png"
    p = kvmdirty("compare", *GRID, "--repeat", "2", "--plot", str(png), "--max-stall-ms", "50")
    assert p.returncode == 0, p.stderr
    text = p.stdout
    assert "16 MiB guest, 2 vCPUs, uniform writes, 20 MB/s asked" in text.splitlines()[0]
    assert "best per design (least vCPU time lost to ring-full stalls" in text and "no single stall over 50 ms" in text
    assert "stall" in text and "guest" in text and "MB/s" in text and "±" in text
    assert png.stat().st_size > 10_000


def test_unpaced_default_rows_per_design():
    # 40,000 uniform writes over 16,384 pages leave ~1,400 never written before the end.
    p = kvmdirty("compare", "--memory", "64M", "--vcpus", "2", "--writes", "20000",
                 "--designs", "bitmap,clear-log")
    assert p.returncode == 0, p.stderr
    assert "unpaced (4096 writes per step)" in p.stdout.splitlines()[0]
    assert "clear-log: the first harvest of each run returned every page (INITIALLY_SET)" in p.stdout


@pytest.mark.parametrize("args,msg", [
    (["--dirty-rate", "0"], "dirty rate must be > 0"),
    (["--dirty-rate", "fast"], "not a dirty rate"),
    (["--ring-entries", "1024,,4096"], "empty item"),
    (["--interval", "10,10"], "twice"),
    (["--vcpus", "2,0"], "must be >= 1"),
    (["--dirty-rate", "8M", "--deterministic"], "needs threads"),
    (["--interval", "5,10", "--deterministic"], "--period"),
    (["--objective", "fastest"], "invalid choice"),
    (["--max-stall-ms", "nan"], "finite"),
    (["--repeat", "0"], "must be >= 1"),
])
def test_bad_input_is_one_line_and_exit_2(args, msg, capsys):
    try:
        status = main(["compare", "--memory", "8M", "--vcpus", "2", *args])
    except SystemExit as e:             # argparse's own errors exit from parse_args
        status = e.code
    assert status == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_every_column_is_defined_in_help_and_readme():
    p = kvmdirty("compare", "--help")
    assert p.returncode == 0
    help_text = " ".join(p.stdout.split())
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md"),
              encoding="utf-8") as f:
        readme = f.read()
    for c in COLUMNS:
        assert c.title in help_text, c.title
        assert f"`{c.title}`" in readme, c.title


def test_compare_and_migrate_share_the_json_envelope():
    c = json.loads(kvmdirty("compare", "--memory", "8M", "--vcpus", "2", "--writes", "2000",
                            "--designs", "bitmap", "--json").stdout)
    m = json.loads(kvmdirty("migrate", "--memory", "64M", "--vcpus", "2", "--dirty-rate", "20M",
                            "--ring-entries", "1024,4096", "--designs", "ring", "--json").stdout)
    for out, command, time_base in ((c, "compare", "real"), (m, "migrate", "virtual")):
        assert out["schema"] == "kvmdirty.results/1" and out["command"] == command
        assert out["meta"]["time"] == time_base and out["meta"]["backend"] == "sim"
        assert {"name", "about", "swept", "memory", "vcpus", "dirty_rate", "ring_entries"} <= set(out["scenario"])
    assert set(c["meta"]) == set(m["meta"])
    assert m["scenario"]["ring_entries"] == [1024, 4096] and m["scenario"]["swept"] == ["ring_entries"]
    assert c["scenario"]["swept"] == [] and c["scenario"]["memory"] == 8 << 20
