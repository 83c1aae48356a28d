# TX: flannel0 -> the wire. One quantum of a bucket: read the bucket's TUN queue, check and route each packet
# (splitting TSO super-packets into segments straight into the send arena), then send what was read through the
# bucket's socket of each peer's family, with sendmmsg and, where sizes allow, UDP_SEGMENT trains.
#
# What is checked here, whatever a local process wrote into flannel0 (the kernel does not check: a packet socket on
# flannel0 can write anything): header length, total length and header checksum of every whole packet, and, given
# this node's subnets, that the inner source is in the one of its family (flannel0's own addresses are). The far
# end would drop such packets anyway; here they cost no bandwidth and are counted where they came from. The TTL
# (hop limit) is decremented, as flannel's proxy does, so one overlay hop costs two; unlike flannel (whose
# decrement wraps 0 to 255) a packet that would reach 0 is dropped, an IPv6 one answered with time exceeded.
# flannel0's own IPv6 link traffic (to multicast, from link-local: neighbour discovery, MLD) never crosses.


cdef bint tx_bucket(engine *e, bucket *b) noexcept nogil:
    """One quantum of a bucket's TUN queue: up to `batch` segments read, routed and sent. True if it used the whole
    quantum (the queue may hold more)."""
    cdef const pt_table *t = pt_acquire(e.routes, e.reader[SIDE_TX])
    cdef tx_state *tx = &e.tx
    cdef ssize_t r
    cdef bint full = True
    cdef iovec iov[2]
    tx.last_len = 0
    iov[0].iov_base = &tx.hdr
    iov[0].iov_len = VNET_HDR_LEN
    iov[1].iov_base = tx.rbuf
    iov[1].iov_len = READ_MAX
    while tx.nseg < e.batch and tx.pos < ARENA and tx.nseg <= MAX_SEGS - SPLIT_SEGS:
        if e.vnet_hdr:
            r = readv(b.tun, iov, 2)
        else:
            r = read(b.tun, tx.arena + tx.pos, READ_MAX)
        if r < 0:
            if errno == EINTR:
                continue
            if errno != EAGAIN:
                fail(e, SIDE_TX, errno)    # a TUN read fails only when the device is gone
            full = False
            break
        e.counters[C_tun_reads] += 1
        if not e.vnet_hdr:
            tx_packet(e, b, t, tx.arena + tx.pos, r)
        elif r < VNET_HDR_LEN:      # no room for even the header: nothing the kernel writes, but never a length
            e.counters[C_tx_malformed] += 1
        else:
            tx_offloaded(e, b, t, r - VNET_HDR_LEN)
    tx_flush(e, b)
    pt_release(e.routes, e.reader[SIDE_TX])   # after the send: the routes' hops name peer slots
    return full


cdef uint64_t tx_route(engine *e, bucket *b, const pt_table *t, uint8_t *p, ssize_t n, bint whole) noexcept nogil:
    """Checks shared by every TUN packet: IPv4, its header (length and checksum too for a `whole` packet, not a
    super-packet about to be split), a source of this node (with a local subnet), a route, TTL (decremented); the
    route's leaf, 0 to drop."""
    cdef unsigned ihl
    if n >= 1 and (p[0] >> 4) == 6:
        return tx_route6(e, b, t, p, n, whole)
    if n < 1 or (p[0] >> 4) != 4:
        e.counters[C_tx_not_ip] += 1
        return 0
    ihl = (p[0] & 0x0f) * 4
    if n < 20 or ihl < 20 or ihl > n or (whole and ntohs(load16(p + 2)) != n):
        e.counters[C_tx_malformed] += 1
        return 0
    if whole and csum_fold(csum_partial(p, ihl, 0)) != 0xffff:
        e.counters[C_tx_bad_checksum] += 1
        return 0
    if e.check_tx_source and (not e.has_subnet4 or (ntohl(load32(p + 12)) & e.local_mask) != e.local_net):
        e.counters[C_tx_spoofed_source] += 1
        return 0
    cdef uint64_t leaf = tx_lookup(e, t, p + 16, 4)
    if not pt_routed(leaf):
        e.counters[C_tx_no_route] += 1
        icmp_unreachable(e, b.tun, p, n, ihl)
        return 0
    if not ttl_decrement(p):
        e.counters[C_tx_ttl_expired] += 1
        return 0
    return leaf


cdef uint64_t tx_route6(engine *e, bucket *b, const pt_table *t, uint8_t *p, ssize_t n, bint whole) noexcept nogil:
    """tx_route for IPv6: the length (payload length too for a `whole` packet), flannel0's own link traffic, a
    source in this node's IPv6 subnet, a route (else ICMPv6 unreachable), the hop limit (decremented; else ICMPv6
    time exceeded)."""
    if n < IP6_HLEN or (whole and IP6_HLEN + ntohs(load16(p + 4)) != n):
        e.counters[C_tx_malformed] += 1
        return 0
    if ip6_link_scope(p):
        e.counters[C_tx_link_scope] += 1
        return 0
    if e.check_tx_source and not (e.has_subnet6 and ip6_in_prefix(p + 8, e.local_net6, e.local_plen6)):
        e.counters[C_tx_spoofed_source] += 1
        return 0
    cdef uint64_t leaf = tx_lookup(e, t, p + 24, 16)
    if not pt_routed(leaf):
        e.counters[C_tx_no_route] += 1
        icmp6_error(e, b.tun, p, n, ICMP6_DST_UNREACH, C_icmp6_unreachable_sent)
        return 0
    if not hop_limit_decrement(p):
        e.counters[C_tx_ttl_expired] += 1
        icmp6_error(e, b.tun, p, n, ICMP6_TIME_EXCEEDED, C_icmp6_time_exceeded_sent)
        return 0
    return leaf


cdef uint64_t tx_lookup(engine *e, const pt_table *t, const uint8_t *dst, unsigned alen) noexcept nogil:
    """The route's leaf for a destination address (4 or 16 bytes, network order); a run of packets to one
    destination looks it up once per quantum."""
    cdef tx_state *tx = &e.tx
    if alen != tx.last_len or memcmp(dst, tx.last_dst, alen) != 0:
        tx.last_leaf = pt_lookup6(t, dst) if alen == 16 else pt_lookup(t, ntohl(load32(dst)))
        memcpy(tx.last_dst, dst, alen)
        tx.last_len = alen
    return tx.last_leaf


cdef void tx_packet(engine *e, bucket *b, const pt_table *t, uint8_t *p, ssize_t n) noexcept nogil:
    """One plain packet already in place at the arena's end: route it, or leave it to be overwritten."""
    cdef uint64_t leaf = tx_route(e, b, t, p, n, True)
    if leaf:
        tx_queue(&e.tx, n, pt_leaf_hop(leaf))


cdef inline void tx_queue(tx_state *tx, size_t n, pt_hop hop) noexcept nogil:
    tx.seg_off[tx.nseg] = tx.pos
    tx.seg_len[tx.nseg] = n
    tx.seg_hop[tx.nseg] = hop
    tx.nseg += 1
    tx.pos += n


cdef void tx_offloaded(engine *e, bucket *b, const pt_table *t, ssize_t n) noexcept nogil:
    """One read with a virtio header (in hdr, packet in rbuf): finish its checksum or split it."""
    cdef tx_state *tx = &e.tx
    cdef vnet_hdr *hdr = &tx.hdr
    cdef int nseg, i
    cdef uint64_t leaf = tx_route(e, b, t, tx.rbuf, n, hdr.gso_type == VNET_GSO_NONE)
    if leaf == 0:
        return
    if hdr.gso_type == VNET_GSO_NONE:
        if hdr.flags & VNET_F_NEEDS_CSUM and vnet_finish_csum(tx.rbuf, n, hdr) < 0:
            e.counters[C_tx_malformed] += 1
            return
        memcpy(tx.arena + tx.pos, tx.rbuf, n)
        tx_queue(tx, n, pt_leaf_hop(leaf))
        return
    nseg = gso_split(tx.rbuf, n, hdr.gso_type, hdr.gso_size, tx.arena + tx.pos, ARENA + ARENA_SLACK - tx.pos,
                     tx.seg_len + tx.nseg, SPLIT_SEGS)
    if nseg < 0:
        e.counters[C_tx_malformed] += 1
        return
    e.counters[C_tun_super_packets] += 1
    for i in range(nseg):
        tx_queue(tx, tx.seg_len[tx.nseg], pt_leaf_hop(leaf))


# ---- sending ------------------------------------------------------------------------------------------------------

cdef void tx_flush(engine *e, bucket *b) noexcept nogil:
    """Send every queued packet, up to `batch` messages per sendmmsg (each through the bucket's socket of its
    peer's family), redoing without GSO if GSO fails."""
    cdef tx_state *tx = &e.tx
    cdef int i = 0, m, failed
    cdef bint v6
    while i < tx.nseg:
        m = 0
        v6 = tx.seg_hop[i].v6
        while i < tx.nseg and m < e.batch and tx.seg_hop[i].v6 == v6:
            i = tx_message(e, m, i)
            m += 1
        failed = tx_send(e, m, b.sock[FAM6 if v6 else FAM4])
        if failed >= 0:
            i = tx.msg_first[failed]
    tx.nseg = 0
    tx.pos = 0


cdef int tx_message(engine *e, int m, int i) noexcept nogil:
    """Message m from segment i on: one datagram, or with GSO a run of equal-size segments to one peer (a shorter
    one may end it, at most GSO_MAX_SEGS, never a one-segment GSO send) whose inner packets the peer's buckets
    steer alike (steering.h: a train arrives as one datagram, steered by its first packet). The next segment."""
    cdef tx_state *tx = &e.tx
    cdef int first = i, count = 1
    cdef size_t size = tx.seg_len[i], total = size
    cdef pt_hop hop = tx.seg_hop[i]
    cdef uint32_t flow
    i += 1
    if e.gso:
        flow = steer_hash(tx.arena + tx.seg_off[first], size)
        while (i < tx.nseg and count < GSO_MAX_SEGS and tx.seg_len[i] <= size
               and tx.seg_hop[i].addr == hop.addr and tx.seg_hop[i].port == hop.port and tx.seg_hop[i].v6 == hop.v6
               and total + tx.seg_len[i] <= UDP_MAX_PAYLOAD and tx.seg_off[i] == tx.seg_off[first] + total
               and steer_hash(tx.arena + tx.seg_off[i], tx.seg_len[i]) == flow):
            total += tx.seg_len[i]
            count += 1
            i += 1
            if tx.seg_len[i - 1] < size:
                break
    tx.iov[m].iov_base = tx.arena + tx.seg_off[first]
    tx.iov[m].iov_len = total
    tx.msgs[m].msg_hdr.msg_name = &tx.addr[m]
    tx.msgs[m].msg_hdr.msg_namelen = tx_address(e, &tx.addr[m], hop)
    tx.msgs[m].msg_hdr.msg_iov = &tx.iov[m]
    tx.msgs[m].msg_hdr.msg_iovlen = 1
    if count > 1:
        cmsg_set_segment(&tx.msgs[m].msg_hdr, tx.cmsg + <size_t>m * CMSG_ROOM, size)
    else:
        tx.msgs[m].msg_hdr.msg_control = NULL
        tx.msgs[m].msg_hdr.msg_controllen = 0
    tx.msg_segs[m] = count
    tx.msg_first[m] = first
    return i


cdef unsigned tx_address(engine *e, sockaddr_in6 *sa, pt_hop hop) noexcept nogil:
    """Fill in the peer's socket address (an IPv6 peer's from its slot); its length."""
    cdef sockaddr_in *sa4 = <sockaddr_in *>sa
    if hop.v6:
        memset(sa, 0, sizeof(sockaddr_in6))
        sa.sin6_family = AF_INET6
        sa.sin6_port = hop.port
        memcpy(sa.sin6_addr.s6_addr, e.peers6.slot[hop.addr].addr, 16)
        return sizeof(sockaddr_in6)
    sa4.sin_family = AF_INET
    sa4.sin_port = hop.port
    sa4.sin_addr.s_addr = hop.addr
    return sizeof(sockaddr_in)


cdef int tx_send(engine *e, int nmsg, int fd) noexcept nogil:
    """sendmmsg the prepared messages, resuming after partial sends and waiting out a full socket buffer (but never
    past stop()). Returns -1, or the index of a GSO message the kernel refused (GSO is then off: rebuild from
    there)."""
    cdef tx_state *tx = &e.tx
    cdef int start = 0, r, i
    cdef pollfd fds[2]
    if fd < 0:      # a route to a peer of a family with no underlay socket (the control side prevents it)
        for i in range(nmsg):
            e.counters[C_tx_send_error] += tx.msg_segs[i]
        return -1
    while start < nmsg:
        r = sendmmsg(fd, tx.msgs + start, nmsg - start, 0)
        if r > 0:
            e.counters[C_tx_send_calls] += 1
            tx_count(e, start, start + r)
            start += r
        elif errno == EINTR:
            continue
        elif errno == EAGAIN:
            fds[0].fd = fd
            fds[0].events = POLLOUT
            fds[1].fd = e.stop_fd
            fds[1].events = POLLIN
            poll(fds, 2, -1)
            if fds[1].revents:
                return -1
        elif errno == EIO and tx.msg_segs[start] > 1:
            # UDP_SEGMENT needs checksum offload on the egress device; without it the kernel says EIO.
            e.gso = False
            e.counters[C_gso_fallbacks] += 1
            return start
        elif fd_dead(errno):
            fail(e, SIDE_TX, errno)
            return -1
        else:
            # The message at `start` was refused (no route to the peer, EPERM from a firewall, ...).
            e.counters[C_tx_send_error] += tx.msg_segs[start]
            start += 1
    return -1


cdef void tx_count(engine *e, int first, int end) noexcept nogil:
    """Count the sent messages first..end-1: the totals once, and each peer once per run of messages to it (a
    batch mostly goes to one peer: one lookup and two atomic adds, not one per message)."""
    cdef tx_state *tx = &e.tx
    cdef uint64_t packets = 0, nbytes = 0, gso = 0, run_packets = 0, run_bytes = 0
    cdef int i
    cdef pt_hop hop, prev
    for i in range(first, end):
        hop = tx.seg_hop[tx.msg_first[i]]
        if i > first and (hop.addr != prev.addr or hop.v6 != prev.v6):
            peer_count(tx_peer(e, prev), run_packets, run_bytes, True)
            packets += run_packets
            nbytes += run_bytes
            run_packets = run_bytes = 0
        prev = hop
        run_packets += tx.msg_segs[i]
        run_bytes += tx.iov[i].iov_len
        gso += tx.msg_segs[i] > 1
    peer_count(tx_peer(e, prev), run_packets, run_bytes, True)
    e.counters[C_tx_packets] += packets + run_packets
    e.counters[C_tx_bytes] += nbytes + run_bytes
    e.counters[C_tx_gso_messages] += gso


cdef inline peer_slot *tx_peer(engine *e, pt_hop hop) noexcept nogil:
    """The counters of the peer a route leads to (an IPv6 peer's slot is in the hop), NULL if none."""
    return &e.peers6.slot[hop.addr].peer if hop.v6 else peer_find(e.peers, hop.addr)
