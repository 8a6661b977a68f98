from libc.stdint cimport uint64_t

cdef extern from "_scan.h" nogil:
    size_t kd_next_nonzero(const uint64_t *w, size_t i, size_t n)
