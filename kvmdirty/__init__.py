"""kvmdirty: Linux KVM dirty-page tracking (bitmaps and dirty rings), simulated and real."""
try:
    from . import _bitmap, _mmu, _uapi  # noqa: F401  (the compiled core)
except ImportError as e:  # pragma: no cover - a source checkout that was never built
    raise ImportError(
        "kvmdirty's compiled core is missing: install the package with `pip install .` "
        "(or `pip install -e .`) instead of importing it from a source tree") from e

from ._bitmap import DirtyBitmap, clear_masked, harvest, harvest_gfns, popcount, to_gfns
from ._ring import DirtyRing
from ._uapi import MEM_LOG_DIRTY_PAGES
from .api import EXIT_BUDGET, EXIT_DIRTY_LOG_FULL, EXIT_DIRTY_RING_FULL, EXIT_HLT, Exit
from .errors import KvmError
from .kvm import KvmVcpu, KvmVM, open_vm
from .vm import FAULTS, VM, Vcpu

__version__ = "0.1.0"

__all__ = [
    "VM", "Vcpu", "KvmVM", "KvmVcpu", "open_vm", "KvmError", "DirtyBitmap", "Exit", "FAULTS",
    "EXIT_HLT", "EXIT_DIRTY_RING_FULL", "EXIT_BUDGET", "EXIT_DIRTY_LOG_FULL",
    "to_gfns", "harvest", "harvest_gfns", "clear_masked", "popcount", "DirtyRing",
    "MEM_LOG_DIRTY_PAGES",
]
