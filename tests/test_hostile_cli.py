"""The `kvmdirty` command under hostile input (issue 10 items 15 and 19).

Every bad input ends in exactly one line on stderr and exit status 2, never a
traceback and never exit 1 (reserved for "a run lost writes"); --json is
strict JSON; a reader that goes away (``| head``) makes it exit quietly.
Run for real through ``python -m kvmdirty`` as tests/test_cli.py does.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from test_cli import PKG_PARENT, kvmdirty
from kvm_util import KVM_UNUSABLE

from kvmdirty.cli import EXIT_BROKEN_PIPE
from kvmdirty.compare import compare_grid, to_json_text
from kvmdirty.comparegrid import Knobs
from kvmdirty.runner import RunResult, RunSpec

SMALL = ["compare", "--memory", "8M", "--vcpus", "1", "--designs", "bitmap"]


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    d = tmp_path_factory.mktemp("traces")
    np.save(d / "nested.npy", np.zeros(3, dtype=[("vcpu", [("a", "<i4")]), ("gfn", "<i8")]))
    np.save(d / "subarray.npy", np.zeros(3, dtype=[("vcpu", "<i4", (2,)), ("gfn", "<i8")]))
    np.save(d / "fields.npy", np.zeros(3, dtype=[("cpu", "<i4"), ("gfn", "<i8")]))
    np.save(d / "float.npy", np.array([1.5, 2.5]))
    np.save(d / "u64.npy", np.array([2**63 + 5], dtype=np.uint64))
    np.save(d / "neg.npy", np.array([-1, 3], dtype=np.int64))
    np.save(d / "cube.npy", np.zeros((2, 2, 2), dtype=np.int64))
    np.save(d / "scalar.npy", np.int64(3))
    np.save(d / "empty.npy", np.zeros(0, dtype=np.int64))
    np.save(d / "outside.npy", np.array([1 << 40], dtype=np.int64))
    (d / "header.npy").write_bytes(b"\x93NUMPY\x01\x00\x10\x00{'descr': <i8'  \n")
    (d / "short.npy").write_bytes(b"\x93NUMPY\x01\x00")
    (d / "garbage.npy").write_bytes(os.urandom(300))
    (d / "big.txt").write_text(f"{2**63}\n")
    (d / "huge.txt").write_text(f"{10**30}\n")
    (d / "vcpu.txt").write_text(f"{2**64} 3\n")
    (d / "binary.txt").write_bytes(b"\xff\xfe\x00\x01")
    (d / "words.txt").write_text("one two\n")
    (d / "ragged.txt").write_text("1\n1 2\n")
    (d / "empty.txt").write_text("# nothing\n")
    return d


BAD = [
    # float options: NaN and inf pass "> 0" (item 15: --duration nan ran forever)
    ["--duration", "nan"], ["--duration", "inf"], ["--duration", "-1"], ["--duration", "0"],
    ["--duration", "1e400"], ["--interval", "inf"], ["--interval", "nan"], ["--interval", "0"],
    ["--interval", "-inf"], ["--hot-fraction", "nan"], ["--hot-fraction", "0"],
    ["--hot-share", "inf"], ["--hot-share", "1.5"], ["--zipf-s", "nan"], ["--zipf-s", "inf"],
    ["--zipf-s", "0"], ["--interval", "ten"],
    # integers out of range
    ["--writes", "0"], ["--writes", "-5"], ["--writes", "1e3"], ["--vcpus", "0"],
    ["--rate", str(10**20)], ["--rate", "1,2"], ["--rate", "0"], ["--seed", "-1"],
    ["--period", "0"], ["--slots", "0"], ["--slots", str(10**12)], ["--ring-entries", "0"],
    ["--memory", "0"], ["--memory", "1000"], ["--memory", "1.5.5"], ["--memory", "lots"],
    ["--memory", "99999999T"],
    # options that do not exist, or do not go together
    ["--bogus"], ["--writes", "10", "--duration", "1"], ["--duration", "1", "--deterministic"],
    ["--designs", "nope"], ["--pattern", "nope"], ["--pattern", "trace"], ["--check", "nope"],
    ["--backend", "nope"], ["--trace", "x.txt"],
]
TRACE_FILES = ["nested.npy", "subarray.npy", "fields.npy", "float.npy", "u64.npy", "neg.npy",
               "cube.npy", "scalar.npy", "empty.npy", "outside.npy", "header.npy", "short.npy",
               "garbage.npy", "big.txt", "huge.txt", "vcpu.txt", "binary.txt", "words.txt",
               "ragged.txt", "empty.txt", "missing.txt", "."]


def _assert_one_line_exit_2(p: subprocess.CompletedProcess, what) -> None:
    assert "Traceback" not in p.stderr, (what, p.stderr)
    assert p.returncode == 2, (what, p.returncode, p.stderr)
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and "error" in lines[0], (what, p.stderr)


@pytest.mark.parametrize("args", BAD, ids=[" ".join(a) for a in BAD])
def test_bad_option_one_line_exit_2(args):
    extra = [] if {"--writes", "--duration"} & set(args) else ["--writes", "100"]
    p = kvmdirty(*SMALL, *extra, *args, timeout=60)
    _assert_one_line_exit_2(p, args)


def test_strided_with_an_enormous_stride_runs():
    """--stride 10**23 was a traceback (uint64 overflow); a stride is taken mod the page count."""
    p = kvmdirty(*SMALL, "--writes", "100", "--pattern", "strided", "--stride", str(10**23), "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["results"][0]["writes"] == 100


@pytest.mark.parametrize("name", TRACE_FILES)
def test_bad_trace_one_line_exit_2(traces, name):
    p = kvmdirty(*SMALL, "--writes", "100", "--pattern", "trace", "--trace", str(traces / name),
                 timeout=60)
    _assert_one_line_exit_2(p, name)


@pytest.mark.skipif(KVM_UNUSABLE is not None, reason=f"real KVM unusable here: {KVM_UNUSABLE}")
@pytest.mark.parametrize("args", [
    ["--memory", "1000T"],                   # beyond what the guest can address
    ["--designs", "indexed-ring"],           # a simulator-only design
    ["--ring-entries", "3", "--designs", "ring"],
], ids=lambda a: " ".join(a))
def test_bad_kvm_input_one_line_exit_2(args):
    p = kvmdirty("compare", "--backend", "kvm", "--vcpus", "1", "--writes", "10",
                 *(["--memory", "8M"] if "--memory" not in args else []), *args, timeout=60)
    _assert_one_line_exit_2(p, args)


def test_no_command_and_unknown_command():
    assert kvmdirty().returncode == 2
    _assert_one_line_exit_2(kvmdirty("frobnicate"), "frobnicate")


def _closed_pipe_run(*args: str) -> subprocess.CompletedProcess:
    r, w = os.pipe()
    os.close(r)                                    # the reader is gone before anything is written
    env = dict(os.environ)
    env["PYTHONPATH"] = PKG_PARENT + os.pathsep + env.get("PYTHONPATH", "")
    try:
        return subprocess.run([sys.executable, "-m", "kvmdirty", *args], stdout=w,
                              stderr=subprocess.PIPE, text=True, timeout=120, env=env, cwd=PKG_PARENT)
    finally:
        os.close(w)


@pytest.mark.parametrize("args", [
    [*SMALL, "--writes", "1000", "--json"],
    [*SMALL, "--writes", "1000"],
    ["compare", "--list-designs"],
    ["info"],
], ids=["json", "table", "list-designs", "info"])
def test_closed_stdout_exits_quietly(args):
    """`--json | head -1` said "Broken pipe" (exit 2): now silent, status 141 (128 + SIGPIPE)."""
    p = _closed_pipe_run(*args)
    assert p.stderr == "" and p.returncode == EXIT_BROKEN_PIPE


def test_json_is_strict_even_with_non_finite_numbers():
    """Non-finite floats become null: `json.dumps` would print NaN / Infinity (invalid JSON)."""
    r = RunResult(design="bitmap", mode="threads", backend="sim", vcpus=1, memory=4096,
                  pattern="uniform", writes=1, wp_faults=1, pages_harvested=0, harvest_calls=1,
                  full_exits=0, tracking_s=math.nan, tracking_ns_per_page=math.inf,
                  tracking_wall_s=-math.inf, elapsed_s=0.0, writes_per_s=math.nan, check="shadow",
                  lost_pages=0, violations=None, unwritten_pages=0, lost=[], problems=[], bad_rounds=[])
    knobs = Knobs(["bitmap"], [4096], [1])
    text = to_json_text(compare_grid(RunSpec(memory=4096, vcpus=1), knobs,
                                     runner=lambda spec, on_progress=None: r))

    def refuse(name):
        raise AssertionError(f"non-JSON constant {name}")
    out = json.loads(text, parse_constant=refuse)
    row = out["results"][0]
    assert row["tracking_s"] is None and row["tracking_ns_per_page"] is None
    assert row["tracking_wall_s"] is None and row["writes_per_s"] is None and row["writes"] == 1
