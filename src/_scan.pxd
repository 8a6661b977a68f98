from libc.stdint cimport uint64_t

cdef extern from "_scan.h" nogil:
    size_t kd_next_nonzero(const uint64_t *w, size_t i, size_t n)
    unsigned kd_nonzero_mask16(const uint64_t *w)
    int kd_ctz32(unsigned x)
