# RX: the wire -> flannel0. One quantum of a bucket's socket: recvmmsg (a message is one datagram, or with UDP_GRO
# a train of them cut at gso_size), validate each inner packet and check its sender, decrement its TTL, and write
# it into the bucket's TUN queue, consecutive segments of one flow merged into one GSO write when the TUN takes
# them.
#
# What is validated: IPv4: version, header length, total length, header checksum; IPv6: a whole header and a
# payload length that fits. The sender check: the outer source address (either family) must be the peer that owns
# the inner source's subnet (either family). flannel accepts any datagram from anyone, which lets any host that can
# reach port 8285 inject packets into the pod network; it is still no authentication (an outer address can be
# forged), which is why there is a way to turn it off (where NAT changes the sender).

cdef enum:
    RX_QUANTUM = 256 << 10   # bytes a bucket's socket gives per turn: a bulk flow's turn keeps others waiting ~30 us


cdef void rx_setup(engine *e) noexcept nogil:
    """Point each receive message at its slot, address and control room (once, before any thread runs)."""
    cdef rx_state *rx = &e.rx
    cdef int i
    for i in range(e.batch):
        rx.iov[i].iov_base = rx.bufs + <size_t>i * SLOT
        rx.iov[i].iov_len = SLOT
        rx.msgs[i].msg_hdr.msg_iov = &rx.iov[i]
        rx.msgs[i].msg_hdr.msg_iovlen = 1
        rx.msgs[i].msg_hdr.msg_name = &rx.addr[i]
        rx.msgs[i].msg_hdr.msg_control = rx.cmsg + <size_t>i * CMSG_ROOM
    for i in range(e.nbuckets):
        e.buckets[i].rx_msgs = e.batch


cdef bint rx_bucket(engine *e, bucket *b, int family) noexcept nogil:
    """One quantum of a bucket's socket of one family: one receive, delivered. True if it got all it asked for
    (the socket may hold more). How many messages it asks for follows the size of the last ones, so that a turn is
    about RX_QUANTUM bytes whether they come as 64 KiB GRO trains or as single small datagrams."""
    cdef rx_state *rx = &e.rx
    cdef int i, r, gso_size, want = b.rx_msgs
    cdef uint64_t nbytes = 0
    for i in range(want):
        rx.msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_in6)
        rx.msgs[i].msg_hdr.msg_controllen = CMSG_ROOM
    r = recvmmsg(b.sock[family], rx.msgs, want, MSG_DONTWAIT, NULL)
    if r <= 0:
        if r < 0 and fd_dead(errno):
            fail(e, SIDE_RX, errno)
        return False
    e.counters[C_rx_recv_calls] += 1
    cdef const pt_table *t = pt_acquire(e.routes, e.reader[SIDE_RX])
    rx.last_len = 0
    for i in range(r):
        cmsg_parse_rx(&rx.msgs[i].msg_hdr, &gso_size, &b.overflow[family])
        rx_message(e, b, t, rx.bufs + <size_t>i * SLOT, rx.msgs[i].msg_len, gso_size, &rx.addr[i])
        nbytes += rx.msgs[i].msg_len
    rx_count_peer(e, &rx.run_peer, rx.run_packets, rx.run_bytes)
    rx.run_packets = rx.run_bytes = 0
    pt_release(e.routes, e.reader[SIDE_RX])   # after the last count: the counts are in peer slots
    if e.coalesce:
        rx_write_coalesced(e, b)
    b.rx_msgs = <uint32_t>max(1, min(e.batch, RX_QUANTUM * r // max(nbytes, 1)))
    return r == want


cdef uint64_t rx_socket_drops(engine *e) noexcept nogil:
    """What the kernel dropped on the engine's full socket buffers, all buckets and families (SO_RXQ_OVFL)."""
    cdef uint64_t total = 0
    cdef int i
    for i in range(e.nbuckets):
        total += <uint64_t>e.buckets[i].overflow[FAM4] + e.buckets[i].overflow[FAM6]
    return total


cdef void rx_message(engine *e, bucket *b, const pt_table *t, uint8_t *p, size_t n, int gso_size,
                     const sockaddr_in6 *src) noexcept nogil:
    """One received message: a datagram, or with UDP_GRO a train cut at gso_size; what was accepted is counted for
    the sending peer (after validation, so made-up senders are never counted), once the batch or the run of
    messages from that peer ends."""
    cdef rx_state *rx = &e.rx
    cdef size_t off = 0, size = n
    cdef uint64_t packets = 0, nbytes = 0
    cdef unsigned got
    if 0 < gso_size < <ssize_t>n:
        e.counters[C_rx_gro_trains] += 1
        size = gso_size
    while True:     # at least once: an empty datagram is dropped (and counted) too
        got = rx_packet(e, b, t, p + off, min(size, n - off), src)
        packets += got != 0
        nbytes += got
        off += size
        if off >= n:
            break
    if not packets:
        return
    if not same_sender(src, &rx.run_peer):
        rx_count_peer(e, &rx.run_peer, rx.run_packets, rx.run_bytes)
        rx.run_peer = src[0]
        rx.run_packets = rx.run_bytes = 0
    rx.run_packets += packets
    rx.run_bytes += nbytes


cdef void rx_count_peer(engine *e, const sockaddr_in6 *src, uint64_t packets, uint64_t nbytes) noexcept nogil:
    """What a run of messages from src carried, counted for its peer (none if src is no configured peer)."""
    cdef peer6_slot *peer6
    cdef peer_slot *peer
    if not packets:
        return
    if src.sin6_family == AF_INET6:
        peer6 = peer6_find(e.peers6, src.sin6_addr.s6_addr)
        peer = &peer6.peer if peer6 else NULL
    else:
        peer = peer_find(e.peers, (<const sockaddr_in *>src).sin_addr.s_addr)
    peer_count(peer, packets, nbytes, False)


cdef unsigned rx_packet(engine *e, bucket *b, const pt_table *t, uint8_t *p, size_t n,
                        const sockaddr_in6 *src) noexcept nogil:
    """Validate one datagram from the wire, check its sender, and write (or queue) it for the TUN; its length, or
    0 if it was dropped."""
    cdef unsigned ihl, total
    if n >= 1 and (p[0] >> 4) == 6:
        return rx_packet6(e, b, t, p, n, src)
    if n < 20:
        e.counters[C_rx_short] += 1
        return 0
    if (p[0] >> 4) != 4:
        e.counters[C_rx_not_ip] += 1
        return 0
    ihl = (p[0] & 0x0f) * 4
    if ihl < 20:
        e.counters[C_rx_bad_ihl] += 1
        return 0
    total = ntohs(load16(p + 2))
    if total > n or total < ihl:
        e.counters[C_rx_bad_length] += 1
        return 0
    if csum_fold(csum_partial(p, ihl, 0)) != 0xffff:
        e.counters[C_rx_bad_checksum] += 1
        return 0
    if e.check_source and not sender_ok(e, t, p + 12, 4, src):
        return 0
    if not ttl_decrement(p):
        e.counters[C_rx_ttl_expired] += 1
        return 0
    return rx_accept(e, b, p, total)


cdef unsigned rx_packet6(engine *e, bucket *b, const pt_table *t, uint8_t *p, size_t n,
                         const sockaddr_in6 *src) noexcept nogil:
    """rx_packet for an inner IPv6 packet: a whole header, a payload length that fits, the sender (the peer owning
    the inner source's IPv6 subnet), the hop limit."""
    cdef unsigned total
    if n < IP6_HLEN:
        e.counters[C_rx_short] += 1
        return 0
    total = IP6_HLEN + ntohs(load16(p + 4))
    if total > n:
        e.counters[C_rx_bad_length] += 1
        return 0
    if e.check_source and not sender_ok(e, t, p + 8, 16, src):
        return 0
    if not hop_limit_decrement(p):
        e.counters[C_rx_ttl_expired] += 1
        return 0
    return rx_accept(e, b, p, total)


cdef unsigned rx_accept(engine *e, bucket *b, uint8_t *p, unsigned total) noexcept nogil:
    """Count a packet that passed every check and write it (or queue it for coalescing); its length."""
    e.counters[C_rx_packets] += 1
    e.counters[C_rx_bytes] += total
    if e.coalesce:
        if gro_add(e.rx.flows, p, total) < 0:
            rx_write_coalesced(e, b)
            gro_add(e.rx.flows, p, total)
    else:
        rx_write(e, b, p, total)
    return total


cdef void rx_write(engine *e, bucket *b, uint8_t *p, size_t n) noexcept nogil:
    if tun_write_plain(e, b.tun, p, n, SIDE_RX) == 0:
        e.counters[C_tun_writes] += 1
    else:
        e.counters[C_rx_tun_write_error] += 1


cdef void rx_write_coalesced(engine *e, bucket *b) noexcept nogil:
    """Write every item of the batch, merged ones as GSO packets gathered by one writev from where their segments
    were received; then start a new batch. A merged write the kernel refuses with EINVAL (the 6.6.44-era virtio
    header regression) turns coalescing off, and its segments are written as they arrived."""
    cdef gro_table *flows = e.rx.flows
    cdef int i, k, err
    cdef gro_item *it
    cdef vnet_hdr hdr
    for i in range(flows.nitems):
        it = &flows.items[i]
        gro_finish(it, &hdr)
        if it.segs < 2:
            err = tun_write(e, b.tun, &hdr, it.pkt, it.len, SIDE_RX)
        elif e.coalesce:
            err = tun_writev(e, b.tun, it.iov, it.segs + 1, VNET_HDR_LEN + it.len, SIDE_RX)
        else:
            err = EINVAL
        if err == 0:
            e.counters[C_tun_writes] += 1
            e.counters[C_tun_coalesced_writes] += it.segs > 1
            continue
        if err != EINVAL or it.segs < 2:
            e.counters[C_rx_tun_write_error] += it.segs
            continue
        if e.coalesce:
            e.coalesce = False
            e.counters[C_coalesce_fallbacks] += 1
        gro_unmerge(it)
        for k in range(1, it.segs + 1):
            rx_write(e, b, <uint8_t *>it.iov[k].iov_base, it.iov[k].iov_len)
    gro_reset(flows)


cdef bint sender_ok(engine *e, const pt_table *t, const uint8_t *inner, unsigned alen,
                    const sockaddr_in6 *src) noexcept nogil:
    """The outer source must be the peer whose subnet holds the inner source (`inner`, alen bytes: 4 or 16; routed
    to a peer of either family); counts the drop if not, as spoofed (a configured peer) or unknown (anyone else),
    both O(1). A run of packets from one inner source and peer is looked up once per batch."""
    cdef rx_state *rx = &e.rx
    if alen == rx.last_len and memcmp(inner, rx.last_src, alen) == 0 and same_sender(src, &rx.last_peer):
        return True
    cdef uint64_t leaf = pt_lookup6(t, inner) if alen == 16 else pt_lookup(t, ntohl(load32(inner)))
    cdef pt_hop hop = pt_leaf_hop(leaf)
    cdef uint32_t addr4 = (<const sockaddr_in *>src).sin_addr.s_addr
    cdef bint v6 = src.sin6_family == AF_INET6
    if pt_routed(leaf) and hop.v6 == v6 and (
            memcmp(e.peers6.slot[hop.addr].addr, src.sin6_addr.s6_addr, 16) == 0 if v6 else hop.addr == addr4):
        memcpy(rx.last_src, inner, alen)
        rx.last_len = alen
        rx.last_peer = src[0]
        return True
    if peer6_configured(e.peers6, src.sin6_addr.s6_addr) if v6 else peer_configured(e.peers, addr4):
        e.counters[C_rx_spoofed_source] += 1
    else:
        e.counters[C_rx_unknown_peer] += 1
    return False
