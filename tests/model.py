"""A deliberately naive pure-Python oracle of KVM's bitmap dirty logging.

Sets and dicts, no bit tricks, no concurrency: what a page write, a
KVM_GET_DIRTY_LOG and a KVM_CLEAR_DIRTY_LOG do, written as plainly as
KVM_SEMANTICS.md states it.  Errors are returned as errno numbers.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set

LOG = 1
READONLY = 2
USER_MEM_SLOTS = 32764
ADDRESS_SPACES = 2


@dataclass
class Slot:
    base: int
    npages: int
    flags: int
    values: Dict[int, int] = field(default_factory=dict)      # page -> last value
    writable: Set[int] = field(default_factory=set)           # pages with a writable SPTE
    dirty: Optional[Set[int]] = None                          # None = no bitmap


class ModelVM:
    def __init__(self) -> None:
        self.slots: Dict[int, Slot] = {}
        self.manual = 0

    # KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
    def enable_manual(self, flags: int) -> int:
        allowed = 3 if flags & 1 else 1
        if flags & ~allowed:
            return errno.EINVAL
        self.manual = flags
        return 0

    def _initially_set(self) -> bool:
        return self.manual == 3

    def set_region(self, slot: int, gpa: int, size: int, flags: int) -> int:
        if slot & 0xFFFF >= USER_MEM_SLOTS:
            return errno.EINVAL
        if flags & ~(LOG | READONLY):
            return errno.EINVAL
        if size % 4096 or gpa % 4096:
            return errno.EINVAL
        if slot >> 16 >= ADDRESS_SPACES:
            return errno.EINVAL
        old = self.slots.get(slot)
        base, npages = gpa // 4096, size // 4096
        if size == 0:
            if old is None:
                return errno.EINVAL
            del self.slots[slot]
            return 0
        if old is not None:
            if npages != old.npages or (flags ^ old.flags) & READONLY:
                return errno.EINVAL
            if base == old.base and flags == old.flags:
                return 0
        if old is None or base != old.base:
            for other_id, other in self.slots.items():
                if other_id != slot and other_id >> 16 == slot >> 16 and \
                        base < other.base + other.npages and other.base < base + npages:
                    return errno.EEXIST
        new = Slot(base, npages, flags)
        if old is not None:
            new.values = old.values
            new.writable = set() if base != old.base else old.writable
        was_logging = old is not None and old.flags & LOG
        if flags & LOG:
            if old is not None and old.dirty is not None:
                new.dirty = old.dirty
            else:
                new.dirty = set(range(npages)) if self._initially_set() else set()
            if not was_logging and not self._initially_set():
                new.writable = set()
        self.slots[slot] = new
        return 0

    def find(self, gfn: int):
        for sid, s in self.slots.items():
            if sid >> 16 == 0 and s.base <= gfn < s.base + s.npages:
                return sid, s
        return None, None

    def write(self, gfns: List[int], value: int) -> int:
        """Run a plan; return the number of writes done.

        A write to a page with no slot (or a read-only one) is an MMIO exit:
        it counts as done, and the run stops after it.
        """
        for i, gfn in enumerate(gfns):
            sid, s = self.find(gfn)
            if s is None or s.flags & READONLY:
                return i + 1
            page = gfn - s.base
            if page not in s.writable:
                if s.flags & LOG and s.dirty is not None:
                    s.dirty.add(page)
                s.writable.add(page)
            s.values[page] = value
        return len(gfns)

    def _logged(self, slot: int):
        if slot >> 16 >= ADDRESS_SPACES or slot & 0xFFFF >= USER_MEM_SLOTS:
            return errno.EINVAL, None
        s = self.slots.get(slot)
        if s is None or s.dirty is None:
            return errno.ENOENT, None
        return 0, s

    def get_log(self, slot: int):
        """(errno, set of dirty pages)."""
        err, s = self._logged(slot)
        if err:
            return err, None
        got = set(s.dirty)
        if not self.manual:
            s.writable -= got
            s.dirty = set()
        return 0, got

    def clear_log(self, slot: int, first: int, num: int, pages: Set[int]):
        """pages: absolute page indexes in the slot to clear (within [first, first+num))."""
        if slot >> 16 >= ADDRESS_SPACES or slot & 0xFFFF >= USER_MEM_SLOTS:
            return errno.EINVAL
        if first % 64:
            return errno.EINVAL
        s = self.slots.get(slot)
        if s is None or s.dirty is None:
            return errno.ENOENT
        rest = s.npages - first
        if first > s.npages or num > rest or (num < rest and num % 64):
            return errno.EINVAL
        really = s.dirty & pages
        s.dirty -= really
        s.writable -= really
        return 0
