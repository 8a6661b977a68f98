/* Fast skipping of zero words in a dirty bitmap.
 *
 * This is a hint read, exactly like the kernel's plain `if (!dirty_bitmap[i])
 * continue;` in kvm_get_dirty_log_protect(): a word seen as zero here may be
 * set a moment later, and will then be seen by the next harvest.  Every word
 * found non-zero is then taken with an atomic exchange / fetch-and-not, which
 * is the access that decides what is harvested.  The hint read is done 16
 * words at a time with vector ORs so that a clean 24 GiB slot (96 Ki words)
 * is skipped at memory bandwidth.
 */
#ifndef KVMDIRTY_SCAN_H
#define KVMDIRTY_SCAN_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

typedef uint64_t kd_v2u64 __attribute__((vector_size(16)));

/* First index >= i (and < n) whose word looks non-zero, or n. */
static inline size_t kd_next_nonzero(const uint64_t *w, size_t i, size_t n)
{
    /* Dense maps: the next word is often the one (no 16-word block read for it). */
    if (i < n && __atomic_load_n(&w[i], __ATOMIC_RELAXED))
        return i;
    while (i + 16 <= n) {
        kd_v2u64 v[8];
        memcpy(v, w + i, sizeof(v));
        kd_v2u64 o = (v[0] | v[1]) | (v[2] | v[3]) | (v[4] | v[5]) | (v[6] | v[7]);
        if (o[0] | o[1])
            break;
        i += 16;
    }
    while (i < n && __atomic_load_n(&w[i], __ATOMIC_RELAXED) == 0)
        i++;
    return i;
}

/* Bit k (k < 16) set iff w[k] looks non-zero: the same hint read as above,
 * for the 16 words from w.  Callers walk a bitmap 16 words at a time and
 * visit the set bits of this mask with count-trailing-zeros, so a block
 * costs one data-dependent branch (any dirty word in it?) instead of one
 * per dirty word: at 0.1% dirty most blocks hold a dirty word at a random
 * place, and a mispredicted branch per word is what a scan costs there. */
static inline unsigned kd_nonzero_mask16(const uint64_t *w)
{
    kd_v2u64 v[8];
    unsigned m = 0;
    int k;
    memcpy(v, w, sizeof(v));
    kd_v2u64 o = (v[0] | v[1]) | (v[2] | v[3]) | (v[4] | v[5]) | (v[6] | v[7]);
    if (!(o[0] | o[1]))
        return 0;
#if defined(__SSE2__)
    for (k = 0; k < 8; k++) {
        __m128i e = _mm_cmpeq_epi32((__m128i)v[k], _mm_setzero_si128());   /* 32-bit halves == 0 */
        e = _mm_and_si128(e, _mm_shuffle_epi32(e, 0xB1));                   /* both halves: word == 0 */
        m |= (unsigned)_mm_movemask_pd(_mm_castsi128_pd(e)) << (2 * k);
    }
    return ~m & 0xFFFFu;
#else
    for (k = 0; k < 8; k++)
        m |= (unsigned)(v[k][0] != 0) << (2 * k) | (unsigned)(v[k][1] != 0) << (2 * k + 1);
    return m;
#endif
}

static inline int kd_ctz32(unsigned x) { return __builtin_ctz(x); }

#endif /* KVMDIRTY_SCAN_H */
