# C declarations of offload.h (virtio header, GSO split, TCP coalescing), cmsg.h, csum.h, peer_stats.h and peer6.h.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int16_t, int32_t

from syscalls cimport msghdr, iovec
from prefix_table cimport pt_handle


cdef extern from "csum.h" nogil:
    uint64_t csum_partial(const void *p, size_t len, uint64_t seed)
    uint16_t csum_fold(uint64_t sum)
    uint16_t csum_finish(uint64_t sum)
    uint16_t csum_replace2(uint16_t check, uint16_t old, uint16_t new_)
    void ip4_set_check(uint8_t *iph, unsigned ihl)


cdef extern from "offload.h" nogil:
    enum:
        VNET_HDR_LEN
        VNET_F_NEEDS_CSUM
        VNET_GSO_NONE
        VNET_GSO_TCPV4
        VNET_GSO_TCPV6
        VNET_GSO_UDP_L4
        GSO_MAX_SEGS
        GRO_IOVS
    ctypedef struct vnet_hdr:
        uint8_t flags
        uint8_t gso_type
        uint16_t hdr_len
        uint16_t gso_size
        uint16_t csum_start
        uint16_t csum_offset
    ctypedef struct gro_item:
        uint8_t *pkt
        uint32_t len
        uint16_t mss
        uint16_t segs
        iovec *iov
    ctypedef struct gro_table:
        gro_item *items
        int nitems
        int max_items
        iovec *pool
        int npool
        int udp
    # Finish a CHECKSUM_PARTIAL packet in place; -1 if the offsets do not fit.
    int vnet_finish_csum(uint8_t *pkt, size_t len, const vnet_hdr *h)
    # Segments back to back at out, lengths in seg_len; the count, or -1 (malformed, or out of room).
    int gso_split(const uint8_t *pkt, size_t len, uint8_t gso_type, uint16_t gso_size,
                  uint8_t *out, size_t cap, uint16_t *seg_len, int max_segs)
    # Start a new batch: no items, every flow bucket stale.
    void gro_reset(gro_table *t)
    # Add one packet; its item index, or -1 when the item list is full.
    int gro_add(gro_table *t, uint8_t *p, uint32_t len)
    # Fix up an item for writing and fill its virtio header (a merged one's write: iov[0..segs]).
    void gro_finish(gro_item *it, vnet_hdr *h)
    # After a refused GSO write: a finished merged item's packets as they arrived, in iov[1..segs].
    void gro_unmerge(gro_item *it)


cdef extern from "cmsg.h" nogil:
    enum:
        CMSG_ROOM
    void cmsg_set_segment(msghdr *m, void *room, uint16_t size)
    void cmsg_parse_rx(msghdr *m, int *gso_size, uint32_t *drops)


cdef extern from "peer_stats.h" nogil:
    enum:
        PEER_SLOTS
    ctypedef struct peer_slot:
        uint32_t addr
        uint32_t state
        uint64_t tx_packets, tx_bytes, rx_packets, rx_bytes
    ctypedef struct peer_table:
        peer_slot slot[8192]
    # The slot of a peer address (network order) that a route leads to, or NULL: O(1). Hold the prefix table
    # from the lookup until the last use of the slot.
    peer_slot *peer_find(peer_table *t, uint32_t addr)
    # Whether a route leads to this address now.
    bint peer_configured(peer_table *t, uint32_t addr)
    # Add n to one counter of a slot (each counter has one writer thread).
    void peer_add(uint64_t *counter, uint64_t n)
    # Control side: set up and free a table; the address gained its first route (its slot, or -1 when the table
    # is full); the peer in a slot lost its last route, in a table published at epoch `tag`.
    int peer_table_init(peer_table *t)
    void peer_table_destroy(peer_table *t)
    int peer_join(peer_table *t, pt_handle *h, uint32_t addr)
    void peer_leave(peer_table *t, int slot, uint64_t tag)


cdef extern from "peer6.h" nogil:
    enum:
        PEER6_SLOTS
    ctypedef struct peer6_slot:
        uint8_t addr[16]
        peer_slot peer
    ctypedef struct peer6_table:
        peer6_slot slot[8192]
    # The slot of an IPv6 peer address that a route leads to, or NULL: O(1) (the same rule as peer_find).
    peer6_slot *peer6_find(peer6_table *t, const uint8_t *addr)
    # Whether a route leads to this address now.
    bint peer6_configured(peer6_table *t, const uint8_t *addr)
    # Control side, as for IPv4 peers; peer6_join's slot number is what a route's leaf holds.
    int peer6_table_init(peer6_table *t)
    void peer6_table_destroy(peer6_table *t)
    int peer6_join(peer6_table *t, pt_handle *h, const uint8_t *addr)
    void peer6_leave(peer6_table *t, int slot, uint64_t tag)
