# C declarations of prefix_table.h (the lock-free LPM table the engine threads read).

from libc.stdint cimport uint8_t, uint16_t, uint32_t


cdef extern from "prefix_table.h" nogil:
    ctypedef struct pt_hop:
        uint32_t addr
        uint16_t port
    ctypedef struct pt_route:
        uint32_t net
        uint8_t plen
        pt_hop hop
    ctypedef struct pt_table:
        uint32_t nhops
        pt_hop *hops
    ctypedef struct pt_handle:
        pt_table *cur
    int PT_READERS
    # Next-hop index for a host-order address; 0 means no route.
    uint32_t pt_lookup(const pt_table *t, uint32_t addr)
    # Sorts routes in place; NULL on allocation failure.
    pt_table *pt_build(pt_route *routes, uint32_t n)
    void pt_free(pt_table *t)
    # Reader side: pin the current table in `slot` for one batch, then release it.
    const pt_table *pt_acquire(pt_handle *h, int slot)
    void pt_release(pt_handle *h, int slot)
    # Writer side: swap in t and free the old table once no reader holds it.
    void pt_publish(pt_handle *h, pt_table *t)
