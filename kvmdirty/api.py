"""The KVM-shaped API shared by the simulated backend (vm.VM) and real KVM (kvm.KvmVM).

User code, the runner, the verifier and `kvmdirty compare` are written against
these protocols only, so they work on either backend.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Tuple, runtime_checkable

import numpy as np

from . import _uapi

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
#: Exit reasons as in <linux/kvm.h> (the simulator reports the same numbers).
EXIT_HLT = _uapi.EXIT_HLT
EXIT_DIRTY_RING_FULL = _uapi.EXIT_DIRTY_RING_FULL
#: Not a KVM exit: the simulated vCPU used up its write budget (deterministic scheduling).
EXIT_BUDGET = -1
#: Seed 000/002's exit when an indexed dirty list is full (never upstream; no KVM number).
EXIT_DIRTY_LOG_FULL = -2

EXIT_NAMES = {
    EXIT_HLT: "HLT",
    EXIT_DIRTY_RING_FULL: "DIRTY_RING_FULL",
    EXIT_BUDGET: "BUDGET",
    EXIT_DIRTY_LOG_FULL: "DIRTY_LOG_FULL",
    _uapi.EXIT_IO: "IO",
    _uapi.EXIT_MMIO: "MMIO",
    _uapi.EXIT_SHUTDOWN: "SHUTDOWN",
    _uapi.EXIT_FAIL_ENTRY: "FAIL_ENTRY",
    _uapi.EXIT_INTERNAL_ERROR: "INTERNAL_ERROR",
}


def as_plan(gfns) -> np.ndarray:
    """A write plan as a contiguous uint64 array of guest frame numbers (kvmdirty.validate.plan)."""
    from .validate import plan
    return plan(gfns)


@dataclass(frozen=True)
class Exit:
    """Why `Vcpu.run` returned.

    reason:    a KVM exit reason (EXIT_HLT when the plan is done).
    writes:    guest writes executed by this call.
    remaining: writes of the current plan still to do (0 when done); a
               later ``run()`` without a plan resumes them.
    """

    reason: int
    writes: int
    remaining: int

    @property
    def name(self) -> str:
        return EXIT_NAMES.get(self.reason, str(self.reason))

    @property
    def done(self) -> bool:
        return self.remaining == 0 and self.reason == EXIT_HLT


@runtime_checkable
class DirtyRingView(Protocol):
    """User space's side of one vCPU's dirty ring."""

    entries: int
    fetch_index: int

    def collect(self, max_count: Optional[int] = None, out_slots: Optional[np.ndarray] = None,
                out_offsets: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Harvest in order while flags == DIRTY, marking each RESET; (slots u32, offsets u64).

        With caller-owned ``out_slots`` / ``out_offsets`` (reused) they are filled instead.
        """
        ...


@runtime_checkable
class VcpuProtocol(Protocol):
    id: int

    @property
    def dirty_ring(self) -> Optional[DirtyRingView]: ...

    def run(self, gfns: Optional[np.ndarray] = None, value: Optional[int] = None) -> Exit: ...

    def close(self) -> None: ...


@runtime_checkable
class VMProtocol(Protocol):
    def check_extension(self, cap: int) -> int: ...

    def enable_cap(self, cap: int, *args: int) -> None: ...

    def enable_dirty_ring(self, entries: int, *, acq_rel: bool = True) -> None: ...

    def enable_manual_protect(self, initially_set: bool = False) -> None: ...

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               flags: int = 0) -> None: ...

    def create_vcpu(self, vcpu_id: int) -> VcpuProtocol: ...

    def get_dirty_log(self, slot: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        """KVM_GET_DIRTY_LOG; into the caller-owned ``out`` (uint64 words, reused) when given."""
        ...

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int,
                        bitmap: np.ndarray) -> None: ...

    def reset_dirty_rings(self) -> int: ...

    def memory(self, slot: int) -> np.ndarray:
        """Read-only uint64 view: the value of each page of the slot (its first 8 bytes)."""
        ...

    def close(self) -> None: ...
