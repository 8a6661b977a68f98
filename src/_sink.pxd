# The C-level write-protect sink: how a harvest (bitmap xchg, clear, ring reset)
# hands each (slot, first page, 64-bit mask) batch to the page tables.
# An object offers one through a PyCapsule named KD_SINK_CAPSULE in its
# `_kd_sink` attribute; the capsule points at a kd_sink that lives as long
# as the object.
from cpython.pycapsule cimport PyCapsule_New, PyCapsule_GetContext, PyCapsule_SetContext
from cpython.ref cimport PyObject, Py_INCREF, Py_XDECREF
from libc.stdint cimport uint32_t, uint64_t

# Returns 1 if the batch was applied, 0 if it was dropped (bad slot, or past
# the slot's end, as kvm_reset_dirty_gfn drops it).
ctypedef int (*kd_protect_fn)(void *ctx, uint32_t slot, uint64_t first_page,
                              uint64_t mask) noexcept nogil

ctypedef struct kd_sink:
    kd_protect_fn protect
    void *ctx

cdef extern from *:
    """
    #define KD_SINK_CAPSULE "kvmdirty.kd_sink"
    #define KD_RING_CAPSULE "kvmdirty.kd_ring"
    """
    const char *KD_SINK_CAPSULE
    const char *KD_RING_CAPSULE

# A pluggable dirty-log design (the seed-era rings): the guest write loop calls
# mark() for every logged write instead of the built-in ring/bitmap.
#   mark(ctx, vcpu_id, slot, offset) -> 0 logged; 1 logged and now full (the
#   vCPU exits with full_exit before its next write, and keeps exiting while
#   still_full() says so); -1 not logged (the write is not done; exit now).
# vcpu_id is KD_NO_VCPU for writes made by the host (no running vCPU).
ctypedef int (*kd_mark_fn)(void *ctx, uint32_t vcpu_id, uint32_t slot,
                           uint64_t offset) noexcept nogil
ctypedef int (*kd_full_fn)(void *ctx, uint32_t vcpu_id) noexcept nogil

ctypedef struct kd_tracker:
    kd_mark_fn mark
    kd_full_fn still_full
    int full_exit
    void *ctx

cdef extern from *:
    """
    #define KD_TRACKER_CAPSULE "kvmdirty.kd_tracker"
    #define KD_NO_VCPU 0xFFFFFFFFu
    """
    const char *KD_TRACKER_CAPSULE
    const unsigned int KD_NO_VCPU


# Capsules that keep their owner alive: the capsule holds a reference to the
# object whose C struct it points into, dropped when the capsule dies, so a
# capsule (or whatever keeps it) can never outlive the memory it points at.
cdef inline void kd_capsule_release(object capsule) noexcept:
    Py_XDECREF(<PyObject *>PyCapsule_GetContext(capsule))


cdef inline object kd_owned_capsule(void *ptr, const char *name, object owner):
    cap = PyCapsule_New(ptr, name, kd_capsule_release)
    Py_INCREF(owner)
    PyCapsule_SetContext(cap, <void *>owner)
    return cap
