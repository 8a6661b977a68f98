"""Named scenarios (``migrate --scenario NAME``): the parameters, and where they come from."""
from __future__ import annotations

from typing import Any, Dict

SCENARIOS: Dict[str, Dict[str, Any]] = {
    "seed-001": {
        "about": "Seed 001 (Peter Xu, KVM dirty ring v4 cover letter, 2020): a 24 GiB guest "
                 "dirtying 800 MB/s at random, ring of 4096 entries vs the bitmap; he measured "
                 "~73 s (ring) vs ~55 s (bitmap). The link is 10 Gb/s; max-bandwidth is raised "
                 "to the link (at QEMU's 128 MiB/s default 24 GiB alone takes 192 s, so the "
                 "seed's run cannot have used it). Intel PML on (KVM's default on Intel hosts: "
                 "the ring's soft limit is 4096 - 64 - 512 entries). Everything else: QEMU's defaults.",
        "designs": ["bitmap", "ring"],
        "config": {"memory": 24 << 30, "dirty_rate": 800e6, "pattern": "uniform",
                   "bandwidth": 1.25e9, "max_bandwidth": 1.25e9, "ring_entries": 4096,
                   "pml": True},
    },
    "sparse-1t": {
        "about": "A huge, sparsely dirtied guest: 1 TiB, 20 MB/s of random writes, 10 Gb/s "
                 "link at full speed: where a tracker whose cost grows with memory size "
                 "should lose to one whose cost grows with dirty pages.",
        "designs": ["bitmap", "clear-log", "ring"],
        "config": {"memory": 1 << 40, "dirty_rate": 20e6, "pattern": "uniform",
                   "bandwidth": 1.25e9, "max_bandwidth": 1.25e9, "ring_entries": 4096,
                   "max_time": 3600.0, "quantum": 0.05},
    },
}
