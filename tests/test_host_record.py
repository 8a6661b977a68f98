"""`kvmdirty record`: the process's anonymous memory tracked by the host kernel, laid out as guest RAM."""
from __future__ import annotations

import os

import numpy as np
import pytest

from host_util import requires_host

from kvmdirty import _host, _kvm
from kvmdirty.cli import main
from kvmdirty.host import record as rec
from kvmdirty.trace import load
from kvmdirty.host.workloads_real import BUILTINS, make, python_workload

PAGE = 4096

MAPS = """\
7f0000000000-7f0000004000 rw-p 00000000 00:00 0 
7f0000004000-7f0000005000 r--p 00000000 00:00 0 
7f0000005000-7f0000006000 rw-p 00001000 08:01 1234 /usr/lib/libc.so
7f0000010000-7f0000012000 rw-p 00000000 00:00 0                          [heap]
7f0000020000-7f0000021000 rw-s 00000000 00:01 77                         /dev/zero (deleted)
7ffff0000000-7ffff0001000 rw-p 00000000 00:00 0                          [vvar]
7ffff0002000-7ffff0004000 rw-p 00000000 00:00 0                          [stack]
"""


def test_maps_parsing_keeps_writable_private_anonymous():
    got = [(m.start, m.end, m.name) for m in rec.anonymous_writable_mappings(MAPS)]
    assert got == [(0x7f0000000000, 0x7f0000004000, "[anon]"),
                   (0x7f0000010000, 0x7f0000012000, "[heap]"),
                   (0x7ffff0002000, 0x7ffff0004000, "[stack]")]


def test_layout_assigns_gfns_on_first_sight_and_keeps_them():
    lay = rec.GuestLayout()
    assert lay.cover(rec.Mapping(0x10000, 0x14000, "a")) == [(0x10000, 0x14000)]
    assert lay.cover(rec.Mapping(0x10000, 0x14000, "a")) == []
    # grown at both ends: only the new parts get gfns
    assert lay.cover(rec.Mapping(0xe000, 0x16000, "a")) == [(0xe000, 0x10000), (0x14000, 0x16000)]
    assert lay.next_gfn == 8
    regions = np.array([[0x10000, 0x12000], [0xe000, 0xf000], [0x15000, 0x16000], [0x90000, 0x91000]],
                       np.uint64)
    assert lay.gfns(regions).tolist() == [0, 1, 4, 7]       # unknown page dropped
    assert [r["gfn"] for r in lay.regions()] == [4, 0, 6]


@requires_host
def test_recorder_sees_exactly_the_pages_a_step_writes():
    m = _kvm.Mapping(256 * PAGE)
    _host.no_huge_pages(m.address, m.size)
    mem = np.frombuffer(m, dtype=np.uint64)
    mem[::512] = 1                       # present before recording: reported once at first sight
    rounds = []

    def step():
        k = len(rounds)
        rounds.append(k)
        for p in (3, 7, 100 + k % 5):
            mem[p * 512] = k
    try:
        tr = rec.record(step, 0.5, interval_s=0.01, workload="unit")
        (region,) = [r for r in tr.meta["regions"] if r["vaddr"] <= m.address < r["vaddr"] + r["pages"] * PAGE]
        base = region["gfn"] + (m.address - region["vaddr"]) // PAGE
        mine = tr.gfn[(tr.gfn >= base) & (tr.gfn < base + 256)] - base
        t_mine = tr.t_ns[(tr.gfn >= base) & (tr.gfn < base + 256)]
        first = t_mine == t_mine.min()
        assert set(mine[first].tolist()) == set(range(256))          # present at first sight
        assert set(mine[~first].tolist()) <= {3, 7, 100, 101, 102, 103, 104}
        assert {3, 7}.issubset(set(mine[~first].tolist()))
        assert tr.meta["samples"] >= 2 and tr.meta["interval_ns"] == 10_000_000
        assert tr.meta["memory_bytes"] >= (region["gfn"] + region["pages"]) * PAGE
    finally:
        m.close()


@requires_host
def test_record_picks_up_new_mappings():
    maps = []

    def step():
        if not maps:
            mm = _kvm.Mapping(64 * PAGE)
            _host.no_huge_pages(mm.address, mm.size)
            maps.append(mm)
        np.frombuffer(maps[0], dtype=np.uint64)[5 * 512] += 1
    try:
        # Under a sanitizer each sample of the (much larger) process takes longer.
        tr = rec.record(step, 3.0 if os.environ.get("KVMDIRTY_SANITIZER_RUN") else 0.3, interval_s=0.01)
        m = maps[0]
        (region,) = [r for r in tr.meta["regions"] if r["vaddr"] <= m.address < r["vaddr"] + r["pages"] * PAGE]
        base = region["gfn"] + (m.address - region["vaddr"]) // PAGE
        assert (tr.gfn == base + 5).sum() >= 3          # written again and again, seen each time
    finally:
        for mm in maps:
            mm.close()


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_workloads_do_real_work(name):
    step = make(name)
    for _ in range(3):
        step()


def gen_workload():
    data = bytearray(1 << 16)
    while True:
        data[0] = (data[0] + 1) % 256
        yield


def test_python_workloads():
    step = python_workload(f"{__name__}:gen_workload")
    step()
    step()
    assert python_workload("math:sqrt") is not None
    for bad in ("nomodule", "math:", "no_such_mod_x:f", "math:nothere", "math:pi"):
        with pytest.raises(ValueError):
            python_workload(bad)


@requires_host
def test_cli_record_then_dirtyrate(tmp_path, capsys):
    out = str(tmp_path / "t.npz")
    assert main(["record", "--workload", "sqlite", "--seconds", "1", "--interval", "20", "-o", out]) == 0
    assert "sqlite" in capsys.readouterr().out
    tr = load(out)
    assert tr.meta["workload"] == "sqlite" and len(tr) > 0 and tr.meta["kernel"]
    assert main(["dirtyrate", out, "--periods", "0.1,0.5"]) == 0
    table = capsys.readouterr().out
    assert "sampling" in table and "0.5 s" in table


def test_cli_record_without_host_tracking_fails_in_one_line(tmp_path, capsys, monkeypatch):
    from kvmdirty.host import tracker
    monkeypatch.setattr(tracker, "host_unusable", lambda: "this kernel has no PAGEMAP_SCAN ioctl")
    assert main(["record", "--workload", "zlib", "--seconds", "0.1", "-o", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "PAGEMAP_SCAN" in err[0]


def test_cli_dirtyrate_on_a_csv(tmp_path, capsys):
    p = tmp_path / "t.csv"
    p.write_text("t_ns,gpa\n" + "".join(f"{i * 1000000},{(i % 300) * 4096}\n" for i in range(1000)))
    assert main(["dirtyrate", str(p), "--trace-unit", "bytes", "--memory", "64M",
                 "--periods", "0.1", "--json"]) == 0
    import json
    d = json.loads(capsys.readouterr().out)
    assert d["rows"][0]["windows"] == 9 and d["trace"]["memory_bytes"] == 64 << 20
