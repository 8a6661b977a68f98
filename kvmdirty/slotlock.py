"""Readers/writer lock for a VM's memslot table (what KVM's SRCU gives it).

Readers are vCPU runs and harvests: many at once, in any threads, with the
GIL released inside.  Writers replace slots or the vCPU set, and wait until
no reader is inside (synchronize_srcu), so the C loops never see a table
being freed.

It is compiled (kvmdirty._mmu.SlotLock, one per Mmu: ``mmu.slots_lock``):
enter and exit are each one step with no Python code inside, so a
KeyboardInterrupt lands before or after them, never between their steps;
vCPU runs take the read side inside their own compiled call.  A forked
child's copy is reset (the threads that held it do not exist there).
"""
from __future__ import annotations

from ._mmu import SlotLock

__all__ = ["SlotLock"]
