"""`kvmdirty bench`: run the benchmark suite, write results JSON, tables and PNG plots.

    kvmdirty bench --quick                     # a few minutes: fewer points and rounds
    kvmdirty bench --out docs/bench --markdown BENCHMARKS.md   # the full run behind BENCHMARKS.md

The suite is the pytest-benchmark files in ``benches/`` of a kvmdirty source
checkout (found in ./benches, next to the package, or given with --benches).
It runs in this process (pytest.main with --benchmark-json), so every figure
of the report comes from this one run; kvmdirty.benchreport turns it into the
target checks, peer ratios, simulator-vs-KVM table and sweep curves.

Needs the ``bench`` extra: pytest-benchmark (required), bitarray and
pyroaring (their peers skip without them), matplotlib (plots; without it the
tables are still written and a message says why there is no PNG).

Wiring into the CLI (kvmdirty/cli.py):  ``from .bench import add_parser as _add_bench``
and ``("bench", _add_bench),`` in COMMANDS: add_parser returns the handler.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

Handler = Callable[[argparse.Namespace], int]

QUICK_ENV = "KVMDIRTY_BENCH_QUICK"


def add_parser(subparsers) -> Handler:
    """Add the ``bench`` subcommand to an argparse subparsers object; return its handler (``run``)."""
    p = subparsers.add_parser(
        "bench", help="run the benchmark suite: per-op costs, peers, real KVM, sweeps, plots",
        description="Run kvmdirty's benchmark suite in this process and report per-operation costs, "
                    "ratios against every peer (numpy, bitarray, pyroaring, pure Python, the real "
                    "/dev/kvm) and against the project's targets, scaling sweeps with the bitmap/ring "
                    "crossover, as a table, JSON and PNG plots.")
    p.add_argument("--quick", action="store_true",
                   help="fewer sweep points and rounds: under a minute (figures are rougher)")
    p.add_argument("--out", default="bench-results", metavar="DIR",
                   help="directory for results.json, report.md, pytest.log and the PNGs (default bench-results)")
    p.add_argument("--markdown", metavar="FILE", default=None,
                   help="also write a complete BENCHMARKS.md-style page (table, plots, command, conditions)")
    p.add_argument("--benches", metavar="DIR", default=None,
                   help="the suite's directory (default: ./benches, or the source checkout's)")
    p.add_argument("-k", dest="keyword", default=None, metavar="EXPR",
                   help="only the benchmarks matching this pytest -k expression")
    p.add_argument("--no-kvm", action="store_true", help="skip the real /dev/kvm benchmarks")
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="statistic of the rounds used for per-op costs (default median)")
    p.add_argument("--from-json", metavar="FILE", default=None,
                   help="do not run: re-render the report of a saved results.json")
    p.add_argument("--callgrind", action="store_true",
                   help="also count the kernels' instructions per op under valgrind's callgrind "
                        "(benches/callgrind.py; skipped with a message when valgrind is missing)")
    p.add_argument("-v", "--verbose", action="store_true", help="show pytest's own output")
    p.set_defaults(handler=run)
    return run


def find_benches(explicit: Optional[str] = None) -> Optional[Path]:
    cands: List[Path] = []
    if explicit:
        cands.append(Path(explicit))
    else:
        cands.append(Path.cwd() / "benches")
        cands.append(Path(__file__).resolve().parent.parent / "benches")
    for c in cands:
        if (c / "conftest.py").is_file() and any(c.glob("bench_*.py")):
            return c.resolve()
    return None


def machine_info() -> Dict[str, Any]:
    """What the run was measured on, and how busy the machine was when it started."""
    info: Dict[str, Any] = {"python": platform.python_version(), "kernel": platform.release(),
                            "machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    with contextlib.suppress(OSError, AttributeError):
        info["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    try:
        import numpy
        info["numpy"] = numpy.__version__
    except ImportError:
        pass
    for mod in ("pytest_benchmark", "bitarray", "pyroaring", "matplotlib"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "?")
        except ImportError:
            info[mod] = None
    from . import __version__
    info["kvmdirty"] = __version__
    return info


class _Progress:
    """A pytest plugin that prints one line per finished benchmark (pytest's own output goes to a log)."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.done = self.skipped = self.failed = 0
        self.total = 0
        self.t0 = time.perf_counter()

    def pytest_collection_finish(self, session) -> None:
        self.total = len(session.items)
        print(f"kvmdirty bench: {self.total} benchmarks", file=self.stream, flush=True)

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            self.done += 1
            if report.skipped:
                self.skipped += 1
            elif report.failed:
                self.failed += 1
            mark = {"passed": "ok", "skipped": "skip", "failed": "FAIL"}[report.outcome]
            name = report.nodeid.split("::", 1)[-1]
            print(f"  [{self.done:3d}/{self.total}] {time.perf_counter() - self.t0:6.1f}s {mark:4s} "
                  f"{report.nodeid.split('::')[0].rsplit('/', 1)[-1]}::{name}",
                  file=self.stream, flush=True)


def _pytest_args(benches: Path, json_path: str, args: argparse.Namespace) -> List[str]:
    a = [str(benches), "--benchmark-only", f"--benchmark-json={json_path}", "-p", "no:cacheprovider",
         "-q", "-rfEs", "--benchmark-sort=name", "--continue-on-collection-errors"]
    if args.quick:
        a += ["--benchmark-max-time=0.05", "--benchmark-min-rounds=3", "--benchmark-warmup=off"]
    else:
        a += ["--benchmark-max-time=1.0", "--benchmark-min-rounds=5"]
    if args.keyword:
        a += ["-k", args.keyword]
    if args.no_kvm:
        a += ["-m", "not kvm"]
    return a


def run_suite(args: argparse.Namespace, out: Path) -> "tuple[int, Dict[str, Any]]":
    """Run the suite in-process; returns (pytest exit status, pytest-benchmark JSON)."""
    import pytest  # noqa: F401  (checked by the caller)

    benches = find_benches(args.benches)
    if benches is None:
        raise FileNotFoundError("the benchmark suite (benches/ with conftest.py) was not found: run from a "
                                "kvmdirty source checkout or pass --benches DIR")
    fd, json_path = tempfile.mkstemp(prefix="kvmdirty-bench-", suffix=".json")
    os.close(fd)
    old_env = os.environ.get(QUICK_ENV)
    os.environ[QUICK_ENV] = "1" if args.quick else "0"
    fd, log_name = tempfile.mkstemp(prefix="kvmdirty-bench-", suffix=".log")
    os.close(fd)
    log_path = Path(log_name)
    progress = _Progress(sys.stderr)
    try:
        with open(log_path, "w") as log:
            target = sys.stdout if args.verbose else log
            with contextlib.redirect_stdout(target), contextlib.redirect_stderr(target):
                status = pytest.main(_pytest_args(benches, json_path, args), plugins=[progress])
        try:
            with open(json_path) as f:
                raw = json.load(f)
        except (OSError, ValueError):
            raw = {"benchmarks": []}
        for b in raw.get("benchmarks", []):
            (b.get("stats") or {}).pop("data", None)       # every round's time: megabytes, not needed
        failed = bool(progress.failed) or int(status) not in (0, 5)
        if failed:
            kept = out / "pytest.log"                     # keep pytest's output next to the results
            kept.write_text(log_path.read_text())
    finally:
        with contextlib.suppress(OSError):
            log_path.unlink()
        if old_env is None:
            os.environ.pop(QUICK_ENV, None)
        else:
            os.environ[QUICK_ENV] = old_env
        with contextlib.suppress(OSError):
            os.unlink(json_path)
    print(f"kvmdirty bench: {progress.done} run, {progress.skipped} skipped, {progress.failed} failed "
          f"in {time.perf_counter() - progress.t0:.1f}s"
          + (f" (pytest output: {out / 'pytest.log'})" if failed else "")
          + ("" if args.verbose else "; -v shows pytest's own output"), file=sys.stderr)
    return int(status), raw


def run_callgrind(args: argparse.Namespace, out: Path) -> Optional[Dict[str, Any]]:
    """benches/callgrind.py in a child process: instructions per op, ours and C; None if skipped."""
    import shutil
    import subprocess
    benches = find_benches(args.benches)
    script = benches / "callgrind.py" if benches else None
    if script is None or not script.is_file():
        print("kvmdirty bench: --callgrind: benches/callgrind.py not found", file=sys.stderr)
        return None
    if shutil.which("valgrind") is None:
        print("kvmdirty bench: --callgrind skipped: valgrind is not installed", file=sys.stderr)
        return {"skipped": "valgrind is not installed"}
    dest = out / "callgrind.json"
    cmd = [sys.executable, str(script), "--json", str(dest)] + (["--quick"] if args.quick else [])
    print(f"kvmdirty bench: instruction counts: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    r = subprocess.run(cmd, stdout=sys.stderr)
    if r.returncode != 0 or not dest.is_file():
        return {"skipped": f"benches/callgrind.py failed (status {r.returncode})"}
    with open(dest) as f:
        return json.load(f)


def _command_line(args: argparse.Namespace) -> str:
    argv = getattr(args, "argv", None) or sys.argv[1:]
    return "kvmdirty " + " ".join(shlex.quote(a) for a in argv) if argv else "kvmdirty bench"


def _conditions(machine: Dict[str, Any], quick: bool) -> str:
    la = machine.get("loadavg_start")
    la_end = machine.get("loadavg_end")
    cpus = machine.get("cpus") or 1
    busy = la is not None and max(la[0], (la_end or la)[0]) > 0.5 * cpus
    return (f"{machine.get('cpu', '?')}, {cpus} CPUs, Linux {machine.get('kernel')}, Python {machine.get('python')}, "
            f"numpy {machine.get('numpy')}; load average at start {la}, at end {la_end}"
            + (" — **measured under contention** (other work was running: absolute figures are "
               "pessimistic and noisy)" if busy else " (quiet machine)")
            + ("; **quick mode** (fewer rounds and sweep points)" if quick else ""))


def render_markdown_page(rep: Dict[str, Any], machine: Dict[str, Any], command: str,
                         plots: List, rel_prefix: str, quick: bool) -> str:
    from . import benchreport
    body = benchreport.markdown(rep, plots=[(t, f"{rel_prefix}{p}") for t, p in plots])
    return (
        "# Benchmarks\n\n"
        "Per-operation costs of kvmdirty's primitives and of the KVM-shaped API, side by side with "
        "peers (plain numpy, bitarray, pyroaring, pure Python) and with this machine's real "
        "`/dev/kvm`, all measured in one run. Absolute times vary between machines and runs; the "
        "ratios are the point.\n\n"
        "Made by:\n\n"
        f"```\npip install -e \".[bench]\"\n{command}\n```\n\n"
        f"Measured on: {_conditions(machine, quick)}.\n"
        f"Run at {machine.get('date', '?')}; kvmdirty {machine.get('kvmdirty')}, pytest-benchmark "
        f"{machine.get('pytest_benchmark')}, bitarray {machine.get('bitarray')}, pyroaring "
        f"{machine.get('pyroaring')}.\n\n"
        "Every kernel and API-path row also stands beside a plain C loop doing the same job on the "
        "same data in the same run (benches/bench_cbase.py: scan/exchange/list a bitmap, collect and "
        "reset a ring with one atomic and-not per entry; built with the package's own compiler "
        "flags): the issue-#16 targets are those ours / C ratios. Instruction counts, a second view "
        "that does not wobble with the machine's load, come from `python benches/callgrind.py` "
        "(valgrind's callgrind; see the section at the end).\n\n"
        "Real KVM here is nested (each guest instruction costs ~4 us), which only affects how the "
        "pages get dirtied between rounds, not the timed ioctls. The seed-era designs and the ring "
        "primitives are in the same run (benches/bench_seeds.py, benches/bench_ring.py): see the "
        "full list at the end.\n\n"
        + body)


def run(args: argparse.Namespace) -> int:
    """The `kvmdirty bench` command; returns the exit status (0 ok, 1 a benchmark failed, 2 cannot run)."""
    from . import benchreport

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quick = bool(getattr(args, "quick", False))
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        raw, machine, status = saved["raw"], saved.get("machine", {}), 0
        quick = bool(saved.get("quick", quick))
        command = saved.get("command", _command_line(args))
    else:
        try:
            import pytest  # noqa: F401
            import pytest_benchmark  # noqa: F401
        except ImportError as e:
            print(f"kvmdirty bench: needs pytest and pytest-benchmark ({e}); install the bench extra: "
                  f"pip install \"kvmdirty[bench]\"", file=sys.stderr)
            return 2
        machine = machine_info()
        machine["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        command = _command_line(args)
        try:
            status, raw = run_suite(args, out)
        except FileNotFoundError as e:
            print(f"kvmdirty bench: {e}", file=sys.stderr)
            return 2
        with contextlib.suppress(OSError, AttributeError):
            machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    rep = benchreport.build(raw, args.stat)
    if args.from_json:
        rep["callgrind"] = saved.get("report", {}).get("callgrind")
    elif getattr(args, "callgrind", False):
        rep["callgrind"] = run_callgrind(args, out)
    plots: List = []
    plot_note = None
    try:
        plots = benchreport.plot(rep, str(out))
    except ImportError:
        plot_note = ("kvmdirty bench: matplotlib is not installed, so no PNG plots were made "
                     "(pip install matplotlib, or the bench extra); the tables and JSON are complete")
    results = {"command": command, "quick": quick, "machine": machine, "report": rep, "raw": raw}
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=1, default=str)
    table = benchreport.markdown(rep, plots=plots)
    (out / "report.md").write_text(table)
    if args.markdown:
        md = Path(args.markdown)
        rel = os.path.relpath(out.resolve(), md.resolve().parent)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        md.write_text(render_markdown_page(rep, machine, command, plots, prefix, quick))
    buf = io.StringIO()
    buf.write(table)
    print(buf.getvalue())
    print(f"Measured on: {_conditions(machine, quick)}")
    print(f"Wrote {out / 'results.json'}, {out / 'report.md'}"
          + "".join(f", {out / p}" for _, p in plots)
          + (f", {args.markdown}" if args.markdown else ""))
    if plot_note:
        print(plot_note, file=sys.stderr)
    if status not in (0, 5):
        print(f"kvmdirty bench: some benchmarks failed (pytest status {status}); see {out / 'pytest.log'}",
              file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Stand-alone entry point (``python -m kvmdirty.bench``), until the CLI wires it in."""
    parser = argparse.ArgumentParser(prog="kvmdirty")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "bench":
        argv = ["bench"] + argv
    args = parser.parse_args(argv)
    args.argv = argv
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
