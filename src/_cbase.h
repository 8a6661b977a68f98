/* The C baseline of the benchmark suite: each operation done the plain way.
 *
 * What a competent C programmer writes for the same job, with the same
 * compiler and flags as the rest of the core (setup.py), and the same
 * atomic accesses where the contract needs them (an exchange to take a word
 * that vCPUs may be setting, an and-not to write-protect, acquire/release on
 * ring flags).  No vector tricks, no batching, no Python: the floor each
 * row of `kvmdirty bench` is divided by (benches/bench_cbase.py).
 *
 * Used only by the benchmarks (kvmdirty._cbase); not an API.
 */
#ifndef KVMDIRTY_CBASE_H
#define KVMDIRTY_CBASE_H

#include <stddef.h>
#include <stdint.h>

struct cb_gfn {            /* struct kvm_dirty_gfn */
    uint32_t flags;
    uint32_t slot;
    uint64_t offset;
};

#define CB_DIRTY 1u
#define CB_RESET 2u

/* KVM_GET_DIRTY_LOG's loop (kvm_get_dirty_log_protect) into a zeroed
 * snapshot: skip zero words with a plain read, exchange the others with 0,
 * write-protect their pages with one and-not.  Returns the dirty pages. */
static size_t cb_harvest(uint64_t *w, uint64_t *snap, uint64_t *wp, size_t n)
{
    size_t i, pages = 0;
    for (i = 0; i < n; i++) {
        uint64_t m;
        if (!w[i])
            continue;
        m = __atomic_exchange_n(&w[i], 0, __ATOMIC_ACQ_REL);
        snap[i] = m;
        __atomic_fetch_and(&wp[i], ~m, __ATOMIC_ACQ_REL);
        pages += (size_t)__builtin_popcountll(m);
    }
    return pages;
}

/* Exchange, scan, list in one loop: every word of a reused snapshot is
 * written (it must equal the harvested bitmap afterwards; snap NULL: no
 * snapshot, the fused harvest-to-list), each dirty word is
 * protected and its pages appended to out (at most cap: (size_t)-1 when
 * they do not fit, as a C caller checks).  Returns the pages listed. */
static size_t cb_harvest_list(uint64_t *w, uint64_t *snap, uint64_t *wp, size_t n,
                              uint64_t base, uint64_t *out, size_t cap)
{
    size_t i, k = 0;
    for (i = 0; i < n; i++) {
        uint64_t m = 0;
        if (w[i]) {
            m = __atomic_exchange_n(&w[i], 0, __ATOMIC_ACQ_REL);
            __atomic_fetch_and(&wp[i], ~m, __ATOMIC_ACQ_REL);
            if (k + (size_t)__builtin_popcountll(m) > cap)
                return (size_t)-1;
        }
        if (snap)
            snap[i] = m;
        while (m) {
            out[k++] = base + ((uint64_t)i << 6) + (uint64_t)__builtin_ctzll(m);
            m &= m - 1;
        }
    }
    return k;
}

/* The set bits of a bitmap as page numbers, into out (at most cap; else (size_t)-1). */
static size_t cb_list(const uint64_t *w, size_t n, uint64_t base, uint64_t *out, size_t cap)
{
    size_t i, k = 0;
    for (i = 0; i < n; i++) {
        uint64_t m = w[i];
        if (m && k + (size_t)__builtin_popcountll(m) > cap)
            return (size_t)-1;
        while (m) {
            out[k++] = base + ((uint64_t)i << 6) + (uint64_t)__builtin_ctzll(m);
            m &= m - 1;
        }
    }
    return k;
}

/* User-space ring harvest: in order while flags == DIRTY, mark RESET. */
static size_t cb_collect(struct cb_gfn *g, uint32_t size, uint32_t fetch,
                         uint32_t *slots, uint64_t *offsets, size_t max)
{
    size_t n = 0;
    while (n < max) {
        struct cb_gfn *e = &g[(fetch + (uint32_t)n) & (size - 1)];
        if (__atomic_load_n(&e->flags, __ATOMIC_ACQUIRE) != CB_DIRTY)
            break;
        slots[n] = e->slot;
        offsets[n] = e->offset;
        __atomic_store_n(&e->flags, CB_RESET, __ATOMIC_RELEASE);
        n++;
    }
    return n;
}

/* KVM_RESET_DIRTY_RINGS without coalescing: for every harvested entry, free
 * it and write-protect its page with one atomic and-not (pages past npages
 * are skipped).  Returns the entries reset. */
static uint32_t cb_reset(struct cb_gfn *g, uint32_t size, uint32_t reset,
                         uint64_t *wp, uint64_t npages)
{
    uint32_t count = 0;
    while (count < size) {
        struct cb_gfn *e = &g[(reset + count) & (size - 1)];
        uint64_t off;
        if (!(__atomic_load_n(&e->flags, __ATOMIC_ACQUIRE) & CB_RESET))
            break;
        off = e->offset;
        __atomic_store_n(&e->flags, 0, __ATOMIC_RELEASE);
        if (off < npages)
            __atomic_fetch_and(&wp[off >> 6], ~((uint64_t)1 << (off & 63)), __ATOMIC_ACQ_REL);
        count++;
    }
    return count;
}

#endif /* KVMDIRTY_CBASE_H */
