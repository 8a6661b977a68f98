"""kvmdirty.migrate: live migration and checkpointing over the real tracking mechanism.

The guest's writes, the tracker's protect/log/harvest/reset/flush and the
destination copy are executed on the simulator; time is virtual, charged
from a measured cost table (:mod:`.costs`).  ``run(MigrationConfig(...))``
migrates one guest and returns a :class:`MigrationResult`.  See docs/migrate.md.
"""
from .config import AIDS, QEMU_MAX_BANDWIDTH, MigrationConfig
from .costs import COST_DOC, Cost, Costs
from .precopy import run
from .results import (CheckpointResult, MigrationResult, RoundRow, TimelinePoint,
                      VcpuStats, VerificationError)
from .trackers import DESIGNS

__all__ = [
    "run", "MigrationConfig", "Costs", "Cost", "COST_DOC", "DESIGNS", "AIDS", "QEMU_MAX_BANDWIDTH",
    "MigrationResult", "CheckpointResult", "RoundRow", "TimelinePoint", "VcpuStats",
    "VerificationError",
]
