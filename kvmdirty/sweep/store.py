"""Where a sweep's results go, written as each cell finishes.

``results.jsonl`` is the record: one JSON object per finished cell, appended,
flushed and fsync'd before the cell counts as done, so an interrupted sweep
loses at most the cells that were still running.  Resume reads it back.
Beside it the same rows as one table, rewritten atomically from the record
every few seconds and at the end: ``results.parquet`` when pyarrow is
installed, ``results.csv`` otherwise.  A cell that ran twice (failed, then
resumed) keeps its last row.
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Dict, List, Optional, Set

RECORD = "results.jsonl"
PARQUET = "results.parquet"
CSV = "results.csv"


def _clean(value: Any) -> Any:
    # JSON has no NaN or Infinity: a non-finite number is written as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_rows(path: str) -> List[Dict[str, Any]]:
    """Rows of a results folder (or of its ``results.jsonl``), the last row of each cell kept."""
    record = os.path.join(path, RECORD) if os.path.isdir(path) else path
    if not os.path.exists(record):
        raise ValueError(f"no sweep results at {path!r} (expected {RECORD})")
    rows: Dict[str, Dict[str, Any]] = {}
    with open(record, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                # Only the very last line can be torn (killed mid-write); skip it.
                continue
            if isinstance(row, dict) and "cell" in row:
                rows[row["cell"]] = row
    return list(rows.values())


class ResultStore:
    """Append-only results of one sweep in folder ``path``."""

    def __init__(self, path: str, *, table: Optional[str] = None) -> None:
        os.makedirs(path, exist_ok=True)
        self.path = path
        if table is None:
            try:
                import pyarrow  # noqa: F401
                table = "parquet"
            except ImportError:
                table = "csv"
        if table not in ("parquet", "csv"):
            raise ValueError(f"table must be 'parquet' or 'csv', got {table!r}")
        self.table = table
        self._record = open(os.path.join(path, RECORD), "a", encoding="utf-8")
        self._dirty = False

    @property
    def table_path(self) -> str:
        return os.path.join(self.path, PARQUET if self.table == "parquet" else CSV)

    def done_keys(self) -> Set[str]:
        """Cells already finished successfully (resume skips them)."""
        try:
            return {r["cell"] for r in read_rows(self.path) if r.get("status") == "ok"}
        except ValueError:
            return set()

    def add(self, row: Dict[str, Any]) -> None:
        """Record one finished cell durably."""
        row = {k: _clean(v) for k, v in row.items()}
        self._record.write(json.dumps(row, allow_nan=False, default=str) + "\n")
        self._record.flush()
        os.fsync(self._record.fileno())
        self._dirty = True

    def flush(self) -> None:
        """Rewrite the table from the record (atomically: readers never see half a file)."""
        if not self._dirty:
            return
        self._dirty = False
        rows = read_rows(self.path)
        tmp = self.table_path + ".tmp"
        if self.table == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq
            pq.write_table(pa.Table.from_pylist(_uniform(rows)), tmp)
        else:
            cols: List[str] = []
            for r in rows:
                cols += [k for k in r if k not in cols]
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=cols)
                w.writeheader()
                w.writerows(rows)
        os.replace(tmp, self.table_path)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._record.close()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _uniform(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    # Parquet columns have one type: a column that mixes ints and floats is float.
    cols: Dict[str, type] = {}
    for r in rows:
        for k, v in r.items():
            if isinstance(v, float) or (cols.get(k) is float and isinstance(v, int)):
                cols[k] = float
            elif k not in cols and v is not None:
                cols[k] = type(v)
    keys = list(cols)
    out = []
    for r in rows:
        row = {}
        for k in keys:
            v = r.get(k)
            if v is not None and cols[k] is float and not isinstance(v, bool):
                v = float(v)
            elif v is not None and cols[k] is str and not isinstance(v, str):
                v = str(v)
            row[k] = v
        out.append(row)
    return out
