# C declarations of atomics.h (what the engine's threads and the control side share).

from libc.stdint cimport uint64_t


cdef extern from "atomics.h" nogil:
    uint64_t load64(const uint64_t *p)
    void store64(uint64_t *p, uint64_t v)
    void add64(uint64_t *p, uint64_t n)
    bint cas64(uint64_t *p, uint64_t *expected, uint64_t v)
    int acquire32(const int *p)
    void release32(int *p, int v)
    void set_once32(int *p, int v)
