# The KVM dirty ring's kernel-side state, push, collect and reset, as inline C
# shared by kvmdirty._ring (DirtyRing), kvmdirty._seeds (the shared ring) and
# kvmdirty._mmu (the guest write loop).
# Mirrors virt/kvm/dirty_ring.c: entries are struct kvm_dirty_gfn; the kernel
# keeps private free-running u32 dirty_index / reset_index; used = dirty - reset.
#
# The protocol (each step names the access that carries it):
#   Push (the vCPU, single producer per ring; kd_ring_push):
#     1. Refuse if every entry is live (kd_ring_full): never overwrite.
#     2. Advance dirty_index (relaxed: only the producer writes it).
#     3. Write slot and offset, then store-release flags = DIRTY: whoever
#        load-acquires DIRTY sees the payload.
#     4. Soft-full if the new used >= soft_limit: the vCPU exits
#        DIRTY_RING_FULL before its next write.
#   Collect (user space, one collector per ring; kd_ring_collect):
#     1. From its own fetch index, load-acquire flags; stop unless == DIRTY
#        (pairs with push step 3).
#     2. Read slot and offset, then store-release flags = RESET: the reads
#        are done before the kernel may recycle the entry.
#   Reset (KVM_RESET_DIRTY_RINGS, one resetter per ring; kd_ring_reset):
#     1. From reset_index, load-acquire flags; stop unless it has RESET
#        (pairs with collect step 2; bit 0 ignored).  Nothing else bounds the
#        walk, exactly as in KVM: RESET forged by user space on entries never
#        pushed is reset too, and reset_index may pass dirty_index (used then
#        reads 0, as /dev/kvm behaves: pushes go on from dirty_index and the
#        ring counts again once the producer has caught up).
#     2. Read slot and offset, store-release flags = 0, advance reset_index.
#     3. Coalesce into (slot, base, 64-bit mask) batches; write-protect each
#        through the sink (which drops a bad slot or a batch past the slot end).
#     4. Store-release reset_index: the producer, acquiring it in used, sees
#        the flags = 0 stores before it reuses the entries.
#     The TLB flush (after every ring) is the caller's, as in
#     kvm_vm_ioctl_reset_dirty_pages.
# Whatever user space writes into the entries (flags, slot, offset), every
# index into gfns is masked with size - 1 and slot/offset only reach the sink,
# which bounds-checks them: nothing it writes can reach outside the ring.
from cpython.pycapsule cimport PyCapsule_IsValid, PyCapsule_GetPointer
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from _uapi cimport kvm_dirty_gfn, KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET
from _atomic cimport (kd_load_acquire_u32, kd_store_release_u32, kd_store_relaxed_u32,
                      kd_load_relaxed_u32, kd_load_relaxed_u64, kd_cmpxchg_u32,
                      kd_fetch_add_relaxed_u64, kd_cpu_relax, kd_compiler_barrier)
from _sink cimport kd_sink, kd_protect_fn, KD_SINK_CAPSULE

ctypedef struct kd_ring:
    kvm_dirty_gfn *gfns
    uint32_t size            # entries, a power of two
    uint32_t soft_limit      # size - 64 - cpu_dirty_log_size
    uint32_t dirty_index     # kernel: next entry to push (written by the producer only)
    uint32_t reset_index     # kernel: next entry to reset (written by reset only)
    # Statistics, read by other threads: relaxed atomics on both sides.
    uint64_t overflows       # pushes refused because every entry is live (a kernel WARN)
    uint64_t pushes          # entries pushed (u64: never wraps)
    uint32_t faults          # KD_RING_F_* deliberate ordering bugs, 0 in normal use (relaxed)

# Return codes of kd_ring_push
cdef enum:
    KD_PUSH_OK = 0
    KD_PUSH_SOFT_FULL = 1    # pushed; the ring is now at or past its soft limit
    KD_PUSH_FULL = -1        # refused: every entry is live (never overwrite)

# The most entries one kd_ring_reset call walks, as KVM's INT_MAX bound.
cdef enum:
    KD_RESET_MAX = 0x7FFFFFFF

# kd_ring.faults bits (fault injection for the verifier)
cdef enum:
    KD_RING_F_PUBLISH_EARLY = 1   # push stores flags = DIRTY before slot/offset

# Pause iterations between the early DIRTY and the payload: widens the window
# so a concurrent collector can actually observe the bug (wide enough that a
# preempted pusher is usually inside it, also under ThreadSanitizer).
cdef enum:
    KD_PUBLISH_EARLY_SPIN = 256
    # relaxed_collect's window must catch a push that lands while the
    # collector waits at the ring head: make it microseconds wide.
    KD_RELAXED_COLLECT_SPIN = 512


cdef inline int32_t kd_ring_backlog(kd_ring *r) noexcept nogil:
    """dirty - reset: entries pushed and not reset; negative once a reset ran ahead."""
    # Acquire on reset_index pairs with the store-release in kd_ring_reset:
    # entries below it have flags == 0 again and reset's reads of them are done.
    return <int32_t>(kd_load_relaxed_u32(&r.dirty_index) - kd_load_acquire_u32(&r.reset_index))


cdef inline uint32_t kd_ring_used(kd_ring *r) noexcept nogil:
    """kvm_dirty_ring_used, as /dev/kvm behaves: 0 while a reset of forged RESET
    flags has run reset_index ahead of dirty_index (measured on Linux 6.18: no
    soft-full exit there, the vCPU keeps pushing from dirty_index)."""
    cdef int32_t b = kd_ring_backlog(r)
    return <uint32_t>b if b > 0 else 0


cdef inline bint kd_ring_full(kd_ring *r) noexcept nogil:
    """Every entry is live: a push would overwrite one (KVM WARNs; we refuse)."""
    return kd_ring_used(r) >= r.size


cdef inline void kd_gfn_publish_early(kvm_dirty_gfn *e, uint32_t slot, uint64_t offset) noexcept nogil:
    """BUG on purpose (fault injection): DIRTY is visible before the payload; a
    collector may read the previous lap's slot/offset.  A function of its own
    so that .ci/tsan.supp can name this deliberate race and nothing else."""
    cdef int k
    kd_store_release_u32(&e.flags, KVM_DIRTY_GFN_F_DIRTY)
    # Keep the compiler from moving the payload stores back above the flag.
    kd_compiler_barrier()
    for k in range(KD_PUBLISH_EARLY_SPIN):
        kd_cpu_relax()
    e.slot = slot
    e.offset = offset


cdef inline void kd_gfn_publish(kvm_dirty_gfn *e, uint32_t slot, uint64_t offset,
                                uint32_t faults) noexcept nogil:
    if faults & KD_RING_F_PUBLISH_EARLY:
        kd_gfn_publish_early(e, slot, offset)
        return
    e.slot = slot
    e.offset = offset
    # Release: slot/offset above are visible before DIRTY; pairs with the
    # load-acquire of flags in kd_ring_collect (user-space harvest).
    kd_store_release_u32(&e.flags, KVM_DIRTY_GFN_F_DIRTY)


cdef inline int kd_ring_push(kd_ring *r, uint32_t slot, uint64_t offset) noexcept nogil:
    """kvm_dirty_ring_push, for the ring's single producer (its vCPU)."""
    cdef uint32_t used = kd_ring_used(r)
    # Own index (only the producer writes it): relaxed.
    cdef uint32_t di = kd_load_relaxed_u32(&r.dirty_index)
    if used >= r.size:
        kd_fetch_add_relaxed_u64(&r.overflows, 1)
        return KD_PUSH_FULL
    # dirty_index is written only by the producer.  It is advanced before the
    # flags are released, so whoever acquires this entry's DIRTY also sees an
    # index (and a used) that covers it.
    kd_store_relaxed_u32(&r.dirty_index, di + 1)
    kd_gfn_publish(&r.gfns[di & (r.size - 1)], slot, offset, kd_load_relaxed_u32(&r.faults))
    kd_fetch_add_relaxed_u64(&r.pushes, 1)
    # kvm_dirty_ring_soft_full on the new used (0 + 1 after a forged reset ran ahead).
    if used + 1 >= r.soft_limit:
        return KD_PUSH_SOFT_FULL
    return KD_PUSH_OK


cdef inline size_t kd_ring_push_many(kd_ring *r, const uint32_t *slots,
                                     const uint64_t *offsets, size_t n) noexcept nogil:
    """Push up to n entries (stopping when every entry is live); single producer."""
    cdef int32_t backlog = kd_ring_backlog(r)
    cdef uint32_t m = r.size - 1
    # Own index (only the producer writes it): relaxed.
    cdef uint32_t di = kd_load_relaxed_u32(&r.dirty_index)
    cdef uint32_t faults = kd_load_relaxed_u32(&r.faults)
    cdef size_t i, k = 0
    # Locals: stores into entries may alias *r, which would force reloads per entry.
    cdef kvm_dirty_gfn *gfns = r.gfns
    cdef kvm_dirty_gfn *e
    # As many as one-at-a-time pushes would take before kd_ring_full: with a
    # negative backlog (a forged reset ran reset_index ahead) more than size.
    if backlog < <int64_t>r.size:
        k = <size_t>(<int64_t>r.size - <int64_t>backlog)
    if n < k:
        k = n
    if k == 0:
        return 0
    # Advanced before the releases below, as in kd_ring_push.
    kd_store_relaxed_u32(&r.dirty_index, di + <uint32_t>k)
    if faults:
        for i in range(k):
            kd_gfn_publish(&r.gfns[(di + <uint32_t>i) & m], slots[i], offsets[i], faults)
    else:
        for i in range(k):
            e = &gfns[(di + <uint32_t>i) & m]
            e.slot = slots[i]
            e.offset = offsets[i]
            # Release pairs with kd_ring_collect's load-acquire of flags.
            kd_store_release_u32(&e.flags, KVM_DIRTY_GFN_F_DIRTY)
    kd_fetch_add_relaxed_u64(&r.pushes, k)
    return k


cdef inline int kd_ring_push_shared(kd_ring *r, uint32_t slot, uint64_t offset) noexcept nogil:
    """Push from any thread: reserve the entry with a compare-exchange on dirty_index.

    The alternative raised in seed 002's review: one ring shared by every vCPU.
    """
    cdef uint32_t head = kd_load_relaxed_u32(&r.dirty_index), used
    cdef int32_t backlog
    while True:
        # Acquire pairs with kd_ring_reset's store-release of reset_index.
        backlog = <int32_t>(head - kd_load_acquire_u32(&r.reset_index))
        used = <uint32_t>backlog if backlog > 0 else 0      # as kd_ring_used
        if used >= r.size:
            kd_fetch_add_relaxed_u64(&r.overflows, 1)
            return KD_PUSH_FULL
        # The cmpxchg makes entry `head` ours alone: no other producer can
        # move dirty_index from the same value.  On failure head is reloaded
        # and we retry.  Its ordering against our payload is not what makes
        # the entry safe to read: the store-release of DIRTY in kd_gfn_publish
        # orders every earlier access of ours (this cmpxchg included) before
        # the flag, as it does kd_ring_push's relaxed index store.
        if kd_cmpxchg_u32(&r.dirty_index, &head, head + 1):
            break
    kd_gfn_publish(&r.gfns[head & (r.size - 1)], slot, offset, kd_load_relaxed_u32(&r.faults))
    if used + 1 >= r.soft_limit:
        return KD_PUSH_SOFT_FULL
    return KD_PUSH_OK


cdef inline size_t kd_ring_collect(kvm_dirty_gfn *gfns, uint32_t size, uint32_t fetch,
                                   uint32_t *slots, uint64_t *offsets, size_t max_count) noexcept nogil:
    """User-space harvest from ``fetch`` on, in order, while flags == DIRTY.

    Works on any ring memory (ours or a real KVM mmap); ``size`` is a power of two.
    """
    cdef size_t n = 0
    cdef uint32_t m = size - 1
    cdef kvm_dirty_gfn *e
    while n < max_count:
        e = &gfns[(fetch + <uint32_t>n) & m]
        # Acquire pairs with the producer's store-release of DIRTY: slot and
        # offset are complete once we see it.
        if kd_load_acquire_u32(&e.flags) != KVM_DIRTY_GFN_F_DIRTY:
            break
        slots[n] = e.slot
        offsets[n] = e.offset
        # Release pairs with kd_ring_reset's load-acquire of RESET: our reads of
        # slot/offset are done before the kernel may recycle the entry.
        kd_store_release_u32(&e.flags, KVM_DIRTY_GFN_F_RESET)
        n += 1
    return n


cdef inline size_t kd_ring_collect_relaxed(kvm_dirty_gfn *gfns, uint32_t size, uint32_t fetch,
                                           uint32_t *slots, uint64_t *offsets,
                                           size_t max_count) noexcept nogil:
    """BUG on purpose (fault injection): kd_ring_collect with relaxed flag accesses.

    Relaxed order lets the payload loads move above the flag load (ARM does
    it, compilers may); x86 hardware would not, so the hoisting is written
    out to make the bug observable: the payload may be the previous lap's.
    """
    cdef size_t n = 0
    cdef uint32_t m = size - 1, s
    cdef uint64_t o
    cdef kvm_dirty_gfn *e
    cdef int k
    while n < max_count:
        e = &gfns[(fetch + <uint32_t>n) & m]
        s = e.slot
        o = e.offset
        # Keep the compiler from sinking the payload loads below the flag load.
        kd_compiler_barrier()
        # Widen the window between the hoisted payload loads and the flag
        # load, as publish_early's spin does, so a test can observe the bug.
        for k in range(KD_RELAXED_COLLECT_SPIN):
            kd_cpu_relax()
        if kd_load_relaxed_u32(&e.flags) != KVM_DIRTY_GFN_F_DIRTY:
            break
        slots[n] = s
        offsets[n] = o
        kd_store_relaxed_u32(&e.flags, KVM_DIRTY_GFN_F_RESET)
        n += 1
    return n


# --- reset: coalescing into (slot, base, mask) batches, as kvm_dirty_ring_reset

ctypedef struct kd_batcher:
    kd_protect_fn protect    # NULL: count batches, protect nothing
    void *ctx
    uint32_t slot
    uint64_t base
    uint64_t mask            # 0 = no batch open
    uint64_t batches         # batches flushed
    uint64_t dropped         # of which the sink dropped (bad slot, past the end)


cdef inline void kd_batcher_init(kd_batcher *b, kd_protect_fn protect, void *ctx) noexcept nogil:
    b.protect = protect
    b.ctx = ctx
    b.slot = 0
    b.base = 0
    b.mask = 0
    b.batches = 0
    b.dropped = 0


cdef inline void kd_batcher_flush(kd_batcher *b) noexcept nogil:
    """kvm_reset_dirty_gfn: write-protect the open batch (the sink may drop it)."""
    if b.mask == 0:
        return
    b.batches += 1
    if b.protect != NULL and b.protect(b.ctx, b.slot, b.base, b.mask) == 0:
        b.dropped += 1
    b.mask = 0


cdef inline void kd_batcher_add(kd_batcher *b, uint32_t slot, uint64_t offset) noexcept nogil:
    """Add one reset entry, coalescing exactly as kvm_dirty_ring_reset does."""
    cdef int64_t delta
    if b.mask:
        if slot == b.slot:
            delta = <int64_t>(offset - b.base)
            if delta >= 0 and delta < 64:
                # Within 64 pages at or above the base: one more bit.
                b.mask |= (<uint64_t>1) << delta
                return
            if delta > -64 and delta < 0 and ((b.mask << -delta) >> -delta) == b.mask:
                # Up to 63 below and the shifted mask keeps every bit: move the base down.
                b.base = offset
                b.mask = (b.mask << -delta) | 1
                return
        kd_batcher_flush(b)
    b.slot = slot
    b.base = offset
    b.mask = 1


cdef inline uint32_t kd_ring_reset(kd_ring *r, kd_batcher *bp, uint32_t max_count) noexcept nogil:
    """kvm_dirty_ring_reset: from reset_index while flags has RESET; returns the count.

    One resetter at a time (KVM holds slots_lock).  Like KVM, only the flags
    bound the walk: RESET forged by user space on entries never pushed is
    reset and counted, and reset_index may pass dirty_index.  ``max_count``
    caps one call (KVM: INT_MAX entries, or a pending signal), so a user
    thread forging RESET behind the walk cannot keep it going forever.
    """
    # Own index (only the resetter writes it): relaxed.
    cdef uint32_t ri = kd_load_relaxed_u32(&r.reset_index), m = r.size - 1, count = 0, slot
    cdef uint64_t offset
    cdef kvm_dirty_gfn *gfns = r.gfns
    cdef kvm_dirty_gfn *e
    # A local copy of the batcher stays in registers (entry stores cannot alias it).
    cdef kd_batcher b = bp[0]
    while count < max_count:
        e = &gfns[(ri + count) & m]
        # Acquire pairs with the user's store-release of RESET in collect
        # (bit 0 is ignored, as kvm_dirty_gfn_harvested does).
        if not (kd_load_acquire_u32(&e.flags) & KVM_DIRTY_GFN_F_RESET):
            break
        slot = e.slot
        offset = e.offset
        # Release: our reads above are done before the entry is free again.
        kd_store_release_u32(&e.flags, 0)
        count += 1
        kd_batcher_add(&b, slot, offset)
    kd_batcher_flush(&b)
    bp[0] = b
    if count:
        # Release pairs with kd_ring_used's load-acquire in push: the flags=0
        # stores above are visible before the producer may reuse the entries.
        kd_store_release_u32(&r.reset_index, ri + count)
    return count


# --- sinks: where reset batches go (resolved at the def boundary)

cdef enum:
    KD_SINK_NONE = 0
    KD_SINK_C = 1        # a kd_sink from a capsule (e.g. the simulated MMU)
    KD_SINK_PY = 2       # a Python callable(slot, first_page, mask), called with the GIL


cdef inline int kd_sink_resolve(object sink, object cap, kd_sink **out) except -1:
    """Classify a sink; ``cap`` is getattr(sink, "_kd_sink", None), which the
    caller keeps referenced for the whole call (the capsule keeps its owner alive)."""
    out[0] = NULL
    if sink is None:
        return KD_SINK_NONE
    if cap is not None and PyCapsule_IsValid(cap, KD_SINK_CAPSULE):
        out[0] = <kd_sink *>PyCapsule_GetPointer(cap, KD_SINK_CAPSULE)
        return KD_SINK_C
    if callable(sink):
        return KD_SINK_PY
    raise TypeError("sink must be None, an object with a kd_sink capsule (e.g. kvmdirty._mmu.Mmu), "
                    f"or a callable(slot, first_page, mask); got {type(sink).__name__}")


# A batch log: the C protect function a reset uses when the sink is a Python
# callable; the batches are handed to it after the nogil walk.
ctypedef struct kd_batch_log:
    uint32_t *slots
    uint64_t *firsts
    uint64_t *masks
    size_t n
    size_t cap


cdef inline int kd_batch_log_protect(void *ctx, uint32_t slot, uint64_t first,
                                     uint64_t mask) noexcept nogil:
    cdef kd_batch_log *log = <kd_batch_log *>ctx
    if log.n >= log.cap:
        return 0     # cannot happen: cap >= entries walked >= batches
    log.slots[log.n] = slot
    log.firsts[log.n] = first
    log.masks[log.n] = mask
    log.n += 1
    return 1
