"""Readers/writer lock for a VM's memslot table (what KVM's SRCU gives it).

Readers are vCPU runs and harvests: many at once, in any threads, with the
GIL released inside.  Writers replace the slot table or the vCPU set, and wait
until no reader is inside (synchronize_srcu), so the C loops never see a table
being freed.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator


class SlotLock:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._writer = True
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
