"""Parsing and printing sizes (binary) and rates (decimal; lower-case b = bits)."""
from __future__ import annotations

import math
import re
from typing import Callable, List, Tuple, TypeVar

T = TypeVar("T")

_NUM = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgtp]?)(i?)([bB]?)(?:it)?(?:/s|ps)?\s*$", re.IGNORECASE)
_POW = "_kmgtp"


def parse_size(text: str) -> int:
    """'24G', '512MiB', '1T', '65536' -> bytes (K/M/G/T are powers of 1024)."""
    m = _NUM.match(str(text))
    if not m or m.group(4) == "b":
        raise ValueError(f"not a size: {text!r} (try 24G, 512M)")
    v = float(m.group(1)) * (1 << (10 * _POW.index(m.group(2).lower() or "_")))
    if v >= 2 ** 64:
        raise ValueError(f"size {text!r} does not fit in 64 bits")
    return int(v)


def parse_rate(text: str) -> float:
    """'800M', '800MB/s', '10Gb/s', '10Gbit', '1.25GB/s', '128MiB/s' -> bytes per second.

    Decimal units (M = 10^6) unless written with i (MiB = 2^20); a lower-case
    b means bits.
    """
    m = _NUM.match(str(text))
    if not m:
        raise ValueError(f"not a rate: {text!r} (try 800M, 10Gb/s, 128MiB/s)")
    p = _POW.index(m.group(2).lower() or "_")
    mult = (1 << (10 * p)) if m.group(3) else 10 ** (3 * p)
    v = float(m.group(1)) * mult
    if not math.isfinite(v):
        raise ValueError(f"rate {text!r} is too large")
    return v / 8 if m.group(4) == "b" else v


#: The suffixes of a per-vCPU dirty rate ("200M/vcpu"); without one a rate is the guest's.
PER_VCPU_SUFFIXES = ("/vcpu", "/vCPU", "per-vcpu", "/cpu")


def parse_dirty_rate(text: str) -> Tuple[float, bool]:
    """'800M' -> (800e6, False): bytes/s for the whole guest; '200M/vcpu' -> (200e6, True): per vCPU.

    A guest write dirties one 4 KiB page, so R bytes/s is R / 4096 page writes
    per second (as ``kvmdirty migrate --dirty-rate``).  Must be finite and > 0.
    """
    t = str(text).strip()
    per_vcpu = False
    low = t.lower()
    for suffix in PER_VCPU_SUFFIXES:
        if low.endswith(suffix.lower()):
            t, per_vcpu = t[: -len(suffix)].strip(), True
            break
    try:
        v = parse_rate(t)
    except ValueError:
        raise ValueError(f"not a dirty rate: {text!r} (try 800M for the guest, 200M/vcpu per vCPU)") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"a dirty rate must be > 0, got {text!r}")
    return v, per_vcpu


def parse_list(text: str, one: Callable[[str], T]) -> List[T]:
    """A comma-separated list of ``one``."""
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"empty list: {text!r}")
    return [one(t) for t in items]


def fmt_bytes(n: float) -> str:
    for unit, div in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.4g} {unit}"
    return f"{n:.0f} B"


def fmt_rate(r: float) -> str:
    for unit, div in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if r >= div:
            return f"{r / div:.4g} {unit}"
    return f"{r:.0f} B/s"


def fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.3f} us"
