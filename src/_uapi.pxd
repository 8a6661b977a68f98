# Constants and structs of the KVM user API, declared from the system <linux/kvm.h>.
from libc.stdint cimport uint32_t, uint64_t

cdef extern from "<linux/kvm.h>" nogil:
    struct kvm_dirty_gfn:
        uint32_t flags
        uint32_t slot
        uint64_t offset

    enum:
        KVM_API_VERSION
        KVM_MEM_LOG_DIRTY_PAGES
        KVM_MEM_READONLY
        KVM_EXIT_HLT
        KVM_EXIT_IO
        KVM_EXIT_MMIO
        KVM_EXIT_SHUTDOWN
        KVM_EXIT_FAIL_ENTRY
        KVM_EXIT_INTERNAL_ERROR
        KVM_EXIT_DIRTY_RING_FULL
        KVM_CAP_NR_VCPUS
        KVM_CAP_MAX_VCPUS
        KVM_CAP_NR_MEMSLOTS
        KVM_CAP_MULTI_ADDRESS_SPACE
        KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
        KVM_CAP_DIRTY_LOG_RING
        KVM_CAP_DIRTY_LOG_RING_ACQ_REL
        KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
        KVM_DIRTY_LOG_INITIALLY_SET
        KVM_DIRTY_GFN_F_DIRTY
        KVM_DIRTY_GFN_F_RESET
        KVM_DIRTY_GFN_F_MASK
        KVM_DIRTY_LOG_PAGE_OFFSET
