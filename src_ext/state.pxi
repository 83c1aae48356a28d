# The engine's state: one C struct per engine, allocated once, read and written only by the thread that holds the
# side it belongs to (TX or RX, see worker.pxi), and the small helpers every part uses. No Python object in here:
# everything below runs with the GIL released.

from atomics cimport load64, store64, add64, cas64, acquire32, release32, set_once32
from counters cimport *


cdef enum:
    MAX_BATCH = 128          # messages per recvmmsg/sendmmsg
    MAX_BUCKETS = 32         # TUN queues (each with its sockets) one engine serves
    SLOT = 65536             # one datagram (or one UDP_GRO train) per receive slot
    READ_MAX = 65535         # one TUN read: an IPv4 packet (or TSO super-packet) up to 64 KiB
    ARENA = 1 << 20          # TX bytes collected before a flush
    ARENA_SLACK = 1 << 19    # room past ARENA for the segments of one last super-packet (SPLIT_SEGS headers)
    MAX_SEGS = 4096          # TX packets collected before a flush
    SPLIT_SEGS = 2048        # segments of one super-packet: 64 KiB at the kernel's smallest MSS (48, tcp_min_snd_mss)
    RX_PACKETS = MAX_BATCH * GSO_MAX_SEGS   # inner packets one receive batch can hold with UDP_GRO
    GRO_POOL = 64            # merged packets (iovec lists) per batch
    UDP_MAX_PAYLOAD = 65507  # 65535 - IPv4 header - UDP header
    ICMP_QUOTE = 8           # payload bytes of the offending packet quoted after its IP header
    SIDE_TX = 0              # the two sides of an engine: each its failure slot and its prefix-table reader
    SIDE_RX = 1
    FAM4 = 0                 # the underlay families: each bucket's socket of that family
    FAM6 = 1
    AF_INET = 2
    AF_INET6 = 10


cdef enum:                   # what the engine's memory is for (Engine.memory(), engine.pyx MEMORY)
    MEM_RX_SLOTS
    MEM_TX_ARENA
    MEM_TX_READ
    MEM_TX_SEGMENTS
    MEM_GRO_TABLE
    MEM_MESSAGES
    MEM_ENGINE
    MEM_KINDS


# One of the engine's TUN queues and its sockets. The kernel keeps a flow in one bucket both ways (steering.h), so
# serving buckets in turn serves flows in turn: a lone request is not queued behind a bulk transfer's data.
cdef struct bucket:
    int tun
    int sock[2]                     # per underlay family (FAM4, FAM6); -1: none
    uint32_t overflow[2]            # per socket: the kernel's cumulative drop count (SO_RXQ_OVFL)
    bint bulk[2]                    # per side: used its whole quantum last time (served after the others)
    uint32_t rx_msgs                # RX: messages to ask for next time, from the size of the last ones


cdef struct tx_state:
    vnet_hdr hdr                    # the virtio header of the last TUN read
    uint8_t *rbuf                   # one TUN read when the TUN carries virtio headers
    uint8_t *arena                  # packets ready to send, back to back
    size_t pos
    int nseg
    uint32_t *seg_off
    uint16_t *seg_len
    pt_hop *seg_hop
    mmsghdr *msgs
    iovec *iov
    sockaddr_in6 *addr              # room for either family
    uint8_t *cmsg
    int *msg_segs
    int *msg_first
    # the last route looked up in this batch (a run of packets to one destination looks it up once)
    uint8_t last_dst[16]            # network order, last_len bytes (4 or 16; 0: none)
    unsigned last_len
    uint64_t last_leaf
    uint8_t icmp[20 + 8 + 60 + ICMP_QUOTE]
    uint8_t icmp6[IP6_MIN_MTU]


cdef struct rx_state:
    uint8_t *bufs
    mmsghdr *msgs
    iovec *iov
    sockaddr_in6 *addr              # room for either family
    uint8_t *cmsg
    gro_table *flows
    # the last sender accepted in this batch (a run from one inner source and peer is checked once)
    uint8_t last_src[16]            # the inner source, last_len bytes (0: none) ...
    unsigned last_len
    sockaddr_in6 last_peer          # ... from this outer source
    # what the messages from one sender in a row added up to, counted for that peer once the run ends
    sockaddr_in6 run_peer
    uint64_t run_packets, run_bytes


cdef struct engine:
    # configuration, fixed at construction
    int batch
    bint check_source
    bint check_tx_source            # TX: the inner source must be in this node's subnet of its family
    bint has_subnet4, has_subnet6
    uint32_t local_net, local_mask  # host order
    uint8_t local_net6[16]
    unsigned local_plen6
    bint vnet_hdr, gso, gro, coalesce   # gso and coalesce turn themselves off if the kernel refuses them
    long spin_ns                    # how long a thread keeps looking for more work before it sleeps
    int nbuckets
    bucket buckets[MAX_BUCKETS]
    int stop_fd
    # the threads (worker.pxi): whether a helper takes the RX side when one thread is not enough
    bint helper
    uint64_t heavy_permille, light_permille  # when it does (worker.pxi: HEAVY_PERMILLE, LIGHT_PERMILLE)
    int mode                        # LIGHT or HEAVY, changed with release order by the thread leaving a side
    int wake_fd[2]                  # per thread: written when the mode changes
    uint64_t busy_share[2]          # per thread: permille of its last window it was busy
    # shared with the control side and the other engines of the tunnel
    pt_handle *routes
    peer_table *peers               # the table's configured peers: what TX sent to each, what RX accepted
    peer6_table *peers6             # the same for IPv6 peers, and their addresses (routes hold slot indexes)
    int reader[2]                   # per side: its reader slot in the prefix table
    uint64_t *icmp_tat              # the ICMP rate limit (icmp.pxi), shared by the engines of one tunnel
    uint64_t icmp_tat_own
    # per side: the errno it stopped on (0 while it runs), written once with an atomic store
    int failed[2]
    uint64_t counters[N_COUNTERS]
    size_t allocated[MEM_KINDS]     # bytes, by what for (engine.pyx _allocate)
    tx_state tx
    rx_state rx


cdef inline bint stopped(engine *e) noexcept nogil:
    """Either side has stopped for good: the engine's threads return."""
    return acquire32(&e.failed[SIDE_TX]) != 0 or acquire32(&e.failed[SIDE_RX]) != 0


cdef inline void fail(engine *e, int side, int err) noexcept nogil:
    """Stop this side for good with err (the first reason wins; Python reads it through Engine.failure()), and
    with it the engine: the other thread is woken to see it (a parked helper polls nothing else)."""
    cdef uint64_t one = 1
    set_once32(&e.failed[side], err)
    write(e.wake_fd[0], &one, 8)
    write(e.wake_fd[1], &one, 8)


cdef inline bint fd_dead(int err) noexcept nogil:
    """An errno that every later call on the same fd would repeat: the device or socket is gone, so the side must
    stop instead of retrying (a deleted TUN answers EBADFD to every read and write and POLLERR to poll).
    EIO is not here: a TUN that is only down refuses writes with EIO until it is up again."""
    return err == EBADFD or err == EBADF or err == ENODEV or err == ENXIO or err == ENOTSOCK or err == EFAULT


cdef inline uint64_t now_ns() noexcept nogil:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)
    return <uint64_t>t.tv_sec * 1000000000 + t.tv_nsec


cdef inline uint16_t load16(const uint8_t *p) noexcept nogil:
    cdef uint16_t v
    memcpy(&v, p, 2)
    return v


cdef inline uint32_t load32(const uint8_t *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


cdef inline bint ttl_decrement(uint8_t *iph) noexcept nogil:
    """Decrement the TTL with an incremental checksum fix; False (packet to drop) if it would reach 0."""
    if iph[8] <= 1:
        return False
    cdef uint16_t old = load16(iph + 8)
    iph[8] -= 1
    cdef uint16_t check = csum_replace2(load16(iph + 10), old, load16(iph + 8))
    memcpy(iph + 10, &check, 2)
    return True


cdef inline bint hop_limit_decrement(uint8_t *ip6h) noexcept nogil:
    """The IPv6 TTL: no header checksum to fix; False (packet to drop) if it would reach 0."""
    if ip6h[7] <= 1:
        return False
    ip6h[7] -= 1
    return True


cdef inline void peer_count(peer_slot *peer, uint64_t packets, uint64_t nbytes, bint tx) noexcept nogil:
    """Add to a configured peer's counters (tx or rx side); nothing for a stranger (NULL) or for no packets."""
    if peer and packets:
        peer_add(&peer.tx_packets if tx else &peer.rx_packets, packets)
        peer_add(&peer.tx_bytes if tx else &peer.rx_bytes, nbytes)


cdef inline bint same_sender(const sockaddr_in6 *a, const sockaddr_in6 *b) noexcept nogil:
    """The same outer source address (either family; the port does not matter)."""
    if a.sin6_family != b.sin6_family:
        return False
    if a.sin6_family == AF_INET6:
        return memcmp(a.sin6_addr.s6_addr, b.sin6_addr.s6_addr, 16) == 0
    return (<const sockaddr_in *>a).sin_addr.s_addr == (<const sockaddr_in *>b).sin_addr.s_addr


# ---- writes into the TUN (RX's packets, and the ICMP errors TX answers with) --------------------------------------

cdef int tun_write(engine *e, int tun, vnet_hdr *hdr, uint8_t *p, size_t n, int side) noexcept nogil:
    """One packet into a TUN queue, behind its virtio header when the TUN has them; 0 or an errno (a dead TUN
    also stops the side)."""
    cdef iovec iov[2]
    if not e.vnet_hdr:
        return tun_result(e, write(tun, p, n), n, side)
    iov[0].iov_base = hdr
    iov[0].iov_len = VNET_HDR_LEN
    iov[1].iov_base = p
    iov[1].iov_len = n
    return tun_writev(e, tun, iov, 2, VNET_HDR_LEN + n, side)


cdef inline int tun_write_plain(engine *e, int tun, uint8_t *p, size_t n, int side) noexcept nogil:
    """tun_write with an all-zero virtio header: no offload asked for."""
    cdef vnet_hdr none
    memset(&none, 0, sizeof(none))
    return tun_write(e, tun, &none, p, n, side)


cdef inline int tun_writev(engine *e, int tun, const iovec *iov, int count, size_t n, int side) noexcept nogil:
    """One packet gathered from `count` iovecs (n bytes in all, its virtio header first) into a TUN queue; as
    tun_write."""
    return tun_result(e, writev(tun, iov, count), n, side)


cdef inline int tun_result(engine *e, ssize_t r, size_t n, int side) noexcept nogil:
    """0 if a TUN write of n bytes returned all of them, else its errno (EIO for a short write); a dead TUN also
    stops the side."""
    if r == <ssize_t>n:
        return 0
    if r < 0 and fd_dead(errno):
        fail(e, side, errno)
    return errno if r < 0 else EIO
