"""A small progress bar on stderr, no dependency.

Quiet unless the stream is a terminal (and not disabled, e.g. by --json), so
pipes, logs and CI output stay clean.  Redraws at most ten times a second.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

_WIDTH = 28


class Progress:
    def __init__(self, total: int, *, stream: Optional[TextIO] = None,
                 enabled: Optional[bool] = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = enabled
        self.total = max(1, total)
        self.done = 0           # finished items
        self.label = ""
        self._last = 0.0
        self._start = time.perf_counter()

    def start(self, label: str) -> None:
        """Begin the next item."""
        self.label = label
        self.update(0.0, force=True)

    def update(self, fraction: float, *, force: bool = False) -> None:
        """Progress within the current item, 0..1."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        overall = (self.done + min(1.0, max(0.0, fraction))) / self.total
        fill = int(overall * _WIDTH)
        bar = "#" * fill + "-" * (_WIDTH - fill)
        line = (f"\r[{bar}] {overall * 100:5.1f}%  {min(self.done + 1, self.total)}/{self.total} "
                f"{self.label:<22.22} {now - self._start:5.1f}s")
        self.stream.write(line)
        self.stream.flush()

    def finish_item(self) -> None:
        self.done += 1
        self.update(0.0, force=True)

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * (_WIDTH + 60) + "\r")
            self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
