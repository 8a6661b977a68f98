"""The simulated MMU: SPTE write bits, guest memory, per-vCPU TLBs, the guest write loop.

Per memslot: a writable-bit bitmap (the SPTE W bit; 1 = writable), one uint64
per page (the guest memory we model: the last value written), and the dirty
bitmap when the slot is logged.  Per vCPU: its cached writable translations
(TLB) and, with a dirty ring, its kd_ring.

The write loop runs with the GIL released.  Before each write the vCPU honours
its requests (TLB flush, ring soft-full), like vcpu_enter_guest().  A remote TLB
flush sets the flush request on every vCPU and waits until every vCPU in guest
mode has acknowledged it (kvm_flush_remote_tlbs).  Masked write-protect is one
atomic and-not of a 64-bit mask into the W word.

Slot tables change only while no vCPU runs and no harvest is under way: the
MMU's own readers/writer lock (SlotLock, what KVM's SRCU gives it) guarantees
it.  Every table change allocates everything it needs first and then swaps,
with the GIL held and no Python code in between, so a MemoryError or a
KeyboardInterrupt leaves the old table whole.

TLB memory follows what is cached, not the slot size: a vCPU's TLB for a slot
is an array of NULL chunk pointers; a chunk (TLB_CHUNK_WORDS words) is
allocated when the vCPU first caches a page in it and recorded in the vCPU's
cached list; a flush frees exactly the chunks on that list.
"""
from cpython.pycapsule cimport PyCapsule_GetPointer, PyCapsule_CheckExact
from cpython.pythread cimport PyThread_get_thread_ident
from cpython.buffer cimport (PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE,
                             PyBUF_C_CONTIGUOUS, PyBUF_FORMAT)
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport calloc, realloc, free
from libc.string cimport memmove, memset

import errno
import os
import weakref

import numpy as np

from _atomic cimport (kd_load_acquire_u32, kd_store_release_u32, kd_store_seqcst_u32,
                      kd_store_relaxed_u32, kd_fetch_or_u32, kd_fetch_andnot_u32,
                      kd_load_relaxed_u64, kd_store_relaxed_u64, kd_fetch_or_u64,
                      kd_fetch_andnot_u64, kd_fetch_add_relaxed_u64,
                      kd_load_acquire_ptr, kd_store_release_ptr, kd_smp_mb, kd_cpu_relax,
                      kd_ctz64, kd_clz64, kd_popcount64, kd_xchg_u64)
from _scan cimport kd_nonzero_mask16, kd_ctz32
from _sink cimport (kd_sink, kd_tracker, kd_owned_capsule, KD_SINK_CAPSULE, KD_RING_CAPSULE,
                    KD_TRACKER_CAPSULE, KD_NO_VCPU)
from _ringcore cimport kd_ring, kd_ring_push, kd_ring_used, KD_PUSH_SOFT_FULL, KD_PUSH_FULL
from _uapi cimport (KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, KVM_EXIT_HLT, KVM_EXIT_MMIO,
                    KVM_EXIT_DIRTY_RING_FULL)

from kvmdirty.errors import KvmError
from kvmdirty import limits as _limits, validate as _validate

# vCPU mode, as vcpu->mode
cdef enum:
    OUTSIDE_GUEST_MODE = 0
    IN_GUEST_MODE = 1

cdef extern from "<sched.h>" nogil:
    int sched_yield()

cdef extern from "<unistd.h>" nogil:
    int usleep(unsigned int usec)

# A flusher spins this many times on a vCPU's acknowledgement before yielding.
cdef enum:
    FLUSH_SPINS_BEFORE_YIELD = 256

# A lock waiter yields this many times before it sleeps between polls.
cdef enum:
    LOCK_YIELDS_BEFORE_SLEEP = 64
    LOCK_SLEEP_US = 100

# TLB chunks: 512 words (4 KiB) cache 32,768 pages (128 MiB of guest memory).
cdef enum:
    TLB_CHUNK_SHIFT = 9
    TLB_CHUNK_WORDS = 1 << TLB_CHUNK_SHIFT
    TLB_CHUNK_MASK = TLB_CHUNK_WORDS - 1

# Slots by id: (address space << 16) | id, address spaces 0 and 1.
cdef enum:
    SLOT_ID_SPACE = 2 << 16

# vCPU request bits, as KVM_REQ_*
cdef enum:
    REQ_TLB_FLUSH = 1
    REQ_DIRTY_RING_SOFT_FULL = 2
    REQ_TRACKER_FULL = 4

# Exit reasons that are not KVM's
cdef enum:
    EXIT_BUDGET = -1

# Deliberate ordering bugs (fault injection), a bit each.  The verifier must catch every one.
cdef enum:
    F_SKIP_FLUSH = 1            # harvest/reset never flush TLBs: stale writable TLB entries survive
    F_FLUSH_BEFORE_PROTECT = 2  # flush first, protect after: a vCPU refills its TLB in between
    F_NO_FLUSH_WAIT = 4         # request the flush but do not wait for vCPUs to acknowledge it
    F_UNLOGGED_FAULT = 8        # a write-protect fault makes the page writable without logging it
    F_SKIP_RESET_PROTECT = 16   # ring reset returns entries without re-protecting their pages
    F_MASK = 31

FAULT_SKIP_FLUSH = F_SKIP_FLUSH
FAULT_FLUSH_BEFORE_PROTECT = F_FLUSH_BEFORE_PROTECT
FAULT_NO_FLUSH_WAIT = F_NO_FLUSH_WAIT
FAULT_UNLOGGED_FAULT = F_UNLOGGED_FAULT
FAULT_SKIP_RESET_PROTECT = F_SKIP_RESET_PROTECT
FAULT_MASK = F_MASK
TLB_CHUNK_PAGES = TLB_CHUNK_WORDS * 64

# Only the Mmu builds vCPU cores and locks: a token module code holds.
cdef object _TOKEN = object()
cdef uint32_t NO_IX = 0xFFFFFFFF

_live_mmus = weakref.WeakSet()


ctypedef struct kd_slot:
    uint64_t base_gfn
    uint64_t npages
    uint32_t id           # (address space << 16) | slot id, as in kvm_dirty_gfn.slot
    uint32_t flags        # KVM_MEM_* flags
    uint64_t *writable    # SPTE W bits, 1 = writable
    uint64_t *values      # guest memory: last value written per page
    uint64_t *dirty       # dirty bitmap, NULL if none (not logging, or ring only)
    size_t nchunks        # TLB chunks one vCPU needs for this slot (0 outside address space 0)
    uint64_t **tlb        # [vcpu ix * nchunks + chunk]: a TLB chunk, or NULL (nothing cached)

ctypedef struct kd_vcpu:
    uint32_t id
    uint32_t ix           # index in kd_mmu.vcpus, the row of every slot's tlb
    uint32_t mode         # OUTSIDE_GUEST_MODE / IN_GUEST_MODE
    uint32_t requests     # REQ_* bits
    kd_ring *ring         # NULL without a dirty ring
    uint64_t ***cached    # the tlb cells whose chunk this vCPU allocated since its last flush
    size_t ncached, cap_cached
    # Statistics: written by the vCPU's thread (relaxed fetch_add once per run),
    # read by any thread (relaxed loads).  They order nothing.
    uint64_t writes, tlb_hits, faults, dirty_logged

# The slots lock.  Its counters change only with the GIL held (so every
# check-and-set is atomic) and inside compiled code (so no KeyboardInterrupt
# can land between two steps); waiters drop the GIL while they poll.
ctypedef struct kd_rwlock:
    long readers
    bint writer           # a writer is inside, or waiting for the readers to leave
    long owner            # the writer's thread ident

ctypedef struct kd_mmu:
    kd_slot **sorted[2]   # per address space, sorted by base_gfn; sorted[0] is what the guest runs in
    size_t nsorted[2], cap_sorted[2]
    kd_slot **by_id       # SLOT_ID_SPACE entries, every address space
    size_t nslots
    kd_vcpu **vcpus
    size_t nvcpus
    kd_rwlock lock
    bint closed           # the VM is closed: runs fail with EBADF
    bint forked           # inherited across fork(): every call fails with EIO, as KVM's mm check
    bint log_every_write  # log every write to a logged page (emulated writes)
    bint protect_range    # seed 004: protect first..last set bit of a mask
    uint32_t faults       # FAULT_* bits
    kd_tracker *tracker   # a seed-era design, replacing ring/bitmap logging; NULL = upstream KVM
    uint64_t protects, protect_dropped, flushes     # statistics (relaxed)


# -- test-only allocation failure injection ------------------------------------
# Table changes allocate through _alloc; _inject_alloc_failure(n) makes the n-th
# of them fail, so tests can prove a MemoryError at every step changes nothing.
cdef long _fail_countdown = 0


cdef void *_alloc(size_t n, size_t size) noexcept:
    # Called with the GIL held only (the countdown is a plain global).
    global _fail_countdown
    if _fail_countdown > 0:
        _fail_countdown -= 1
        if _fail_countdown == 0:
            return NULL
    return calloc(n if n else 1, size)


def _inject_alloc_failure(long n):
    """Make the n-th table allocation from now fail (0: none).  Returns how many were still pending."""
    global _fail_countdown
    old = _fail_countdown
    _fail_countdown = n
    return old


# -- the slots lock -------------------------------------------------------------

cdef inline void _lock_pause(int *polls) noexcept nogil:
    polls[0] += 1
    if polls[0] < LOCK_YIELDS_BEFORE_SLEEP:
        sched_yield()
    else:
        usleep(LOCK_SLEEP_US)


cdef void _read_lock(kd_mmu *m):
    """Enter as a reader (GIL held); waits, GIL released, while a writer is in or waiting."""
    cdef int polls = 0
    while m.lock.writer:
        with nogil:
            _lock_pause(&polls)
    m.lock.readers += 1


cdef void _read_unlock(kd_mmu *m):
    m.lock.readers -= 1


cdef bint _write_held(kd_mmu *m):
    return m.lock.writer and m.lock.owner == <long>PyThread_get_thread_ident() and m.lock.readers == 0


cdef void _write_lock(kd_mmu *m):
    """Enter as the writer (GIL held): wait out other writers, bar new readers, wait out readers."""
    cdef int polls = 0
    while m.lock.writer:
        with nogil:
            _lock_pause(&polls)
    m.lock.writer = True
    m.lock.owner = <long>PyThread_get_thread_ident()
    polls = 0
    while m.lock.readers:
        with nogil:
            _lock_pause(&polls)


cdef void _write_unlock(kd_mmu *m):
    m.lock.writer = False
    m.lock.owner = 0


cdef class _ReadSide:
    cdef Mmu mmu

    def __cinit__(self, Mmu mmu not None, token):
        if token is not _TOKEN:
            raise TypeError("use SlotLock.read()")
        self.mmu = mmu

    def __enter__(self):
        _read_lock(self.mmu.m)

    def __exit__(self, *exc):
        _read_unlock(self.mmu.m)


cdef class _WriteSide:
    cdef Mmu mmu

    def __cinit__(self, Mmu mmu not None, token):
        if token is not _TOKEN:
            raise TypeError("use SlotLock.write()")
        self.mmu = mmu

    def __enter__(self):
        _write_lock(self.mmu.m)

    def __exit__(self, *exc):
        _write_unlock(self.mmu.m)


cdef class SlotLock:
    """Readers (vCPU runs, harvests) vs writers (memslot and vCPU-set changes) of one MMU.

    ``with lock.read():`` shares the slot table; ``with lock.write():`` waits
    for every reader to leave and keeps new ones out (synchronize_srcu).
    Enter and exit are single compiled steps: an interrupt can only land
    before or after them.  Readers do not nest while a writer waits.
    """
    cdef Mmu mmu
    cdef _ReadSide _read
    cdef _WriteSide _write

    def __cinit__(self, Mmu mmu not None, token):
        if token is not _TOKEN:
            raise TypeError("SlotLock is created by its Mmu (Mmu.slots_lock)")
        self.mmu = mmu
        self._read = _ReadSide(mmu, _TOKEN)
        self._write = _WriteSide(mmu, _TOKEN)

    def read(self):
        return self._read

    def write(self):
        return self._write

    @property
    def readers(self):
        return self.mmu.m.lock.readers

    @property
    def writer(self):
        return bool(self.mmu.m.lock.writer)


# -- slot lookup ----------------------------------------------------------------

cdef inline kd_slot *_slot_by_gfn(kd_mmu *m, uint64_t gfn) noexcept nogil:
    cdef size_t lo = 0, hi = m.nsorted[0], mid
    cdef kd_slot *s
    while lo < hi:
        mid = (lo + hi) >> 1
        s = m.sorted[0][mid]
        if gfn < s.base_gfn:
            hi = mid
        elif gfn - s.base_gfn >= s.npages:
            lo = mid + 1
        else:
            return s
    return NULL


cdef inline size_t _sorted_pos(kd_mmu *m, uint32_t asid, uint64_t base) noexcept nogil:
    """Index of the first slot of address space asid whose base is >= base."""
    cdef size_t lo = 0, hi = m.nsorted[asid], mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if m.sorted[asid][mid].base_gfn < base:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef inline void _sorted_remove(kd_mmu *m, uint32_t asid, kd_slot *s) noexcept nogil:
    # Bases are unique within an address space (slots never overlap).
    cdef size_t pos = _sorted_pos(m, asid, s.base_gfn)
    memmove(&m.sorted[asid][pos], &m.sorted[asid][pos + 1], (m.nsorted[asid] - pos - 1) * sizeof(kd_slot *))
    m.nsorted[asid] -= 1


cdef inline kd_slot *_slot_by_id(kd_mmu *m, uint32_t sid) noexcept nogil:
    # Ring entries carry any u32 user space wrote: bound it first.
    if sid >= SLOT_ID_SPACE:
        return NULL
    return m.by_id[sid]


cdef inline uint64_t _range_mask(uint64_t mask) noexcept nogil:
    # Seed 004 (ARM's first patch): every page from the first to the last set bit.
    cdef int lo = kd_ctz64(mask), hi = 63 - kd_clz64(mask)
    if hi - lo == 63:
        return <uint64_t>-1
    return (((<uint64_t>1) << (hi - lo + 1)) - 1) << lo


cdef inline void _count_protects(kd_mmu *m, uint64_t n) noexcept nogil:
    """Statistics only (nothing decides on it).  A relaxed load and store, not a
    locked add per batch: every protector of a VM holds its slots mutex (the
    dirty-log and ring-reset ioctls), so the count is exact there; protectors
    not serialised (direct kernel calls from several threads) may lose a count."""
    kd_store_relaxed_u64(&m.protects, kd_load_relaxed_u64(&m.protects) + n)


cdef inline int _protect_slot(kd_mmu *m, kd_slot *s, uint64_t first, uint64_t mask) noexcept nogil:
    """_protect without the slot lookup and the count (returns 1 applied, 0 dropped)."""
    cdef uint64_t w, sh
    if mask == 0:
        return 1
    if s == NULL or first >= s.npages or first + <uint64_t>(63 - kd_clz64(mask)) >= s.npages:
        kd_fetch_add_relaxed_u64(&m.protect_dropped, 1)
        return 0
    if m.protect_range:
        mask = _range_mask(mask)
        # The range may not run past the slot either.
        if first + <uint64_t>(63 - kd_clz64(mask)) >= s.npages:
            mask &= ((<uint64_t>1) << (s.npages - first)) - 1
    w = first >> 6
    sh = first & 63
    # One atomic and-not per W word; pairs with the fault path's fetch-or (step 2 there).
    kd_fetch_andnot_u64(&s.writable[w], mask << sh)
    if sh and (mask >> (64 - sh)):
        kd_fetch_andnot_u64(&s.writable[w + 1], mask >> (64 - sh))
    return 1


cdef int _protect(void *ctx, uint32_t sid, uint64_t first, uint64_t mask) noexcept nogil:
    """Masked write-protect of pages first + set bits of mask (kvm_arch_mmu_enable_log_dirty_pt_masked).

    Dropped, as kvm_reset_dirty_gfn drops it, if the slot does not exist or the
    mask runs past its end.  first need not be 64-aligned (ring reset batches
    are not); the mask then spans two W words.  The caller holds the slots lock.
    """
    cdef kd_mmu *m = <kd_mmu *>ctx
    if mask == 0:
        return 1
    if _protect_slot(m, _slot_by_id(m, sid), first, mask):
        _count_protects(m, 1)
        return 1
    return 0


cdef inline size_t _harvest_slot_word(kd_mmu *m, kd_slot *s, uint64_t *d, uint64_t *snap,
                                      size_t j, uint64_t *dirty) noexcept nogil:
    # xchg: the one access that decides what this harvest owns; pairs with
    # the vCPU's fetch-or in mark-dirty (_mark_dirty).
    cdef uint64_t mask = kd_xchg_u64(&d[j], 0)
    snap[j] = mask
    if mask == 0:
        return 0
    dirty[0] |= mask
    return <size_t>_protect_slot(m, s, <uint64_t>j << 6, mask)


cdef size_t _harvest_slot(kd_mmu *m, kd_slot *s, uint64_t *d, uint64_t *snap, size_t n,
                          bint zeroed, uint64_t *pages) noexcept nogil:
    """KVM_GET_DIRTY_LOG's harvest of one slot (the numbered protocol of kvmdirty._bitmap):
    exchange each non-zero dirty word with 0 into snap, protect its pages.

    16 words at a time (one branch per block, its dirty words visited through
    its non-zero mask, src/_scan.h).  Without ``zeroed`` the snapshot may hold
    anything (a reused buffer) and ends up equal to the harvested words.  Returns the words
    protected; ``pages`` is non-zero iff anything was dirty (the caller then
    flushes TLBs).
    """
    cdef size_t i = 0, protected = 0
    cdef unsigned bm
    cdef uint64_t dirty = 0
    if not zeroed:
        # The caller's private buffer, which may hold anything: one memset
        # first (faster than a store or a read per word in the scan, measured).
        memset(snap, 0, n * sizeof(uint64_t))
    while i + 16 <= n:
        bm = kd_nonzero_mask16(&d[i])
        while bm:
            protected += _harvest_slot_word(m, s, d, snap, i + <size_t>kd_ctz32(bm), &dirty)
            bm &= bm - 1
        i += 16
    while i < n:
        if kd_load_relaxed_u64(&d[i]):
            protected += _harvest_slot_word(m, s, d, snap, i, &dirty)
        i += 1
    pages[0] = dirty
    return protected


cdef void _flush_remote_tlbs(kd_mmu *m) noexcept nogil:
    """kvm_flush_remote_tlbs: after it returns, no vCPU holds a TLB entry from before it.

    Protocol (the caller holds the slots lock, so m.vcpus is stable):
      1. The caller has write-protected the pages (and-not of W bits) already.
      2. Set REQ_TLB_FLUSH on every vCPU with a fetch-or: ordered after the
         protects of step 1; pairs with the vCPU's load-acquire of requests.
      3. Full barrier, then read each vCPU's mode: pairs with the vCPU's
         seq-cst store of IN_GUEST_MODE + full barrier before it reads its
         requests (a Dekker handshake): either we see it in guest mode, or it
         sees our request before its next write.
      4. Wait while a vCPU is in guest mode with the request still set.  It
         clears the request (release) only after emptying its TLB; once it
         has, or has left guest mode (release), its stale entries are gone.
    Why the window is safe: between steps 1 and 4 a vCPU may still write
    through a stale writable TLB entry without faulting; that write is not
    logged by this harvest, but the page's bit was taken by it before step 1
    only if the page was dirty, and the caller returns only after step 4, so
    user space never reads the page before the stale entry is gone; a write
    after step 4 faults and is logged again.
    """
    cdef size_t i, spins
    cdef kd_vcpu *v
    if m.faults & F_SKIP_FLUSH:
        return
    kd_fetch_add_relaxed_u64(&m.flushes, 1)
    for i in range(m.nvcpus):
        kd_fetch_or_u32(&m.vcpus[i].requests, REQ_TLB_FLUSH)          # step 2
    kd_smp_mb()                                                        # step 3
    if m.faults & F_NO_FLUSH_WAIT:
        return
    for i in range(m.nvcpus):                                          # step 4
        v = m.vcpus[i]
        spins = 0
        while (kd_load_acquire_u32(&v.mode) == IN_GUEST_MODE and
               kd_load_acquire_u32(&v.requests) & REQ_TLB_FLUSH):
            # A vCPU thread the OS has descheduled cannot acknowledge: after a
            # short spin give it our CPU (more threads than cores is common here).
            spins += 1
            if spins < FLUSH_SPINS_BEFORE_YIELD:
                kd_cpu_relax()
            else:
                sched_yield()


# -- TLBs -----------------------------------------------------------------------

cdef void _tlb_flush_local(kd_vcpu *v) noexcept nogil:
    """Empty this vCPU's TLB: free the chunks it cached since its last flush (cost follows what is cached)."""
    cdef size_t k
    for k in range(v.ncached):
        free(v.cached[k][0])
        v.cached[k][0] = NULL
    v.ncached = 0


cdef inline void _tlb_fill(kd_vcpu *v, uint64_t **cell, uint64_t w, uint64_t bit) noexcept nogil:
    """Cache a writable translation.  Out of memory: cache nothing (a TLB miss is always correct)."""
    cdef uint64_t *chunk = cell[0]
    cdef uint64_t ***grown
    cdef size_t cap
    if chunk == NULL:
        if v.ncached == v.cap_cached:
            cap = v.cap_cached * 2 if v.cap_cached else 16
            grown = <uint64_t ***>realloc(v.cached, cap * sizeof(uint64_t **))
            if grown == NULL:
                return
            v.cached = grown
            v.cap_cached = cap
        chunk = <uint64_t *>calloc(TLB_CHUNK_WORDS, sizeof(uint64_t))
        if chunk == NULL:
            return
        v.cached[v.ncached] = cell
        v.ncached += 1
        cell[0] = chunk
    chunk[w & TLB_CHUNK_MASK] |= bit


cdef void _flush_all_local(kd_mmu *m) noexcept nogil:
    """Every vCPU's TLB emptied by the writer (no vCPU runs: the slots lock is held for writing)."""
    cdef size_t i
    for i in range(m.nvcpus):
        _tlb_flush_local(m.vcpus[i])


cdef void _free_slot(kd_slot *s) noexcept nogil:
    # Its chunks are freed by the vCPUs' flushes (the writer flushes every vCPU first).
    if s != NULL:
        free(s.tlb)
        free(s)


# -- the guest ------------------------------------------------------------------

cdef inline int _check_requests(kd_mmu *m, kd_vcpu *v) noexcept nogil:
    """Honour pending requests before entering the guest; return an exit reason or 0."""
    # Acquire pairs with the fetch-or in _flush_remote_tlbs (its step 2) / the soft-full request.
    cdef uint32_t req = kd_load_acquire_u32(&v.requests)
    if req & REQ_TLB_FLUSH:
        _tlb_flush_local(v)
        # Release: the TLB is empty before the flusher (its step 4) sees the acknowledgement.
        kd_fetch_andnot_u32(&v.requests, REQ_TLB_FLUSH)
    if req & REQ_DIRTY_RING_SOFT_FULL:
        # kvm_dirty_ring_check_request: keep exiting while still soft-full.
        if v.ring != NULL and kd_ring_used(v.ring) >= v.ring.soft_limit:
            return KVM_EXIT_DIRTY_RING_FULL
        kd_fetch_andnot_u32(&v.requests, REQ_DIRTY_RING_SOFT_FULL)
    if req & REQ_TRACKER_FULL:
        if m.tracker != NULL and m.tracker.still_full(m.tracker.ctx, v.id):
            return m.tracker.full_exit
        kd_fetch_andnot_u32(&v.requests, REQ_TRACKER_FULL)
    return 0


cdef inline int _mark_dirty(kd_mmu *m, kd_vcpu *v, kd_slot *s, uint64_t rel,
                            uint64_t *logged) noexcept nogil:
    """mark_page_dirty_in_slot: record one write; return an exit reason if it could not be.

    As KVM: into the vCPU's ring when the VM has rings, else into the slot's bitmap.
    """
    cdef uint64_t *d
    cdef int r
    if not (s.flags & KVM_MEM_LOG_DIRTY_PAGES):
        return 0
    if m.tracker != NULL:
        r = m.tracker.mark(m.tracker.ctx, v.id, s.id, rel)
        if r < 0:
            return m.tracker.full_exit
        if r > 0:
            kd_fetch_or_u32(&v.requests, REQ_TRACKER_FULL)
        logged[0] += 1
        return 0
    if v.ring != NULL:
        r = kd_ring_push(v.ring, s.id, rel)
        if r == KD_PUSH_FULL:
            return KVM_EXIT_DIRTY_RING_FULL
        if r == KD_PUSH_SOFT_FULL:
            kd_fetch_or_u32(&v.requests, REQ_DIRTY_RING_SOFT_FULL)
        logged[0] += 1
        return 0
    # Acquire pairs with set_dirty's store-release of the pointer (switched bitmaps).
    d = <uint64_t *>kd_load_acquire_ptr(<void **>&s.dirty)
    if d != NULL:
        # fetch-or pairs with the harvester's xchg / fetch-and-not.
        kd_fetch_or_u64(&d[rel >> 6], (<uint64_t>1) << (rel & 63))
        logged[0] += 1
    return 0


cdef int _run(kd_mmu *m, kd_vcpu *v, const uint64_t *gfns, const uint64_t *vals,
              size_t vstride, size_t n, size_t *done) noexcept nogil:
    """The guest: write vals[i*vstride] to page gfns[i], for i < n.  Returns the exit reason.

    Write-fault protocol (fast_page_fault + mark_page_dirty_in_slot), per write:
      1. TLB hit: store the value, no fault.  The entry was filled after the
         last flush this vCPU acknowledged (_check_requests), so the page was
         writable and logged since its last harvest.
      2. W bit set (relaxed load: a stale 1 is only a stale TLB-like view, and
         the harvester's and-not + flush handshake covers it): fill the TLB.
      3. W bit clear, a write-protect fault: set the W bit (fetch-or) FIRST,
         then log the page (ring push / bitmap fetch-or, both publishing with
         release; they pair with the harvester's acquire / xchg).  A harvest
         between the two does not see the page dirty and leaves W alone; our
         log then marks it, so the next harvest reports and re-protects it.
         The other order loses writes: log, a harvest takes the bit and
         protects the page, then we set W: writable and clean, and every
         later write to it goes unlogged.
      4. Store the value (relaxed: readers only need the value itself; user
         space reads pages after a harvest that flushed us, step 4 of
         _flush_remote_tlbs, which orders our stores before its return).
    Requests are checked before each write; a flush request empties the TLB
    before the write, so no write uses an entry from before the flush once
    the flusher has seen our acknowledgement.
    """
    cdef size_t i = 0
    cdef kd_slot *s = NULL
    cdef uint64_t **row = NULL
    cdef uint64_t *chunk
    cdef uint64_t gfn, rel, w, bit, hits = 0, faults = 0, logged = 0
    cdef int reason = KVM_EXIT_HLT, r
    cdef bint unlogged = (m.faults & F_UNLOGGED_FAULT) != 0
    # Dekker handshake with _flush_remote_tlbs (its step 3): publish guest mode,
    # full barrier, then read requests (vcpu_enter_guest's smp_mb__after_srcu_read_unlock).
    kd_store_seqcst_u32(&v.mode, IN_GUEST_MODE)
    kd_smp_mb()
    while i < n:
        if kd_load_acquire_u32(&v.requests):
            r = _check_requests(m, v)
            if r:
                reason = r
                break
        gfn = gfns[i]
        if s == NULL or gfn - s.base_gfn >= s.npages:
            s = _slot_by_gfn(m, gfn)
            if s == NULL or s.flags & KVM_MEM_READONLY:
                # No memslot, or a read-only one: the write goes to user space
                # as MMIO.  KVM retires the instruction with the exit, so it
                # counts as done and a resume goes on with the next write.
                s = NULL
                reason = KVM_EXIT_MMIO
                i += 1
                break
            row = s.tlb + <size_t>v.ix * s.nchunks
        rel = gfn - s.base_gfn
        w = rel >> 6
        bit = (<uint64_t>1) << (rel & 63)
        chunk = row[w >> TLB_CHUNK_SHIFT]
        if chunk != NULL and chunk[w & TLB_CHUNK_MASK] & bit:          # step 1
            hits += 1
            if m.log_every_write and (s.flags & KVM_MEM_LOG_DIRTY_PAGES):
                r = _mark_dirty(m, v, s, rel, &logged)
                if r:
                    reason = r
                    break
        elif kd_load_relaxed_u64(&s.writable[w]) & bit:                # step 2
            if m.log_every_write and (s.flags & KVM_MEM_LOG_DIRTY_PAGES):
                r = _mark_dirty(m, v, s, rel, &logged)
                if r:
                    reason = r
                    break
            _tlb_fill(v, &row[w >> TLB_CHUNK_SHIFT], w, bit)
        else:                                                          # step 3
            if (v.ring != NULL and m.tracker == NULL and s.flags & KVM_MEM_LOG_DIRTY_PAGES
                    and kd_ring_used(v.ring) >= v.ring.size):
                # Every entry is live (only if user space never resets): never
                # overwrite one; the write waits for a reset.
                reason = KVM_EXIT_DIRTY_RING_FULL
                break
            kd_fetch_or_u64(&s.writable[w], bit)
            if not unlogged:
                r = _mark_dirty(m, v, s, rel, &logged)
                if r:
                    # Only a seed design's tracker refuses: undo the W bit; the
                    # write is redone, and logged, when the vCPU resumes.
                    kd_fetch_andnot_u64(&s.writable[w], bit)
                    reason = r
                    break
            faults += 1
            _tlb_fill(v, &row[w >> TLB_CHUNK_SHIFT], w, bit)
        kd_store_relaxed_u64(&s.values[rel], vals[i * vstride])        # step 4
        i += 1
    kd_fetch_add_relaxed_u64(&v.writes, i)
    kd_fetch_add_relaxed_u64(&v.tlb_hits, hits)
    kd_fetch_add_relaxed_u64(&v.faults, faults)
    kd_fetch_add_relaxed_u64(&v.dirty_logged, logged)
    # Release: our stores are done before a flusher stops waiting for us (its step 4).
    kd_store_release_u32(&v.mode, OUTSIDE_GUEST_MODE)
    done[0] = i
    return reason




cdef object _vm_error(int err, str ioctl, str detail):
    return KvmError(err, ioctl, detail)


# get_dirty_log modes (vm.VM decides which from its caps)
cdef enum:
    LOG_NONE = 0        # ring-only VM or a seed design: ENXIO
    LOG_HARVEST = 1     # exchange, protect, flush
    LOG_COPY = 2        # manual protect: copy the live bitmap
GET_LOG_NONE = LOG_NONE
GET_LOG_HARVEST = LOG_HARVEST
GET_LOG_COPY = LOG_COPY

cdef uint32_t _USER_MEM_SLOTS = _limits.USER_MEM_SLOTS
cdef object _np_zeros = np.zeros
cdef object _U64 = np.dtype(np.uint64)


cdef int _out_view(object out, Py_buffer *view) except -1:
    """Export a caller-owned output buffer as validate.out_words accepts it (its
    errors, raised by it, for anything else); released by the caller."""
    cdef const char *f
    if not isinstance(out, np.ndarray):
        _validate.out_words(out)
        raise TypeError("out must be a numpy uint64 array")
    try:
        PyObject_GetBuffer(out, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT)
    except (BufferError, ValueError, TypeError):
        _validate.out_words(out)
        raise
    f = view.format
    if (view.ndim != 1 or view.itemsize != 8 or (<size_t>view.buf) & 7 or f == NULL
            or not ((f[0] == c'Q' or f[0] == c'L') and f[1] == 0
                    or (f[0] == c'<' or f[0] == c'=' or f[0] == c'@') and (f[1] == c'Q' or f[1] == c'L') and f[2] == 0)):
        PyBuffer_Release(view)
        _validate.out_words(out)
        raise ValueError("out must be a writable, C-contiguous, aligned 1-D uint64 array")
    return 0


cdef class VcpuCore:
    """One simulated vCPU: requests, TLB, optional dirty ring, counters, and its write plan.

    Built by ``Mmu.new_vcpu`` / ``Mmu.add_vcpu`` only.  The plan and the
    position in it live here and change in one compiled step with the run,
    so an interrupt cannot separate the writes done from the position.
    """
    cdef kd_vcpu v
    cdef Mmu mmu
    cdef object _ring          # the DirtyRing object behind v.ring (kept alive)
    cdef bint running
    cdef const uint64_t[::1] _plan
    cdef const uint64_t[::1] _vals
    cdef uint64_t _one
    cdef bint _has_plan, _per_write
    cdef size_t _pos

    def __cinit__(self, Mmu mmu not None, uint32_t vcpu_id, token):
        if token is not _TOKEN:
            raise TypeError("VcpuCore is created by Mmu.new_vcpu()")
        self.mmu = mmu
        self.v.id = vcpu_id
        self.v.ix = NO_IX

    def __dealloc__(self):
        # The chunks are the slots' (freed by a flush or by the Mmu); the list is ours.
        free(self.v.cached)

    def attach_ring(self, ring):
        """Log this vCPU's dirty pages into ``ring`` (a kvmdirty._ring.DirtyRing)."""
        if self.running:
            raise RuntimeError(f"vCPU {self.v.id} is running")
        cap = ring._kd_ring
        if not PyCapsule_CheckExact(cap):
            raise TypeError("ring must offer a kd_ring capsule")
        self.v.ring = <kd_ring *>PyCapsule_GetPointer(cap, KD_RING_CAPSULE)
        self._ring = ring

    @property
    def id(self):
        return self.v.id

    @property
    def remaining(self):
        """Writes of the current plan not done yet."""
        return self._plan.shape[0] - self._pos if self._has_plan else 0

    @property
    def position(self):
        return self._pos

    def run(self, gfns=None, values=None, size_t budget=0):
        """Install a new plan (``gfns`` not None) and/or go on with the current one.

        ``gfns``: C-contiguous uint64 array; ``values``: an int in [0, 2**64)
        or a uint64 array parallel to gfns (validated by kvmdirty.validate).
        At most ``budget`` writes (0 = all).  Returns (exit reason, writes
        done, writes remaining).  A failed call changes nothing.
        """
        cdef const uint64_t[::1] g
        cdef const uint64_t[::1] va
        cdef uint64_t one = 0
        cdef bint per_write = False
        cdef size_t n, count, done = 0, stride, start
        cdef const uint64_t *vp
        cdef const uint64_t *gp
        cdef int reason
        cdef kd_mmu *m = self.mmu.m
        if m.forked:
            raise _vm_error(errno.EIO, "KVM_RUN", "the VM belongs to the parent process")
        if self.v.ix == NO_IX:
            raise RuntimeError("this vCPU core is not attached to its MMU")
        if gfns is not None:
            g = gfns
            if values is None or isinstance(values, int):
                one = 0 if values is None else values
            else:
                va = values
                if va.shape[0] != g.shape[0]:
                    raise ValueError(f"values has {va.shape[0]} entries, the plan {g.shape[0]}")
                per_write = True
        elif values is not None:
            raise ValueError("values given without gfns")
        if self.running:
            raise RuntimeError(f"vCPU {self.v.id} is already running in another thread")
        # From here on nothing fails and no Python code runs until the return.
        _read_lock(m)
        if m.closed:
            _read_unlock(m)
            raise _vm_error(errno.EBADF, "KVM_RUN", "the VM is closed")
        self.running = True
        if gfns is not None:
            self._plan = g
            self._has_plan = True
            self._per_write = per_write
            if per_write:
                self._vals = va
            else:
                self._vals = None
                self._one = one
            self._pos = 0
        start = self._pos
        n = self._plan.shape[0] if self._has_plan else 0
        count = n - start
        if budget and budget < count:
            count = budget
        gp = &self._plan[start] if count else NULL
        if self._per_write:
            vp = &self._vals[start] if count else NULL
            stride = 1
        else:
            vp = &self._one
            stride = 0
        # self._plan / self._vals stay exported for the whole loop: only a
        # call that passes the running check above can replace them.
        with nogil:
            reason = _run(m, &self.v, gp, vp, stride, count, &done)
        self._pos = start + done
        self.running = False
        _read_unlock(m)
        if reason == KVM_EXIT_HLT and self._pos < n:
            reason = EXIT_BUDGET
        return reason, done, n - self._pos

    def request_pending(self):
        return kd_load_acquire_u32(&self.v.requests)

    @property
    def stats(self):
        # Relaxed loads pair with the relaxed fetch_adds at the end of _run.
        return {"writes": kd_load_relaxed_u64(&self.v.writes),
                "tlb_hits": kd_load_relaxed_u64(&self.v.tlb_hits),
                "faults": kd_load_relaxed_u64(&self.v.faults),
                "dirty_logged": kd_load_relaxed_u64(&self.v.dirty_logged)}

    @property
    def tlb_chunks(self):
        """TLB chunks this vCPU holds (what its next flush frees)."""
        return self.v.ncached


cdef class Mmu:
    """The simulated page tables of one VM, and its vCPUs' shared state.

    ``slots`` (sid -> the caller's slot object) and the vCPU registry are
    updated in the same compiled step as the C tables.
    """
    cdef kd_mmu *m
    cdef kd_sink sink
    cdef dict _keep            # sid -> (writable, values, dirty): the buffers behind the C slots
    cdef dict _slots           # sid -> the caller's slot object
    cdef list _retired         # dirty bitmaps replaced by set_dirty, kept until a flush proves them unused
    cdef list _vcpus
    cdef object _tracker
    cdef SlotLock _lock
    cdef object __weakref__

    def __cinit__(self):
        self.m = <kd_mmu *>calloc(1, sizeof(kd_mmu))
        if self.m == NULL:
            raise MemoryError()
        self.m.by_id = <kd_slot **>calloc(SLOT_ID_SPACE, sizeof(kd_slot *))
        if self.m.by_id == NULL:
            free(self.m)
            self.m = NULL
            raise MemoryError()
        self.sink.protect = _protect
        self.sink.ctx = self.m
        self._keep = {}
        self._slots = {}
        self._retired = []
        self._vcpus = []
        self._lock = SlotLock(self, _TOKEN)
        _live_mmus.add(self)

    def __dealloc__(self):
        cdef size_t i, k
        cdef kd_slot *s
        if self.m == NULL:
            return
        for i in range(SLOT_ID_SPACE):
            s = self.m.by_id[i]
            if s != NULL:
                if s.tlb != NULL:
                    for k in range(self.m.nvcpus * s.nchunks):
                        free(s.tlb[k])
                _free_slot(s)
        free(self.m.by_id)
        free(self.m.sorted[0])
        free(self.m.sorted[1])
        free(self.m.vcpus)
        free(self.m)

    @property
    def _kd_sink(self):
        """PyCapsule (KD_SINK_CAPSULE) of this MMU's masked write-protect; keeps the MMU alive."""
        return kd_owned_capsule(&self.sink, KD_SINK_CAPSULE, self)

    @property
    def slots_lock(self):
        return self._lock

    @property
    def slots(self):
        """sid -> slot object, as installed (do not mutate: use set_slot / delete_slot)."""
        return self._slots

    @property
    def closed(self):
        return bool(self.m.closed)

    @property
    def forked(self):
        """True in a child process: the VM belongs to the parent (KVM answers EIO)."""
        return bool(self.m.forked)

    cdef int _check_live(self, str ioctl) except -1:
        if self.m.forked:
            raise _vm_error(errno.EIO, ioctl, "the VM belongs to the parent process")
        if self.m.closed:
            raise _vm_error(errno.EBADF, ioctl, "the VM is closed")
        return 0

    def close(self):
        """Wait for every reader to leave; later runs fail with EBADF."""
        if self.m.forked:
            self.m.closed = True
            return
        held = _write_held(self.m)
        if not held:
            _write_lock(self.m)
        self.m.closed = True
        if not held:
            _write_unlock(self.m)

    def _after_fork_child(self):
        # The threads that held the lock or ran vCPUs do not exist here.
        cdef size_t i
        self.m.lock.readers = 0
        self.m.lock.writer = False
        self.m.lock.owner = 0
        self.m.forked = True
        for i in range(self.m.nvcpus):
            self.m.vcpus[i].mode = OUTSIDE_GUEST_MODE
        for vc in self._vcpus:
            (<VcpuCore>vc).running = False

    # -- memslots -------------------------------------------------------------
    def set_slot(self, slot, bint write_protect=False, bint zap=False):
        """Install ``slot`` (create it, or replace the slot with its id) in one step.

        ``slot`` has attributes slot (sid), base_gfn, npages, flags, writable,
        values, dirty (uint64 arrays; dirty may be None).  ``write_protect``:
        clear every W bit (dirty logging turned on); ``zap``: the same for a
        moved slot.  Takes the slots lock for writing unless this thread holds
        it.  Every vCPU's TLB is flushed (a memslot change flushes TLBs).
        Allocates everything first: on MemoryError nothing has changed.
        Overlap checks are the caller's (vm.py, under its slots mutex).
        """
        cdef uint64_t[::1] w, val, d
        cdef kd_slot *ns
        cdef kd_slot *old
        cdef kd_slot **grown = NULL
        cdef uint32_t sid32, asid
        cdef uint64_t npages, base, nw, k
        cdef size_t pos, cap = 0
        cdef bint held
        self._check_live("KVM_SET_USER_MEMORY_REGION")
        sid, base_o, npages_o, flags = slot.slot, slot.base_gfn, slot.npages, slot.flags
        writable, values, dirty = slot.writable, slot.values, slot.dirty
        if not 0 <= sid < SLOT_ID_SPACE:
            raise ValueError(f"slot {sid:#x} out of range")
        npages, base = npages_o, base_o
        if npages == 0 or base + npages < base:
            raise ValueError("a slot has at least one page and does not wrap")
        nw = (npages + 63) >> 6
        w = writable
        val = values
        if <uint64_t>w.shape[0] < nw or <uint64_t>val.shape[0] < npages:
            raise ValueError(f"slot {sid:#x}: arrays too small for {npages} pages")
        if dirty is not None:
            d = dirty
            if <uint64_t>d.shape[0] < nw:
                raise ValueError(f"slot {sid:#x}: dirty bitmap too small")
        sid32 = sid
        asid = sid32 >> 16
        held = _write_held(self.m)
        if not held:
            _write_lock(self.m)
        try:
            old = self.m.by_id[sid32]
            ns = <kd_slot *>_alloc(1, sizeof(kd_slot))
            if ns == NULL:
                raise MemoryError()
            ns.base_gfn, ns.npages, ns.id, ns.flags = base, npages, sid32, flags
            ns.writable, ns.values = &w[0], &val[0]
            ns.dirty = &d[0] if dirty is not None else NULL
            if asid == 0:
                ns.nchunks = (nw + TLB_CHUNK_MASK) >> TLB_CHUNK_SHIFT
                ns.tlb = <uint64_t **>_alloc(self.m.nvcpus * ns.nchunks, sizeof(uint64_t *))
                if ns.tlb == NULL:
                    free(ns)
                    raise MemoryError()
            if old == NULL and self.m.nsorted[asid] == self.m.cap_sorted[asid]:
                cap = self.m.cap_sorted[asid] * 2 if self.m.cap_sorted[asid] else 16
                grown = <kd_slot **>_alloc(cap, sizeof(kd_slot *))
                if grown == NULL:
                    _free_slot(ns)
                    raise MemoryError()
            try:
                entry = (writable, values, dirty)
                prev_keep = self._keep.get(sid)
                prev_slot = self._slots.get(sid)
                self._keep[sid] = entry
                try:
                    self._slots[sid] = slot
                except BaseException:
                    if prev_keep is None:
                        del self._keep[sid]
                    else:
                        self._keep[sid] = prev_keep
                    raise
            except BaseException:
                free(grown)
                _free_slot(ns)
                raise
            # -- commit: nothing below fails --
            _flush_all_local(self.m)
            if grown != NULL:
                if self.m.nsorted[asid]:
                    memmove(grown, self.m.sorted[asid], self.m.nsorted[asid] * sizeof(kd_slot *))
                free(self.m.sorted[asid])
                self.m.sorted[asid] = grown
                self.m.cap_sorted[asid] = cap
            if old != NULL:
                _sorted_remove(self.m, asid, old)
            pos = _sorted_pos(self.m, asid, base)
            memmove(&self.m.sorted[asid][pos + 1], &self.m.sorted[asid][pos],
                    (self.m.nsorted[asid] - pos) * sizeof(kd_slot *))
            self.m.sorted[asid][pos] = ns
            self.m.nsorted[asid] += 1
            self.m.by_id[sid32] = ns
            if old == NULL:
                self.m.nslots += 1
            if write_protect or zap:
                # kvm_mmu_slot_apply_flags / a move's zap: no SPTE of the slot stays writable.
                for k in range(nw):
                    if kd_load_relaxed_u64(&ns.writable[k]):
                        kd_store_relaxed_u64(&ns.writable[k], 0)
            _free_slot(old)
        finally:
            if not held:
                _write_unlock(self.m)

    def delete_slot(self, sid):
        """Remove slot ``sid`` in one step (KeyError if absent); flushes every vCPU's TLB."""
        cdef kd_slot *old
        cdef size_t pos
        cdef bint held
        cdef uint32_t sid32
        self._check_live("KVM_SET_USER_MEMORY_REGION")
        if sid not in self._slots:
            raise KeyError(sid)
        sid32 = sid
        held = _write_held(self.m)
        if not held:
            _write_lock(self.m)
        try:
            old = self.m.by_id[sid32]
            _flush_all_local(self.m)
            _sorted_remove(self.m, sid32 >> 16, old)
            self.m.by_id[sid32] = NULL
            self.m.nslots -= 1
            _free_slot(old)
            del self._slots[sid]
            del self._keep[sid]
        finally:
            if not held:
                _write_unlock(self.m)

    def set_slots(self, rows):
        """Replace the whole table with rows (sid, base_gfn, npages, flags, writable, values, dirty|None)."""
        from types import SimpleNamespace
        new = {r[0]: SimpleNamespace(slot=r[0], base_gfn=r[1], npages=r[2], flags=r[3],
                                     writable=r[4], values=r[5], dirty=r[6]) for r in rows}
        for sid in [s for s in self._slots if s not in new]:
            self.delete_slot(sid)
        for s in new.values():
            self.set_slot(s)

    def set_dirty(self, uint32_t sid, dirty):
        """Point slot ``sid``'s dirty-bitmap pointer at ``dirty`` (store-release; None = no bitmap).

        Used by the switched-bitmap design to swap buffers while vCPUs run.
        """
        cdef uint64_t[::1] d
        cdef kd_slot *s = _slot_by_id(self.m, sid)
        cdef uint64_t *p = NULL
        if s == NULL:
            raise KeyError(sid)
        if dirty is not None:
            d = dirty
            if <size_t>d.shape[0] < ((s.npages + 63) >> 6):
                raise ValueError("dirty bitmap too small")
            p = &d[0]
        old = self._keep[sid][2]
        entry = self._keep[sid][:2] + (dirty,)
        if old is not None:
            # A vCPU in guest mode may still write through the old pointer:
            # keep the buffer alive until a completed remote flush (below).
            self._retired.append(old)
        # Release pairs with _mark_dirty's load-acquire of the pointer.
        kd_store_release_ptr(<void **>&s.dirty, p)
        self._keep[sid] = entry

    # -- vCPUs ----------------------------------------------------------------
    def add_vcpu(self, uint32_t vcpu_id, ring=None, registry=None, factory=None):
        """Create and register a vCPU core in one step; returns ``factory(core)`` (or the core).

        With ``registry`` (a dict), the result is stored at ``registry[vcpu_id]``
        in the same step.  Duplicate-id checks are the caller's (under kvm->lock).
        Allocates everything first: on MemoryError nothing has changed.
        """
        cdef VcpuCore vc
        cdef kd_vcpu **arr = NULL
        cdef uint64_t ***tlbs = NULL
        cdef size_t i, j, nv
        cdef bint held
        cdef kd_slot *s
        self._check_live("KVM_CREATE_VCPU")
        vc = VcpuCore(self, vcpu_id, _TOKEN)
        if ring is not None:
            vc.attach_ring(ring)
        result = factory(vc) if factory is not None else vc
        held = _write_held(self.m)
        if not held:
            _write_lock(self.m)
        try:
            nv = self.m.nvcpus
            arr = <kd_vcpu **>_alloc(nv + 1, sizeof(kd_vcpu *))
            tlbs = <uint64_t ***>_alloc(self.m.nsorted[0], sizeof(uint64_t **))
            if arr == NULL or tlbs == NULL:
                free(arr)
                free(tlbs)
                raise MemoryError()
            for i in range(self.m.nsorted[0]):
                tlbs[i] = <uint64_t **>_alloc((nv + 1) * self.m.sorted[0][i].nchunks, sizeof(uint64_t *))
                if tlbs[i] == NULL:
                    for j in range(i):
                        free(tlbs[j])
                    free(tlbs)
                    free(arr)
                    raise MemoryError()
            try:
                self._vcpus.append(vc)
                try:
                    if registry is not None:
                        registry[vcpu_id] = result
                except BaseException:
                    self._vcpus.pop()
                    raise
            except BaseException:
                for i in range(self.m.nsorted[0]):
                    free(tlbs[i])
                free(tlbs)
                free(arr)
                raise
            # -- commit: nothing below fails --
            # Every TLB is emptied first, so the new per-slot rows hold no chunk to carry over.
            _flush_all_local(self.m)
            for i in range(self.m.nsorted[0]):
                s = self.m.sorted[0][i]
                free(s.tlb)
                s.tlb = tlbs[i]
            free(tlbs)
            for i in range(nv):
                arr[i] = self.m.vcpus[i]
            vc.v.ix = <uint32_t>nv
            arr[nv] = &vc.v
            free(self.m.vcpus)
            self.m.vcpus = arr
            self.m.nvcpus = nv + 1
        finally:
            if not held:
                _write_unlock(self.m)
        return result

    def new_vcpu(self, uint32_t vcpu_id):
        """A registered vCPU core without a ring (tests and benches)."""
        return self.add_vcpu(vcpu_id)

    def overlaps(self, sid, base_gfn, npages):
        """True if [base_gfn, base_gfn + npages) meets a slot of sid's address space other than sid (O(log n))."""
        cdef uint32_t sid32 = sid, asid = sid32 >> 16
        cdef uint64_t base = base_gfn, end = base + <uint64_t>npages
        cdef size_t pos
        cdef kd_slot *s
        if asid > 1:
            return False
        # Slots of one address space never overlap, so sorted by base they are
        # sorted by end too: the last one starting below end (not sid) decides.
        pos = _sorted_pos(self.m, asid, end)
        while pos > 0:
            pos -= 1
            s = self.m.sorted[asid][pos]
            if s.id != sid32:
                return s.base_gfn + s.npages > base
        return False

    @property
    def nvcpus(self):
        return self.m.nvcpus

    @property
    def nslots(self):
        return self.m.nslots

    # -- harvest-side helpers (the caller holds the slots lock) ------------------
    def protect(self, uint32_t sid, uint64_t first_page, uint64_t mask):
        """Masked write-protect (as a harvest does); False if dropped."""
        cdef int r
        with nogil:
            r = _protect(self.m, sid, first_page, mask)
        return r == 1

    def write_protect_slot(self, uint32_t sid):
        """Clear every W bit of the slot (dirty logging turned on), then flush TLBs."""
        cdef kd_slot *s = _slot_by_id(self.m, sid)
        cdef size_t i, n
        if s == NULL:
            raise KeyError(sid)
        n = (s.npages + 63) >> 6
        with nogil:
            for i in range(n):
                if kd_load_relaxed_u64(&s.writable[i]):
                    kd_store_relaxed_u64(&s.writable[i], 0)
            _flush_remote_tlbs(self.m)

    def merge_dirty(self, uint32_t sid, const uint64_t[::1] words not None, size_t first_word=0):
        """Give bits back to slot ``sid``'s dirty bitmap (atomic fetch-or): a failed harvest's snapshot."""
        cdef kd_slot *s = _slot_by_id(self.m, sid)
        cdef uint64_t *d
        cdef size_t i, n = words.shape[0]
        if s == NULL:
            raise KeyError(sid)
        d = <uint64_t *>kd_load_acquire_ptr(<void **>&s.dirty)
        if d == NULL or first_word + n > ((s.npages + 63) >> 6):
            raise ValueError("no dirty bitmap, or the words run past it")
        with nogil:
            for i in range(n):
                if words[i]:
                    kd_fetch_or_u64(&d[first_word + i], words[i])

    def get_dirty_log(self, slot, out, int mode, uint32_t address_spaces, mutex):
        """KVM_GET_DIRTY_LOG, compiled end to end for vm.VM.get_dirty_log (its docstring is the contract).

        Checks and errno in KVM's order (EIO/EBADF, then the argument checks of
        kvmdirty.validate, then under ``mutex`` (kvm->slots_lock) and the
        slots lock's read side: ENXIO for ``mode`` LOG_NONE, EINVAL for the
        slot id, ENOENT, EFAULT for an ``out`` shorter than the bitmap).
        ``mode``: LOG_HARVEST (exchange, protect, flush) or LOG_COPY (manual
        protect: a relaxed copy).  ``out``: None (a new array) or a
        caller-owned uint64 array, filled and returned (its first nwords
        words when longer).  Nothing can fail once a bit is taken.
        """
        cdef Py_buffer view
        cdef bint have_view = False
        cdef uint32_t s32
        cdef kd_slot *ks
        cdef uint64_t *d
        cdef uint64_t *snap
        cdef uint64_t pages = 0
        cdef size_t n, i, retired
        cdef kd_mmu *m = self.m
        cdef bint zeroed = False, early
        self._check_live("KVM_GET_DIRTY_LOG")
        if type(slot) is int and 0 <= slot <= 0xFFFFFFFF:
            s32 = slot
        else:
            s32 = _validate.u32(slot, "slot")
        if out is not None:
            _out_view(out, &view)
            have_view = True
        try:
            mutex.acquire()
            try:
                _read_lock(m)
                try:
                    if mode == LOG_NONE:
                        raise _vm_error(errno.ENXIO, "KVM_GET_DIRTY_LOG",
                                        "this VM does not log into KVM's dirty bitmaps")
                    if (s32 >> 16) >= address_spaces or (s32 & 0xFFFF) >= _USER_MEM_SLOTS:
                        raise _vm_error(errno.EINVAL, "KVM_GET_DIRTY_LOG",
                                        f"address space {s32 >> 16} / slot id {s32 & 0xFFFF} out of range")
                    ks = _slot_by_id(m, s32)
                    d = <uint64_t *>kd_load_acquire_ptr(<void **>&ks.dirty) if ks != NULL else NULL
                    if d == NULL:
                        raise _vm_error(errno.ENOENT, "KVM_GET_DIRTY_LOG",
                                        f"slot {s32:#x} does not exist or is not logging")
                    n = <size_t>((ks.npages + 63) >> 6)
                    if have_view:
                        if <size_t>view.shape[0] < n:
                            raise _vm_error(errno.EFAULT, "KVM_GET_DIRTY_LOG",
                                            f"out has {view.shape[0]} words, {n} needed")
                        result = out if <size_t>view.shape[0] == n else out[:n]
                    else:
                        # Zeroed by calloc (big ones lazily, by the kernel): the
                        # harvest writes only the dirty words, so only their
                        # pages of a big new array are ever faulted in.
                        result = _np_zeros(n, _U64)
                        PyObject_GetBuffer(result, &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS)
                        have_view = True
                        zeroed = True
                    snap = <uint64_t *>view.buf
                    if n == 0:
                        return result
                    if mode == LOG_COPY:
                        with nogil:
                            for i in range(n):
                                # Relaxed: vCPUs may be setting bits (fetch-or); a bit
                                # set after this read is simply not in the copy.
                                snap[i] = kd_load_relaxed_u64(&d[i])
                        return result
                    retired = len(self._retired)
                    early = (m.faults & F_FLUSH_BEFORE_PROTECT) != 0
                    with nogil:
                        if early:
                            _flush_remote_tlbs(m)       # the deliberate bug: before protecting
                        # 1-2: exchange and protect; 3: flush (if anything was dirty);
                        # 4: the caller gets the snapshot only after that.
                        i = _harvest_slot(m, ks, d, snap, n, zeroed, &pages)
                        if pages and not early:
                            _flush_remote_tlbs(m)
                    if i:
                        _count_protects(m, i)
                    if pages or early:
                        self._trim_retired(retired)
                    return result
                finally:
                    _read_unlock(m)
            finally:
                mutex.release()
        finally:
            if have_view:
                PyBuffer_Release(&view)

    cdef void _trim_retired(self, size_t retired):
        # After a completed flush, every vCPU in guest mode passed a request check
        # since it began, i.e. finished any write that loaded a pointer retired before it.
        if retired and not (self.m.faults & (F_SKIP_FLUSH | F_NO_FLUSH_WAIT)):
            del self._retired[:retired]

    def set_tracker(self, tracker):
        """Log through a seed-era design (an object with a ``_kd_tracker`` capsule), or None for KVM's own."""
        cdef kd_tracker *t = NULL
        if tracker is not None:
            cap = tracker._kd_tracker
            if not PyCapsule_CheckExact(cap):
                raise TypeError("tracker must offer a kd_tracker capsule")
            t = <kd_tracker *>PyCapsule_GetPointer(cap, KD_TRACKER_CAPSULE)
        self.m.tracker = t
        self._tracker = tracker

    def host_write(self, const uint64_t[::1] gfns not None, uint64_t value):
        """Write ``value`` to pages as the host does (kvm_write_guest): no vCPU, no TLB.

        Takes the slots lock for reading.  Logged pages are marked through the
        design's tracker (vcpu KD_NO_VCPU) or the slot's dirty bitmap; a
        ring-only upstream VM has no bitmap, so they are not logged.  Returns
        the writes done; stops at the first page outside every slot or that
        the tracker refuses.
        """
        cdef size_t i, n = gfns.shape[0]
        cdef kd_slot *s
        cdef uint64_t rel
        cdef uint64_t *d
        cdef int r
        self._check_live("write_guest")
        _read_lock(self.m)
        if self.m.closed:
            _read_unlock(self.m)
            raise _vm_error(errno.EBADF, "write_guest", "the VM is closed")
        with nogil:
            for i in range(n):
                s = _slot_by_gfn(self.m, gfns[i])
                if s == NULL or s.flags & KVM_MEM_READONLY:
                    break
                rel = gfns[i] - s.base_gfn
                if s.flags & KVM_MEM_LOG_DIRTY_PAGES:
                    if self.m.tracker != NULL:
                        r = self.m.tracker.mark(self.m.tracker.ctx, KD_NO_VCPU, s.id, rel)
                        if r < 0:
                            break
                    else:
                        d = <uint64_t *>kd_load_acquire_ptr(<void **>&s.dirty)
                        if d != NULL:
                            kd_fetch_or_u64(&d[rel >> 6], (<uint64_t>1) << (rel & 63))
                kd_store_relaxed_u64(&s.values[rel], value)
            else:
                i = n
        _read_unlock(self.m)
        return i

    def flush_remote_tlbs(self):
        """kvm_flush_remote_tlbs (the caller holds the slots lock)."""
        cdef size_t retired = len(self._retired)
        if self.m.forked:
            raise _vm_error(errno.EIO, "flush", "the VM belongs to the parent process")
        with nogil:
            _flush_remote_tlbs(self.m)
        self._trim_retired(retired)

    property log_every_write:
        def __get__(self):
            return self.m.log_every_write
        def __set__(self, bint on):
            self.m.log_every_write = on

    property protect_range:
        def __get__(self):
            return self.m.protect_range
        def __set__(self, bint on):
            self.m.protect_range = on

    property faults:
        def __get__(self):
            return self.m.faults
        def __set__(self, unsigned int bits):
            if bits & ~F_MASK:
                raise ValueError(f"unknown fault bits {bits & ~F_MASK:#x}")
            self.m.faults = bits

    @property
    def stats(self):
        """MMU counters plus every vCPU's, summed (a consistent vCPU set: no Python code runs meanwhile)."""
        cdef size_t i
        cdef kd_vcpu *v
        cdef uint64_t writes = 0, hits = 0, faults = 0, logged = 0
        for i in range(self.m.nvcpus):
            v = self.m.vcpus[i]
            writes += kd_load_relaxed_u64(&v.writes)
            hits += kd_load_relaxed_u64(&v.tlb_hits)
            faults += kd_load_relaxed_u64(&v.faults)
            logged += kd_load_relaxed_u64(&v.dirty_logged)
        return {"protects": kd_load_relaxed_u64(&self.m.protects),
                "protect_dropped": kd_load_relaxed_u64(&self.m.protect_dropped),
                "flushes": kd_load_relaxed_u64(&self.m.flushes),
                "writes": writes, "tlb_hits": hits, "faults": faults, "dirty_logged": logged}


def _after_fork_in_child():
    for mmu in list(_live_mmus):
        (<Mmu>mmu)._after_fork_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
