# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The packet engine: flannel0 (TUN) <-> UDP, one TX thread and one RX thread, both in C with the GIL released;
one engine per queue of a multi-queue flannel0.

Design notes (what is flannel's and why; what is ours and why)
- Wire format is flannel's udp backend, bit for bit: the UDP payload is the raw inner IPv4 packet, nothing more,
  default port 8285 (pkg/backend/udp). A flannel node and a pyflannel node exchange packets unchanged.
- Ours: dual stack, beyond flannel (whose udp backend is IPv4 only). The inner packet may be IPv6 and is carried
  the same way: the raw IPv6 packet is the UDP payload, the receiver tells the families apart by the version
  nibble, so a flannel node (which never routes IPv6 to the udp backend) never sees one. The underlay may be
  IPv6 too: a second socket (bound to the node's IPv6 address, same port) beside the IPv4 one; either inner
  family travels over either underlay, chosen per route by the peer's address family. The RX thread waits on
  both sockets; TX sends each run of packets through the socket of its peer's family.
- Ours, IPv6 inner packets: the hop limit is decremented in both directions (no header checksum to fix); on TX,
  hop limit 1 gets ICMPv6 time exceeded and no route ICMPv6 destination unreachable (no route), both from the
  destination's address as for IPv4, under the same token bucket, with RFC 4443's exceptions (never about an
  ICMPv6 error, a multicast destination or a non-first fragment; ipv6.h). flannel0's own link traffic (to
  multicast, from link-local: neighbour discovery, MLD) is dropped as tx_link_scope and never crosses. There is
  no Packet Too Big, as there is no IPv4 frag-needed: flannel0's MTU leaves room for the outer headers of the
  underlay with the larger ones (dataplane.tunnel), so nothing from flannel0 is too big for a peer.
- TTL is decremented in both directions with an RFC 1624 incremental checksum update, as flannel's proxy does,
  so one overlay hop costs two. Unlike flannel (whose `--ttl` wraps 0 to 255) a packet arriving with TTL 0 or 1
  is dropped and counted.
- No route for a destination: ICMP destination unreachable / net unreachable (3/0) goes back into the TUN, with
  flannel's exceptions: never about ICMP, never about a non-first fragment. flannel sends it from flannel0's own
  address, which the kernel then drops as a martian (a local source arriving from outside, unless accept_local
  is set), so flannel's errors never reach the sender. Ours come from the unreachable destination itself: not a
  local address, and routed via flannel0, so reverse-path checks pass and the sender sees ENETUNREACH. Unlike
  flannel's, they are rate-limited like the kernel's own (a token bucket, 1000/s in bursts of 50), and the ones
  held back are counted.
- Ours: the TX side checks what local processes wrote into flannel0 (which the kernel does not: a packet socket
  on flannel0 can write anything): header length, total length and header checksum of every whole packet, and,
  given this node's subnets, that the inner source is in the one of its family (flannel0's own addresses are).
  The far end would drop such packets anyway; here they cost no bandwidth and are counted where they came from.
- Ours: the RX side validates what arrives (IPv4: version, header length, total length, header checksum; IPv6:
  a whole header and a payload length that fits) and checks the sender: the outer source address (either family)
  must be the peer that owns the inner source's subnet (either family). flannel accepts any datagram from anyone,
  which lets any host that can reach port 8285 inject packets into the pod network.
- Ours: batches. The TX thread drains the TUN into one contiguous arena and sends with sendmmsg; the RX thread
  uses recvmmsg. With batch 1 and no offloads each direction is one packet per syscall, like flannel's C proxy;
  that mode is the baseline for every speed figure.
- Ours: a reply crosses without waiting for the TX thread. Writing a packet into the TUN makes the kernel
  answer at once when it can (an echo reply, an ACK), inside the write, so the answer is already on the TUN
  when the RX thread returns. If the TX thread is asleep, the RX thread sends it (the TX side's state is
  claimed by one thread at a time), sparing the round trip one wake-up: on this 2-vCPU VM each one costs tens
  of microseconds, and a ping through two engines crossed four of them.
- The routing table is a prefix_table.h table, read lock-free: each thread pins the current table in its reader
  slot for one batch, up to the last use of what its routes led to (the peers' slots: the sends and the
  per-peer counts), so a route change never waits for traffic, and traffic never waits for a change (a thread
  waiting for socket space only delays the freeing of what changes replaced). A route change costs O(changed
  routes); the sender check and the per-peer counters are O(1) lookups in the peer slots (peer_stats.h,
  peer6.h), which are reused once no thread can see them (peer_slots.h). A route to an IPv6 peer holds the
  peer's slot in peer6.h (a 64-bit leaf cannot hold the address).
- A thread whose TUN or socket is gone (a deleted flannel0 answers EBADFD to everything and POLLERR to poll)
  stops for good and records why (failure()); it never retries in a loop. A TUN that is merely down refuses
  writes with EIO: a per-packet drop, not a failure.
- Offloads (each optional, chosen by dataplane.offload before the engine starts):
  vnet_hdr: the TUN carries a virtio_net_hdr; with TSO (TSO6) the kernel hands over 64 KiB TCP super-packets over
  IPv4 (IPv6), which TX splits into MSS-size segments (offload.h gso_split) straight into the send arena.
  gso: runs of equal-size segments to one peer leave as one UDP_SEGMENT message; the kernel cuts them into
  datagrams, so each datagram on the wire still carries exactly one inner packet (flannel's format).
  gro: UDP_GRO delivers trains of datagrams from one sender in one receive; RX cuts them at the gso_size.
  coalesce: consecutive segments of one TCP flow (IPv4 or IPv6) are merged again and written to the TUN as one
  GSO packet; with uso (the TUN takes GSO_UDP_L4), consecutive datagrams of one UDP flow (either family) too.
  Nothing is copied: one writev gathers the packet from where its segments were received.
  A GSO send refused with EIO (egress device without checksum offload) turns GSO off and resends; a coalesced
  write refused with EINVAL (the 6.6.44-era virtio header regression) turns coalescing off and writes the
  segments as they arrived.
- Ours: several queues (dataplane.pump). Each engine owns one TUN queue and one UDP socket of a SO_REUSEPORT
  group on the same port; the kernel keeps each flow on one queue both ways (steering.h explains how), so the
  engines share nothing per packet but the route table (each thread its own reader slot), the per-peer counters
  (atomic adds) and the ICMP rate limit (one word, compare-and-swap).
- Per batch, not per packet: a run of packets to one destination looks its route up once, a run from one sender
  and inner source is checked once, and per-peer counters are added once per run of messages to or from a peer.
- Nothing here allocates or touches a Python object per packet; all buffers are allocated at construction.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset
from libc.stdlib cimport calloc, free
from libc.errno cimport (
    errno, EAGAIN, EINTR, EIO, EINVAL, EBADF, EBADFD, ENODEV, ENXIO, ENOTSOCK, EFAULT,
)
from posix.unistd cimport read, write, close
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

from syscalls cimport (
    iovec, readv, writev, sockaddr_in, sockaddr_in6, htons, ntohs, htonl, ntohl, mmsghdr, recvmmsg, sendmmsg,
    MSG_DONTWAIT, pollfd, poll, POLLIN, POLLOUT, POLLERR, POLLHUP, POLLNVAL, eventfd, EFD_NONBLOCK, EFD_CLOEXEC, sched_yield,
)
from prefix_table cimport (
    pt_table, pt_handle, pt_hop, pt_lookup, pt_lookup6, pt_routed, pt_leaf_hop, pt_acquire, pt_release,
    PT_QUEUES,
)
from offload cimport (
    csum_partial, csum_fold, csum_finish, csum_replace2, ip4_set_check, VNET_HDR_LEN, VNET_F_NEEDS_CSUM,
    VNET_GSO_NONE, VNET_GSO_TCPV4, VNET_GSO_TCPV6, VNET_GSO_UDP_L4, GSO_MAX_SEGS, GRO_IOVS, vnet_hdr, gro_item,
    gro_table,
    vnet_finish_csum, gso_split, gro_reset, gro_add, gro_finish, gro_unmerge, CMSG_ROOM, cmsg_set_segment,
    cmsg_parse_rx,
    peer_slot, peer_table, peer_find, peer_configured, peer_add,
    peer6_slot, peer6_table, peer6_find, peer6_configured,
)
from ipv6 cimport (
    IP6_HLEN, IP6_MIN_MTU, ICMP6_DST_UNREACH, ICMP6_PACKET_TOO_BIG, ICMP6_TIME_EXCEEDED, ip6_in_prefix,
    ip6_link_scope, ip6_error_allowed, ip6_build_error,
)


cdef extern from *:
    """
    /* The TX side's state belongs to whichever thread holds this flag: the TX thread, or the RX thread sending
       what its own TUN write made the kernel answer at once. */
    static inline int tx_claim(int *flag) { return !__atomic_exchange_n(flag, 1, __ATOMIC_ACQUIRE); }
    static inline void tx_unclaim(int *flag) { __atomic_store_n(flag, 0, __ATOMIC_RELEASE); }
    static inline void flag_set(int *flag, int v) { __atomic_store_n(flag, v, __ATOMIC_RELAXED); }
    static inline int flag_get(int *flag) { return __atomic_load_n(flag, __ATOMIC_RELAXED); }
    static inline uint64_t atomic_load64(uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline int atomic_cas64(uint64_t *p, uint64_t *expected, uint64_t v)
    {
        return __atomic_compare_exchange_n(p, expected, v, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    }
    """
    bint tx_claim(int *flag) noexcept nogil
    void tx_unclaim(int *flag) noexcept nogil
    void flag_set(int *flag, int v) noexcept nogil
    bint flag_get(int *flag) noexcept nogil
    uint64_t atomic_load64(uint64_t *p) noexcept nogil
    bint atomic_cas64(uint64_t *p, uint64_t *expected, uint64_t v) noexcept nogil


include "prefix_table.pxi"
include "offload.pxi"
include "steering.pxi"


cdef enum:
    MAX_BATCH = 128          # messages per recvmmsg/sendmmsg
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
    SPIN_POLLS = 20          # readiness checks (with a yield) before a drained thread blocks in poll
    ICMP_PER_SEC = 1000      # ICMP errors: the kernel's net.ipv4.icmp_msgs_per_sec ...
    ICMP_BURST = 50          # ... and net.ipv4.icmp_msgs_burst
    HAZARD_TX = 0            # each thread's failure slot, and its reader slot in the prefix table of queue 0
    HAZARD_RX = 1
    AF_INET = 2
    AF_INET6 = 10

MAX_QUEUES = PT_QUEUES       # engines (TX/RX thread pairs) that can share one prefix table

# Counter indices. TX counters are written only by the TX thread, RX counters only by the RX thread.
cdef enum:
    C_TX_PACKETS
    C_TX_BYTES
    C_TX_SEND_CALLS
    C_TX_GSO_MESSAGES
    C_TUN_READS
    C_TUN_SUPER_PACKETS
    C_RX_PACKETS
    C_RX_BYTES
    C_RX_RECV_CALLS
    C_RX_GRO_TRAINS
    C_TUN_WRITES
    C_TUN_COALESCED_WRITES
    C_ICMP_UNREACH_SENT
    C_GSO_FALLBACKS
    C_COALESCE_FALLBACKS
    C_RX_SOCKET_OVERFLOW
    C_ICMP_UNREACH_RATE_LIMITED
    C_ICMP6_UNREACH_SENT
    C_ICMP6_TIME_EXCEEDED_SENT
    D_TX_NOT_IP
    D_TX_LINK_SCOPE
    D_TX_MALFORMED
    D_TX_BAD_CHECKSUM
    D_TX_SPOOFED_SOURCE
    D_TX_NO_ROUTE
    D_TX_TTL_EXPIRED
    D_TX_SEND_ERROR
    D_RX_SHORT
    D_RX_NOT_IP
    D_RX_BAD_IHL
    D_RX_BAD_LENGTH
    D_RX_BAD_CHECKSUM
    D_RX_TTL_EXPIRED
    D_RX_UNKNOWN_PEER
    D_RX_SPOOFED_SOURCE
    D_RX_TUN_WRITE_ERROR
    N_COUNTERS

COUNTERS = (
    "tx_packets", "tx_bytes", "tx_send_calls", "tx_gso_messages", "tun_reads", "tun_super_packets",
    "rx_packets", "rx_bytes", "rx_recv_calls", "rx_gro_trains", "tun_writes", "tun_coalesced_writes",
    "icmp_unreachable_sent", "gso_fallbacks", "coalesce_fallbacks", "rx_socket_overflow",
    "icmp_unreachable_rate_limited", "icmp6_unreachable_sent", "icmp6_time_exceeded_sent",
)
DROPS = (
    "tx_not_ip", "tx_link_scope", "tx_malformed", "tx_bad_checksum", "tx_spoofed_source", "tx_no_route",
    "tx_ttl_expired", "tx_send_error",
    "rx_short", "rx_not_ip", "rx_bad_ihl", "rx_bad_length", "rx_bad_checksum", "rx_ttl_expired",
    "rx_unknown_peer", "rx_spoofed_source", "rx_tun_write_error",
)


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


cdef inline bint fd_dead(int err) noexcept nogil:
    """An errno that every later call on the same fd would repeat: the device or socket is gone, so the thread
    must stop instead of retrying (a deleted TUN answers EBADFD to every read and write and POLLERR to poll).
    EIO is not here: a TUN that is only down refuses writes with EIO until it is up again."""
    return err == EBADFD or err == EBADF or err == ENODEV or err == ENXIO or err == ENOTSOCK or err == EFAULT


cdef inline void _peer_count(peer_slot *peer, uint64_t packets, uint64_t nbytes, bint tx) noexcept nogil:
    """Add to a configured peer's counters (tx or rx side); nothing for a stranger (NULL) or for no packets."""
    if peer and packets:
        peer_add(&peer.tx_packets if tx else &peer.rx_packets, packets)
        peer_add(&peer.tx_bytes if tx else &peer.rx_bytes, nbytes)


cdef inline bint _same_sender(const sockaddr_in6 *a, const sockaddr_in6 *b) noexcept nogil:
    """The same outer source address (either family; the port does not matter)."""
    if a.sin6_family != b.sin6_family:
        return False
    if a.sin6_family == AF_INET6:
        return memcmp(a.sin6_addr.s6_addr, b.sin6_addr.s6_addr, 16) == 0
    return (<const sockaddr_in *>a).sin_addr.s_addr == (<const sockaddr_in *>b).sin_addr.s_addr


cdef class Engine:
    """Moves packets between a TUN fd and the UDP sockets (IPv4, and IPv6 when given); fds stay the caller's.

    run_tx() and run_rx() block until stop() and are meant to be called from two threads; they release the GIL.
    The offload switches must match how the fds were set up (dataplane.offload probes and enables them).
    """

    cdef int tun_fd, sock_fd, sock6_fd, stop_fd   # sock_fd or sock6_fd is -1 without that underlay
    # Set once stop_fd is ours. A flag that starts false, not a -1 written by __cinit__: when the arguments do not
    # parse, __dealloc__ runs on zeroed fields before any line of __cinit__, and fd 0 is somebody's stdin.
    cdef bint owns_stop_fd
    cdef int failed[2]              # per thread (HAZARD_TX, HAZARD_RX): the errno it stopped on, 0 while running
    cdef int batch
    cdef int tx_owned               # tx_claim's flag: set while a thread runs the TX side
    cdef int tx_asleep              # set while the TX thread blocks in poll (not while it spins)
    cdef bint check_source, vnet_hdr, gso, gro, coalesce
    cdef bint check_tx_source       # TX: the inner source must be in this node's subnet of its family
    cdef bint has_subnet4, has_subnet6
    cdef uint32_t local_net, local_mask         # host order
    cdef uint8_t local_net6[16]
    cdef unsigned local_plen6
    cdef int reader[2]              # per thread: its reader slot in the prefix table (HAZARD_* + 2 * queue)
    # The ICMP rate limit, shared by the engines of one tunnel (the kernel's is per host): the theoretical
    # arrival time of the next error (GCRA), in this engine or in the one it shares with (kept alive here).
    cdef uint64_t icmp_tat_own
    cdef uint64_t *icmp_tat
    cdef object icmp_owner
    cdef readonly PrefixTable table
    cdef pt_handle *routes
    cdef uint64_t counters[N_COUNTERS]
    cdef peer_table *peers          # the table's configured peers: what TX sent to each, what RX accepted
    cdef peer6_table *peers6        # the same for IPv6 peers, and their addresses (routes hold slot indexes)
    # Per batch: the last route looked up (a run of packets to one destination looks it up once) and the last
    # sender accepted; both forgotten whenever the thread takes the table again, which may then be another one.
    cdef uint8_t tx_last_dst[16]    # network order, tx_last_len bytes (4 or 16; 0: none)
    cdef unsigned tx_last_len
    cdef uint64_t tx_last_leaf
    cdef uint8_t rx_last_src[16]    # the inner source accepted last, rx_last_len bytes (0: none) ...
    cdef unsigned rx_last_len
    cdef sockaddr_in6 rx_last_peer  # ... from this outer source
    # RX: what the messages from one sender in a row added up to, counted for that peer once the run ends
    cdef sockaddr_in6 rx_run_peer
    cdef uint64_t rx_run_packets, rx_run_bytes
    # TX state
    cdef vnet_hdr tx_hdr
    cdef uint8_t *rbuf              # one TUN read when the TUN carries virtio headers
    cdef uint8_t *arena             # packets ready to send, back to back
    cdef size_t tx_pos
    cdef int tx_nseg
    cdef uint32_t *seg_off
    cdef uint16_t *seg_len
    cdef pt_hop *seg_hop
    cdef mmsghdr *tx_msgs
    cdef iovec *tx_iov
    cdef sockaddr_in6 *tx_addr      # room for either family
    cdef uint8_t *tx_cmsg
    cdef int *tx_msg_segs
    cdef int *tx_msg_first
    cdef uint8_t icmp[20 + 8 + 60 + ICMP_QUOTE]
    cdef uint8_t icmp6[IP6_MIN_MTU]
    # RX state
    cdef uint8_t *rx_bufs
    cdef mmsghdr *rx_msgs
    cdef iovec *rx_iov
    cdef sockaddr_in6 *rx_addr      # room for either family
    cdef uint8_t *rx_cmsg
    cdef uint32_t rx_overflow[2]    # per socket (IPv4, IPv6): the kernel's cumulative count
    cdef gro_table *flows

    def __cinit__(self, int tun_fd, int sock_fd, PrefixTable table not None, *, int batch=64,
                  bint check_source=True, bint vnet_hdr=False, bint gso=False, bint gro=False, bint coalesce=False,
                  bint uso=False, local_subnet=None, local_subnet6=None, int sock6_fd=-1, int queue=0,
                  Engine icmp_shared_with=None):
        """`queue`: which of the table's engines this is (0 to MAX_QUEUES - 1, one engine per TUN queue: each
        thread reads the table through its own reader slot). `icmp_shared_with`: another engine of the same
        tunnel, whose ICMP rate limit this one shares. `uso`: the TUN takes GSO_UDP_L4 writes, so coalescing
        merges UDP flows too. `sock6_fd`: the IPv6 underlay socket, -1 for none (sock_fd may be -1 too, not both)."""
        if not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"batch {batch} out of range 1-{MAX_BATCH}")
        if not 0 <= queue < MAX_QUEUES:
            raise ValueError(f"queue {queue} out of range 0-{MAX_QUEUES - 1}")
        if coalesce and not vnet_hdr:
            raise ValueError("coalescing needs a TUN with virtio headers")
        if sock_fd < 0 and sock6_fd < 0:
            raise ValueError("no underlay socket")
        self.tun_fd = tun_fd
        self.sock_fd = sock_fd
        self.sock6_fd = sock6_fd
        self.batch = batch
        self.check_source = check_source
        self.check_tx_source = check_source and (local_subnet is not None or local_subnet6 is not None)
        if local_subnet is not None:
            subnet = ipaddress.IPv4Network(local_subnet)
            self.has_subnet4 = True
            self.local_net = int(subnet.network_address)
            self.local_mask = int(subnet.netmask)
        if local_subnet6 is not None:
            subnet6 = ipaddress.IPv6Network(local_subnet6)
            net6 = subnet6.network_address.packed
            self.has_subnet6 = True
            memcpy(self.local_net6, <const char *>net6, 16)
            self.local_plen6 = subnet6.prefixlen
        self.reader[HAZARD_TX] = HAZARD_TX + 2 * queue
        self.reader[HAZARD_RX] = HAZARD_RX + 2 * queue
        self.icmp_owner = icmp_shared_with
        self.icmp_tat = &self.icmp_tat_own if icmp_shared_with is None else icmp_shared_with.icmp_tat
        self.vnet_hdr = vnet_hdr
        self.gso = gso
        self.gro = gro
        self.coalesce = coalesce
        self.table = table
        self.routes = table._handle()
        memset(self.counters, 0, sizeof(self.counters))
        memset(self.failed, 0, sizeof(self.failed))
        self.rbuf = <uint8_t *>calloc(READ_MAX + 1, 1)
        self.arena = <uint8_t *>calloc(ARENA + ARENA_SLACK, 1)
        self.seg_off = <uint32_t *>calloc(MAX_SEGS, sizeof(uint32_t))
        self.seg_len = <uint16_t *>calloc(MAX_SEGS, sizeof(uint16_t))
        self.seg_hop = <pt_hop *>calloc(MAX_SEGS, sizeof(pt_hop))
        self.tx_msgs = <mmsghdr *>calloc(MAX_BATCH, sizeof(mmsghdr))
        self.tx_iov = <iovec *>calloc(MAX_BATCH, sizeof(iovec))
        self.tx_addr = <sockaddr_in6 *>calloc(MAX_BATCH, sizeof(sockaddr_in6))
        self.tx_cmsg = <uint8_t *>calloc(MAX_BATCH, CMSG_ROOM)
        self.tx_msg_segs = <int *>calloc(MAX_BATCH, sizeof(int))
        self.tx_msg_first = <int *>calloc(MAX_BATCH, sizeof(int))
        self.rx_bufs = <uint8_t *>calloc(MAX_BATCH, SLOT)
        self.rx_msgs = <mmsghdr *>calloc(MAX_BATCH, sizeof(mmsghdr))
        self.rx_iov = <iovec *>calloc(MAX_BATCH, sizeof(iovec))
        self.rx_addr = <sockaddr_in6 *>calloc(MAX_BATCH, sizeof(sockaddr_in6))
        self.rx_cmsg = <uint8_t *>calloc(MAX_BATCH, CMSG_ROOM)
        self.flows = new_gro_table(RX_PACKETS, GRO_POOL)
        if self.flows:
            self.flows.udp = coalesce and uso
        self.peers = table._peer_table()
        self.peers6 = table._peer6_table()
        if (not self.rbuf or not self.arena or not self.seg_off or not self.seg_len or not self.seg_hop
                or not self.tx_msgs or not self.tx_iov or not self.tx_addr or not self.tx_cmsg
                or not self.tx_msg_segs or not self.tx_msg_first or not self.rx_bufs or not self.rx_msgs
                or not self.rx_iov or not self.rx_addr or not self.rx_cmsg or not self.flows):
            raise MemoryError()
        self.stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.stop_fd < 0:
            raise OSError(errno, "eventfd failed")
        self.owns_stop_fd = True

    def __dealloc__(self):
        if self.owns_stop_fd:
            close(self.stop_fd)
        free(self.rbuf)
        free(self.arena)
        free(self.seg_off)
        free(self.seg_len)
        free(self.seg_hop)
        free(self.tx_msgs)
        free(self.tx_iov)
        free(self.tx_addr)
        free(self.tx_cmsg)
        free(self.tx_msg_segs)
        free(self.tx_msg_first)
        free(self.rx_bufs)
        free(self.rx_msgs)
        free(self.rx_iov)
        free(self.rx_addr)
        free(self.rx_cmsg)
        free_gro_table(self.flows)

    # ---- Python surface -------------------------------------------------------------------------------------

    def run_tx(self) -> None:
        """TUN -> UDP until stop(), or until the TUN or the socket is gone (then failure() says why)."""
        with nogil:
            self._serve(self.tun_fd, HAZARD_TX)

    def run_rx(self) -> None:
        """UDP -> TUN until stop(), or until the socket or the TUN is gone (then failure() says why)."""
        with nogil:
            self._rx_setup()
            self._serve(self.sock_fd, HAZARD_RX)

    def failure(self) -> tuple[str, int] | None:
        """("TX" or "RX", errno) for a thread that stopped on its own, None while both run or were stopped."""
        for side, name in ((HAZARD_TX, "TX"), (HAZARD_RX, "RX")):
            if self.failed[side]:
                return name, self.failed[side]
        return None

    def stop(self) -> None:
        """Wake both loops and make them return; idempotent."""
        cdef uint64_t one = 1
        write(self.stop_fd, &one, 8)

    def stats(self) -> dict:
        """Counters as plain ints, drops by reason under "drops", the offloads in use under "offloads", and
        per configured peer address under "peers" (tx: inner packets sent to it; rx: packets accepted from it)."""
        out = {name: self.counters[i] for i, name in enumerate(COUNTERS)}
        out["drops"] = {name: self.counters[D_TX_NOT_IP + i] for i, name in enumerate(DROPS)}
        out["offloads"] = {"vnet_hdr": self.vnet_hdr, "gso": self.gso, "gro": self.gro, "coalesce": self.coalesce}
        out["peers"] = self.table.peer_counts()
        return out

    # ---- TX: TUN -> UDP -------------------------------------------------------------------------------------

    cdef void _serve(self, int fd, int side) noexcept nogil:
        """Wait for fd to become readable, then drain it batch by batch (TX or RX) until it would block; again
        until stop() or until the thread fails (failed[side] set: a dead fd, or poll itself failing).

        Once drained, the thread first checks the fd a few times (poll with no timeout, yielding the CPU in
        between) before it blocks: in a bulk transfer the next packet is usually microseconds away, and a
        sleep-and-wake-up costs more than that. Measured on the 2-vCPU rig (bench/RESULTS.md), SPIN_POLLS 20
        gave +10-20% single-stream throughput at the same CPU per GB; 50 and 200 were worse. With batch 1 the
        engine keeps flannel's C proxy design and blocks at once. The TX thread says when it blocks (tx_asleep):
        the RX thread then sends what its TUN writes made the kernel answer (_tx_reply). The RX thread waits on
        the IPv6 socket too (a negative fd, no IPv6 underlay, is one poll skips)."""
        cdef pollfd fds[3]
        cdef int idle = 0
        cdef int spin = SPIN_POLLS if self.batch > 1 else 0
        fds[0].fd = fd
        fds[0].events = POLLIN
        fds[1].fd = self.stop_fd
        fds[1].events = POLLIN
        fds[2].fd = self.sock6_fd if side == HAZARD_RX else -1
        fds[2].events = POLLIN
        while not self.failed[side]:
            if side == HAZARD_TX:
                flag_set(&self.tx_asleep, idle >= spin)
            if poll(fds, 3, 0 if idle < spin else -1) < 0:
                if errno != EINTR:
                    self._fail(side, errno)
                continue
            if fds[1].revents:
                return
            if not fds[0].revents and not fds[2].revents:
                idle += 1
                sched_yield()
                continue
            if side == HAZARD_TX:
                flag_set(&self.tx_asleep, False)
            if not self._drain(side):
                idle += 1           # the RX thread is sending from the TUN right now
                sched_yield()
                continue
            idle = 0
            # POLLERR on the socket is a queued ICMP error that the receive just consumed; on the TUN (or
            # POLLNVAL on either) it is final. Normally the read has already failed with the reason.
            if fds[0].revents & POLLNVAL or (side == HAZARD_TX and fds[0].revents & (POLLERR | POLLHUP)):
                self._fail(side, EBADF if fds[0].revents & POLLNVAL else EBADFD)

    cdef bint _drain(self, int side) noexcept nogil:
        """Move packets batch by batch until the fd would block; False (nothing done) if this is the TX thread
        and the RX thread holds the TX side."""
        if side == HAZARD_RX:
            while self.sock_fd >= 0 and self._rx_batch(self.sock_fd, 0) and not self.failed[side]:
                pass
            while self.sock6_fd >= 0 and self._rx_batch(self.sock6_fd, 1) and not self.failed[side]:
                pass
            self._tx_reply()
            return True
        if not tx_claim(&self.tx_owned):
            return False
        while self._tx_batch() and not self.failed[side]:
            pass
        tx_unclaim(&self.tx_owned)
        return True

    cdef void _tx_reply(self) noexcept nogil:
        """After RX wrote into the TUN: send one TX batch from this thread if the TX thread sleeps. What the
        kernel answers at once (a ping's reply, an ACK) is already queued on the TUN, and sending it here spares
        the round trip the TX thread's wake-up (tens of microseconds on this rig). A TX thread that is awake
        (busy or spinning) keeps its work: taking it over in a bulk transfer cost throughput."""
        if self.failed[HAZARD_TX] or not flag_get(&self.tx_asleep) or not tx_claim(&self.tx_owned):
            return
        self._tx_batch()
        tx_unclaim(&self.tx_owned)

    cdef void _fail(self, int side, int err) noexcept nogil:
        """Stop this thread for good with err (the first reason wins)."""
        if not self.failed[side]:
            self.failed[side] = err

    cdef bint _tx_batch(self) noexcept nogil:
        """Read up to one batch from the TUN and send it; True if the TUN may have more."""
        cdef const pt_table *t = pt_acquire(self.routes, self.reader[HAZARD_TX])
        cdef ssize_t n
        self.tx_last_len = 0
        cdef bint more = True
        cdef iovec iov[2]
        iov[0].iov_base = &self.tx_hdr
        iov[0].iov_len = VNET_HDR_LEN
        iov[1].iov_base = self.rbuf
        iov[1].iov_len = READ_MAX
        while self.tx_nseg < self.batch and self.tx_pos < ARENA and self.tx_nseg <= MAX_SEGS - SPLIT_SEGS:
            if self.vnet_hdr:
                n = readv(self.tun_fd, iov, 2) - VNET_HDR_LEN
            else:
                n = read(self.tun_fd, self.arena + self.tx_pos, READ_MAX)
            if n < 0:
                if errno == EINTR:
                    continue
                if errno != EAGAIN:
                    self._fail(HAZARD_TX, errno)    # a TUN read fails only when the device is gone
                more = False
                break
            self.counters[C_TUN_READS] += 1
            if self.vnet_hdr:
                self._tx_offloaded(t, n)
            else:
                self._tx_packet(t, self.arena + self.tx_pos, n)
        self._tx_flush()
        pt_release(self.routes, self.reader[HAZARD_TX])   # after the send: the hops may name peers' slots
        return more

    cdef uint64_t _tx_route(self, const pt_table *t, uint8_t *p, ssize_t n, bint whole) noexcept nogil:
        """Checks shared by every TUN packet: IPv4, its header (length and checksum too for a `whole` packet, not a
        super-packet about to be split), a source of this node (with local_subnet), a route, TTL (decremented);
        the route's leaf, 0 to drop. Whatever a local process wrote into flannel0, nothing the far end would
        refuse leaves here."""
        cdef unsigned ihl
        if n >= 1 and (p[0] >> 4) == 6:
            return self._tx_route6(t, p, n, whole)
        if n < 1 or (p[0] >> 4) != 4:
            self.counters[D_TX_NOT_IP] += 1
            return 0
        ihl = (p[0] & 0x0f) * 4
        if n < 20 or ihl < 20 or ihl > n or (whole and ntohs(load16(p + 2)) != n):
            self.counters[D_TX_MALFORMED] += 1
            return 0
        if whole and csum_fold(csum_partial(p, ihl, 0)) != 0xffff:
            self.counters[D_TX_BAD_CHECKSUM] += 1
            return 0
        if self.check_tx_source and (
                not self.has_subnet4 or (ntohl(load32(p + 12)) & self.local_mask) != self.local_net):
            self.counters[D_TX_SPOOFED_SOURCE] += 1
            return 0
        cdef uint64_t leaf = self._tx_lookup(t, p + 16, 4)
        if not pt_routed(leaf):
            self.counters[D_TX_NO_ROUTE] += 1
            self._icmp_unreachable(p, n, ihl)
            return 0
        if not ttl_decrement(p):
            self.counters[D_TX_TTL_EXPIRED] += 1
            return 0
        return leaf

    cdef uint64_t _tx_route6(self, const pt_table *t, uint8_t *p, ssize_t n, bint whole) noexcept nogil:
        """_tx_route for IPv6: the length (payload length too for a `whole` packet), flannel0's own link traffic
        (neighbour discovery, MLD: never sent across), a source in this node's IPv6 subnet, a route (else ICMPv6
        unreachable), the hop limit (decremented; else ICMPv6 time exceeded)."""
        if n < IP6_HLEN or (whole and IP6_HLEN + ntohs(load16(p + 4)) != n):
            self.counters[D_TX_MALFORMED] += 1
            return 0
        if ip6_link_scope(p):
            self.counters[D_TX_LINK_SCOPE] += 1
            return 0
        if self.check_tx_source and not (self.has_subnet6 and ip6_in_prefix(p + 8, self.local_net6, self.local_plen6)):
            self.counters[D_TX_SPOOFED_SOURCE] += 1
            return 0
        cdef uint64_t leaf = self._tx_lookup(t, p + 24, 16)
        if not pt_routed(leaf):
            self.counters[D_TX_NO_ROUTE] += 1
            self._icmp6_error(p, n, ICMP6_DST_UNREACH, C_ICMP6_UNREACH_SENT)
            return 0
        if not hop_limit_decrement(p):
            self.counters[D_TX_TTL_EXPIRED] += 1
            self._icmp6_error(p, n, ICMP6_TIME_EXCEEDED, C_ICMP6_TIME_EXCEEDED_SENT)
            return 0
        return leaf

    cdef uint64_t _tx_lookup(self, const pt_table *t, const uint8_t *dst, unsigned alen) noexcept nogil:
        """The route's leaf for a destination address (4 or 16 bytes, network order); a run of packets to one
        destination looks it up once per batch."""
        if alen != self.tx_last_len or memcmp(dst, self.tx_last_dst, alen) != 0:
            self.tx_last_leaf = pt_lookup6(t, dst) if alen == 16 else pt_lookup(t, ntohl(load32(dst)))
            memcpy(self.tx_last_dst, dst, alen)
            self.tx_last_len = alen
        return self.tx_last_leaf

    cdef void _tx_packet(self, const pt_table *t, uint8_t *p, ssize_t n) noexcept nogil:
        """One plain packet already in place at the arena's end: route it, or leave it to be overwritten."""
        cdef uint64_t leaf = self._tx_route(t, p, n, True)
        if leaf:
            self._tx_queue(n, pt_leaf_hop(leaf))

    cdef inline void _tx_queue(self, size_t n, pt_hop hop) noexcept nogil:
        self.seg_off[self.tx_nseg] = self.tx_pos
        self.seg_len[self.tx_nseg] = n
        self.seg_hop[self.tx_nseg] = hop
        self.tx_nseg += 1
        self.tx_pos += n

    cdef void _tx_offloaded(self, const pt_table *t, ssize_t n) noexcept nogil:
        """One read with a virtio header (in tx_hdr, packet in rbuf): finish its checksum or split it."""
        cdef vnet_hdr *hdr = &self.tx_hdr
        cdef int nseg, i
        cdef uint64_t leaf = self._tx_route(t, self.rbuf, n, hdr.gso_type == VNET_GSO_NONE)
        if leaf == 0:
            return
        if hdr.gso_type == VNET_GSO_NONE:
            if hdr.flags & VNET_F_NEEDS_CSUM and vnet_finish_csum(self.rbuf, n, hdr) < 0:
                self.counters[D_TX_MALFORMED] += 1
                return
            memcpy(self.arena + self.tx_pos, self.rbuf, n)
            self._tx_queue(n, pt_leaf_hop(leaf))
            return
        nseg = gso_split(self.rbuf, n, hdr.gso_type, hdr.gso_size, self.arena + self.tx_pos,
                         ARENA + ARENA_SLACK - self.tx_pos, self.seg_len + self.tx_nseg, SPLIT_SEGS)
        if nseg < 0:
            self.counters[D_TX_MALFORMED] += 1
            return
        self.counters[C_TUN_SUPER_PACKETS] += 1
        for i in range(nseg):
            self._tx_queue(self.seg_len[self.tx_nseg], pt_leaf_hop(leaf))

    cdef void _icmp_unreachable(self, const uint8_t *p, ssize_t n, unsigned ihl) noexcept nogil:
        """ICMP 3/0 back into the TUN from the destination's address (not about ICMP, not for non-first fragments)."""
        if p[9] == 1 or (load16(p + 6) & htons(0x1fff)) != 0:
            return
        if not self._icmp_allowed():
            self.counters[C_ICMP_UNREACH_RATE_LIMITED] += 1
            return
        cdef unsigned quote = ihl + (ICMP_QUOTE if n - ihl >= ICMP_QUOTE else n - ihl)
        cdef unsigned total = 20 + 8 + quote
        cdef uint8_t *o = self.icmp
        cdef vnet_hdr none
        memset(o, 0, 28)
        o[0] = 0x45
        cdef uint16_t v = htons(total)
        memcpy(o + 2, &v, 2)
        o[8] = 8                  # flannel's TTL for generated errors
        o[9] = 1
        memcpy(o + 12, p + 16, 4)
        memcpy(o + 16, p + 12, 4)
        ip4_set_check(o, 20)
        o[20] = 3
        o[21] = 0
        memcpy(o + 28, p, quote)
        v = csum_finish(csum_partial(o + 20, 8 + quote, 0))
        memcpy(o + 22, &v, 2)
        memset(&none, 0, sizeof(none))
        if self._tun_write(&none, o, total, HAZARD_TX) == 0:
            self.counters[C_ICMP_UNREACH_SENT] += 1

    cdef void _icmp6_error(self, const uint8_t *p, ssize_t n, uint8_t type, int counter) noexcept nogil:
        """An ICMPv6 error (code 0) back into the TUN from the packet's destination, as _icmp_unreachable does
        for IPv4 (RFC 4443's exceptions: ipv6.h), under the same rate limit."""
        cdef vnet_hdr none
        cdef size_t total
        if not ip6_error_allowed(p, n, type):
            return
        if not self._icmp_allowed():
            self.counters[C_ICMP_UNREACH_RATE_LIMITED] += 1
            return
        total = ip6_build_error(self.icmp6, p, n, p + 24, type, 0, 0)
        memset(&none, 0, sizeof(none))
        if self._tun_write(&none, self.icmp6, total, HAZARD_TX) == 0:
            self.counters[counter] += 1

    cdef bint _icmp_allowed(self) noexcept nogil:
        """A rate limit like the kernel's global ICMP limit: ICMP_PER_SEC errors a second, bursts of ICMP_BURST
        (flannel has none: one error per packet, so a sender to nowhere got as many as it sent). A token bucket
        in one word (GCRA: the time at which the bucket is full again), so that the TX threads of all queues
        share it with one compare-and-swap."""
        cdef timespec now
        cdef uint64_t cost = 1000000000 // ICMP_PER_SEC, t, tat, next_tat
        clock_gettime(CLOCK_MONOTONIC, &now)
        t = <uint64_t>now.tv_sec * 1000000000 + now.tv_nsec
        tat = atomic_load64(self.icmp_tat)
        while True:
            next_tat = max(tat, t) + cost
            if next_tat - t > ICMP_BURST * cost:
                return False
            if atomic_cas64(self.icmp_tat, &tat, next_tat):
                return True

    cdef int _tun_write(self, vnet_hdr *hdr, uint8_t *p, size_t n, int side) noexcept nogil:
        """One packet into the TUN, behind its virtio header when the TUN has them; 0 or an errno (a dead TUN
        also stops the calling thread)."""
        cdef iovec iov[2]
        if not self.vnet_hdr:
            return self._tun_result(write(self.tun_fd, p, n), n, side)
        iov[0].iov_base = hdr
        iov[0].iov_len = VNET_HDR_LEN
        iov[1].iov_base = p
        iov[1].iov_len = n
        return self._tun_writev(iov, 2, VNET_HDR_LEN + n, side)

    cdef inline int _tun_writev(self, const iovec *iov, int count, size_t n, int side) noexcept nogil:
        """One packet gathered from `count` iovecs (n bytes in all, its virtio header first) into the TUN; as
        _tun_write."""
        return self._tun_result(writev(self.tun_fd, iov, count), n, side)

    cdef inline int _tun_result(self, ssize_t r, size_t n, int side) noexcept nogil:
        """0 if a TUN write of n bytes returned all of them, else its errno (EIO for a short write); a dead
        TUN also stops the calling thread."""
        if r == <ssize_t>n:
            return 0
        if r < 0 and fd_dead(errno):
            self._fail(side, errno)
        return errno if r < 0 else EIO

    cdef void _tx_flush(self) noexcept nogil:
        """Send every queued packet, up to `batch` messages per sendmmsg (each through the socket of its peer's
        family), redoing without GSO if GSO fails."""
        cdef int i = 0, m, failed
        cdef bint v6
        while i < self.tx_nseg:
            m = 0
            v6 = self.seg_hop[i].v6
            while i < self.tx_nseg and m < self.batch and self.seg_hop[i].v6 == v6:
                i = self._tx_message(m, i)
                m += 1
            failed = self._tx_send(m, self.sock6_fd if v6 else self.sock_fd)
            if failed >= 0:
                i = self.tx_msg_first[failed]
        self.tx_nseg = 0
        self.tx_pos = 0

    cdef int _tx_message(self, int m, int i) noexcept nogil:
        """Message m from segment i on: one datagram, or with GSO a run of equal-size segments to one peer
        (a shorter one may end it, at most GSO_MAX_SEGS, never a one-segment GSO send) whose inner packets the
        peer's queues steer alike (steering.h: a train arrives as one datagram, steered by its first packet).
        The next segment."""
        cdef int first = i, count = 1
        cdef size_t size = self.seg_len[i], total = size
        cdef pt_hop hop = self.seg_hop[i]
        cdef uint32_t flow
        i += 1
        if self.gso:
            flow = steer_hash(self.arena + self.seg_off[first], size)
            while (i < self.tx_nseg and count < GSO_MAX_SEGS and self.seg_len[i] <= size
                   and self.seg_hop[i].addr == hop.addr and self.seg_hop[i].port == hop.port
                   and self.seg_hop[i].v6 == hop.v6
                   and total + self.seg_len[i] <= UDP_MAX_PAYLOAD and self.seg_off[i] == self.seg_off[first] + total
                   and steer_hash(self.arena + self.seg_off[i], self.seg_len[i]) == flow):
                total += self.seg_len[i]
                count += 1
                i += 1
                if self.seg_len[i - 1] < size:
                    break
        self.tx_iov[m].iov_base = self.arena + self.seg_off[first]
        self.tx_iov[m].iov_len = total
        self.tx_msgs[m].msg_hdr.msg_name = &self.tx_addr[m]
        self.tx_msgs[m].msg_hdr.msg_namelen = self._tx_address(&self.tx_addr[m], hop)
        self.tx_msgs[m].msg_hdr.msg_iov = &self.tx_iov[m]
        self.tx_msgs[m].msg_hdr.msg_iovlen = 1
        if count > 1:
            cmsg_set_segment(&self.tx_msgs[m].msg_hdr, self.tx_cmsg + <size_t>m * CMSG_ROOM, size)
        else:
            self.tx_msgs[m].msg_hdr.msg_control = NULL
            self.tx_msgs[m].msg_hdr.msg_controllen = 0
        self.tx_msg_segs[m] = count
        self.tx_msg_first[m] = first
        return i

    cdef unsigned _tx_address(self, sockaddr_in6 *sa, pt_hop hop) noexcept nogil:
        """Fill in the peer's socket address (an IPv6 peer's from its slot); its length."""
        cdef sockaddr_in *sa4 = <sockaddr_in *>sa
        if hop.v6:
            memset(sa, 0, sizeof(sockaddr_in6))
            sa.sin6_family = AF_INET6
            sa.sin6_port = hop.port
            memcpy(sa.sin6_addr.s6_addr, self.peers6.slot[hop.addr].addr, 16)
            return sizeof(sockaddr_in6)
        sa4.sin_family = AF_INET
        sa4.sin_port = hop.port
        sa4.sin_addr.s_addr = hop.addr
        return sizeof(sockaddr_in)

    cdef int _tx_send(self, int nmsg, int fd) noexcept nogil:
        """sendmmsg the prepared messages, resuming after partial sends and waiting out a full socket buffer.
        Returns -1, or the index of a GSO message the kernel refused (GSO is then off: rebuild from there)."""
        cdef int start = 0, r, i
        cdef pollfd fds[2]
        if fd < 0:      # a route to a peer of a family with no underlay socket (the control side prevents it)
            for i in range(nmsg):
                self.counters[D_TX_SEND_ERROR] += self.tx_msg_segs[i]
            return -1
        while start < nmsg:
            r = sendmmsg(fd, self.tx_msgs + start, nmsg - start, 0)
            if r > 0:
                self.counters[C_TX_SEND_CALLS] += 1
                self._tx_count(start, start + r)
                start += r
            elif errno == EINTR:
                continue
            elif errno == EAGAIN:
                fds[0].fd = fd
                fds[0].events = POLLOUT
                fds[1].fd = self.stop_fd
                fds[1].events = POLLIN
                poll(fds, 2, -1)
                if fds[1].revents:
                    return -1
            elif errno == EIO and self.tx_msg_segs[start] > 1:
                # UDP_SEGMENT needs checksum offload on the egress device; without it the kernel says EIO.
                self.gso = False
                self.counters[C_GSO_FALLBACKS] += 1
                return start
            elif fd_dead(errno):
                self._fail(HAZARD_TX, errno)
                return -1
            else:
                # The message at `start` was refused (no route to the peer, EPERM from a firewall, ...).
                self.counters[D_TX_SEND_ERROR] += self.tx_msg_segs[start]
                start += 1
        return -1

    cdef void _tx_count(self, int first, int end) noexcept nogil:
        """Count the sent messages first..end-1: the totals once, and each peer once per run of messages to it
        (a batch mostly goes to one peer: one lookup and two atomic adds, not one per message)."""
        cdef uint64_t packets = 0, nbytes = 0, gso = 0, run_packets = 0, run_bytes = 0
        cdef int i
        cdef pt_hop hop, prev
        for i in range(first, end):
            hop = self.seg_hop[self.tx_msg_first[i]]
            if i > first and (hop.addr != prev.addr or hop.v6 != prev.v6):
                _peer_count(self._tx_peer(prev), run_packets, run_bytes, True)
                packets += run_packets
                nbytes += run_bytes
                run_packets = run_bytes = 0
            prev = hop
            run_packets += self.tx_msg_segs[i]
            run_bytes += self.tx_iov[i].iov_len
            gso += self.tx_msg_segs[i] > 1
        _peer_count(self._tx_peer(prev), run_packets, run_bytes, True)
        self.counters[C_TX_PACKETS] += packets + run_packets
        self.counters[C_TX_BYTES] += nbytes + run_bytes
        self.counters[C_TX_GSO_MESSAGES] += gso

    cdef peer_slot *_tx_peer(self, pt_hop hop) noexcept nogil:
        """The counters of the peer a route leads to (an IPv6 peer's slot is in the hop), NULL if none."""
        return &self.peers6.slot[hop.addr].peer if hop.v6 else peer_find(self.peers, hop.addr)

    # ---- RX: UDP -> TUN -------------------------------------------------------------------------------------

    cdef void _rx_setup(self) noexcept nogil:
        cdef int i
        for i in range(MAX_BATCH):
            self.rx_iov[i].iov_base = self.rx_bufs + <size_t>i * SLOT
            self.rx_iov[i].iov_len = SLOT
            self.rx_msgs[i].msg_hdr.msg_iov = &self.rx_iov[i]
            self.rx_msgs[i].msg_hdr.msg_iovlen = 1
            self.rx_msgs[i].msg_hdr.msg_name = &self.rx_addr[i]
            self.rx_msgs[i].msg_hdr.msg_control = self.rx_cmsg + <size_t>i * CMSG_ROOM

    cdef bint _rx_batch(self, int fd, int family) noexcept nogil:
        """Receive one batch of datagrams from one socket (family 0: IPv4, 1: IPv6) and deliver them; True if the
        socket may have more."""
        cdef int i, r, gso_size
        for i in range(self.batch):
            self.rx_msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_in6)
            self.rx_msgs[i].msg_hdr.msg_controllen = CMSG_ROOM
        r = recvmmsg(fd, self.rx_msgs, self.batch, MSG_DONTWAIT, NULL)
        if r <= 0:
            if r < 0 and fd_dead(errno):
                self._fail(HAZARD_RX, errno)
            return r < 0 and errno == EINTR
        self.counters[C_RX_RECV_CALLS] += 1
        cdef const pt_table *t = pt_acquire(self.routes, self.reader[HAZARD_RX])
        self.rx_last_len = 0
        for i in range(r):
            cmsg_parse_rx(&self.rx_msgs[i].msg_hdr, &gso_size, &self.rx_overflow[family])
            self._rx_message(t, self.rx_bufs + <size_t>i * SLOT, self.rx_msgs[i].msg_len, gso_size, &self.rx_addr[i])
        self._rx_count_peer(&self.rx_run_peer, self.rx_run_packets, self.rx_run_bytes)
        pt_release(self.routes, self.reader[HAZARD_RX])   # after the last use of a peer's slot
        self.rx_run_packets = self.rx_run_bytes = 0
        self.counters[C_RX_SOCKET_OVERFLOW] = <uint64_t>self.rx_overflow[0] + self.rx_overflow[1]
        if self.coalesce:
            self._rx_write_coalesced()
        return r == self.batch

    cdef void _rx_message(self, const pt_table *t, uint8_t *p, size_t n, int gso_size,
                          const sockaddr_in6 *src) noexcept nogil:
        """One received message: a datagram, or with UDP_GRO a train cut at gso_size; what was accepted is
        counted for the sending peer (after validation, so made-up senders are never counted), once the batch
        or the run of messages from that peer ends."""
        cdef size_t off = 0, size = n
        cdef uint64_t packets = 0, nbytes = 0
        cdef unsigned got
        if 0 < gso_size < <ssize_t>n:
            self.counters[C_RX_GRO_TRAINS] += 1
            size = gso_size
        while True:     # at least once: an empty datagram is dropped (and counted) too
            got = self._rx_packet(t, p + off, min(size, n - off), src)
            packets += got != 0
            nbytes += got
            off += size
            if off >= n:
                break
        if not packets:
            return
        if not _same_sender(src, &self.rx_run_peer):
            self._rx_count_peer(&self.rx_run_peer, self.rx_run_packets, self.rx_run_bytes)
            self.rx_run_peer = src[0]
            self.rx_run_packets = self.rx_run_bytes = 0
        self.rx_run_packets += packets
        self.rx_run_bytes += nbytes

    cdef void _rx_count_peer(self, const sockaddr_in6 *src, uint64_t packets, uint64_t nbytes) noexcept nogil:
        """What a run of messages from src carried, counted for its peer (none if src is no configured peer)."""
        cdef peer6_slot *peer6
        cdef peer_slot *peer
        if not packets:
            return
        if src.sin6_family == AF_INET6:
            peer6 = peer6_find(self.peers6, src.sin6_addr.s6_addr)
            peer = &peer6.peer if peer6 else NULL
        else:
            peer = peer_find(self.peers, (<const sockaddr_in *>src).sin_addr.s_addr)
        _peer_count(peer, packets, nbytes, False)

    cdef unsigned _rx_packet(self, const pt_table *t, uint8_t *p, size_t n, const sockaddr_in6 *src) noexcept nogil:
        """Validate one datagram from the wire, check its sender, and write (or queue) it for the TUN; its
        length, or 0 if it was dropped."""
        cdef unsigned ihl, total
        if n >= 1 and (p[0] >> 4) == 6:
            return self._rx_packet6(t, p, n, src)
        if n < 20:
            self.counters[D_RX_SHORT] += 1
            return 0
        if (p[0] >> 4) != 4:
            self.counters[D_RX_NOT_IP] += 1
            return 0
        ihl = (p[0] & 0x0f) * 4
        if ihl < 20:
            self.counters[D_RX_BAD_IHL] += 1
            return 0
        total = ntohs(load16(p + 2))
        if total > n or total < ihl:
            self.counters[D_RX_BAD_LENGTH] += 1
            return 0
        if csum_fold(csum_partial(p, ihl, 0)) != 0xffff:
            self.counters[D_RX_BAD_CHECKSUM] += 1
            return 0
        if self.check_source and not self._sender_ok(t, p + 12, 4, src):
            return 0
        if not ttl_decrement(p):
            self.counters[D_RX_TTL_EXPIRED] += 1
            return 0
        return self._rx_accept(p, total)

    cdef unsigned _rx_packet6(self, const pt_table *t, uint8_t *p, size_t n, const sockaddr_in6 *src) noexcept nogil:
        """_rx_packet for an inner IPv6 packet: a whole header, a payload length that fits, the sender (the
        peer owning the inner source's IPv6 subnet), the hop limit."""
        cdef unsigned total
        if n < IP6_HLEN:
            self.counters[D_RX_SHORT] += 1
            return 0
        total = IP6_HLEN + ntohs(load16(p + 4))
        if total > n:
            self.counters[D_RX_BAD_LENGTH] += 1
            return 0
        if self.check_source and not self._sender_ok(t, p + 8, 16, src):
            return 0
        if not hop_limit_decrement(p):
            self.counters[D_RX_TTL_EXPIRED] += 1
            return 0
        return self._rx_accept(p, total)

    cdef unsigned _rx_accept(self, uint8_t *p, unsigned total) noexcept nogil:
        """Count a packet that passed every check and write it (or queue it for coalescing); its length."""
        self.counters[C_RX_PACKETS] += 1
        self.counters[C_RX_BYTES] += total
        if self.coalesce:
            if gro_add(self.flows, p, total) < 0:
                self._rx_write_coalesced()
                gro_add(self.flows, p, total)
        else:
            self._rx_write(p, total)
        return total

    cdef void _rx_write(self, uint8_t *p, size_t n) noexcept nogil:
        cdef vnet_hdr none
        memset(&none, 0, sizeof(none))
        if self._tun_write(&none, p, n, HAZARD_RX) == 0:
            self.counters[C_TUN_WRITES] += 1
        else:
            self.counters[D_RX_TUN_WRITE_ERROR] += 1

    cdef void _rx_write_coalesced(self) noexcept nogil:
        """Write every item of the batch, merged ones as GSO packets gathered by one writev from where their
        segments were received; then start a new batch."""
        cdef int i, k, err
        cdef gro_item *it
        cdef vnet_hdr hdr
        for i in range(self.flows.nitems):
            it = &self.flows.items[i]
            gro_finish(it, &hdr)
            if it.segs < 2:
                err = self._tun_write(&hdr, it.pkt, it.len, HAZARD_RX)
            elif self.coalesce:
                err = self._tun_writev(it.iov, it.segs + 1, VNET_HDR_LEN + it.len, HAZARD_RX)
            else:
                err = EINVAL
            if err == 0:
                self.counters[C_TUN_WRITES] += 1
                self.counters[C_TUN_COALESCED_WRITES] += it.segs > 1
                continue
            if err != EINVAL or it.segs < 2:
                self.counters[D_RX_TUN_WRITE_ERROR] += it.segs
                continue
            # The kernel refused a GSO write: stop merging, and write this packet's segments as they arrived.
            if self.coalesce:
                self.coalesce = False
                self.counters[C_COALESCE_FALLBACKS] += 1
            gro_unmerge(it)
            for k in range(1, it.segs + 1):
                self._rx_write(<uint8_t *>it.iov[k].iov_base, it.iov[k].iov_len)
        gro_reset(self.flows)

    cdef bint _sender_ok(self, const pt_table *t, const uint8_t *inner, unsigned alen,
                         const sockaddr_in6 *src) noexcept nogil:
        """The outer source must be the peer whose subnet holds the inner source (`inner`, alen bytes: 4 or 16;
        routed to a peer of either family); counts the drop if not, as spoofed (a configured peer) or unknown
        (anyone else), both O(1). A run of packets from one inner source and peer is looked up once per batch."""
        if (alen == self.rx_last_len and memcmp(inner, self.rx_last_src, alen) == 0
                and _same_sender(src, &self.rx_last_peer)):
            return True
        cdef uint64_t leaf = pt_lookup6(t, inner) if alen == 16 else pt_lookup(t, ntohl(load32(inner)))
        cdef pt_hop hop = pt_leaf_hop(leaf)
        cdef uint32_t addr4 = (<const sockaddr_in *>src).sin_addr.s_addr
        cdef bint v6 = src.sin6_family == AF_INET6
        if pt_routed(leaf) and hop.v6 == v6 and (
                memcmp(self.peers6.slot[hop.addr].addr, src.sin6_addr.s6_addr, 16) == 0 if v6 else hop.addr == addr4):
            memcpy(self.rx_last_src, inner, alen)
            self.rx_last_len = alen
            self.rx_last_peer = src[0]
            return True
        if peer6_configured(self.peers6, src.sin6_addr.s6_addr) if v6 else peer_configured(self.peers, addr4):
            self.counters[D_RX_SPOOFED_SOURCE] += 1
        else:
            self.counters[D_RX_UNKNOWN_PEER] += 1
        return False
