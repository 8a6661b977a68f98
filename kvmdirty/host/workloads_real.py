"""Real workloads for `kvmdirty record`: real libraries doing real work in this process.

Each built-in is a factory: it sets its data up and returns a ``step()``
function that does one slice of work (a few milliseconds); the recorder calls
``step()`` until the time is up.

    sqlite   an in-memory SQLite database: batches of inserts, updates of
             random rows by key, and deletes, each batch one transaction
    numpy    a 5-point stencil (Jacobi sweeps) over a 1024x1024 float64 grid,
             with a 256x256 matrix product every few sweeps
    heap     a Python object heap under churn: dicts, lists and strings
             created, mutated and dropped at random (the allocator and the
             garbage collector at work)
    zlib     zlib compressing a stream of semi-compressible data, keeping a
             bounded window of compressed output

``--python module:function`` names a callable of your own: it is called
with no arguments, repeatedly, until the time is up (a generator function's
generator is advanced instead, so setup can run once before the first yield).
"""
from __future__ import annotations

import importlib
import inspect
import random
import sqlite3
import zlib
from collections import deque
from typing import Callable, Dict

import numpy as np

Step = Callable[[], object]


def sqlite_workload(seed: int = 0) -> Step:
    rng = random.Random(seed)
    db = sqlite3.connect(":memory:", check_same_thread=False)
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k INTEGER, v TEXT)")
    db.execute("CREATE INDEX t_k ON t (k)")
    next_id = [0]

    def step() -> None:
        with db:
            rows = [(next_id[0] + i, rng.randrange(1 << 30), "x" * rng.randrange(16, 200))
                    for i in range(400)]
            next_id[0] += len(rows)
            db.executemany("INSERT INTO t VALUES (?, ?, ?)", rows)
            ids = [(rng.randrange(next_id[0]),) for _ in range(200)]
            db.executemany("UPDATE t SET v = v || 'u', k = k + 1 WHERE id = ?", ids)
            db.executemany("DELETE FROM t WHERE id = ?", ids[:20])
    step.db = db          # keep the connection alive with the step
    return step


def numpy_workload(seed: int = 0) -> Step:
    rng = np.random.default_rng(seed)
    a = rng.random((1024, 1024))
    b = np.empty_like(a)
    m = rng.random((256, 256))
    sweeps = [0]

    def step() -> None:
        nonlocal a, b, m
        b[1:-1, 1:-1] = 0.25 * (a[:-2, 1:-1] + a[2:, 1:-1] + a[1:-1, :-2] + a[1:-1, 2:])
        a, b = b, a
        sweeps[0] += 1
        if sweeps[0] % 4 == 0:
            m = m @ m
            m /= np.abs(m).max()
    return step


def heap_workload(seed: int = 0) -> Step:
    rng = random.Random(seed)
    live: Dict[int, object] = {}
    counter = [0]

    def step() -> None:
        for _ in range(2000):
            counter[0] += 1
            r = rng.random()
            if r < 0.5 or not live:
                kind = rng.randrange(3)
                obj = ({str(i): i for i in range(rng.randrange(1, 20))} if kind == 0 else
                       [rng.random() for _ in range(rng.randrange(1, 50))] if kind == 1 else
                       "s" * rng.randrange(1, 500))
                live[counter[0]] = obj
            elif r < 0.8:
                live.pop(rng.choice(list(live)) if len(live) < 64 else next(iter(live)))
            else:
                o = live[rng.choice(list(live)) if len(live) < 64 else next(reversed(live))]
                if isinstance(o, list):
                    o.append(rng.random())
                elif isinstance(o, dict):
                    o[str(rng.random())] = 1
        while len(live) > 50_000:
            live.pop(next(iter(live)))
    return step


def zlib_workload(seed: int = 0) -> Step:
    rng = np.random.default_rng(seed)
    words = [bytes(rng.integers(97, 123, rng.integers(2, 10)).astype(np.uint8))
             for _ in range(2000)]
    comp = zlib.compressobj(6)
    window: deque = deque(maxlen=256)

    def step() -> None:
        idx = rng.integers(0, len(words), 40_000)
        chunk = b" ".join(words[i] for i in idx)
        window.append(comp.compress(chunk))
        window.append(comp.flush(zlib.Z_SYNC_FLUSH))
    return step


BUILTINS: Dict[str, Callable[[int], Step]] = {
    "sqlite": sqlite_workload,
    "numpy": numpy_workload,
    "heap": heap_workload,
    "zlib": zlib_workload,
}


def python_workload(spec: str) -> Step:
    """``module:function`` -> a step function (see the module docstring)."""
    mod, sep, name = spec.partition(":")
    if not sep or not mod or not name:
        raise ValueError(f"--python wants module:function, got {spec!r}")
    try:
        obj = importlib.import_module(mod)
    except ImportError as e:
        raise ValueError(f"--python {spec}: cannot import {mod!r}: {e}") from None
    for part in name.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"--python {spec}: {mod!r} has no {name!r}") from None
    if not callable(obj):
        raise ValueError(f"--python {spec}: {name!r} is not callable")
    if inspect.isgeneratorfunction(obj):
        gen = obj()

        def step() -> None:
            try:
                next(gen)
            except StopIteration:
                raise ValueError(f"--python {spec}: the generator ended before the time was up") from None
        return step
    return obj


def make(name: str, seed: int = 0) -> Step:
    """A built-in workload's step function by name."""
    if name not in BUILTINS:
        raise ValueError(f"unknown workload {name!r}; built-ins: {', '.join(BUILTINS)}")
    return BUILTINS[name](seed)
