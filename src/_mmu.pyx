"""The simulated MMU: SPTE write bits, guest memory, per-vCPU TLBs, the guest write loop.

Per memslot: a writable-bit bitmap (the SPTE W bit; 1 = writable), one uint64
per page (the guest memory we model: the last value written), and the dirty
bitmap when the slot is logged.  Per vCPU: one TLB bitmap per memslot (cached
writable translations) and, with a dirty ring, its kd_ring.

The write loop runs with the GIL released.  Before each write the vCPU honours
its requests (TLB flush, ring soft-full), like vcpu_enter_guest().  A remote TLB
flush sets the flush request on every vCPU and waits until every vCPU in guest
mode has acknowledged it (kvm_flush_remote_tlbs).  Masked write-protect is one
atomic and-not of a 64-bit mask into the W word.

Slot tables change only while no vCPU runs and no harvest is under way: the
Python layer (vm.py, slotlock.py) guarantees it, as KVM's SRCU synchronize does.
"""
from cpython.pycapsule cimport PyCapsule_GetPointer, PyCapsule_CheckExact
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset

import numpy as np

from _atomic cimport (kd_load_acquire_u32, kd_store_release_u32, kd_store_seqcst_u32,
                      kd_fetch_or_u32, kd_fetch_andnot_u32, kd_load_relaxed_u64,
                      kd_store_relaxed_u64, kd_fetch_or_u64, kd_fetch_andnot_u64, kd_fetch_add_u64,
                      kd_load_acquire_ptr, kd_store_release_ptr, kd_smp_mb, kd_cpu_relax,
                      kd_ctz64, kd_clz64)
from _sink cimport (kd_sink, kd_tracker, kd_owned_capsule, KD_SINK_CAPSULE, KD_RING_CAPSULE,
                    KD_TRACKER_CAPSULE, KD_NO_VCPU)
from _ringcore cimport kd_ring, kd_ring_push, kd_ring_used, KD_PUSH_SOFT_FULL, KD_PUSH_FULL
from _uapi cimport (KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, KVM_EXIT_HLT, KVM_EXIT_MMIO,
                    KVM_EXIT_DIRTY_RING_FULL)

# vCPU mode, as vcpu->mode
cdef enum:
    OUTSIDE_GUEST_MODE = 0
    IN_GUEST_MODE = 1

cdef extern from "<sched.h>" nogil:
    int sched_yield()

# A flusher spins this many times on a vCPU's acknowledgement before yielding.
cdef enum:
    FLUSH_SPINS_BEFORE_YIELD = 256

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

ctypedef struct kd_slot:
    uint64_t base_gfn
    uint64_t npages
    uint32_t id           # (address space << 16) | slot id, as in kvm_dirty_gfn.slot
    uint32_t flags        # KVM_MEM_* flags
    uint64_t *writable    # SPTE W bits, 1 = writable
    uint64_t *values      # guest memory: last value written per page
    uint64_t *dirty       # dirty bitmap, NULL if none (not logging, or ring only)

ctypedef struct kd_vcpu:
    uint32_t id
    uint32_t mode         # OUTSIDE_GUEST_MODE / IN_GUEST_MODE
    uint32_t requests     # REQ_* bits
    uint64_t **tlb        # per slot index: TLB bitmap of writable translations
    kd_ring *ring         # NULL without a dirty ring
    uint64_t writes, tlb_hits, faults, dirty_logged

ctypedef struct kd_mmu:
    kd_slot *slots        # sorted by (address space, base_gfn)
    size_t nslots
    size_t nguest         # slots[:nguest] are address space 0, the one the guest runs in
    kd_vcpu **vcpus
    size_t nvcpus
    bint log_every_write  # log every write to a logged page (emulated writes)
    bint protect_range    # seed 004: protect first..last set bit of a mask
    uint32_t faults       # FAULT_* bits
    kd_tracker *tracker   # a seed-era design, replacing ring/bitmap logging; NULL = upstream KVM
    uint64_t protects, protect_dropped, flushes


cdef inline kd_slot *_slot_by_gfn(kd_mmu *m, uint64_t gfn, size_t *index) noexcept nogil:
    cdef size_t lo = 0, hi = m.nguest, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if gfn < m.slots[mid].base_gfn:
            hi = mid
        elif gfn - m.slots[mid].base_gfn >= m.slots[mid].npages:
            lo = mid + 1
        else:
            index[0] = mid
            return &m.slots[mid]
    return NULL


cdef inline kd_slot *_slot_by_id(kd_mmu *m, uint32_t sid) noexcept nogil:
    cdef size_t i
    for i in range(m.nslots):
        if m.slots[i].id == sid:
            return &m.slots[i]
    return NULL


cdef inline uint64_t _range_mask(uint64_t mask) noexcept nogil:
    # Seed 004 (ARM's first patch): every page from the first to the last set bit.
    cdef int lo = kd_ctz64(mask), hi = 63 - kd_clz64(mask)
    if hi - lo == 63:
        return <uint64_t>-1
    return (((<uint64_t>1) << (hi - lo + 1)) - 1) << lo


cdef int _protect(void *ctx, uint32_t sid, uint64_t first, uint64_t mask) noexcept nogil:
    """Masked write-protect of pages first + set bits of mask (kvm_arch_mmu_enable_log_dirty_pt_masked).

    Dropped, as kvm_reset_dirty_gfn drops it, if the slot does not exist or the
    mask runs past its end.  first need not be 64-aligned (ring reset batches
    are not); the mask then spans two W words.
    """
    cdef kd_mmu *m = <kd_mmu *>ctx
    cdef kd_slot *s = _slot_by_id(m, sid)
    cdef uint64_t w, sh
    if mask == 0:
        return 1
    if s == NULL or first >= s.npages or first + <uint64_t>(63 - kd_clz64(mask)) >= s.npages:
        # Stats counters: harvests may run in several threads at once.
        kd_fetch_add_u64(&m.protect_dropped, 1)
        return 0
    if m.protect_range:
        mask = _range_mask(mask)
        # The range may not run past the slot either.
        if first + <uint64_t>(63 - kd_clz64(mask)) >= s.npages:
            mask &= ((<uint64_t>1) << (s.npages - first)) - 1
    w = first >> 6
    sh = first & 63
    # One atomic and-not per W word; pairs with the fault path's fetch-or.
    kd_fetch_andnot_u64(&s.writable[w], mask << sh)
    if sh and (mask >> (64 - sh)):
        kd_fetch_andnot_u64(&s.writable[w + 1], mask >> (64 - sh))
    kd_fetch_add_u64(&m.protects, 1)
    return 1


cdef void _flush_remote_tlbs(kd_mmu *m) noexcept nogil:
    """Request a TLB flush of every vCPU; wait for each one in guest mode to acknowledge."""
    cdef size_t i, spins
    cdef kd_vcpu *v
    if m.faults & F_SKIP_FLUSH:
        return
    kd_fetch_add_u64(&m.flushes, 1)
    for i in range(m.nvcpus):
        # fetch-or (a full barrier on x86, acq_rel in C11): the protect above is
        # visible before the request; pairs with the vCPU's load-acquire of requests.
        kd_fetch_or_u32(&m.vcpus[i].requests, REQ_TLB_FLUSH)
    # Order the request stores before the mode loads below; pairs with the
    # vCPU's store of IN_GUEST_MODE followed by smp_mb before it reads requests.
    kd_smp_mb()
    if m.faults & F_NO_FLUSH_WAIT:
        return
    for i in range(m.nvcpus):
        v = m.vcpus[i]
        spins = 0
        # Acquire on both: once the vCPU has cleared the request (store-release
        # after emptying its TLB) or left guest mode, its stale entries are gone.
        while (kd_load_acquire_u32(&v.mode) == IN_GUEST_MODE and
               kd_load_acquire_u32(&v.requests) & REQ_TLB_FLUSH):
            # A vCPU thread the OS has descheduled cannot acknowledge: after a
            # short spin give it our CPU (more threads than cores is common here).
            spins += 1
            if spins < FLUSH_SPINS_BEFORE_YIELD:
                kd_cpu_relax()
            else:
                sched_yield()


cdef void _tlb_flush_local(kd_mmu *m, kd_vcpu *v) noexcept nogil:
    cdef size_t i
    for i in range(m.nslots):
        memset(v.tlb[i], 0, ((m.slots[i].npages + 63) >> 6) * 8)


cdef inline int _check_requests(kd_mmu *m, kd_vcpu *v) noexcept nogil:
    """Honour pending requests before entering the guest; return an exit reason or 0."""
    # Acquire pairs with the fetch-or in _flush_remote_tlbs / the soft-full request.
    cdef uint32_t req = kd_load_acquire_u32(&v.requests)
    if req & REQ_TLB_FLUSH:
        _tlb_flush_local(m, v)
        # Release: the TLB is empty before the flusher sees the acknowledgement.
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


cdef inline int _mark_dirty(kd_mmu *m, kd_vcpu *v, kd_slot *s, uint64_t rel) noexcept nogil:
    """mark_page_dirty_in_slot: record one write; return an exit reason if it could not be."""
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
        v.dirty_logged += 1
        return 0
    if v.ring != NULL:
        r = kd_ring_push(v.ring, s.id, rel)
        if r == KD_PUSH_FULL:
            return KVM_EXIT_DIRTY_RING_FULL
        if r == KD_PUSH_SOFT_FULL:
            kd_fetch_or_u32(&v.requests, REQ_DIRTY_RING_SOFT_FULL)
        v.dirty_logged += 1
    d = <uint64_t *>kd_load_acquire_ptr(<void **>&s.dirty)
    if d != NULL:
        # fetch-or pairs with the harvester's xchg / fetch-and-not.
        kd_fetch_or_u64(&d[rel >> 6], (<uint64_t>1) << (rel & 63))
        v.dirty_logged += 1
    return 0


cdef int _run(kd_mmu *m, kd_vcpu *v, const uint64_t *gfns, const uint64_t *vals,
              size_t vstride, size_t n, size_t *done) noexcept nogil:
    """The guest: write vals[i*vstride] to page gfns[i], for i < n.  Returns the exit reason."""
    cdef size_t i = 0, si = 0
    cdef kd_slot *s = NULL
    cdef uint64_t gfn, rel, w, bit
    cdef int reason = KVM_EXIT_HLT, r
    cdef bint unlogged = (m.faults & F_UNLOGGED_FAULT) != 0
    # Dekker handshake with _flush_remote_tlbs: publish guest mode, full
    # barrier, then read requests (vcpu_enter_guest's smp_mb__after_srcu_read_unlock).
    kd_store_seqcst_u32(&v.mode, IN_GUEST_MODE)
    kd_smp_mb()
    while i < n:
        if kd_load_acquire_u32(&v.requests):
            r = _check_requests(m, v)
            if r:
                reason = r
                break
        gfn = gfns[i]
        if s == NULL or gfn - s.base_gfn >= s.npages or gfn < s.base_gfn:
            s = _slot_by_gfn(m, gfn, &si)
            if s == NULL or s.flags & KVM_MEM_READONLY:
                # No memslot, or a read-only one: the write goes to user space
                # as MMIO.  KVM retires the instruction with the exit, so it
                # counts as done and a resume goes on with the next write.
                s = NULL
                reason = KVM_EXIT_MMIO
                i += 1
                break
        rel = gfn - s.base_gfn
        w = rel >> 6
        bit = (<uint64_t>1) << (rel & 63)
        if v.tlb[si][w] & bit:
            v.tlb_hits += 1
            if m.log_every_write and (s.flags & KVM_MEM_LOG_DIRTY_PAGES):
                r = _mark_dirty(m, v, s, rel)
                if r:
                    reason = r
                    break
        elif kd_load_relaxed_u64(&s.writable[w]) & bit:
            if m.log_every_write and (s.flags & KVM_MEM_LOG_DIRTY_PAGES):
                r = _mark_dirty(m, v, s, rel)
                if r:
                    reason = r
                    break
            v.tlb[si][w] |= bit
        else:
            # Write-protect fault (fast_page_fault): make the SPTE writable,
            # then log the page, as fast_pf_fix_direct_spte does.  The other
            # order loses writes: a harvest between the two would protect
            # first and leave the page writable and clean.
            if (v.ring != NULL and m.tracker == NULL and s.flags & KVM_MEM_LOG_DIRTY_PAGES
                    and kd_ring_used(v.ring) >= v.ring.size):
                # Every entry is live (only if user space never resets): never
                # overwrite one; the write waits for a reset.
                reason = KVM_EXIT_DIRTY_RING_FULL
                break
            kd_fetch_or_u64(&s.writable[w], bit)
            if not unlogged:
                r = _mark_dirty(m, v, s, rel)
                if r:
                    # Only a seed design's tracker refuses: undo the W bit; the
                    # write is redone, and logged, when the vCPU resumes.
                    kd_fetch_andnot_u64(&s.writable[w], bit)
                    reason = r
                    break
            v.faults += 1
            v.tlb[si][w] |= bit
        # The guest's store; relaxed because readers only need the value itself.
        kd_store_relaxed_u64(&s.values[rel], vals[i * vstride])
        i += 1
    v.writes += i
    # Release: our stores are done before a flusher stops waiting for us.
    kd_store_release_u32(&v.mode, OUTSIDE_GUEST_MODE)
    done[0] = i
    return reason


cdef class VcpuCore:
    """One simulated vCPU: requests, TLB bitmaps, optional dirty ring, counters."""
    cdef kd_vcpu v
    cdef Mmu mmu
    cdef object _tlbs      # numpy arrays behind v.tlb
    cdef object _ring      # the DirtyRing object behind v.ring (kept alive)
    cdef bint running

    def __cinit__(self, Mmu mmu not None, uint32_t vcpu_id):
        self.mmu = mmu
        self.v.id = vcpu_id
        self._tlbs = []

    def __dealloc__(self):
        free(self.v.tlb)

    cdef int _rebuild_tlbs(self) except -1:
        cdef size_t i, n = self.mmu.m.nslots
        cdef uint64_t[::1] a
        cdef uint64_t **tlb = <uint64_t **>calloc(n if n else 1, sizeof(uint64_t *))
        if tlb == NULL:
            raise MemoryError()
        arrays = []
        for i in range(n):
            arr = np.zeros(max(1, (self.mmu.m.slots[i].npages + 63) >> 6), dtype=np.uint64)
            a = arr
            tlb[i] = &a[0]
            arrays.append(arr)
        free(self.v.tlb)
        self.v.tlb = tlb
        self._tlbs = arrays
        return 0

    def attach_ring(self, ring):
        """Log this vCPU's dirty pages into ``ring`` (a kvmdirty._ring.DirtyRing)."""
        cap = ring._kd_ring
        if not PyCapsule_CheckExact(cap):
            raise TypeError("ring must offer a kd_ring capsule")
        self.v.ring = <kd_ring *>PyCapsule_GetPointer(cap, KD_RING_CAPSULE)
        self._ring = ring

    def run(self, const uint64_t[::1] gfns not None, values, size_t start=0, size_t budget=0):
        """Execute writes gfns[start:], at most ``budget`` of them (0 = all).

        ``values`` is one int or a uint64 array parallel to gfns.  Returns
        (exit reason, writes done).  The caller (vm.Vcpu) keeps the plan.
        """
        cdef const uint64_t[::1] va
        cdef uint64_t one
        cdef size_t n = gfns.shape[0], count, done = 0, stride
        cdef const uint64_t *vp
        cdef int reason
        if start > n:
            raise ValueError(f"start {start} past the plan's {n} writes")
        if isinstance(values, (int, np.integer)):
            if values < 0 or values >= (1 << 64):
                raise ValueError("value must fit in 64 bits")
            one = values
            vp = &one
            stride = 0
        else:
            va = values
            if <size_t>va.shape[0] != n:
                raise ValueError(f"values has {va.shape[0]} entries, the plan {n}")
            vp = &va[start] if start < n else NULL
            stride = 1
        count = n - start
        if budget and budget < count:
            count = budget
        if self.running:
            raise RuntimeError(f"vCPU {self.v.id} is already running in another thread")
        self.running = True
        try:
            if count == 0:
                with nogil:
                    reason = _run(self.mmu.m, &self.v, NULL, vp, stride, 0, &done)
            else:
                with nogil:
                    reason = _run(self.mmu.m, &self.v, &gfns[start], vp, stride, count, &done)
        finally:
            self.running = False
        if reason == KVM_EXIT_HLT and start + done < n:
            reason = EXIT_BUDGET
        return reason, done

    def request_pending(self):
        return kd_load_acquire_u32(&self.v.requests)

    @property
    def stats(self):
        return {"writes": self.v.writes, "tlb_hits": self.v.tlb_hits,
                "faults": self.v.faults, "dirty_logged": self.v.dirty_logged}


cdef class Mmu:
    """The simulated page tables of one VM, and its vCPUs' shared state."""
    cdef kd_mmu *m
    cdef kd_sink sink
    cdef list _slot_arrays
    cdef list _vcpus
    cdef object _tracker

    def __cinit__(self):
        self.m = <kd_mmu *>calloc(1, sizeof(kd_mmu))
        if self.m == NULL:
            raise MemoryError()
        self.sink.protect = _protect
        self.sink.ctx = self.m
        self._slot_arrays = []
        self._vcpus = []

    @property
    def _kd_sink(self):
        """PyCapsule (KD_SINK_CAPSULE) of this MMU's masked write-protect; keeps the MMU alive."""
        return kd_owned_capsule(&self.sink, KD_SINK_CAPSULE, self)

    def __dealloc__(self):
        if self.m != NULL:
            free(self.m.slots)
            free(self.m.vcpus)
            free(self.m)

    def set_slots(self, slots):
        """Install a new slot table: a list of (id, base_gfn, npages, flags, writable, values, dirty|None).

        Slots of every address space are kept (harvests name them); the guest
        runs in address space 0 only.
        Only while no vCPU runs and nothing harvests (vm.py's slots lock).
        Every vCPU's TLB is rebuilt empty (a memslot change flushes TLBs).
        """
        cdef size_t i, n = len(slots)
        cdef uint64_t[::1] w, val, d
        cdef kd_slot *tab
        rows = sorted(slots, key=lambda r: (r[0] >> 16, r[1]))
        for r in rows:
            sid, base, npages, flags, writable, values, dirty = r
            nw = (npages + 63) >> 6
            if len(writable) < nw or len(values) < npages or (dirty is not None and len(dirty) < nw):
                raise ValueError(f"slot {sid:#x}: arrays too small for {npages} pages")
        tab = <kd_slot *>calloc(n if n else 1, sizeof(kd_slot))
        if tab == NULL:
            raise MemoryError()
        keep = []
        try:
            for i in range(n):
                sid, base, npages, flags, writable, values, dirty = rows[i]
                w = writable
                val = values
                tab[i].id = sid
                tab[i].base_gfn = base
                tab[i].npages = npages
                tab[i].flags = flags
                tab[i].writable = &w[0] if w.shape[0] else NULL
                tab[i].values = &val[0] if val.shape[0] else NULL
                if dirty is not None:
                    d = dirty
                    tab[i].dirty = &d[0] if d.shape[0] else NULL
                keep.append(rows[i])
        except BaseException:
            free(tab)
            raise
        free(self.m.slots)
        self.m.slots = tab
        self.m.nslots = n
        self.m.nguest = sum(1 for r in rows if r[0] >> 16 == 0)
        self._slot_arrays = keep
        for vc in self._vcpus:
            (<VcpuCore>vc)._rebuild_tlbs()

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
        # Release pairs with _mark_dirty's load-acquire of the pointer.
        kd_store_release_ptr(<void **>&s.dirty, p)
        for i, r in enumerate(self._slot_arrays):
            if r[0] == sid:
                self._slot_arrays[i] = r[:6] + (dirty,)

    def new_vcpu(self, uint32_t vcpu_id):
        cdef VcpuCore vc = VcpuCore(self, vcpu_id)
        cdef kd_vcpu **arr = <kd_vcpu **>calloc(self.m.nvcpus + 1, sizeof(kd_vcpu *))
        cdef size_t i
        if arr == NULL:
            raise MemoryError()
        vc._rebuild_tlbs()
        for i in range(self.m.nvcpus):
            arr[i] = self.m.vcpus[i]
        arr[self.m.nvcpus] = &vc.v
        free(self.m.vcpus)
        self.m.vcpus = arr
        self.m.nvcpus += 1
        self._vcpus.append(vc)
        return vc

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

        Logged pages are marked through the design's tracker (vcpu KD_NO_VCPU)
        or the slot's dirty bitmap; a ring-only upstream VM cannot log them
        (KVM warns), so they are not logged.  Returns the writes done; stops at
        the first page outside every slot or that the tracker refuses.
        """
        cdef size_t i, si, n = gfns.shape[0]
        cdef kd_slot *s
        cdef uint64_t rel
        cdef uint64_t *d
        cdef int r
        with nogil:
            for i in range(n):
                s = _slot_by_gfn(self.m, gfns[i], &si)
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
        return i

    def flush_remote_tlbs(self):
        with nogil:
            _flush_remote_tlbs(self.m)

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
        return {"protects": self.m.protects, "protect_dropped": self.m.protect_dropped,
                "flushes": self.m.flushes}
