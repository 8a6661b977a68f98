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
"""
from cpython.pycapsule cimport PyCapsule_New, PyCapsule_IsValid, PyCapsule_GetPointer
from libc.stdint cimport uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset

import numpy as np

from . import _bitmap

from _atomic cimport (kd_load_acquire_u16, kd_load_relaxed_u16, kd_store_release_u16,
                      kd_load_acquire_u32, kd_load_relaxed_u32, kd_store_relaxed_u32,
                      kd_store_release_u32, kd_cmpxchg_u32, kd_fetch_add_u64,
                      kd_load_relaxed_u64, kd_fetch_or_u64, kd_load_acquire_ptr, kd_store_release_ptr,
                      kd_cpu_relax, kd_popcount64)
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
#: vCPU ids with their own indexed ring (KVM_MAX_VCPU_IDS on x86); others use the VM ring.
cdef enum:
    KD_MAX_VCPU_IDS = 4096 * 4
MAX_VCPU_IDS = KD_MAX_VCPU_IDS
PAGE_SIZE = 4096

IGFN_DTYPE = np.dtype([("pad", "<u4"), ("slot", "<u4"), ("offset", "<u8")])


# ---------------------------------------------------------------- indexed ring

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
    uint64_t pushes
    uint64_t overflows


cdef inline int _iring_push(kd_iring *r, uint32_t slot, uint64_t offset) noexcept nogil:
    """Log one page: 0 logged, 1 logged and now full, -1 refused (every entry live)."""
    # Own index (only the producer writes it): relaxed.
    cdef uint32_t di = kd_load_relaxed_u32(&r.dirty_index)
    # Acquire pairs with _iring_reset's store-release of reset_index: those
    # entries were read by reset and may be overwritten.
    cdef uint32_t used = di - kd_load_acquire_u32(&r.reset_index)
    cdef kd_igfn *e
    if used >= r.size:
        r.overflows += 1
        return -1
    e = &r.gfns[di & (r.size - 1)]
    e.slot = slot
    e.offset = offset
    # Stored before avail is released, so reset (after the user's
    # acquire/release chain through avail and fetch) sees it; see _iring_reset.
    kd_store_relaxed_u32(&r.dirty_index, di + 1)
    # Release: the entry is complete before avail_index covers it; pairs with
    # the user's load-acquire of avail_index in IndexedRing.fetch.
    kd_store_release_u16(r.avail, <uint16_t>(di + 1))
    r.pushes += 1
    return 1 if used + 1 >= r.soft_limit else 0


cdef inline int _iring_push_locked(kd_iring *r, uint32_t slot, uint64_t offset) noexcept nogil:
    cdef uint32_t unlocked = 0
    cdef int rc
    # cmpxchg (acquire) takes the per-VM ring's lock; pairs with the release below.
    while not kd_cmpxchg_u32(&r.lock, &unlocked, 1):
        unlocked = 0
        kd_cpu_relax()
    rc = _iring_push(r, slot, offset)
    # Release: our entry and index stores happen before the next writer's.
    kd_store_release_u32(&r.lock, 0)
    return rc


cdef bint _iring_fetch_valid(kd_iring *r) noexcept nogil:
    """Whether user space's fetch_index lies within what the kernel pushed (as _iring_reset checks)."""
    # Own index (only the resetter writes it): relaxed.
    cdef uint32_t ri = kd_load_relaxed_u32(&r.reset_index)
    return <uint16_t>(kd_load_acquire_u16(r.fetch) - <uint16_t>ri) <= \
        kd_load_relaxed_u32(&r.dirty_index) - ri


cdef long _iring_reset(kd_iring *r, kd_batcher *b) noexcept nogil:
    """KVM_RESET_DIRTY_PAGES for one ring: re-protect and free reset_index..fetch_index.

    Returns the count, or -1 (nothing changed) if user space's fetch_index is
    not within what the kernel has pushed.
    """
    # Own index (only the resetter writes it): relaxed.
    cdef uint32_t ri = kd_load_relaxed_u32(&r.reset_index), m = r.size - 1, i, n
    # Acquire pairs with the user's store-release of fetch_index: its reads of
    # the entries are done before we free them.
    cdef uint16_t f = kd_load_acquire_u16(r.fetch)
    # dirty_index was stored before the avail_index the user acquired, and the
    # user released fetch after that: the chain makes this value cover fetch.
    cdef uint32_t used = kd_load_relaxed_u32(&r.dirty_index) - ri
    cdef kd_igfn *e
    n = <uint16_t>(f - <uint16_t>ri)
    if n > used:
        return -1
    for i in range(n):
        e = &r.gfns[(ri + i) & m]
        kd_batcher_add(b, e.slot, e.offset)
    kd_batcher_flush(b)
    if n:
        # Release pairs with _iring_push's load-acquire: our reads are done
        # before the producer may reuse the entries.
        kd_store_release_u32(&r.reset_index, ri + n)
    return n


cdef class IndexedRing:
    """One seed-000 dirty list: ``entries`` {pad, slot, offset} with the u16 index header in entry 0's pad."""
    cdef kd_iring r
    cdef object _buf
    cdef readonly object gfns          # IGFN_DTYPE view: user space's mmap
    cdef readonly object vcpu_id       # None for the per-VM ring
    cdef uint64_t _fetched, _resets, _batches, _dropped

    def __cinit__(self, entries, vcpu_id=None):
        cdef unsigned char[::1] mv
        if not isinstance(entries, int) or isinstance(entries, bool):
            raise TypeError(f"entries must be an int, got {type(entries).__name__}")
        # u16 free-running indexes tell at most 65535 live entries apart: 32768 max.
        if entries < 2 * RSVD_ENTRIES or entries > 32768 or entries & (entries - 1):
            raise ValueError(f"entries {entries} must be a power of two in [128, 32768]")
        nbytes = entries * sizeof(kd_igfn)
        raw = np.zeros(nbytes + PAGE_SIZE, np.uint8)
        skip = (-raw.ctypes.data) & (PAGE_SIZE - 1)
        self._buf = raw[skip:skip + nbytes]
        mv = self._buf
        self.gfns = self._buf.view(IGFN_DTYPE)
        self.r.gfns = <kd_igfn *>&mv[0]
        self.r.avail = <uint16_t *>&mv[0]
        self.r.fetch = <uint16_t *>&mv[2]
        self.r.size = entries
        self.r.soft_limit = entries - RSVD_ENTRIES
        self.vcpu_id = vcpu_id

    # -- user side -------------------------------------------------------
    def fetch(self, max_count=None):
        """Read entries fetch_index..avail_index in order and publish the new fetch_index.

        Returns (slots uint32, offsets uint64).  Raises ValueError (nothing
        changed) if the header says more than ``entries`` are available.
        """
        cdef uint16_t idx, avail, count, i
        cdef uint32_t m = self.r.size - 1
        cdef uint32_t[::1] vs
        cdef uint64_t[::1] vo
        cdef kd_igfn *e
        if max_count is not None and (not isinstance(max_count, int) or max_count < 0):
            raise ValueError("max_count must be a non-negative int or None")
        # User space owns fetch_index: a relaxed read of our own value.
        idx = kd_load_relaxed_u16(self.r.fetch)
        # Acquire pairs with the kernel's store-release of avail_index in push.
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
                for i in range(count):
                    e = &self.r.gfns[(<uint16_t>(idx + i)) & m]
                    vs[i] = e.slot
                    vo[i] = e.offset
                # Release pairs with reset's load-acquire of fetch_index: our
                # reads above are done before the kernel recycles the entries.
                kd_store_release_u16(self.r.fetch, <uint16_t>(idx + count))
        self._fetched += count
        return a_s, a_o

    @property
    def avail_index(self):
        return kd_load_acquire_u16(self.r.avail)

    property fetch_index:
        def __get__(self):
            return kd_load_relaxed_u16(self.r.fetch)
        def __set__(self, v):
            if not isinstance(v, int) or v < 0 or v > 0xFFFF:
                raise ValueError("fetch_index is a u16")
            kd_store_release_u16(self.r.fetch, <uint16_t>v)

    @property
    def count(self):
        """(u16)(avail_index - fetch_index): entries user space has not fetched yet."""
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
        return kd_load_relaxed_u32(&self.r.dirty_index) - kd_load_acquire_u32(&self.r.reset_index)

    @property
    def full(self):
        return self.used >= self.r.soft_limit

    def push(self, slot, offset):
        """Kernel-side push (tests/embedding): returns 0 logged, 1 now full, -1 refused."""
        if not (0 <= slot <= 0xFFFFFFFF) or not (0 <= offset < 1 << 64):
            raise ValueError("slot is a u32 and offset a u64")
        return _iring_push_locked(&self.r, slot, offset)

    @property
    def stats(self):
        return {"pushes": self.r.pushes, "fetched": self._fetched, "resets": self._resets,
                "batches": self._batches, "dropped": self._dropped, "overflows": self.r.overflows}

    def __repr__(self):
        who = "vm" if self.vcpu_id is None else f"vcpu {self.vcpu_id}"
        return f"IndexedRing({who}, entries={self.r.size}, used={self.used}, count={self.count})"


ctypedef struct kd_iset:
    kd_iring **by_vcpu     # MAX_VCPU_IDS pointers, each published once with release
    kd_iring *vm           # writes without a running vCPU


cdef inline kd_iring *_iset_ring(kd_iset *s, uint32_t vcpu_id) noexcept nogil:
    cdef kd_iring *r = NULL
    if vcpu_id < KD_MAX_VCPU_IDS:
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
    if r == NULL:
        r = s.vm
    return kd_load_relaxed_u32(&r.dirty_index) - kd_load_acquire_u32(&r.reset_index) >= r.soft_limit


cdef class IndexedRingSet:
    """Seed 000/002's rings of one VM: per vCPU plus the per-VM ring; the MMU tracker."""
    cdef kd_iset s
    cdef kd_tracker t

    @property
    def _kd_tracker(self):
        """PyCapsule (KD_TRACKER_CAPSULE) for Mmu.set_tracker; keeps this object alive."""
        return kd_owned_capsule(&self.t, KD_TRACKER_CAPSULE, self)
    cdef readonly IndexedRing vm_ring
    cdef dict _rings
    cdef readonly object entries

    def __cinit__(self, entries):
        self.vm_ring = IndexedRing(entries)
        self.entries = entries
        self._rings = {}
        self.s.by_vcpu = <kd_iring **>calloc(MAX_VCPU_IDS, sizeof(kd_iring *))
        if self.s.by_vcpu == NULL:
            raise MemoryError()
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
        if not isinstance(vcpu_id, int) or not 0 <= vcpu_id < MAX_VCPU_IDS:
            raise ValueError(f"vcpu_id must be an int in [0, {MAX_VCPU_IDS})")
        if vcpu_id in self._rings:
            return self._rings[vcpu_id]
        r = IndexedRing(self.entries, vcpu_id)
        self._rings[vcpu_id] = r
        # Release: the ring is initialised before a vCPU's mark can see it.
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

    def reset(self, sink=None):
        """KVM_RESET_DIRTY_PAGES: re-protect and free what user space fetched, in every ring.

        Returns the entry count, or -1 (nothing changed in the offending ring
        and those after it) when a ring's fetch_index is beyond what was pushed.
        The TLB flush is the caller's.
        """
        cdef IndexedRing r
        cdef kd_sink *cs = NULL
        cap = getattr(sink, "_kd_sink", None) if sink is not None else None
        cdef int kind = kd_sink_resolve(sink, cap, &cs)
        cdef kd_batcher b
        cdef kd_batch_log log
        cdef long n, total = 0
        cdef uint32_t[::1] ls
        cdef uint64_t[::1] lf, lm
        # Validate every ring first: a bad fetch_index anywhere changes nothing
        # anywhere (no ring half-reset without the caller's TLB flush).
        for r in self.rings:
            if not _iring_fetch_valid(&r.r):
                return -1
        if kind == KD_SINK_PY:
            a_s = np.empty(self.entries, np.uint32)
            a_f = np.empty(self.entries, np.uint64)
            a_m = np.empty(self.entries, np.uint64)
            ls, lf, lm = a_s, a_f, a_m
        for r in self.rings:
            if kind == KD_SINK_C:
                kd_batcher_init(&b, cs.protect, cs.ctx)
            elif kind == KD_SINK_PY:
                log.slots, log.firsts, log.masks = &ls[0], &lf[0], &lm[0]
                log.n, log.cap = 0, self.entries
                kd_batcher_init(&b, kd_batch_log_protect, &log)
            else:
                kd_batcher_init(&b, NULL, NULL)
            with nogil:
                n = _iring_reset(&r.r, &b)
            if n < 0:
                return -1
            if kind == KD_SINK_PY:
                for i in range(log.n):
                    if sink(int(ls[i]), int(lf[i]), int(lm[i])) is False:
                        b.dropped += 1
            r._resets += n
            r._batches += b.batches
            r._dropped += b.dropped
            total += n
        return total


# ---------------------------------------------------------------- shared ring

cdef int _shared_mark(void *ctx, uint32_t vcpu_id, uint32_t slot, uint64_t offset) noexcept nogil:
    return kd_ring_push_shared(<kd_ring *>ctx, slot, offset)


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
        # One counter update per call (an atomic add per entry would be a second contended line).
        kd_fetch_add_u64(&r.pushes, i)
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
