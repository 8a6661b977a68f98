# The KVM dirty ring's kernel-side state and push, as inline C shared by
# kvmdirty._ring (DirtyRing) and kvmdirty._mmu (the guest write loop).
# Mirrors virt/kvm/dirty_ring.c: entries are struct kvm_dirty_gfn; the kernel
# keeps private free-running u32 dirty_index / reset_index.
from libc.stdint cimport uint32_t, uint64_t
from _uapi cimport kvm_dirty_gfn, KVM_DIRTY_GFN_F_DIRTY
from _atomic cimport kd_load_acquire_u32, kd_store_release_u32, kd_store_relaxed_u32, kd_load_relaxed_u32

ctypedef struct kd_ring:
    kvm_dirty_gfn *gfns
    uint32_t size            # entries, a power of two
    uint32_t soft_limit      # size - 64 - cpu_dirty_log_size
    uint32_t dirty_index     # kernel: next entry to push (written by the vCPU only)
    uint32_t reset_index     # kernel: next entry to reset (written by reset only)
    uint64_t overflows       # pushes refused because used == size (a kernel WARN)

# Return codes of kd_ring_push
cdef enum:
    KD_PUSH_OK = 0
    KD_PUSH_SOFT_FULL = 1    # pushed; the ring is now at or past its soft limit
    KD_PUSH_FULL = -1        # refused: every entry is live (never overwrite)

cdef inline uint32_t kd_ring_used(kd_ring *r) noexcept nogil:
    # Acquire on reset_index pairs with the store-release in reset: entries
    # below it have flags == 0 again and may be reused.
    return kd_load_relaxed_u32(&r.dirty_index) - kd_load_acquire_u32(&r.reset_index)

cdef inline int kd_ring_push(kd_ring *r, uint32_t slot, uint64_t offset) noexcept nogil:
    cdef uint32_t used = kd_ring_used(r)
    cdef kvm_dirty_gfn *e
    if used >= r.size:
        r.overflows += 1
        return KD_PUSH_FULL
    e = &r.gfns[r.dirty_index & (r.size - 1)]
    e.slot = slot
    e.offset = offset
    # Release: slot/offset above are visible before DIRTY; pairs with the
    # load-acquire of flags in collect (user space harvest).
    kd_store_release_u32(&e.flags, KVM_DIRTY_GFN_F_DIRTY)
    # dirty_index is only written here (one vCPU); relaxed for readers of stats.
    kd_store_relaxed_u32(&r.dirty_index, r.dirty_index + 1)
    if used + 1 >= r.soft_limit:
        return KD_PUSH_SOFT_FULL
    return KD_PUSH_OK
