"""argparse ``type=`` converters shared by the subcommands.

Each turns one command-line word into a value or raises
``argparse.ArgumentTypeError`` (argparse then prints one line and exits 2);
the parsing itself is kvmdirty.units', so the command line and the Python
API accept the same spellings.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable, List, Optional, Tuple, TypeVar

from . import units

T = TypeVar("T")


def arg(fn: Callable[[str], T]) -> Callable[[str], T]:
    """``fn`` with its ValueError turned into argparse's one-line error."""
    def parse(text: str) -> T:
        try:
            return fn(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = getattr(fn, "__name__", "value")
    return parse


def parse_size(text: str) -> int:
    """'4G', '512MiB', '1.5g', '65536' (bytes) -> bytes; binary units (kvmdirty.units)."""
    return arg(units.parse_size)(text)


def int_at_least(lo: int, hi: Optional[int] = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi}, got {v}")
        return v
    return parse


positive_int = int_at_least(1)


def float_in(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Callable[[str], float]:
    """A finite float in [lo, hi] (open at either end if asked): NaN and inf never pass."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
            left, right = "(" if lo_open else "[", ")" if hi_open else "]"
            raise argparse.ArgumentTypeError(f"must be in {left}{lo:g}, {hi:g}{right}, got {v:g}")
        return v
    return parse


def list_of(one: Callable[[str], T]) -> Callable[[str], List[T]]:
    """A comma list of ``one`` (each item checked by it; empty items and repeats refused)."""
    def parse(text: str) -> List[T]:
        items = [t.strip() for t in text.split(",")]
        if not any(items):
            raise argparse.ArgumentTypeError(f"empty list: {text!r}")
        if not all(items):
            raise argparse.ArgumentTypeError(f"an empty item in {text!r}")
        out = [one(t) for t in items]
        if len(set(map(repr, out))) != len(out):
            raise argparse.ArgumentTypeError(f"a value is given twice in {text!r}")
        return out
    return parse


def dirty_rate(text: str) -> Tuple[float, bool]:
    """'800M' (bytes/s for the guest) or '200M/vcpu' (per vCPU): (bytes/s, per vCPU)."""
    return arg(units.parse_dirty_rate)(text)
