"""The rich Console of every command's tables: stdout closed early is the CLI's business.

rich's own answer to a reader that went away (``| head``) is to exit with
status 1; the kvmdirty command exits quietly with 141 (kvmdirty.cli).  This
Console hands the BrokenPipeError on, and can keep rows unfolded when stdout
is not a terminal (a pipe or a file has no width to fit).
"""
from __future__ import annotations

import sys

from rich.console import Console


class _Console(Console):
    def on_broken_pipe(self) -> None:          # rich >= 13: called instead of raising
        raise BrokenPipeError


def stdout_console(unfolded: bool = False, **kw) -> Console:
    """A Console on stdout; ``unfolded``: in a pipe or a file, rows are never folded to 80 columns."""
    if unfolded and not sys.stdout.isatty():
        kw.setdefault("width", 400)
    return _Console(**kw)
