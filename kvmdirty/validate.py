"""The one argument validator of every entry point, compiled and Python, on every backend.

Each function checks one kind of argument and returns it in the form the C
layer takes, or raises before anything changes:
  TypeError   the wrong kind of thing (a float, a str, a bool, a float array)
  ValueError  the right kind, out of range (negative, >= 2**64, wrong shape)
  KvmError    only for what the kernel itself checks (errno from the kernel's order)
Python ints and numpy integers are accepted alike wherever an integer is.
"""
from __future__ import annotations

import errno
import math
from typing import NamedTuple, Optional, Tuple, Union

import numpy as np

from .errors import KvmError
from . import _uapi
from .limits import ADDRESS_SPACES, MEM_MAX_NR_PAGES, USER_MEM_SLOTS

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1


def integer(value, name: str) -> int:
    """A Python int from an int or a numpy integer; TypeError for anything else (bool, float, str)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got bool")
    if isinstance(value, int):
        return value
    if isinstance(value, np.integer):
        return int(value)
    raise TypeError(f"{name} must be an int, got {type(value).__name__}")


def u64(value, name: str) -> int:
    """An argument the kernel takes as a __u64: an int in [0, 2**64)."""
    v = integer(value, name)
    if v < 0 or v > U64_MAX:
        raise ValueError(f"{name} {v} does not fit in a u64")
    return v


def u32(value, name: str) -> int:
    """An argument the kernel takes as a __u32: an int in [0, 2**32)."""
    v = integer(value, name)
    if v < 0 or v > U32_MAX:
        raise ValueError(f"{name} {v} does not fit in a u32")
    return v


def split_slot(slot, ioctl: str, address_spaces: int = ADDRESS_SPACES) -> Tuple[int, int]:
    """(address space, slot id) of a u32 slot field; EINVAL when out of range, as the kernel checks."""
    slot = u32(slot, f"{ioctl}: slot")
    as_id, sid = slot >> 16, slot & 0xFFFF
    if as_id >= address_spaces or sid >= USER_MEM_SLOTS:
        raise KvmError(errno.EINVAL, ioctl, f"address space {as_id} / slot id {sid} out of range")
    return as_id, sid


class Region(NamedTuple):
    """A KVM_SET_USER_MEMORY_REGION request that passed the kernel's argument checks."""
    slot: int
    gpa: int
    size: int
    flags: int
    npages: int


def memory_region(slot, guest_phys_addr, memory_size, flags, address_spaces: int,
                  ioctl: str = "KVM_SET_USER_MEMORY_REGION") -> Region:
    """The checks of kvm_vm_ioctl_set_memory_region then __kvm_set_memory_region,
    in the kernel's order, before any slot is looked at (the callers check
    existence and overlap under their slots lock)."""
    slot = u32(slot, "slot")
    gpa = u64(guest_phys_addr, "guest_phys_addr")
    size = u64(memory_size, "memory_size")
    flags = u32(flags, "flags")
    if (slot & 0xFFFF) >= USER_MEM_SLOTS:
        raise KvmError(errno.EINVAL, ioctl, f"slot id {slot & 0xFFFF} >= {USER_MEM_SLOTS}")
    if flags & ~(_uapi.MEM_LOG_DIRTY_PAGES | _uapi.MEM_READONLY):
        raise KvmError(errno.EINVAL, ioctl, f"unsupported flags {flags:#x}")
    if size & 0xFFF:
        raise KvmError(errno.EINVAL, ioctl, "memory_size is not page aligned")
    if gpa & 0xFFF:
        raise KvmError(errno.EINVAL, ioctl, "guest_phys_addr is not page aligned")
    if (slot >> 16) >= address_spaces:
        raise KvmError(errno.EINVAL, ioctl, f"address space {slot >> 16} out of range")
    if gpa + size >= 1 << 64:
        raise KvmError(errno.EINVAL, ioctl, "guest_phys_addr + memory_size overflows")
    npages = size >> 12
    if npages > MEM_MAX_NR_PAGES:
        raise KvmError(errno.EINVAL, ioctl, f"{npages} pages is more than a slot may have")
    return Region(slot, gpa, size, flags, npages)


def _int_array(a, name: str) -> np.ndarray:
    """A 1-D array of integers as contiguous uint64; negative entries are a ValueError, never wrapped."""
    if isinstance(a, (str, bytes)):
        raise TypeError(f"{name} must be integers, got {type(a).__name__}")
    a = np.asarray(a)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    if a.size == 0:
        return np.zeros(0, np.uint64)
    if a.dtype.kind not in "ui":
        raise TypeError(f"{name} must be integers, got dtype {a.dtype}")
    if a.dtype.kind == "i" and int(a.min()) < 0:
        raise ValueError(f"{name} must be non-negative")
    return np.ascontiguousarray(a, dtype=np.uint64)


def plan(gfns) -> np.ndarray:
    """A write plan: guest frame numbers as a contiguous uint64 array."""
    return _int_array(gfns, "gfns")


def values(value, n: int) -> Union[int, np.ndarray]:
    """The value(s) a plan writes: one u64, or an array of n u64 (negative entries rejected)."""
    if isinstance(value, (int, np.integer, bool, np.bool_)):
        return u64(value, "value")
    if isinstance(value, (float, str, bytes)):
        raise TypeError(f"value must be an int or an array of ints, got {type(value).__name__}")
    a = _int_array(value, "values")
    if a.shape[0] != n:
        raise ValueError(f"value must be an int or a 1-D array of {n} values, got {a.shape[0]}")
    return a


def budget(max_writes) -> int:
    """A run's write budget: None (0 = no bound) or a positive int below 2**64."""
    if max_writes is None:
        return 0
    v = integer(max_writes, "max_writes")
    if v < 1 or v > U64_MAX:
        raise ValueError(f"max_writes must be a positive int below 2**64, got {v}")
    return v


def bitmap_words(bitmap) -> np.ndarray:
    """A user bitmap (KVM_CLEAR_DIRTY_LOG): a 1-D array of integer words as contiguous uint64."""
    return _int_array(bitmap, "bitmap")


def count(value, name: str, *, minimum: int = 0, maximum: Optional[int] = None) -> int:
    """An int count in [minimum, maximum]."""
    v = integer(value, name)
    if v < minimum or (maximum is not None and v > maximum):
        raise ValueError(f"{name} must be in [{minimum}, {maximum}], got {v}")
    return v


def positive_finite(value, name: str) -> float:
    """A real number > 0 that is finite (NaN and inf rejected: NaN passes '> 0' tests otherwise)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return v


def out_words(out, name: str = "out") -> np.ndarray:
    """A caller-owned output buffer of uint64 words (get_dirty_log, to_gfns, harvest_gfns, ...).

    A numpy array (TypeError otherwise) that is 1-D, uint64, C-contiguous,
    writable and 8-byte aligned (ValueError otherwise).  Whether it is long
    enough is the call's own check (EFAULT for the KVM-shaped ioctls, as the
    kernel answers a short user buffer).
    """
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy uint64 array, got {type(out).__name__}")
    if out.dtype != np.uint64:
        raise ValueError(f"{name} must have dtype uint64, got {out.dtype}")
    if out.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {out.shape}")
    if not out.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    if out.size and out.ctypes.data % 8:
        raise ValueError(f"{name} must be 8-byte aligned")
    return out
