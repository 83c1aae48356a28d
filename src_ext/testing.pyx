# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The engine's C parts exposed to tests and micro-benchmarks (pyflannel.dataplane._testing): the prefix table
raced against a reader thread, the offload helpers (checksums, GSO split, coalescing) without a TUN device, and
the steering hash. Built from the same headers and .pxi files as the engine, so what is tested is the engine's
code; never imported by production code, which is why none of this is in pyflannel.dataplane._engine."""

import ipaddress

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset
from libc.errno cimport errno

from syscalls cimport iovec, htonl, htons, ntohl, ntohs
from prefix_table cimport (
    pt_hop, pt_table, pt_handle, pt_routed, pt_leaf_hop, pt_lookup, pt_lookup6, pt_acquire, pt_release,
)
from offload cimport (
    csum_partial, csum_finish, VNET_GSO_TCPV4, VNET_GSO_TCPV6, VNET_GSO_UDP_L4, GRO_IOVS, vnet_hdr, gro_item,
    gro_table, vnet_finish_csum, gso_split, gro_reset, gro_add, gro_finish, gro_unmerge, PEER6_SLOTS,
)
from steering cimport steer_hash, STEER_MAX

include "prefix_table.pxi"
include "offload.pxi"

cdef enum:
    SPLIT_SEGS = 2048        # as the engine's (state.pxi): segments of one super-packet at the smallest MSS

GSO_TCPV4 = VNET_GSO_TCPV4
GSO_UDP_L4 = VNET_GSO_UDP_L4
GSO_TCPV6 = VNET_GSO_TCPV6


# ---- the prefix table under a concurrent reader ------------------------------------------------------------------

cdef extern from * nogil:
    # gcc's atomic builtins, for the test reader's stop flag
    int __atomic_load_n(int *p, int order)
    void __atomic_store_n(int *p, int value, int order)
    int __ATOMIC_ACQUIRE, __ATOMIC_RELEASE

cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    int pthread_create(pthread_t *thread, const void *attr, void *(*start)(void *) noexcept nogil, void *arg)
    int pthread_join(pthread_t thread, void **retval)

cdef enum:
    READER_TEST = PT_READERS - 1

ctypedef struct _race_reader:
    pt_handle *h
    const uint32_t *probes
    Py_ssize_t nprobes
    const uint8_t *probes6       # 16-byte IPv6 addresses back to back
    Py_ssize_t nprobes6
    uint32_t peer_a, peer_b      # network order: the only peers the racing writer uses
    int stop
    uint64_t rounds, wrong


cdef void *_race_read(void *arg) noexcept nogil:
    """What an engine thread does to the table: pin it, look up a batch of addresses, let go; again until told."""
    cdef _race_reader *r = <_race_reader *>arg
    cdef const pt_table *t
    cdef uint64_t leaf
    cdef Py_ssize_t i
    while not __atomic_load_n(&r.stop, __ATOMIC_ACQUIRE):
        t = pt_acquire(r.h, READER_TEST)
        for i in range(r.nprobes):
            leaf = pt_lookup(t, r.probes[i])
            if pt_routed(leaf) and pt_leaf_hop(leaf).addr != r.peer_a and pt_leaf_hop(leaf).addr != r.peer_b:
                r.wrong += 1
        for i in range(r.nprobes6):
            leaf = pt_lookup6(t, r.probes6 + 16 * i)
            if pt_routed(leaf) and pt_leaf_hop(leaf).addr != r.peer_a and pt_leaf_hop(leaf).addr != r.peer_b:
                r.wrong += 1
        pt_release(r.h, READER_TEST)
        r.rounds += 1
    return NULL


def race(PrefixTable table, batches: list, const uint32_t[:] probes, str peer_a, str peer_b,
                     const uint8_t[:] probes6 = None) -> tuple:
    """Apply each (set, delete) batch while a C thread keeps looking the probes up, as an engine thread does;
    (lookup rounds done, leaves seen with a peer other than peer_a/peer_b). Under AddressSanitizer (make debug)
    a node freed while a reader could still hold it is reported."""
    cdef _race_reader r
    cdef pthread_t thread
    memset(&r, 0, sizeof(r))
    r.h = &table._h
    r.probes = &probes[0]
    r.nprobes = probes.shape[0]
    if probes6 is not None and probes6.shape[0] >= 16:
        r.probes6 = &probes6[0]
        r.nprobes6 = probes6.shape[0] // 16
    r.peer_a = htonl(int(ipaddress.IPv4Address(peer_a)))
    r.peer_b = htonl(int(ipaddress.IPv4Address(peer_b)))
    if pthread_create(&thread, NULL, _race_read, &r) != 0:
        raise OSError("pthread_create failed")
    try:
        for sets, deletes in batches:
            table.update(set=sets, delete=deletes)
    finally:
        __atomic_store_n(&r.stop, 1, __ATOMIC_RELEASE)
        with nogil:
            pthread_join(thread, NULL)
    return r.rounds, r.wrong


cdef enum:
    SLOT_RACE_HELD = 256         # slots remembered per pin (the first pass's)
    SLOT_RACE_PASSES = 64        # passes over the probes per pin

ctypedef struct _slot_reader:
    pt_handle *h
    peer_table *peers
    peer6_table *peers6
    const uint32_t *probes       # host order: an address in IPv4 prefix k at index k
    Py_ssize_t nprobes
    const uint8_t *probes6       # an address in IPv6 prefix k at 16 * k
    Py_ssize_t nprobes6
    const uint8_t *held_at[SLOT_RACE_HELD]   # per slot found in one pin: where its peer's address is ...
    uint8_t held_addr[SLOT_RACE_HELD][16]    # ... and what it was then
    int held_len[SLOT_RACE_HELD]
    Py_ssize_t nheld
    int stop
    uint64_t rounds, found, wrong


cdef void _slot_hold(_slot_reader *r, uint64_t leaf, Py_ssize_t k) noexcept nogil:
    """What an engine thread does with a route's hop: find its peer's slot (by number for an IPv6 peer, by
    address for an IPv4 one) and count into it; and remember where the slot keeps the peer's address and what
    it was. The racing writer routes prefix k only to peers whose address ends in the byte k."""
    cdef pt_hop hop
    cdef peer_slot *s
    cdef const uint8_t *at
    cdef int alen
    if not pt_routed(leaf):
        return
    hop = pt_leaf_hop(leaf)
    if hop.v6:
        at = r.peers6.slot[hop.addr].addr
        alen = 16
        s = &r.peers6.slot[hop.addr].peer
    else:
        s = peer_find(r.peers, hop.addr)
        if s == NULL:   # the peer is leaving: its slot is found no more
            return
        at = <const uint8_t *>&s.addr
        alen = 4
    if at[alen - 1] != k or (alen == 16 and at[14] != 0):
        r.wrong += 1
    peer_add(&s.tx_packets, 1)
    r.found += 1
    if r.nheld == SLOT_RACE_HELD:
        return
    r.held_at[r.nheld] = at
    r.held_len[r.nheld] = alen
    memcpy(r.held_addr[r.nheld], at, alen)
    r.nheld += 1


cdef void *_slot_read(void *arg) noexcept nogil:
    """Pin the table, follow every probe's route to its peer's slot over and over (a batch's worth of time),
    then check that no slot held in this pin changed owner: a slot reused under a reader shows up as a changed
    address."""
    cdef _slot_reader *r = <_slot_reader *>arg
    cdef const pt_table *t
    cdef Py_ssize_t k, i, again
    while not __atomic_load_n(&r.stop, __ATOMIC_ACQUIRE):
        t = pt_acquire(r.h, READER_TEST)
        r.nheld = 0
        for again in range(SLOT_RACE_PASSES):
            for k in range(r.nprobes):
                _slot_hold(r, pt_lookup(t, r.probes[k]), k)
            for k in range(r.nprobes6):
                _slot_hold(r, pt_lookup6(t, r.probes6 + 16 * k), k)
        for i in range(r.nheld):
            if memcmp(r.held_at[i], r.held_addr[i], r.held_len[i]) != 0:
                r.wrong += 1
        pt_release(r.h, READER_TEST)
        r.rounds += 1
    return NULL


def slot_race(PrefixTable table, batches: list, const uint32_t[:] probes,
                          const uint8_t[:] probes6) -> tuple:
    """Apply each (set, delete) batch while a C thread keeps following the probes' routes to their peers'
    slots, as the engine threads do; (pins done, slots followed, wrong observations: a slot of another peer, or
    one reused while pinned). Under AddressSanitizer (make debug) an index freed too early is reported."""
    cdef _slot_reader *r = <_slot_reader *>calloc(1, sizeof(_slot_reader))
    cdef pthread_t thread
    if r == NULL:
        raise MemoryError()
    if probes.shape[0] + probes6.shape[0] // 16 > SLOT_RACE_HELD:
        raise ValueError("too many probes")
    r.h = &table._h
    r.peers = table._peers
    r.peers6 = table._peers6
    r.probes = &probes[0]
    r.nprobes = probes.shape[0]
    r.probes6 = &probes6[0]
    r.nprobes6 = probes6.shape[0] // 16
    if pthread_create(&thread, NULL, _slot_read, r) != 0:
        free(r)
        raise OSError("pthread_create failed")
    try:
        for sets, deletes in batches:
            table.update(set=sets, delete=deletes)
    finally:
        __atomic_store_n(&r.stop, 1, __ATOMIC_RELEASE)
        with nogil:
            pthread_join(thread, NULL)
    result = r.rounds, r.found, r.wrong
    free(r)
    return result


# ---- offload helpers ---------------------------------------------------------------------------------------------

def checksum(const uint8_t[:] data) -> int:
    """The RFC 1071 checksum of data as a number (0 when data already contains a correct checksum field)."""
    return ntohs(csum_finish(csum_partial(&data[0] if len(data) else NULL, len(data), 0)))


def finish_checksum(packet: bytes, csum_start: int, csum_offset: int) -> bytes:
    """Complete a CHECKSUM_PARTIAL packet (its checksum field holds the pseudo-header seed)."""
    cdef bytearray out = bytearray(packet)
    cdef vnet_hdr h
    memset(&h, 0, sizeof(h))
    h.csum_start = csum_start
    h.csum_offset = csum_offset
    if vnet_finish_csum(<uint8_t *><char *>out, len(out), &h) < 0:
        raise ValueError("checksum offsets outside the packet")
    return bytes(out)


def split(packet: bytes, gso_type: int, gso_size: int) -> list[bytes]:
    """Segments of a TSO/USO super-packet (IPv4 or IPv6), as the TX thread sends them; ValueError if it is
    malformed."""
    cdef const uint8_t[:] src = packet
    cdef uint16_t lens[SPLIT_SEGS]
    cdef bytearray out = bytearray(len(packet) + SPLIT_SEGS * 120)
    cdef int n = gso_split(&src[0], len(packet), gso_type, gso_size, <uint8_t *><char *>out, len(out), lens,
                           SPLIT_SEGS)
    if n < 0:
        raise ValueError("not a splittable super-packet")
    segments, off = [], 0
    for i in range(n):
        segments.append(bytes(out[off:off + lens[i]]))
        off += lens[i]
    return segments


cdef gro_table *_coalesced(list bufs, bint udp) except NULL:
    """A table with every buffer of `bufs` (bytearrays, worked on in place as receive buffers are) added in
    order, as the RX thread adds a batch; the caller frees it."""
    cdef gro_table *t = new_gro_table(max(len(bufs), 1), min(max(len(bufs), 1), 64))
    if t == NULL:
        raise MemoryError()
    t.udp = udp
    for buf in bufs:
        if gro_add(t, <uint8_t *><char *>buf, len(buf)) < 0:
            free_gro_table(t)
            raise ValueError("too many packets")
    return t


cdef bytes _iov_bytes(const iovec *v):
    return (<const char *>v.iov_base)[:v.iov_len]


def coalesce(packets: list[bytes], udp: bool = False,
             refused: bool = False) -> list[tuple[tuple[int, int, int, int, int, int], bytes]]:
    """What the RX thread writes to the TUN for these packets: (virtio header fields, packet) per write, a merged
    packet gathered from its iovecs; with `udp`, as when the TUN takes USO; with `refused`, as after the kernel
    refused GSO writes (each merged packet unmerged and written packet by packet).

    Header fields are (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset).
    """
    cdef list keep = [bytearray(p) for p in packets]
    cdef gro_table *t = _coalesced(keep, udp)
    cdef gro_item *it
    cdef vnet_hdr h
    cdef int i, k
    try:
        out = []
        for i in range(t.nitems):
            it = &t.items[i]
            gro_finish(it, &h)
            if it.segs < 2:
                out.append(((0, 0, 0, 0, 0, 0), bytes(it.pkt[:it.len])))
            elif refused:
                gro_unmerge(it)
                for k in range(1, it.segs + 1):
                    out.append(((0, 0, 0, 0, 0, 0), _iov_bytes(&it.iov[k])))
            else:
                out.append(((h.flags, h.gso_type, h.hdr_len, h.gso_size, h.csum_start, h.csum_offset),
                            b"".join([_iov_bytes(&it.iov[k]) for k in range(1, it.segs + 1)])))
        return out
    finally:
        free_gro_table(t)


cdef tuple _locate(list bufs, const iovec *v):
    """(index of the buffer of `bufs` that v points into, offset there, length); index -1: none of them."""
    cdef size_t at = <size_t>v.iov_base, start
    for index, buf in enumerate(bufs):
        start = <size_t><char *>buf
        if start <= at < start + len(buf):
            return index, at - start, v.iov_len
    return -1, 0, v.iov_len


def coalesce_iovecs(packets: list[bytes], udp: bool = False) -> list[list[tuple[int, int, int]]]:
    """Where the data of each write lies: (index of the packet, offset in it, length) per iovec after the
    virtio header, index -1 for data outside every packet (a copy)."""
    cdef list keep = [bytearray(p) for p in packets]
    cdef gro_table *t = _coalesced(keep, udp)
    cdef gro_item *it
    cdef iovec lone
    cdef int i, k
    try:
        out = []
        for i in range(t.nitems):
            it = &t.items[i]
            if it.segs > 1:
                out.append([_locate(keep, &it.iov[k]) for k in range(1, it.segs + 1)])
            else:
                lone.iov_base = it.pkt
                lone.iov_len = it.len
                out.append([_locate(keep, &lone)])
        return out
    finally:
        free_gro_table(t)


# ---- steering ----------------------------------------------------------------------------------------------------

def steered_queue(const uint8_t[:] packet, int queues) -> int:
    """The queue (socket index) the attached program picks for a datagram carrying `packet`."""
    return steer_hash(&packet[0] if len(packet) else NULL, len(packet)) % queues


def steer_counts(const uint8_t[:] packets, int size, int queues) -> list[int]:
    """How many of `packets` (`size` bytes each, back to back) go to each queue: the engine's hash in a C loop,
    for bench/micro.py."""
    cdef uint64_t counts[STEER_MAX]
    cdef Py_ssize_t off = 0
    if not 1 <= queues <= STEER_MAX or size < 1:
        raise ValueError("queues or size out of range")
    memset(counts, 0, sizeof(counts))
    with nogil:
        while off + size <= packets.shape[0]:
            counts[steer_hash(&packets[off], size) % queues] += 1
            off += size
    return [counts[i] for i in range(queues)]
