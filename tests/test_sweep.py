"""kvmdirty.sweep: specs, grids, the local executor, the results store, resume, summary."""
import json
import os
import signal
import time

import pytest

import child
from kvmdirty.sweep import (Constraint, LocalExecutor, ResultStore, Spec, expand, load, read_rows,
                            run_sweep, summarize)
from kvmdirty.sweep.spec import axis_values, from_mapping

# Small deterministic compare cells: the same cell gives the same counts anywhere.
FIXED = {"memory": "16M", "writes": 3000, "vcpus": 2, "mode": "deterministic", "rate": 256}
COUNTS = ("wp_faults", "pages_harvested", "harvest_calls", "full_exits", "lost_pages", "writes")


def _spec(tmp_path, **kw) -> Spec:
    axes = kw.pop("axes", {"design": ["bitmap", "ring"], "ring_entries": [1024, 4096]})
    return Spec("compare", fixed=dict(FIXED), axes=axes, out=str(tmp_path / "out"), **kw)


# -- specs and grids -----------------------------------------------------------------
def test_toml_spec_with_range_and_glob(tmp_path):
    (tmp_path / "traces").mkdir()
    for n in ("b.npy", "a.npy"):
        (tmp_path / "traces" / n).write_bytes(b"")
    (tmp_path / "s.toml").write_text(
        'command = "compare"\nseed = 7\n[fixed]\nmemory = "16M"\n'
        '[axes]\nvcpus = { range = [1, 4] }\ntrace = { glob = "traces/*.npy" }\n'
        '[outputs]\ndir = "res"\nobjective = "-writes_per_s"\nconstraints = ["lost_pages <= 0"]\n')
    spec = load(str(tmp_path / "s.toml"))
    assert spec.command == "compare" and spec.seed == 7
    assert spec.axes["vcpus"] == [1, 2, 3]
    assert spec.axes["trace"] == [str(tmp_path / "traces" / "a.npy"), str(tmp_path / "traces" / "b.npy")]
    assert spec.out == str(tmp_path / "res")
    assert spec.constraints == [Constraint("lost_pages", "<=", 0.0)]
    assert spec.size == 6


def test_yaml_spec(tmp_path):
    pytest.importorskip("yaml", reason="PyYAML is optional")
    (tmp_path / "s.yaml").write_text("command: compare\naxes:\n  design: [bitmap, ring]\n")
    assert load(str(tmp_path / "s.yaml")).axes == {"design": ["bitmap", "ring"]}


@pytest.mark.parametrize("doc, message", [
    ({"axes": {"design": ["bitmap"]}}, "command"),
    ({"command": "nope", "axes": {"design": ["bitmap"]}}, "cannot sweep"),
    ({"command": "compare", "axes": {"colour": [1]}}, "no option 'colour'"),
    ({"command": "compare", "axes": {"design": []}}, "no values"),
    ({"command": "compare", "axes": {"design": ["bitmap"]}, "fixed": {"design": "ring"}}, "both fixed"),
    ({"command": "compare", "axes": {"design": ["warp-drive"]}}, "design must be one of"),
    ({"command": "compare", "axes": {"design": ["bitmap"], "memory": ["lots"]}}, "not a size"),
    ({"command": "compare", "axes": {"design": ["bitmap"], "interval": [float("nan")]}}, "finite"),
    ({"command": "compare", "axes": {"design": ["bitmap"], "vcpus": [{"range": [1, 1]}]}}, "range"),
    ({"command": "compare", "axes": {"design": ["bitmap"], "seed": [1, 2]}}, "seed"),
    ({"command": "compare", "axes": {"trace": {"glob": "none/*.npz"}}}, "no file matches"),
    ({"command": "compare", "colour": 1}, "unknown spec keys"),
    ({"command": "compare", "outputs": {"constraints": ["x ~ 1"]}}, "not a constraint"),
])
def test_bad_specs_fail_before_any_cell_runs(tmp_path, doc, message):
    with pytest.raises(ValueError, match=message):
        expand(from_mapping(doc, base_dir=str(tmp_path)))


def test_cells_are_deduplicated_and_keyed_by_inputs(tmp_path):
    cells = expand(_spec(tmp_path))
    # A ring size means nothing to the bitmap design: 1 bitmap cell + 2 ring cells.
    assert [(c.options["design"], c.options.get("ring_entries")) for c in cells] == \
        [("bitmap", None), ("ring", 1024), ("ring", 4096)]
    again = expand(_spec(tmp_path))
    assert [(c.key, c.seed) for c in cells] == [(c.key, c.seed) for c in again]
    assert len({c.seed for c in cells}) == 3
    other_seed = expand(_spec(tmp_path, seed=1))
    assert not {c.key for c in cells} & {c.key for c in other_seed}
    # "16M" and 16 MiB in bytes are the same cell.
    fixed = dict(FIXED, memory=16 << 20)
    same = expand(Spec("compare", fixed=fixed, axes={"design": ["bitmap"]}))
    assert same[0].key == cells[0].key


def test_axis_values_forms(tmp_path):
    assert axis_values("x", 5) == [5]
    assert axis_values("x", {"range": [0.5, 2.0, 0.5]}) == [0.5, 1.0, 1.5]
    with pytest.raises(ValueError):
        axis_values("x", {"range": [0, 10, 0]})
    with pytest.raises(ValueError):
        axis_values("x", {"steps": 3})


# -- running, recording, resuming --------------------------------------------------
def test_local_sweep_records_every_cell_and_resumes(tmp_path):
    spec = _spec(tmp_path)
    first = run_sweep(spec, LocalExecutor(2))
    assert (first.cells, first.skipped, first.failed) == (3, 0, 0)
    rows = read_rows(spec.out)
    assert sorted(r["cell"] for r in rows) == sorted(c.key for c in expand(spec))
    for r in rows:
        assert r["status"] == "ok" and r["verified"] is True
        assert r["wall_s"] > 0 and r["worker"] and r["version"]
    # Resume: nothing left to do.
    again = run_sweep(spec, LocalExecutor(2))
    assert (again.skipped, len(again.rows)) == (3, 0)
    # Drop one finished row from the record (as if it never landed): only it runs.
    record = os.path.join(spec.out, "results.jsonl")
    lines = open(record).read().splitlines()
    victim = json.loads(lines[1])["cell"]
    with open(record, "w") as f:
        f.write("\n".join(lines[:1] + lines[2:]) + "\n")
    third = run_sweep(spec, LocalExecutor(1))
    assert [r["cell"] for r in third.rows] == [victim]
    assert len(read_rows(spec.out)) == 3


def test_same_cell_same_result_on_any_worker_count(tmp_path):
    a = {r["cell"]: r for r in run_sweep(_spec(tmp_path / "a"), LocalExecutor(1)).rows}
    b = {r["cell"]: r for r in run_sweep(_spec(tmp_path / "b"), LocalExecutor(2)).rows}
    assert a.keys() == b.keys()
    for k in a:
        assert {c: a[k][c] for c in COUNTS} == {c: b[k][c] for c in COUNTS}


def test_a_failing_cell_is_recorded_and_the_sweep_goes_on(tmp_path):
    missing = str(tmp_path / "no-such-trace.npy")
    spec = Spec("compare", fixed=dict(FIXED), axes={"design": ["bitmap", "ring"],
                                                    "trace": [missing]}, out=str(tmp_path / "o"))
    spec2 = Spec("compare", fixed=dict(FIXED), axes={"design": ["bitmap", "ring"]}, out=str(tmp_path / "o"))
    run = run_sweep(spec, LocalExecutor(2))
    assert run.failed == 2
    assert all("no-such-trace" in r["error"] for r in run.rows)
    ok = run_sweep(spec2, LocalExecutor(2))
    assert ok.failed == 0 and len(ok.rows) == 2
    # Failed cells are not "done": resuming the first spec runs them again.
    assert run_sweep(spec, LocalExecutor(1)).skipped == 0


def test_torn_last_line_is_ignored(tmp_path):
    spec = _spec(tmp_path, axes={"design": ["bitmap"]})
    run_sweep(spec, LocalExecutor(1))
    with open(os.path.join(spec.out, "results.jsonl"), "a") as f:
        f.write('{"cell": "abc", "sta')          # killed mid-write
    assert len(read_rows(spec.out)) == 1
    assert run_sweep(spec, LocalExecutor(1)).skipped == 1


@pytest.mark.parametrize("table", ["csv", "parquet"])
def test_results_table(tmp_path, table):
    if table == "parquet":
        pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is optional")
    spec = _spec(tmp_path)
    run_sweep(spec, LocalExecutor(2), table=table)
    if table == "csv":
        import csv
        with open(os.path.join(spec.out, "results.csv")) as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 3 and {r["design"] for r in rows} == {"bitmap", "ring"}
    else:
        t = pq.read_table(os.path.join(spec.out, "results.parquet"))
        assert t.num_rows == 3 and "wp_faults" in t.column_names


def test_store_writes_valid_json_for_non_finite_numbers(tmp_path):
    with ResultStore(str(tmp_path), table="csv") as s:
        s.add({"cell": "x", "status": "ok", "v": float("nan"), "w": float("inf")})
    line = open(tmp_path / "results.jsonl").read()
    assert json.loads(line) == {"cell": "x", "status": "ok", "v": None, "w": None}


# -- summary ------------------------------------------------------------------------
def test_summary_names_the_best_setting_per_axis_value():
    rows = [
        {"cell": "1", "status": "ok", "design": "bitmap", "bw": 1, "t": 10.0, "down": 0.1},
        {"cell": "2", "status": "ok", "design": "bitmap", "bw": 10, "t": 4.0, "down": 0.5},
        {"cell": "3", "status": "ok", "design": "ring", "bw": 1, "t": 8.0, "down": 0.2},
        {"cell": "4", "status": "ok", "design": "ring", "bw": 10, "t": 3.0, "down": 0.2},
        {"cell": "5", "status": "failed", "design": "ring", "bw": 5, "error": "boom"},
    ]
    s = summarize(rows, ["design", "bw"], "t", [Constraint.parse("down <= 0.3")])
    assert (s.cells, s.ok, s.failed, s.feasible) == (5, 4, 1, 3)
    best = {(b.axis, b.value): (b.objective, b.setting) for b in s.per_value}
    assert best[("design", "bitmap")] == (10.0, {"design": "bitmap", "bw": 1})   # bw=10 breaks down
    assert best[("design", "ring")] == (3.0, {"design": "ring", "bw": 10})
    assert best[("bw", 10)][0] == 3.0
    assert s.overall.setting == {"design": "ring", "bw": 10}
    assert s.importance["bw"] > 0
    hi = summarize(rows, ["design", "bw"], "-t")
    assert hi.overall.objective == 10.0
    with pytest.raises(ValueError, match="numeric"):
        summarize(rows, ["design"], "design")


# -- the command line -----------------------------------------------------------------
def _cli(*args, **kw):
    return child.run(["-m", "kvmdirty", "sweep", *args], timeout=240, **kw)


def test_cli_runs_summarizes_and_writes_the_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="the summary plot needs matplotlib")
    out = tmp_path / "res"
    sets = [a for k, v in FIXED.items() for a in ("--set", f"{k}={v}")]
    r = _cli("--command", "compare", *sets, "--axis", "design=bitmap,ring",
             "--axis", "ring_entries=1024,4096", "--workers", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "3 cells" in r.stdout and "overall best" in r.stdout
    assert (out / "summary.png").stat().st_size > 0
    s = _cli("--summarize", str(out), "--objective", "wp_faults", "--json")
    assert s.returncode == 0, s.stderr
    doc = json.loads(s.stdout)
    assert doc["objective"] == "wp_faults" and doc["ok"] == 3


@pytest.mark.parametrize("args, message", [
    ((), "give a SPEC"),
    (("--command", "compare", "--axis", "design"), "NAME=VALUE"),
    (("--command", "compare", "--axis", "design=bitmap", "--workers", "0"), "--workers"),
    (("--command", "compare", "--axis", "flux=1"), "no option"),
    (("--summarize", "/nonexistent/results"), "no sweep results"),
    (("no-such-spec.toml",), "cannot read spec"),
])
def test_cli_bad_usage_is_one_line_and_exit_2(tmp_path, args, message):
    r = _cli(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_ctrl_c_then_resume_runs_only_the_missing_cells(tmp_path):
    out = tmp_path / "res"
    sets = [a for k, v in dict(FIXED, writes=400_000, memory="64M").items() for a in ("--set", f"{k}={v}")]
    args = ["--command", "compare", *sets, "--axis", "design=bitmap,clear-log,ring",
            "--axis", "vcpus=1,2,3", "--workers", "1", "--out", str(out), "--json"]
    p = child.popen(["-m", "kvmdirty", "sweep", *args], start_new_session=True)
    record = out / "results.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not record.exists() or not record.read_text().strip()):
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)               # Ctrl-C reaches the whole process group
    _out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "resume" in err
    done = {json.loads(line)["cell"] for line in record.read_text().splitlines()}
    assert 1 <= len(done) < 9
    r = _cli(*args)
    assert r.returncode == 0, r.stderr
    assert f"resuming: {len(done)} of 9" in r.stderr
    rows = read_rows(str(out))
    assert len(rows) == 9 and all(r["status"] == "ok" for r in rows)
    # Each cell ran exactly once across both invocations.
    lines = record.read_text().splitlines()
    assert len(lines) == 9


# -- migrate cells ---------------------------------------------------------------------
MIGRATE = {"memory": "64M", "vcpus": 2, "dirty_rate": "20M", "max_bandwidth": "link"}


def test_migrate_cells_normalise_and_run(tmp_path):
    spec = Spec("migrate", fixed=dict(MIGRATE), out=str(tmp_path / "m"),
                axes={"design": ["bitmap", "ring"], "ring_entries": [1024, 4096],
                      "bandwidth": ["1Gb/s", "10Gb/s"]})
    cells = expand(spec)
    assert len(cells) == 6          # bitmap x 2 links + ring x 2 sizes x 2 links
    assert {c.options["bandwidth"] for c in cells} == {125e6, 1.25e9}
    run = run_sweep(spec, LocalExecutor(2))
    assert run.failed == 0
    for r in run.rows:
        assert r["verified"] is True and r["converged"] is True
        assert r["total_time_s"] > r["downtime_s"] > 0
    # The same cell gives the same (virtual-time) result on a second run.
    again = {r["cell"]: r for r in run_sweep(Spec("migrate", fixed=dict(MIGRATE), out=str(tmp_path / "n"),
                                                   axes=spec.axes), LocalExecutor(1)).rows}
    for r in run.rows:
        assert again[r["cell"]]["total_time_s"] == r["total_time_s"]


def test_migrate_checkpoint_cells(tmp_path):
    spec = Spec("migrate", fixed=dict(MIGRATE, mode="checkpoint", epoch=0.05, checkpoints=5),
                out=str(tmp_path / "c"), axes={"design": ["bitmap", "ring"]})
    run = run_sweep(spec, LocalExecutor(1))
    assert run.failed == 0
    for r in run.rows:
        assert r["verified"] is True and r["checkpoints"] == 5
        assert r["pause_max_s"] >= r["pause_p50_s"] > 0


def test_the_fleet_example_expands(tmp_path):
    spec = load(os.path.join(child.ROOT, "examples", "fleet.toml"))
    cells = expand(spec)
    assert spec.command == "migrate" and len(cells) == 20
