"""Sizes and rates as people write them: "4G", "512MiB", "800M", "10G"."""
from __future__ import annotations

import math
import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'4G', '512MiB', '1.5g', '65536' (bytes) -> bytes; binary units."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (try 4G, 512M)")
    mult = 1 << (10 * "_kmgt".index(m.group(2).lower())) if m.group(2) else 1
    value = float(m.group(1)) * mult
    if not math.isfinite(value) or value >= 2 ** 64:
        raise ValueError(f"size {text!r} is too large")
    return int(value)
