"""Readers/writer lock for a VM's memslot table (what KVM's SRCU gives it).

Readers are vCPU runs and harvests: many at once, in any threads, with the
GIL released inside.  Writers replace the slot table or the vCPU set, and wait
until no reader is inside (synchronize_srcu), so the C loops never see a table
being freed.  Readers take one uncontended mutex twice and nothing else: the
read side sits on every ioctl's path.
"""
from __future__ import annotations

import threading


class _ReadSide:
    __slots__ = ("_l",)

    def __init__(self, lock: "SlotLock") -> None:
        self._l = lock

    def __enter__(self) -> None:
        l = self._l
        l._mutex.acquire()
        try:
            while l._writer:
                l._cond.wait()
            l._readers += 1
        finally:
            l._mutex.release()

    def __exit__(self, *exc) -> None:
        l = self._l
        l._mutex.acquire()
        l._readers -= 1
        if l._readers == 0 and l._writer:
            l._cond.notify_all()
        l._mutex.release()


class _WriteSide:
    __slots__ = ("_l",)

    def __init__(self, lock: "SlotLock") -> None:
        self._l = lock

    def __enter__(self) -> None:
        l = self._l
        with l._cond:
            while l._writer:
                l._cond.wait()
            l._writer = True            # new readers wait from here on
            while l._readers:
                l._cond.wait()

    def __exit__(self, *exc) -> None:
        l = self._l
        with l._cond:
            l._writer = False
            l._cond.notify_all()


class SlotLock:
    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._readers = 0
        self._writer = False
        self._read = _ReadSide(self)
        self._write = _WriteSide(self)

    def read(self) -> _ReadSide:
        """``with lock.read():`` — share the table with other readers."""
        return self._read

    def write(self) -> _WriteSide:
        """``with lock.write():`` — wait for every reader to leave, keep new ones out."""
        return self._write
