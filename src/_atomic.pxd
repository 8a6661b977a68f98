# Cython declarations of src/_atomic.h: named memory orders over __atomic builtins.
from libc.stdint cimport uint16_t, uint32_t, uint64_t

cdef extern from "_atomic.h" nogil:
    uint16_t kd_load_relaxed_u16(const uint16_t *p)
    uint16_t kd_load_acquire_u16(const uint16_t *p)
    void kd_store_relaxed_u16(uint16_t *p, uint16_t v)
    void kd_store_release_u16(uint16_t *p, uint16_t v)
    uint16_t kd_xchg_u16(uint16_t *p, uint16_t v)
    uint16_t kd_fetch_add_u16(uint16_t *p, uint16_t v)
    bint kd_cmpxchg_u16(uint16_t *p, uint16_t *expected, uint16_t desired)

    uint32_t kd_load_relaxed_u32(const uint32_t *p)
    uint32_t kd_load_acquire_u32(const uint32_t *p)
    uint32_t kd_load_seqcst_u32(const uint32_t *p)
    void kd_store_relaxed_u32(uint32_t *p, uint32_t v)
    void kd_store_release_u32(uint32_t *p, uint32_t v)
    void kd_store_seqcst_u32(uint32_t *p, uint32_t v)
    uint32_t kd_xchg_u32(uint32_t *p, uint32_t v)
    uint32_t kd_fetch_or_u32(uint32_t *p, uint32_t v)
    uint32_t kd_fetch_andnot_u32(uint32_t *p, uint32_t v)
    uint32_t kd_fetch_add_u32(uint32_t *p, uint32_t v)
    bint kd_cmpxchg_u32(uint32_t *p, uint32_t *expected, uint32_t desired)

    uint64_t kd_load_relaxed_u64(const uint64_t *p)
    uint64_t kd_load_acquire_u64(const uint64_t *p)
    void kd_store_relaxed_u64(uint64_t *p, uint64_t v)
    void kd_store_release_u64(uint64_t *p, uint64_t v)
    uint64_t kd_xchg_u64(uint64_t *p, uint64_t v)
    uint64_t kd_fetch_or_u64(uint64_t *p, uint64_t v)
    uint64_t kd_fetch_andnot_u64(uint64_t *p, uint64_t v)
    uint64_t kd_fetch_add_u64(uint64_t *p, uint64_t v)
    bint kd_cmpxchg_u64(uint64_t *p, uint64_t *expected, uint64_t desired)

    void *kd_load_acquire_ptr(void **p)
    void kd_store_release_ptr(void **p, void *v)
    void *kd_xchg_ptr(void **p, void *v)

    void kd_smp_mb()
    void kd_compiler_barrier()
    void kd_cpu_relax()
    int kd_ctz64(uint64_t x)
    int kd_clz64(uint64_t x)
    int kd_popcount64(uint64_t x)
