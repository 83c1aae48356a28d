# Allocation of the coalescing table, and Python entry points to the pure-C offload helpers so that they can be
# tested and measured without a TUN device (tests/test_offload.py, bench/micro).

from libc.stdlib cimport calloc, free

GSO_TCPV4 = VNET_GSO_TCPV4
GSO_UDP_L4 = VNET_GSO_UDP_L4
GSO_TCPV6 = VNET_GSO_TCPV6


cdef gro_table *new_gro_table(int max_items, int npool) noexcept:
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
