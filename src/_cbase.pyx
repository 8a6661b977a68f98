"""The plain-C baseline of the benchmark suite (src/_cbase.h), callable from the benches.

Private to benches/bench_cbase.py and benches/callgrind.py: not an API.
Each function checks its buffers once, then runs the C loop with the GIL
released; every buffer stays exported (a typed memoryview) for the whole loop.
"""
from libc.stdint cimport uint32_t, uint64_t, uintptr_t


cdef extern from "_cbase.h" nogil:
    struct cb_gfn:
        uint32_t flags
        uint32_t slot
        uint64_t offset
    size_t cb_harvest(uint64_t *w, uint64_t *snap, uint64_t *wp, size_t n)
    size_t cb_harvest_list(uint64_t *w, uint64_t *snap, uint64_t *wp, size_t n,
                           uint64_t base, uint64_t *out, size_t cap)
    size_t cb_list(const uint64_t *w, size_t n, uint64_t base, uint64_t *out, size_t cap)
    size_t cb_collect(cb_gfn *g, uint32_t size, uint32_t fetch, uint32_t *slots,
                      uint64_t *offsets, size_t max)
    uint32_t cb_reset(cb_gfn *g, uint32_t size, uint32_t reset, uint64_t *wp, uint64_t npages)


cdef int _same(size_t a, size_t b, str what) except -1:
    if a != b:
        raise ValueError(f"{what}: {a} != {b}")
    return 0


cdef cb_gfn *_ring(unsigned char[::1] entries) except NULL:
    cdef size_t nbytes = entries.shape[0], count = nbytes // sizeof(cb_gfn)
    if nbytes == 0 or nbytes % sizeof(cb_gfn) or count & (count - 1) or (<uintptr_t>&entries[0]) & 7:
        raise ValueError("entries must be an 8-byte aligned power-of-two number of 16-byte entries")
    return <cb_gfn *>&entries[0]


def harvest(uint64_t[::1] words not None, uint64_t[::1] snapshot not None,
            uint64_t[::1] writable not None):
    """cb_harvest: exchange non-zero words into a zeroed snapshot, and-not them from writable."""
    cdef size_t n = words.shape[0], pages
    _same(snapshot.shape[0], n, "snapshot")
    _same(writable.shape[0], n, "writable")
    if n == 0:
        return 0
    with nogil:
        pages = cb_harvest(&words[0], &snapshot[0], &writable[0], n)
    return pages


def harvest_list(uint64_t[::1] words not None, uint64_t[::1] snapshot,
                 uint64_t[::1] writable not None, uint64_t[::1] out not None, uint64_t base=0):
    """cb_harvest_list: exchange, protect and list in one loop (every snapshot word
    written; ``snapshot`` None: none kept, the fused harvest-to-list).

    Returns the pages listed; ValueError if they do not fit in ``out``.
    """
    cdef size_t n = words.shape[0], k
    cdef uint64_t *sp = NULL
    if snapshot is not None:
        _same(snapshot.shape[0], n, "snapshot")
        if n:
            sp = &snapshot[0]
    _same(writable.shape[0], n, "writable")
    if n == 0:
        return 0
    with nogil:
        k = cb_harvest_list(&words[0], sp, &writable[0], n, base,
                            &out[0] if out.shape[0] else NULL, out.shape[0])
    if k == <size_t>-1:
        raise ValueError("out is too short for the pages set")
    return k


def to_gfns(const uint64_t[::1] words not None, uint64_t[::1] out not None, uint64_t base=0):
    """cb_list: the set bits as page numbers into ``out``; returns how many (ValueError if they do not fit)."""
    cdef size_t n = words.shape[0], k
    if n == 0:
        return 0
    with nogil:
        k = cb_list(&words[0], n, base, &out[0] if out.shape[0] else NULL, out.shape[0])
    if k == <size_t>-1:
        raise ValueError("out is too short for the pages set")
    return k


def collect(unsigned char[::1] entries not None, uint32_t fetch, uint32_t[::1] slots not None,
            uint64_t[::1] offsets not None):
    """cb_collect over raw ring bytes; returns the count."""
    cdef cb_gfn *g = _ring(entries)
    cdef uint32_t size = <uint32_t>(entries.shape[0] // sizeof(cb_gfn))
    cdef size_t cap = min(<size_t>slots.shape[0], <size_t>offsets.shape[0]), n
    if cap == 0:
        return 0
    with nogil:
        n = cb_collect(g, size, fetch, &slots[0], &offsets[0], cap)
    return n


def reset(unsigned char[::1] entries not None, uint32_t reset_index, uint64_t[::1] writable not None,
          uint64_t npages):
    """cb_reset over raw ring bytes: free RESET entries, and-not each page's W bit; returns the count."""
    cdef cb_gfn *g = _ring(entries)
    cdef uint32_t size = <uint32_t>(entries.shape[0] // sizeof(cb_gfn)), n
    if npages > <uint64_t>writable.shape[0] * 64:
        raise ValueError("npages is beyond writable")
    with nogil:
        n = cb_reset(g, size, reset_index, &writable[0] if writable.shape[0] else NULL, npages)
    return n
