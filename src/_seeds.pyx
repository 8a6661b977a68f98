"""The seed-era dirty-log designs' compiled cores, plugged into the guest write loop.

Each tracker offers a ``_kd_tracker`` capsule (see _sink.pxd) for
kvmdirty._mmu.Mmu.set_tracker: the write loop calls mark() on every logged
write, and still_full() while the vCPU has a full request pending.

- IndexedRing / IndexedRingSet (seeds 000/002): entries {u32 pad; u32 slot;
  u64 offset}; the header {u16 avail_index; u16 fetch_index} overlays entry
  0's pad, as seed 000's union does.  One ring per vCPU plus one per VM for
  writes without a running vCPU (spin-locked: several host threads may write).
  A full list exits with EXIT_DIRTY_LOG_FULL; KVM_RESET_DIRTY_PAGES re-protects
  and frees what user space fetched.
- SharedRingTracker: one flags ring (a kvmdirty._ring.DirtyRing) for every
  vCPU; writers reserve entries with compare-exchange (seed 002's review).
- switch_bitmaps / protect_bitmap: the switch of seed 003's double-buffered
  bitmaps and the masked write-protect of a retired one.

What user space may scribble on (it maps the indexed rings writable): the
kernel side reads only fetch_index, validated against its private indexes
(dirty_index, reset_index) before anything changes, and the slot/offset of
the entries it frees, which the write-protect sink validates (a forged entry
re-protects the page it names, or nothing).  It never reads avail_index back:
every push and every still-full check republishes it from dirty_index, so a
scribbled header costs user space its own view, never the process or the
vCPU: a reset with fetch_index anywhere in [reset, avail] succeeds.
"""
import threading

from cpython.pycapsule cimport PyCapsule_New, PyCapsule_IsValid, PyCapsule_GetPointer
from libc.stdint cimport uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset

import numpy as np

from . import _bitmap
from .limits import MAX_VCPU_IDS

from _atomic cimport (kd_load_acquire_u16, kd_load_relaxed_u16, kd_store_release_u16,
                      kd_load_acquire_u32, kd_load_relaxed_u32, kd_store_relaxed_u32,
                      kd_store_release_u32, kd_cmpxchg_u32, kd_fetch_add_relaxed_u64,
                      kd_fetch_or_u64, kd_load_relaxed_u64, kd_load_acquire_ptr,
                      kd_store_release_ptr, kd_cpu_relax, kd_popcount64)
from _sink cimport (kd_sink, kd_tracker, kd_owned_capsule, KD_TRACKER_CAPSULE, KD_RING_CAPSULE,
                   KD_NO_VCPU)
from _uapi cimport KVM_EXIT_DIRTY_RING_FULL
from _ringcore cimport (kd_ring, kd_ring_used, kd_ring_push_shared, kd_batcher, kd_batcher_init,
                        kd_batcher_add, kd_batcher_flush, kd_batch_log, kd_batch_log_protect,
                        kd_sink_resolve, KD_SINK_C, KD_SINK_PY, KD_PUSH_FULL)

#: Seed 000/002's exit when an indexed list is full (api.EXIT_DIRTY_LOG_FULL).
EXIT_DIRTY_LOG_FULL = -2
#: Entries kept free below the hard limit for pushes between the full request and the exit.
RSVD_ENTRIES = 64
PAGE_SIZE = 4096

IGFN_DTYPE = np.dtype([("pad", "<u4"), ("slot", "<u4"), ("offset", "<u8")])


# ---------------------------------------------------------------- indexed ring
#
# Protocol of one indexed list (seed 000), with who owns each word:
#   dirty_index  kernel-private, written by the list's producer only
#   reset_index  kernel-private, written by reset only (under the set's lock)
#   avail_index  header, written by the producer only (user space reads it)
#   fetch_index  header, written by user space only (reset reads it)
# Push (the vCPU's write fault, or a host write under the per-VM list's lock):
#   P1. used = dirty_index - reset_index (acquire: pairs with R3, the entry
#       is free again); refuse if the list is full.
#   P2. write the entry's slot and offset (plain: the entry is ours).
#   P3. dirty_index += 1 (relaxed: own word).
#   P4. avail_index = dirty_index (release: pairs with F1; the entry is
#       complete before user space can see it).
# Fetch (user space, one fetcher per list at a time: IndexedRing's lock):
#   F1. load-acquire avail_index; count = (u16)(avail - fetch), at most the size.
#   F2. read the entries fetch..avail.
#   F3. store-release fetch_index (pairs with R1: F2's reads are done before
#       the kernel may recycle the entries).
# Reset (KVM_RESET_DIRTY_PAGES, one at a time: IndexedRingSet's lock):
#   R1. load-acquire fetch_index, once per list (a snapshot: user space may
#       change it meanwhile); n = (u16)(fetch - reset_index) must be <= used,
#       where used = dirty_index - reset_index.  dirty_index covers that fetch:
#       P3 precedes P4, whose release F1 acquired before F3 released fetch.
#       Any list failing this fails the whole reset, nothing changed.
#   R2. re-protect the n entries' pages (coalesced masks, the sink validates).
#       Every list's R2 runs before any R3: a sink that raises (Ctrl-C) leaves
#       every entry held, to be reset again.
#   R3. reset_index += n (release: pairs with P1; R2's reads are done).
#   R4. flush remote TLBs if anything was re-protected (also when R2 failed
#       part-way).  A write between R2 and R4 through a stale writable TLB
#       entry is not logged, and need not be: its page was fetched, and user
#       space reads page contents only after the reset returns (QEMU does).

ctypedef struct kd_igfn:
    uint32_t pad          # entry 0's pad is the header {u16 avail_index; u16 fetch_index}
    uint32_t slot
    uint64_t offset

ctypedef struct kd_iring:
    kd_igfn *gfns
    uint16_t *avail       # header: written by the kernel (push), read by user space
    uint16_t *fetch       # header: written by user space, read by reset
    uint32_t size
    uint32_t soft_limit
    uint32_t dirty_index  # kernel-private free-running indexes
    uint32_t reset_index
    uint32_t lock         # serialises writers of the per-VM ring
    uint64_t pushes       # statistics: relaxed atomics (read by other threads)
    uint64_t overflows


cdef inline int _iring_push(kd_iring *r, uint32_t slot, uint64_t offset) noexcept nogil:
    """Log one page (P1-P4): 0 logged, 1 logged and now full, -1 refused (every entry live)."""
    # Own index (only the producer writes it): relaxed.
    cdef uint32_t di = kd_load_relaxed_u32(&r.dirty_index)
    # P1. Acquire pairs with R3's store-release of reset_index: those entries
    # were read by reset and may be overwritten.
    cdef uint32_t used = di - kd_load_acquire_u32(&r.reset_index)
    cdef kd_igfn *e
    if used >= r.size:
        # Statistics read by other threads: relaxed atomic, orders nothing.
        kd_fetch_add_relaxed_u64(&r.overflows, 1)
        # Republish avail_index (release, as P4): undoes a user scribble on a full list.
        kd_store_release_u16(r.avail, <uint16_t>di)
        return -1
    e = &r.gfns[di & (r.size - 1)]
    e.slot = slot                                      # P2
    e.offset = offset
    # P3. Own index, relaxed; R1 sees it through P4 -> F1 -> F3 -> R1.
    kd_store_relaxed_u32(&r.dirty_index, di + 1)
    # P4. Release: the entry is complete before avail_index covers it; pairs
    # with the user's load-acquire of avail_index in F1.
    kd_store_release_u16(r.avail, <uint16_t>(di + 1))
    kd_fetch_add_relaxed_u64(&r.pushes, 1)
    return 1 if used + 1 >= r.soft_limit else 0


cdef inline void _iring_lock(kd_iring *r) noexcept nogil:
    cdef uint32_t unlocked = 0
    # cmpxchg (acquire) takes the per-VM ring's lock; pairs with the release in _iring_unlock.
    while not kd_cmpxchg_u32(&r.lock, &unlocked, 1):
        unlocked = 0
        kd_cpu_relax()


cdef inline void _iring_unlock(kd_iring *r) noexcept nogil:
    # Release: our entry and index stores happen before the next writer's.
    kd_store_release_u32(&r.lock, 0)


cdef inline int _iring_push_locked(kd_iring *r, uint32_t slot, uint64_t offset) noexcept nogil:
    cdef int rc
    _iring_lock(r)
    rc = _iring_push(r, slot, offset)
    _iring_unlock(r)
    return rc


cdef inline int _iring_still_full(kd_iring *r) noexcept nogil:
    """Called by the list's producer (or under its lock): still full? Republishes avail_index.

    Rewriting avail_index from dirty_index undoes whatever user space wrote
    over it, so a full list always shows user space what it may fetch.
    """
    # Own index: relaxed.  Acquire below pairs with R3's store-release of reset_index.
    cdef uint32_t di = kd_load_relaxed_u32(&r.dirty_index)
    # Release, as P4 (same producer, same value or a later one).
    kd_store_release_u16(r.avail, <uint16_t>di)
    return di - kd_load_acquire_u32(&r.reset_index) >= r.soft_limit


cdef long _iring_pending(kd_iring *r, uint16_t *fetch) noexcept nogil:
    """R1: the entries a reset would free (fetch snapshot in *fetch), or -1 if fetch_index is invalid."""
    # Own index (only the resetter writes it, under the set's lock): relaxed.
    cdef uint32_t ri = kd_load_relaxed_u32(&r.reset_index)
    # Acquire pairs with F3's store-release of fetch_index.
    cdef uint16_t f = kd_load_acquire_u16(r.fetch)
    # Relaxed: dirty_index covers f through the chain P3 -> P4 -> F1 -> F3 -> R1.
    cdef uint32_t used = kd_load_relaxed_u32(&r.dirty_index) - ri
    cdef uint32_t n = <uint16_t>(f - <uint16_t>ri)
    fetch[0] = f
    if n > used:
        return -1
    return n


cdef void _iring_protect(kd_iring *r, uint32_t n, kd_batcher *b) noexcept nogil:
    """R2: batch and re-protect the n entries from reset_index on (the sink validates them)."""
    cdef uint32_t ri = kd_load_relaxed_u32(&r.reset_index), m = r.size - 1, i
    cdef kd_igfn *e
    for i in range(n):
        e = &r.gfns[(ri + i) & m]
        kd_batcher_add(b, e.slot, e.offset)
    kd_batcher_flush(b)


cdef inline void _iring_commit(kd_iring *r, uint32_t n) noexcept nogil:
    """R3: free the n entries."""
    if n:
        # Release pairs with P1's load-acquire: R2's reads are done before
        # the producer may reuse the entries.
        kd_store_release_u32(&r.reset_index, kd_load_relaxed_u32(&r.reset_index) + n)


cdef class _Mutex:
    """A lock that refuses re-entry: a sink or flush callback calling back into
    the call that holds it gets RuntimeError instead of a deadlock (or, with a
    re-entrant lock, a nested reset freeing the same entries twice).

    acquire() raising (Ctrl-C while waiting) leaves it unheld; the owner is
    recorded in compiled code right after the acquisition, so no interrupt
    can separate the two.
    """
    cdef object _lock
    cdef object _owner

    def __cinit__(self):
        self._lock = threading.Lock()
        self._owner = None

    def __enter__(self):
        me = threading.get_ident()
        if self._owner == me:
            raise RuntimeError("re-entrant call (from a sink or flush callback) refused")
        self._lock.acquire()
        self._owner = me
        return self

    def __exit__(self, *exc):
        self._owner = None
        self._lock.release()
        return False


cdef class IndexedRing:
    """One seed-000 dirty list: ``entries`` {pad, slot, offset} with the u16 index header in entry 0's pad.

    ``gfns`` is user space's writable mapping of it: anything written there is
    tolerated (see the module docstring).  ``fetch()`` calls are serialised.
    Valid from construction (a stand-alone list; IndexedRingSet makes the VM's).
    """
    cdef kd_iring r
    cdef object _buf
    cdef object _fetch_lock
    cdef readonly object gfns          # IGFN_DTYPE view: user space's mmap
    cdef readonly object vcpu_id       # None for the per-VM ring
    cdef uint64_t _fetched, _resets, _batches, _dropped

    def __cinit__(self, entries, vcpu_id=None):
        cdef unsigned char[::1] mv
        if not isinstance(entries, int) or isinstance(entries, bool):
            raise TypeError(f"entries must be an int, got {type(entries).__name__}")
        if vcpu_id is not None and (not isinstance(vcpu_id, int) or isinstance(vcpu_id, bool)):
            raise TypeError(f"vcpu_id must be an int or None, got {type(vcpu_id).__name__}")
        # u16 free-running indexes tell at most 65535 live entries apart: 32768 max.
        if entries < 2 * RSVD_ENTRIES or entries > 32768 or entries & (entries - 1):
            raise ValueError(f"entries {entries} must be a power of two in [128, 32768]")
        nbytes = entries * sizeof(kd_igfn)
        raw = np.zeros(nbytes + PAGE_SIZE, np.uint8)
        skip = (-raw.ctypes.data) & (PAGE_SIZE - 1)
        self._buf = raw[skip:skip + nbytes]
        mv = self._buf
        self.gfns = self._buf.view(IGFN_DTYPE)
        self._fetch_lock = _Mutex()
        self.r.gfns = <kd_igfn *>&mv[0]
        self.r.avail = <uint16_t *>&mv[0]
        self.r.fetch = <uint16_t *>&mv[2]
        self.r.size = entries
        self.r.soft_limit = entries - RSVD_ENTRIES
        self.vcpu_id = vcpu_id

    # -- user side -------------------------------------------------------
    def fetch(self, max_count=None):
        """Read entries fetch_index..avail_index in order and publish the new fetch_index (F1-F3).

        Returns (slots uint32, offsets uint64).  Raises ValueError (nothing
        changed) if the header says more than ``entries`` are available.
        Concurrent calls are serialised: each entry is fetched once.
        """
        if max_count is not None and (not isinstance(max_count, int) or max_count < 0):
            raise ValueError("max_count must be a non-negative int or None")
        with self._fetch_lock:
            return self._fetch(max_count)

    cdef tuple _fetch(self, object max_count):
        cdef uint16_t idx, avail, count, i
        cdef uint32_t m = self.r.size - 1
        cdef uint32_t[::1] vs
        cdef uint64_t[::1] vo
        cdef kd_igfn *e
        # User space owns fetch_index: a relaxed read of our own value.
        idx = kd_load_relaxed_u16(self.r.fetch)
        # F1. Acquire pairs with the kernel's store-release of avail_index (P4).
        avail = kd_load_acquire_u16(self.r.avail)
        count = <uint16_t>(avail - idx)
        if count > self.r.size:
            raise ValueError(f"header is corrupt: {count} entries available in a ring of {self.r.size}")
        if max_count is not None and max_count < count:
            count = max_count
        a_s = np.empty(count, np.uint32)
        a_o = np.empty(count, np.uint64)
        if count:
            vs, vo = a_s, a_o
            with nogil:
                for i in range(count):                 # F2
                    e = &self.r.gfns[(<uint16_t>(idx + i)) & m]
                    vs[i] = e.slot
                    vo[i] = e.offset
                # F3. Release pairs with reset's load-acquire of fetch_index
                # (R1): our reads above are done before the kernel recycles them.
                kd_store_release_u16(self.r.fetch, <uint16_t>(idx + count))
        self._fetched += count
        return a_s, a_o

    cdef void _unfetch(self, uint16_t idx) noexcept:
        """Put fetch_index back (a harvest that could not finish hands nothing over, so takes nothing)."""
        # Release, as F3 (we read nothing more, but reset must see a consistent value).
        kd_store_release_u16(self.r.fetch, idx)

    @property
    def avail_index(self):
        # Acquire pairs with P4's store-release (entries up to it are complete).
        return kd_load_acquire_u16(self.r.avail)

    property fetch_index:
        def __get__(self):
            # User space's own word: relaxed.
            return kd_load_relaxed_u16(self.r.fetch)
        def __set__(self, v):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v > 0xFFFF:
                raise ValueError("fetch_index is a u16")
            # Release, as F3: pairs with R1's load-acquire.
            kd_store_release_u16(self.r.fetch, <uint16_t>v)

    @property
    def count(self):
        """(u16)(avail_index - fetch_index): entries user space has not fetched yet."""
        # As F1: acquire of avail (pairs with P4), relaxed read of user space's own fetch.
        return <uint16_t>(kd_load_acquire_u16(self.r.avail) - kd_load_relaxed_u16(self.r.fetch))

    # -- kernel state ------------------------------------------------------
    @property
    def entries(self):
        return self.r.size

    @property
    def soft_limit(self):
        return self.r.soft_limit

    @property
    def used(self):
        """Entries the kernel holds: pushed and not yet reset."""
        # A snapshot for reporting: relaxed dirty_index (the producer's), acquire
        # of reset_index (pairs with R3).  Exact only while both sides are quiet.
        return kd_load_relaxed_u32(&self.r.dirty_index) - kd_load_acquire_u32(&self.r.reset_index)

    @property
    def full(self):
        return self.used >= self.r.soft_limit

    def push(self, slot, offset):
        """Kernel-side push (tests/embedding), under the list's writer lock: 0 logged, 1 now full, -1 refused.

        Not for a list whose vCPU is running (its write loop pushes unlocked).
        """
        if not isinstance(slot, int) or not isinstance(offset, int):
            raise TypeError("slot and offset must be ints")
        if not (0 <= slot <= 0xFFFFFFFF) or not (0 <= offset < 1 << 64):
            raise ValueError("slot is a u32 and offset a u64")
        return _iring_push_locked(&self.r, slot, offset)

    @property
    def stats(self):
        # Relaxed loads pair with the producer's relaxed fetch-adds: counts, no ordering.
        return {"pushes": kd_load_relaxed_u64(&self.r.pushes), "fetched": self._fetched,
                "resets": self._resets, "batches": self._batches, "dropped": self._dropped,
                "overflows": kd_load_relaxed_u64(&self.r.overflows)}

    def __repr__(self):
        who = "vm" if self.vcpu_id is None else f"vcpu {self.vcpu_id}"
        return f"IndexedRing({who}, entries={self.r.size}, used={self.used}, count={self.count})"


ctypedef struct kd_iset:
    kd_iring **by_vcpu     # nids pointers, each published once with release
    uint32_t nids
    kd_iring *vm           # writes without a running vCPU


cdef inline kd_iring *_iset_ring(kd_iset *s, uint32_t vcpu_id) noexcept nogil:
    cdef kd_iring *r = NULL
    if vcpu_id < s.nids:
        # Acquire pairs with the store-release in IndexedRingSet.add_vcpu.
        r = <kd_iring *>kd_load_acquire_ptr(<void **>&s.by_vcpu[vcpu_id])
    return r


cdef int _iset_mark(void *ctx, uint32_t vcpu_id, uint32_t slot, uint64_t offset) noexcept nogil:
    cdef kd_iset *s = <kd_iset *>ctx
    cdef kd_iring *r = _iset_ring(s, vcpu_id) if vcpu_id != KD_NO_VCPU else NULL
    if r == NULL:
        return _iring_push_locked(s.vm, slot, offset)
    return _iring_push(r, slot, offset)


cdef int _iset_still_full(void *ctx, uint32_t vcpu_id) noexcept nogil:
    cdef kd_iset *s = <kd_iset *>ctx
    cdef kd_iring *r = _iset_ring(s, vcpu_id)
    cdef int full
    if r != NULL:
        return _iring_still_full(r)      # we are its only producer
    _iring_lock(s.vm)
    full = _iring_still_full(s.vm)
    _iring_unlock(s.vm)
    return full


cdef class IndexedRingSet:
    """Seed 000/002's rings of one VM: per vCPU plus the per-VM ring; the MMU tracker.

    ``max_vcpu_ids`` sizes the per-vCPU table: pass the VM's KVM_MAX_VCPU_IDS
    (kvmdirty.limits.MAX_VCPU_IDS by default), so every vCPU the VM accepts
    gets its own list.  Resets and vCPU additions are serialised.
    """
    cdef kd_iset s
    cdef kd_tracker t
    cdef object _lock
    cdef readonly IndexedRing vm_ring
    cdef dict _rings
    cdef readonly object entries
    cdef readonly object max_vcpu_ids

    @property
    def _kd_tracker(self):
        """PyCapsule (KD_TRACKER_CAPSULE) for Mmu.set_tracker; keeps this object alive."""
        return kd_owned_capsule(&self.t, KD_TRACKER_CAPSULE, self)

    def __cinit__(self, entries, max_vcpu_ids=MAX_VCPU_IDS):
        if not isinstance(max_vcpu_ids, int) or isinstance(max_vcpu_ids, bool):
            raise TypeError("max_vcpu_ids must be an int")
        if not 1 <= max_vcpu_ids <= 1 << 20:
            raise ValueError(f"max_vcpu_ids must be in [1, {1 << 20}], got {max_vcpu_ids}")
        self.vm_ring = IndexedRing(entries)
        self.entries = entries
        self.max_vcpu_ids = max_vcpu_ids
        self._rings = {}
        self._lock = _Mutex()
        self.s.by_vcpu = <kd_iring **>calloc(max_vcpu_ids, sizeof(kd_iring *))
        if self.s.by_vcpu == NULL:
            raise MemoryError()
        self.s.nids = max_vcpu_ids
        self.s.vm = &self.vm_ring.r
        self.t.mark = _iset_mark
        self.t.still_full = _iset_still_full
        self.t.full_exit = EXIT_DIRTY_LOG_FULL
        self.t.ctx = &self.s

    def __dealloc__(self):
        free(self.s.by_vcpu)

    def add_vcpu(self, vcpu_id):
        """Allocate vCPU ``vcpu_id``'s ring (idempotent); returns it."""
        cdef IndexedRing r
        if not isinstance(vcpu_id, int) or isinstance(vcpu_id, bool) or \
                not 0 <= vcpu_id < self.s.nids:
            raise ValueError(f"vcpu_id must be an int in [0, {self.s.nids})")
        with self._lock:
            r = self._rings.get(vcpu_id)
            if r is None:
                r = IndexedRing(self.entries, vcpu_id)
                self._rings[vcpu_id] = r
                # Release: the ring is initialised before a vCPU's mark can
                # see it; pairs with _iset_ring's load-acquire.
                kd_store_release_ptr(<void **>&self.s.by_vcpu[<uint32_t>vcpu_id], &r.r)
            return r

    def ring(self, vcpu_id):
        """The list of vCPU ``vcpu_id`` (ValueError if it has none)."""
        r = self._rings.get(vcpu_id) if isinstance(vcpu_id, int) else None
        if r is None:
            raise ValueError(f"no dirty list for vCPU {vcpu_id!r}")
        return r

    @property
    def rings(self):
        """Every ring: per vCPU (by id), then the per-VM ring."""
        return [self._rings[k] for k in sorted(self._rings)] + [self.vm_ring]

    def reset(self, sink=None, flush=None):
        """KVM_RESET_DIRTY_PAGES: re-protect and free what user space fetched, in every ring.

        Returns the entry count, or -1 when a ring's fetch_index is not
        within what was pushed (nothing changed in any ring).  ``flush``: a
        callable run (here, before returning) when anything was re-protected
        or when the sink failed part-way; without it the flush is the caller's.
        """
        with self._lock:
            return self._reset(sink, flush)

    def harvest(self, sink=None, flush=None):
        """Fetch every ring, then reset them, as one step: {slot: offsets (uint64, fetch order)}.

        All or nothing: the result is built before the reset frees anything;
        if the reset is refused (returns None) or anything raises (corrupt
        header, MemoryError, a sink's Ctrl-C), every fetch_index is put back,
        so nothing fetched is lost.
        """
        cdef IndexedRing r
        cdef list rings, starts, parts = []
        cdef Py_ssize_t held = 0
        with self._lock:
            rings = self.rings
            try:
                for r in rings:
                    r._fetch_lock.__enter__()       # may raise (Ctrl-C, re-entry): released below
                    held += 1
                starts = [r.fetch_index for r in rings]
                try:
                    for r in rings:
                        parts.append(r._fetch(None))
                    slots = np.concatenate([p[0] for p in parts])
                    offs = np.concatenate([p[1] for p in parts])
                    out = {int(sid): offs[slots == sid] for sid in np.unique(slots)}
                    if self._reset(sink, flush) < 0:
                        raise _ResetRefused()
                except _ResetRefused:
                    for r, f in zip(rings, starts):
                        r._unfetch(f)
                    return None
                except BaseException:
                    for r, f in zip(rings, starts):
                        r._unfetch(f)
                    raise
                return out
            finally:
                for r in rings[:held]:
                    r._fetch_lock.__exit__(None, None, None)

    cdef long _reset(self, object sink, object flush) except -2:
        cdef IndexedRing r
        cdef list rings = self.rings
        cdef Py_ssize_t k, nr = len(rings)
        cdef kd_sink *cs = NULL
        cap = getattr(sink, "_kd_sink", None) if sink is not None else None
        cdef int kind = kd_sink_resolve(sink, cap, &cs)
        cdef kd_batcher b
        cdef kd_batch_log log
        cdef long total = 0, most = 1
        cdef uint16_t f
        cdef uint32_t nk
        cdef uint32_t[::1] ls
        cdef uint64_t[::1] lf, lm
        cdef bint touched = False
        ns = []
        for r in rings:                                 # R1: validate every ring first
            n = _iring_pending(&r.r, &f)
            if n < 0:
                return -1
            ns.append(n)
            most = max(most, n)
        if kind == KD_SINK_PY:
            a_s = np.empty(most, np.uint32)             # MemoryError here changes nothing
            a_f = np.empty(most, np.uint64)
            a_m = np.empty(most, np.uint64)
            ls, lf, lm = a_s, a_f, a_m
        try:
            for k in range(nr):                         # R2
                r = rings[k]
                n = ns[k]
                if not n:
                    continue
                if kind == KD_SINK_C:
                    kd_batcher_init(&b, cs.protect, cs.ctx)
                elif kind == KD_SINK_PY:
                    log.slots, log.firsts, log.masks = &ls[0], &lf[0], &lm[0]
                    log.n, log.cap = 0, most
                    kd_batcher_init(&b, kd_batch_log_protect, &log)
                else:
                    kd_batcher_init(&b, NULL, NULL)
                touched = True
                nk = n
                with nogil:
                    _iring_protect(&r.r, nk, &b)
                if kind == KD_SINK_PY:
                    # Before the commit: a sink that raises (Ctrl-C) leaves every entry held.
                    for i in range(log.n):
                        if sink(int(ls[i]), int(lf[i]), int(lm[i])) is False:
                            b.dropped += 1
                r._batches += b.batches
                r._dropped += b.dropped
        except BaseException:
            if touched and flush is not None:
                flush()                                 # R4, for what was re-protected
            raise
        for k in range(nr):                             # R3: nothing can fail from here
            r = rings[k]
            n = ns[k]
            _iring_commit(&r.r, <uint32_t>n)
            r._resets += n
            total += n
        if total and flush is not None:
            flush()                                     # R4
        return total


class _ResetRefused(Exception):
    pass


# ---------------------------------------------------------------- shared ring

# Protocol of the shared ring (seed 002's review: one ring, cmpxchg reservation):
#   S1. any writer reserves entry dirty_index with a compare-exchange
#       (kd_ring_push_shared): the winner alone owns it; losers retry with the
#       reloaded index.  Acquire of reset_index pairs with the reset's release.
#   S2. the owner fills slot/offset and store-releases flags = DIRTY (pairs
#       with the collector's load-acquire of DIRTY).
#   S3. collect and reset are DirtyRing's own (one user of each at a time:
#       SharedRingDesign's mutex); a reset that freed anything flushes TLBs.
#   Entries become visible in reservation order, not completion order: a
#   collector stops at the first entry not yet DIRTY and resumes there.
#   pushes is a statistic: relaxed fetch-add here, relaxed load by readers.

cdef int _shared_mark(void *ctx, uint32_t vcpu_id, uint32_t slot, uint64_t offset) noexcept nogil:
    cdef kd_ring *r = <kd_ring *>ctx
    cdef int rc = kd_ring_push_shared(r, slot, offset)
    if rc != KD_PUSH_FULL:
        # Statistics (read by other threads): relaxed atomic, orders nothing.
        kd_fetch_add_relaxed_u64(&r.pushes, 1)
    return rc


cdef int _shared_still_full(void *ctx, uint32_t vcpu_id) noexcept nogil:
    cdef kd_ring *r = <kd_ring *>ctx
    return kd_ring_used(r) >= r.soft_limit


cdef kd_ring *_ring_of(object ring) except NULL:
    cap = getattr(ring, "_kd_ring", None)
    if cap is None or not PyCapsule_IsValid(cap, KD_RING_CAPSULE):
        raise TypeError("ring must be a kvmdirty._ring.DirtyRing (a kd_ring capsule)")
    return <kd_ring *>PyCapsule_GetPointer(cap, KD_RING_CAPSULE)


cdef class SharedRingTracker:
    """Every vCPU (and the host) pushes into one DirtyRing, reserving entries by compare-exchange.

    User space collects and resets ``ring`` with DirtyRing's own collect/reset.
    A vCPU exits with KVM_EXIT_DIRTY_RING_FULL once the ring is soft-full.
    """
    cdef kd_tracker t

    @property
    def _kd_tracker(self):
        """PyCapsule (KD_TRACKER_CAPSULE) for Mmu.set_tracker; keeps this object alive."""
        return kd_owned_capsule(&self.t, KD_TRACKER_CAPSULE, self)
    cdef readonly object ring

    def __cinit__(self, ring):
        self.t.ctx = _ring_of(ring)
        self.ring = ring
        self.t.mark = _shared_mark
        self.t.still_full = _shared_still_full
        self.t.full_exit = KVM_EXIT_DIRTY_RING_FULL


def push_many_shared(ring, const uint32_t[::1] slots not None, const uint64_t[::1] offsets not None):
    """Push into a shared ring from any number of threads, one compare-exchange per entry.

    Stops at the first entry refused (ring full); returns the count pushed.
    """
    cdef kd_ring *r = _ring_of(ring)
    cdef size_t n = slots.shape[0], i = 0
    if <size_t>offsets.shape[0] != n:
        raise ValueError(f"slots has {n} entries, offsets {offsets.shape[0]}")
    with nogil:
        while i < n:
            if kd_ring_push_shared(r, slots[i], offsets[i]) == KD_PUSH_FULL:
                break
            i += 1
        # One relaxed counter update per call (an add per entry would be a
        # second contended line); readers load it relaxed.
        kd_fetch_add_relaxed_u64(&r.pushes, i)
    return i


# ---------------------------------------------------------------- switched bitmaps

cdef int _protect_words(const uint64_t *words, size_t n, uint64_t last_mask, kd_sink *cs,
                        uint32_t slot, uint64_t *pages, uint64_t *batches,
                        uint64_t *dropped) noexcept nogil:
    """Masked write-protect of every set bit of words[0:n] (the last word ANDed with last_mask)."""
    cdef size_t i
    cdef uint64_t w
    for i in range(n):
        # Relaxed: the flush that retired this bitmap ordered every vCPU's
        # fetch-or into it before us (its acknowledgement is a release).
        w = kd_load_relaxed_u64(&words[i])
        if i + 1 == n:
            w &= last_mask
        if w:
            pages[0] += kd_popcount64(w)
            batches[0] += 1
            if cs.protect(cs.ctx, slot, <uint64_t>i * 64, w) == 0:
                dropped[0] += 1
    return 0


cdef size_t _nwords_and_mask(object npages, size_t n, uint64_t *last_mask) except? 0:
    """Words of a bitmap that cover ``npages`` (at most n) and the mask of the last one."""
    last_mask[0] = <uint64_t>-1
    if npages is None:
        return n
    if not isinstance(npages, int) or npages < 0:
        raise ValueError("npages must be a non-negative int")
    if (npages + 63) >> 6 < n:
        n = (npages + 63) >> 6
    if npages & 63 and n == (npages + 63) >> 6:
        last_mask[0] = ((<uint64_t>1) << (npages & 63)) - 1
    return n


def protect_bitmap(const uint64_t[::1] words not None, sink, unsigned int slot, npages=None):
    """Masked write-protect of every set bit of a retired (quiescent) bitmap.

    With ``npages``, bits at or past the slot's end (garbage user space may
    have written) are ignored, so the real pages of the last word are still
    protected rather than the whole batch being dropped as out of range.

    ``sink``: an object with a ``_kd_sink`` capsule (the Mmu) or a callable
    (slot, first_page, mask) returning False when it drops the batch.
    Returns (pages, batches, dropped).
    """
    cdef kd_sink *cs = NULL
    cap = getattr(sink, "_kd_sink", None) if sink is not None else None
    cdef int kind = kd_sink_resolve(sink, cap, &cs)
    cdef size_t i, n = words.shape[0]
    cdef uint64_t w, pages = 0, batches = 0, dropped = 0, last_mask
    if n and (<uintptr_t>&words[0]) & 7:
        raise ValueError("words must be 8-byte aligned")
    n = _nwords_and_mask(npages, n, &last_mask)
    if kind == KD_SINK_C and n:
        # ``words`` (a typed memoryview) keeps the buffer exported for the whole loop.
        with nogil:
            _protect_words(&words[0], n, last_mask, cs, slot, &pages, &batches, &dropped)
    elif kind == KD_SINK_PY:
        for i in np.flatnonzero(np.asarray(words)[:n]):
            w = words[i] & (last_mask if i + 1 == n else <uint64_t>-1)
            if not w:
                continue
            pages += kd_popcount64(w)
            batches += 1
            if sink(slot, int(i) * 64, int(w)) is False:
                dropped += 1
    return pages, batches, dropped


def switch_bitmaps(mmu, dict active, dict other, list sids, list news, dict npages,
                   bint zero_news, bint flush_first, bint offsets):
    """KVM_SWITCH_DIRTY_LOG of every slot in ``sids`` at once (seed 003).

    Protocol (the order KVM's get_dirty_log_protect keeps, with a pointer swap
    in place of the xchg of each word):
      1. Each new bitmap is (optionally) zeroed while no vCPU can reach it, then
         published as the slot's active bitmap: store-release of the pointer,
         paired with the write loop's load-acquire in _mark_dirty.
      2. One remote TLB flush: every vCPU in guest mode passes a request check,
         so no write still in flight uses an old pointer (what synchronize_srcu
         gives the kernel).  The old bitmaps are quiescent from here on.
      3. Every page set in an old bitmap is write-protected (masked protect).
      4. A second flush drops the writable TLB entries of those pages.  A write
         between 3 and 4 through such an entry is not logged, and need not be:
         its page is already in the old bitmap the caller receives (step 5).
      5. Returns the old bitmaps (or, with ``offsets``, each old bitmap's set
         pages below npages; if that fails the bits go back, see or_back).
    The bookkeeping (``active[sid] = new``, ``other[sid] = old``) is done
    between 1 and 2, where nothing can fail.

    The caller holds the VM's slot lock for reading (no memslot change) and
    the design's mutex (one switch at a time: two would take one spare).
    No Python code runs between the steps, so an interrupt cannot split them;
    a failure before step 2 puts back every pointer already swapped.
    """
    cdef Py_ssize_t k, n = len(sids)
    cdef uint64_t[::1] w
    cdef kd_sink *cs = NULL
    cdef uint64_t pages = 0, batches = 0, dropped = 0, last_mask
    cdef size_t nw
    cdef uint32_t sid32
    if len(news) != n:
        raise ValueError("one new bitmap per slot")
    cap = mmu._kd_sink
    if kd_sink_resolve(mmu, cap, &cs) != KD_SINK_C:
        raise TypeError("mmu must offer a kd_sink capsule")
    olds = [active[sid] for sid in sids]           # KeyError here changes nothing
    for k in range(n):
        w = news[k]
        if <size_t>w.shape[0] < (<size_t>npages[sids[k]] + 63) >> 6:
            raise ValueError(f"bitmap for slot {sids[k]:#x} is too small")
    if zero_news:
        for k in range(n):
            w = news[k]
            if w.shape[0]:
                memset(&w[0], 0, w.shape[0] * sizeof(uint64_t))
    k = 0
    try:
        while k < n:                                # 1
            mmu.set_dirty(sids[k], news[k])
            k += 1
    except BaseException:
        while k > 0:                                # put back what was swapped
            k -= 1
            mmu.set_dirty(sids[k], olds[k])
        raise
    for k in range(n):                              # 5 (bookkeeping, no failure point)
        active[sids[k]] = news[k]
        other[sids[k]] = olds[k]
    mmu.flush_remote_tlbs()                         # 2
    for k in range(n):                              # 3
        w = olds[k]
        nw = _nwords_and_mask(npages[sids[k]], w.shape[0], &last_mask)
        sid32 = sids[k]
        if nw:
            with nogil:
                _protect_words(&w[0], nw, last_mask, cs, sid32, &pages, &batches, &dropped)
    if pages and not flush_first:
        mmu.flush_remote_tlbs()                     # 4
    if not offsets:
        return olds
    try:
        out = []
        for k in range(n):
            got = _bitmap.to_gfns(olds[k])
            out.append(got[got < npages[sids[k]]])
    except BaseException:
        # (MemoryError) Never drop taken bits: back into the active bitmaps.
        for k in range(n):
            or_back(news[k], olds[k])
        raise
    return out


def or_back(uint64_t[::1] active not None, const uint64_t[::1] taken not None):
    """Put bits taken out of a bitmap back into the live one (atomic fetch-or per word).

    For error paths: a harvest that cannot hand its pages over returns them
    to the active bitmap, where the next harvest reports them.
    """
    cdef size_t i, n = min(active.shape[0], taken.shape[0])
    with nogil:
        for i in range(n):
            if taken[i]:
                # acq_rel, as the write loop's fetch-or into the same words.
                kd_fetch_or_u64(&active[i], taken[i])
