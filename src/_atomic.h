/* Named atomic helpers over the GCC/Clang __atomic builtins.
 *
 * Every word shared between a vCPU thread and a collector thread goes
 * through one of these, so the memory order of each access is written at
 * the call site by name.  The comments at the call sites say what each
 * acquire/release pairs with.
 */
#ifndef KVMDIRTY_ATOMIC_H
#define KVMDIRTY_ATOMIC_H

#include <stdint.h>

#define KD_DEFINE_ATOMICS(T, SFX)                                              \
static inline T kd_load_relaxed_##SFX(const T *p)                              \
{ return __atomic_load_n(p, __ATOMIC_RELAXED); }                               \
static inline T kd_load_acquire_##SFX(const T *p)                              \
{ return __atomic_load_n(p, __ATOMIC_ACQUIRE); }                               \
static inline void kd_store_relaxed_##SFX(T *p, T v)                           \
{ __atomic_store_n(p, v, __ATOMIC_RELAXED); }                                  \
static inline void kd_store_release_##SFX(T *p, T v)                           \
{ __atomic_store_n(p, v, __ATOMIC_RELEASE); }                                  \
static inline T kd_xchg_##SFX(T *p, T v)                                       \
{ return __atomic_exchange_n(p, v, __ATOMIC_ACQ_REL); }                        \
static inline T kd_fetch_or_##SFX(T *p, T v)                                   \
{ return __atomic_fetch_or(p, v, __ATOMIC_ACQ_REL); }                          \
static inline T kd_fetch_andnot_##SFX(T *p, T v)                               \
{ return __atomic_fetch_and(p, (T)~v, __ATOMIC_ACQ_REL); }                     \
static inline T kd_fetch_add_##SFX(T *p, T v)                                  \
{ return __atomic_fetch_add(p, v, __ATOMIC_ACQ_REL); }                         \
/* Statistics: atomic (no torn or lost increments) but orders nothing. */      \
static inline T kd_fetch_add_relaxed_##SFX(T *p, T v)                          \
{ return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }                         \
/* Returns 1 and stores desired if *p == expected; else 0 and *expected = *p. */ \
static inline int kd_cmpxchg_##SFX(T *p, T *expected, T desired)               \
{ return __atomic_compare_exchange_n(p, expected, desired, 0,                  \
                                     __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE); }    \
static inline T kd_load_seqcst_##SFX(const T *p)                               \
{ return __atomic_load_n(p, __ATOMIC_SEQ_CST); }                               \
static inline void kd_store_seqcst_##SFX(T *p, T v)                            \
{ __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }

KD_DEFINE_ATOMICS(uint16_t, u16)
KD_DEFINE_ATOMICS(uint32_t, u32)
KD_DEFINE_ATOMICS(uint64_t, u64)

/* Pointer slots (e.g. the active bitmap of a switched-bitmap slot). */
static inline void *kd_load_acquire_ptr(void *const *p)
{ return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void kd_store_release_ptr(void **p, void *v)
{ __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void *kd_xchg_ptr(void **p, void *v)
{ return __atomic_exchange_n(p, v, __ATOMIC_ACQ_REL); }

/* A full barrier: the store->load ordering of the vCPU-mode / request
 * handshake (like smp_mb() in kvm_vcpu_exiting_guest_mode). */
static inline void kd_smp_mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

/* Stop the compiler moving memory accesses across this point (no CPU fence):
 * used where fault injection must keep a deliberately wrong order. */
static inline void kd_compiler_barrier(void) { __asm__ __volatile__("" ::: "memory"); }

/* Let the sibling hyper-thread run while we spin on a flag. */
static inline void kd_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline int kd_ctz64(uint64_t x) { return __builtin_ctzll(x); }
static inline int kd_clz64(uint64_t x) { return __builtin_clzll(x); }
static inline int kd_popcount64(uint64_t x) { return __builtin_popcountll(x); }

#endif /* KVMDIRTY_ATOMIC_H */
