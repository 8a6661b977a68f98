"""Limits of the simulated x86-64 KVM (not in the uapi header; values of Linux 6.x x86)."""
from __future__ import annotations

import errno

from .errors import KvmError

#: KVM_USER_MEM_SLOTS: KVM_MEM_SLOTS_NUM (SHRT_MAX) minus 3 private slots.
USER_MEM_SLOTS = 32764
#: kvm_arch_nr_memslot_as_ids(): normal + SMM address spaces.
ADDRESS_SPACES = 2
#: KVM_MEM_MAX_NR_PAGES: a slot's page count must fit in 31 bits.
MEM_MAX_NR_PAGES = (1 << 31) - 1
#: KVM_MAX_VCPUS (CONFIG_KVM_MAX_NR_VCPUS default) and KVM_MAX_VCPU_IDS
#: (KVM_MAX_VCPUS * KVM_VCPU_ID_RATIO), as this repository's hosts report.
MAX_VCPUS = 1024
MAX_VCPU_IDS = 1024 * 4
#: KVM_DIRTY_RING_RSVD_ENTRIES and KVM_DIRTY_RING_MAX_ENTRIES.
DIRTY_RING_RSVD_ENTRIES = 64
DIRTY_RING_MAX_ENTRIES = 65536
#: kvm_cpu_dirty_log_size() with Intel PML (0 without).
PML_LOG_SIZE = 512
DIRTY_GFN_SIZE = 16


def split_slot(slot: int, ioctl: str, address_spaces: int = ADDRESS_SPACES) -> tuple:
    """(address space, slot id) of a u32 slot field; EINVAL when out of range, as the kernel checks."""
    if not isinstance(slot, int) or isinstance(slot, bool):
        raise TypeError(f"{ioctl}: slot must be an int, got {type(slot).__name__}")
    if slot < 0 or slot > 0xFFFFFFFF:
        raise ValueError(f"{ioctl}: slot {slot} does not fit in a u32")
    as_id, sid = slot >> 16, slot & 0xFFFF
    if as_id >= address_spaces or sid >= USER_MEM_SLOTS:
        raise KvmError(errno.EINVAL, ioctl, f"address space {as_id} / slot id {sid} out of range")
    return as_id, sid


def u64(value, name: str) -> int:
    """An argument that the kernel takes as a __u64: an int in [0, 2**64)."""
    if not isinstance(value, int) or isinstance(value, bool):
        import numpy as np
        if isinstance(value, np.integer):
            value = int(value)
        else:
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0 or value >= 1 << 64:
        raise ValueError(f"{name} {value} does not fit in a u64")
    return value
