"""Limits of the simulated x86-64 KVM (not in the uapi header; values of Linux 6.x x86).

The one definition of each: every module (the simulator, the seed designs,
the compiled kernels) imports them from here.  Argument checks are in
kvmdirty.validate.
"""
from __future__ import annotations


#: KVM_USER_MEM_SLOTS: KVM_MEM_SLOTS_NUM (SHRT_MAX) minus 3 private slots.
USER_MEM_SLOTS = 32764
#: kvm_arch_nr_memslot_as_ids(): normal + SMM address spaces.
ADDRESS_SPACES = 2
#: KVM_MEM_MAX_NR_PAGES: a slot's page count must fit in 31 bits.
MEM_MAX_NR_PAGES = (1 << 31) - 1
#: KVM_MAX_VCPUS (CONFIG_KVM_MAX_NR_VCPUS default) and KVM_MAX_VCPU_IDS
#: (KVM_MAX_VCPUS * KVM_VCPU_ID_RATIO), as this repository's hosts report.
MAX_VCPUS = 1024
MAX_VCPU_IDS = 1024 * 4
#: KVM_DIRTY_RING_RSVD_ENTRIES and KVM_DIRTY_RING_MAX_ENTRIES.
DIRTY_RING_RSVD_ENTRIES = 64
DIRTY_RING_MAX_ENTRIES = 65536
#: kvm_cpu_dirty_log_size() with Intel PML (0 without).
PML_LOG_SIZE = 512
DIRTY_GFN_SIZE = 16
