# Allocation of the coalescing table (offload.h works in it; the engine and the test hooks in testing.pyx own one).

from libc.stdlib cimport calloc, free


cdef size_t gro_table_size(int max_items, int npool) noexcept nogil:
    """What new_gro_table allocates, in bytes."""
    return sizeof(gro_table) + <size_t>max_items * sizeof(gro_item) + <size_t>npool * GRO_IOVS * sizeof(iovec)


cdef gro_table *new_gro_table(int max_items, int npool) noexcept:
    """A coalescing table for up to max_items packets, npool of them merged (gro_table_size bytes)."""
    cdef gro_table *t = <gro_table *>calloc(1, sizeof(gro_table))
    if t == NULL:
        return NULL
    t.items = <gro_item *>calloc(max_items, sizeof(gro_item))
    t.pool = <iovec *>calloc(<size_t>npool * GRO_IOVS, sizeof(iovec))
    t.max_items = max_items
    t.npool = npool
    if t.items == NULL or t.pool == NULL:
        free_gro_table(t)
        return NULL
    gro_reset(t)
    return t


cdef void free_gro_table(gro_table *t) noexcept:
    if t != NULL:
        free(t.items)
        free(t.pool)
        free(t)
