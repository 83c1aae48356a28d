# C declarations of prefix_table.h (the lock-free LPM table the engine threads read).

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "prefix_table.h" nogil:
    ctypedef struct pt_hop:
        uint32_t addr
        uint16_t port
        uint8_t v6
    ctypedef struct pt_table:
        pass
    ctypedef struct pt_op:
        uint8_t key[16]
        uint8_t plen
        uint8_t dele "del"
        uint8_t family
        uint64_t leaf
    enum:
        PT_V4
        PT_V6
    ctypedef struct pt_handle:
        uint64_t epoch      # publishes (and pt_bump calls) so far; the writer's to read
    enum:
        PT_READERS
        PT_QUEUES
    uint64_t PT_NONE
    # The leaf a route stores (its hop and prefix length), whether a leaf is a route, and its hop.
    uint64_t pt_leaf(pt_hop hop, unsigned plen)
    bint pt_routed(uint64_t leaf)
    pt_hop pt_leaf_hop(uint64_t leaf)
    # The leaf for a host-order IPv4 address, or for an IPv6 address (16 bytes); test it with pt_routed.
    uint64_t pt_lookup(const pt_table *t, uint32_t addr)
    uint64_t pt_lookup6(const pt_table *t, const uint8_t *addr)
    # Reader side: pin the current table in `slot` (one per thread) for one batch, then release it; never waits.
    const pt_table *pt_acquire(pt_handle *h, int slot)
    void pt_release(pt_handle *h, int slot)
    # Writer side (one at a time): an empty table; a batch applied and published at once (-1: out of memory,
    # nothing changed); everything freed once no reader is left.
    int pt_init(pt_handle *h)
    int pt_apply(pt_handle *h, const pt_op *ops, size_t n)
    void pt_destroy(pt_handle *h)
    # Writer side: a new epoch without a new table (what was hidden from readers before, new ones cannot see).
    void pt_bump(pt_handle *h)
