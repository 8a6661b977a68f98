"""Running cells: the task every worker runs, and the two ways to run them.

``run_cell`` is the whole task: it runs one cell in the worker's process and
returns its row; a cell that raises is a row with status "failed" and the
error, never an exception that stops the sweep.

LocalExecutor   processes on this machine (concurrent.futures); a worker
                process that dies is replaced and its cell run again (at
                most ``attempts`` times, then recorded as failed).
DaskExecutor    a dask.distributed cluster: an existing scheduler's address
                ("tcp://host:8786"), or "local" for a LocalCluster of worker
                processes here.  Dask re-runs the tasks of a worker that dies
                (the scheduler's allowed-failures); a task that keeps killing
                workers is recorded as failed.
"""
from __future__ import annotations

import os
import socket
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from .cells import Cell

Row = Dict[str, Any]


def _worker_name() -> str:
    try:
        from distributed import get_worker
        return str(get_worker().address)
    except (ImportError, ValueError):
        return f"{socket.gethostname()}:{os.getpid()}"


def run_cell(command_name: str, options: Dict[str, Any], seed: int, key: str) -> Row:
    """Run one cell here and return its row (inputs, metrics, status, wall time, worker)."""
    from .. import __version__
    from .commands import command
    t0 = time.perf_counter()
    row: Row = {"cell": key, "command": command_name, "seed": seed}
    row.update(options)
    try:
        metrics = command(command_name).run(options, seed)
        for k, v in metrics.items():
            if k not in row:
                row[k] = v
        row["status"], row["error"] = "ok", None
    except Exception as e:  # noqa: BLE001 - a failed cell is data, not a crash
        row["status"] = "failed"
        row["error"] = f"{type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc(limit=8)
    row["wall_s"] = time.perf_counter() - t0
    row["worker"] = _worker_name()
    row["version"] = __version__
    return row


def failed_row(cell: Cell, error: str) -> Row:
    """The row of a cell that could not run at all (its worker died)."""
    from .. import __version__
    row: Row = {"cell": cell.key, "command": cell.command, "seed": cell.seed}
    row.update(cell.options)
    row.update(status="failed", error=error, wall_s=None, worker=None, version=__version__)
    return row


class LocalExecutor:
    """``workers`` processes on this machine."""

    def __init__(self, workers: int = 1, attempts: int = 3) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self.attempts = attempts
        self.describe = f"{workers} local worker process{'es' if workers > 1 else ''}"

    def _pool(self) -> ProcessPoolExecutor:
        import multiprocessing
        # forkserver: workers never inherit the threads or locks of this process.
        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("forkserver"))

    def run(self, cells: Iterable[Cell]) -> Iterator[Row]:
        queue: List[Tuple[Cell, int]] = [(c, 1) for c in cells]
        queue.reverse()
        pool = self._pool()
        running: Dict[Future, Tuple[Cell, int]] = {}
        try:
            while queue or running:
                # Keep a short queue per worker: cancelling on Ctrl-C stays cheap.
                while queue and len(running) < 2 * self.workers:
                    cell, attempt = queue.pop()
                    try:
                        fut = pool.submit(run_cell, cell.command, cell.options, cell.seed, cell.key)
                    except BrokenProcessPool:
                        queue.append((cell, attempt))
                        pool = self._restart(pool, running, queue)
                        continue
                    running[fut] = (cell, attempt)
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                broken = False
                for fut in done:
                    cell, attempt = running.pop(fut)
                    try:
                        yield fut.result()
                    except BrokenProcessPool:
                        broken = True
                        if attempt >= self.attempts:
                            yield failed_row(cell, f"worker died {attempt} times running it")
                        else:
                            queue.append((cell, attempt + 1))
                if broken:
                    pool = self._restart(pool, running, queue)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _restart(self, pool: ProcessPoolExecutor, running: Dict[Future, Tuple[Cell, int]],
                 queue: List[Tuple[Cell, int]]) -> ProcessPoolExecutor:
        # Every future of a broken pool fails: run their cells again.
        for fut, (cell, attempt) in list(running.items()):
            queue.append((cell, attempt))
        running.clear()
        pool.shutdown(wait=False, cancel_futures=True)
        return self._pool()


class DaskExecutor:
    """Cells as tasks on a dask.distributed cluster."""

    def __init__(self, scheduler: str = "local", workers: Optional[int] = None) -> None:
        try:
            import distributed  # noqa: F401
        except ImportError:
            raise ValueError("--scheduler needs Dask: pip install \"kvmdirty[dask]\"") from None
        self.scheduler = scheduler
        self.workers = workers
        self.describe = (f"Dask LocalCluster, {workers or 'default'} worker processes"
                         if scheduler == "local" else f"Dask scheduler {scheduler}")
        self._cluster = None
        self._client = None

    def __enter__(self) -> "DaskExecutor":
        from distributed import Client, LocalCluster
        if self.scheduler == "local":
            self._cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1,
                                         processes=True, dashboard_address=None)
            self._client = Client(self._cluster)
        else:
            if self.workers is not None:
                raise ValueError("--workers applies to local executors; a cluster has its own")
            try:
                self._client = Client(self.scheduler, timeout="10s")
            except (OSError, TimeoutError) as e:
                raise ValueError(f"cannot reach the Dask scheduler at {self.scheduler}: {e}") from None
        return self

    def __exit__(self, *exc) -> None:
        if self._client is not None:
            self._client.close()
        if self._cluster is not None:
            self._cluster.close()

    @property
    def client(self):
        return self._client

    def run(self, cells: Iterable[Cell]) -> Iterator[Row]:
        from distributed import as_completed
        from distributed.scheduler import KilledWorker
        cells = list(cells)
        futures = {}
        for c in cells:
            fut = self._client.submit(run_cell, c.command, c.options, c.seed, c.key,
                                      key=f"kvmdirty-cell-{c.key}", pure=False)
            futures[fut] = c
        try:
            for fut in as_completed(futures):
                try:
                    yield fut.result()
                except KilledWorker as e:
                    yield failed_row(futures[fut], f"workers died running it: {e}")
        finally:
            for fut in futures:
                if not fut.done():
                    fut.cancel()


def make_executor(scheduler: Optional[str], workers: Optional[int]):
    """The executor the command line asks for: local processes unless ``scheduler``."""
    if scheduler is None:
        return LocalExecutor(workers or 1)
    return DaskExecutor(scheduler, workers)


def drive(cells: List[Cell], executor, store, *, on_row: Optional[Callable[[Row], None]] = None,
          flush_every: float = 2.0) -> List[Row]:
    """Run ``cells`` (those not already in ``store``), recording each row as it lands."""
    rows = []
    last = time.monotonic()
    try:
        for row in executor.run(cells):
            store.add(row)
            rows.append(row)
            if on_row is not None:
                on_row(row)
            if time.monotonic() - last >= flush_every:
                store.flush()
                last = time.monotonic()
    finally:
        store.flush()
    return rows
