# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The packet engine: flannel0 (TUN) <-> UDP, one TX thread and one RX thread, both in C with the GIL released.

Design notes (what is flannel's and why; what is ours and why)
- Wire format is flannel's udp backend, bit for bit: the UDP payload is the raw inner IPv4 packet, nothing more,
  default port 8285 (pkg/backend/udp). A flannel node and a pyflannel node exchange packets unchanged.
- TTL is decremented in both directions with an RFC 1624 incremental checksum update, as flannel's proxy does,
  so one overlay hop costs two. Unlike flannel (whose `--ttl` wraps 0 to 255) a packet arriving with TTL 0 or 1
  is dropped and counted.
- No route for a destination: ICMP destination unreachable / net unreachable (3/0) goes back into the TUN, with
  flannel's exceptions: never about ICMP, never about a non-first fragment. flannel sends it from flannel0's own
  address, which the kernel then drops as a martian (a local source arriving from outside, unless accept_local
  is set), so flannel's errors never reach the sender. Ours come from the unreachable destination itself: not a
  local address, and routed via flannel0, so reverse-path checks pass and the sender sees ENETUNREACH.
- Ours: the RX side validates what arrives (version, header length, total length, header checksum) and checks
  the sender: the outer source address must be the peer that owns the inner source's subnet. flannel accepts any
  datagram from anyone, which lets any host that can reach port 8285 inject packets into the pod network.
- Ours: batches. The TX thread drains the TUN into one contiguous arena and sends with sendmmsg; the RX thread
  uses recvmmsg. With batch 1 and no offloads each direction is one packet per syscall, like flannel's C proxy;
  that mode is the baseline for every speed figure.
- The routing table is a prefix_table.h table, read lock-free: each thread pins the current table in its hazard
  slot for one batch, so a route change never waits for traffic to stop, and traffic never waits for a change.
- Nothing here allocates or touches a Python object per packet; all buffers are allocated at construction.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset
from libc.stdlib cimport calloc, free
from libc.errno cimport errno, EAGAIN, EINTR
from posix.unistd cimport read, write, close

from syscalls cimport (
    iovec, writev, sockaddr_in, htons, ntohs, htonl, ntohl, msghdr, mmsghdr, recvmmsg, sendmmsg,
    MSG_DONTWAIT, pollfd, poll, POLLIN, POLLOUT, eventfd, EFD_NONBLOCK, EFD_CLOEXEC,
)
from prefix_table cimport pt_table, pt_handle, pt_hop, pt_lookup, pt_acquire, pt_release


cdef extern from "csum.h" nogil:
    uint64_t csum_partial(const void *p, size_t len, uint64_t seed)
    uint16_t csum_fold(uint64_t sum)
    uint16_t csum_finish(uint64_t sum)
    uint64_t csum_pseudo4(const uint8_t *iph, uint8_t proto, uint16_t l4len)
    uint16_t csum_replace2(uint16_t check, uint16_t old, uint16_t new_)
    void ip4_set_check(uint8_t *iph, unsigned ihl)


include "prefix_table.pxi"


cdef enum:
    MAX_BATCH = 128          # messages per recvmmsg/sendmmsg
    SLOT = 65536             # one datagram (or one UDP_GRO train) per receive slot
    READ_MAX = 65535 + 10    # one TUN read: an IPv4 packet up to 64 KiB plus the virtio header
    ARENA = 1 << 20          # TX bytes collected before a flush
    MAX_SEGS = 4096          # TX packets collected before a flush
    ICMP_QUOTE = 8           # payload bytes of the offending packet quoted after its IP header
    HAZARD_TX = 0
    HAZARD_RX = 1

# Counter indices. TX counters are written only by the TX thread, RX counters only by the RX thread.
cdef enum:
    C_TX_PACKETS
    C_TX_BYTES
    C_TX_SEND_CALLS
    C_TUN_READS
    C_RX_PACKETS
    C_RX_BYTES
    C_RX_RECV_CALLS
    C_TUN_WRITES
    C_ICMP_UNREACH_SENT
    D_TX_NOT_IPV4
    D_TX_MALFORMED
    D_TX_NO_ROUTE
    D_TX_TTL_EXPIRED
    D_TX_SEND_ERROR
    D_RX_SHORT
    D_RX_NOT_IPV4
    D_RX_BAD_IHL
    D_RX_BAD_LENGTH
    D_RX_BAD_CHECKSUM
    D_RX_TTL_EXPIRED
    D_RX_UNKNOWN_PEER
    D_RX_SPOOFED_SOURCE
    D_RX_TUN_WRITE_ERROR
    N_COUNTERS

COUNTERS = (
    "tx_packets", "tx_bytes", "tx_send_calls", "tun_reads",
    "rx_packets", "rx_bytes", "rx_recv_calls", "tun_writes",
    "icmp_unreachable_sent",
)
DROPS = (
    "tx_not_ipv4", "tx_malformed", "tx_no_route", "tx_ttl_expired", "tx_send_error",
    "rx_short", "rx_not_ipv4", "rx_bad_ihl", "rx_bad_length", "rx_bad_checksum", "rx_ttl_expired",
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


cdef class Engine:
    """Moves packets between a TUN fd and a UDP socket fd; both fds stay owned by the caller.

    run_tx() and run_rx() block until stop() and are meant to be called from two threads; they release the GIL.
    """

    cdef int tun_fd, sock_fd, stop_fd
    cdef int batch
    cdef bint check_source
    cdef readonly PrefixTable table
    cdef pt_handle *routes
    cdef uint64_t counters[N_COUNTERS]
    # TX state
    cdef uint8_t *arena
    cdef size_t tx_pos
    cdef int tx_nseg
    cdef uint32_t *seg_off
    cdef uint16_t *seg_len
    cdef pt_hop *seg_hop
    cdef mmsghdr *tx_msgs
    cdef iovec *tx_iov
    cdef sockaddr_in *tx_addr
    cdef int *tx_msg_segs
    cdef uint8_t icmp[20 + 8 + 60 + ICMP_QUOTE]
    # RX state
    cdef uint8_t *rx_bufs
    cdef mmsghdr *rx_msgs
    cdef iovec *rx_iov
    cdef sockaddr_in *rx_addr

    def __cinit__(self, int tun_fd, int sock_fd, PrefixTable table not None, *, int batch=64, bint check_source=True):
        if not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"batch {batch} out of range 1-{MAX_BATCH}")
        self.tun_fd = tun_fd
        self.sock_fd = sock_fd
        self.batch = batch
        self.check_source = check_source
        self.table = table
        self.routes = table._handle()
        memset(self.counters, 0, sizeof(self.counters))
        self.stop_fd = -1
        self.arena = <uint8_t *>calloc(ARENA + READ_MAX, 1)
        self.seg_off = <uint32_t *>calloc(MAX_SEGS, sizeof(uint32_t))
        self.seg_len = <uint16_t *>calloc(MAX_SEGS, sizeof(uint16_t))
        self.seg_hop = <pt_hop *>calloc(MAX_SEGS, sizeof(pt_hop))
        self.tx_msgs = <mmsghdr *>calloc(MAX_BATCH, sizeof(mmsghdr))
        self.tx_iov = <iovec *>calloc(MAX_BATCH, sizeof(iovec))
        self.tx_addr = <sockaddr_in *>calloc(MAX_BATCH, sizeof(sockaddr_in))
        self.tx_msg_segs = <int *>calloc(MAX_BATCH, sizeof(int))
        self.rx_bufs = <uint8_t *>calloc(MAX_BATCH, SLOT)
        self.rx_msgs = <mmsghdr *>calloc(MAX_BATCH, sizeof(mmsghdr))
        self.rx_iov = <iovec *>calloc(MAX_BATCH, sizeof(iovec))
        self.rx_addr = <sockaddr_in *>calloc(MAX_BATCH, sizeof(sockaddr_in))
        if (not self.arena or not self.seg_off or not self.seg_len or not self.seg_hop or not self.tx_msgs
                or not self.tx_iov or not self.tx_addr or not self.tx_msg_segs or not self.rx_bufs
                or not self.rx_msgs or not self.rx_iov or not self.rx_addr):
            raise MemoryError()
        self.stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.stop_fd < 0:
            raise OSError(errno, "eventfd failed")

    def __dealloc__(self):
        if self.stop_fd >= 0:
            close(self.stop_fd)
        free(self.arena)
        free(self.seg_off)
        free(self.seg_len)
        free(self.seg_hop)
        free(self.tx_msgs)
        free(self.tx_iov)
        free(self.tx_addr)
        free(self.tx_msg_segs)
        free(self.rx_bufs)
        free(self.rx_msgs)
        free(self.rx_iov)
        free(self.rx_addr)

    # ---- Python surface -------------------------------------------------------------------------------------

    def run_tx(self) -> None:
        """TUN -> UDP until stop(); raises OSError if poll itself fails."""
        cdef int err
        with nogil:
            err = self._tx_loop()
        if err:
            raise OSError(err, "tx loop failed")

    def run_rx(self) -> None:
        """UDP -> TUN until stop(); raises OSError if poll itself fails."""
        cdef int err
        with nogil:
            err = self._rx_loop()
        if err:
            raise OSError(err, "rx loop failed")

    def stop(self) -> None:
        """Wake both loops and make them return; idempotent."""
        cdef uint64_t one = 1
        write(self.stop_fd, &one, 8)

    def stats(self) -> dict:
        """Counters as plain ints: traffic counters, plus drops by reason under "drops"."""
        out = {name: self.counters[i] for i, name in enumerate(COUNTERS)}
        out["drops"] = {name: self.counters[D_TX_NOT_IPV4 + i] for i, name in enumerate(DROPS)}
        return out

    # ---- TX: TUN -> UDP -------------------------------------------------------------------------------------

    cdef int _tx_loop(self) noexcept nogil:
        cdef pollfd fds[2]
        fds[0].fd = self.tun_fd
        fds[0].events = POLLIN
        fds[1].fd = self.stop_fd
        fds[1].events = POLLIN
        while True:
            if poll(fds, 2, -1) < 0:
                if errno == EINTR:
                    continue
                return errno
            if fds[1].revents:
                return 0
            while self._tx_batch():
                pass

    cdef bint _tx_batch(self) noexcept nogil:
        """Read up to one batch from the TUN and send it; True if the TUN may have more."""
        cdef const pt_table *t = pt_acquire(self.routes, HAZARD_TX)
        cdef ssize_t n
        cdef bint more = True
        while self.tx_nseg < self.batch and self.tx_pos < ARENA:
            n = read(self.tun_fd, self.arena + self.tx_pos, READ_MAX)
            if n < 0:
                if errno == EINTR:
                    continue
                more = False      # EAGAIN: drained. Anything else: poll will report it again.
                break
            self.counters[C_TUN_READS] += 1
            self._tx_packet(t, self.arena + self.tx_pos, n)
        self._tx_flush()
        pt_release(self.routes, HAZARD_TX)
        return more

    cdef void _tx_packet(self, const pt_table *t, uint8_t *p, ssize_t n) noexcept nogil:
        """Route one packet read from the TUN into the arena, or drop it."""
        cdef unsigned ihl
        if n < 1 or (p[0] >> 4) != 4:
            self.counters[D_TX_NOT_IPV4] += 1     # the kernel's own IPv6 chatter on flannel0, mostly
            return
        ihl = (p[0] & 0x0f) * 4
        if n < 20 or ihl < 20 or ihl > n:
            self.counters[D_TX_MALFORMED] += 1
            return
        cdef uint32_t h = pt_lookup(t, ntohl(load32(p + 16)))
        if h == 0:
            self.counters[D_TX_NO_ROUTE] += 1
            self._icmp_unreachable(p, n, ihl)
            return
        if not ttl_decrement(p):
            self.counters[D_TX_TTL_EXPIRED] += 1
            return
        self.seg_off[self.tx_nseg] = self.tx_pos
        self.seg_len[self.tx_nseg] = n
        self.seg_hop[self.tx_nseg] = t.hops[h]
        self.tx_nseg += 1
        self.tx_pos += n

    cdef void _icmp_unreachable(self, const uint8_t *p, ssize_t n, unsigned ihl) noexcept nogil:
        """ICMP 3/0 back into the TUN from the destination's address (not about ICMP, not for non-first fragments)."""
        if p[9] == 1 or (load16(p + 6) & htons(0x1fff)) != 0:
            return
        cdef unsigned quote = ihl + (ICMP_QUOTE if n - ihl >= ICMP_QUOTE else n - ihl)
        cdef unsigned total = 20 + 8 + quote
        cdef uint8_t *o = self.icmp
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
        if write(self.tun_fd, o, total) == total:
            self.counters[C_ICMP_UNREACH_SENT] += 1

    cdef void _tx_flush(self) noexcept nogil:
        """Send every collected packet: one message per packet, up to `batch` messages per sendmmsg."""
        cdef int i = 0, m = 0
        while i < self.tx_nseg:
            self.tx_iov[m].iov_base = self.arena + self.seg_off[i]
            self.tx_iov[m].iov_len = self.seg_len[i]
            self.tx_addr[m].sin_family = 2    # AF_INET
            self.tx_addr[m].sin_port = self.seg_hop[i].port
            self.tx_addr[m].sin_addr.s_addr = self.seg_hop[i].addr
            self.tx_msgs[m].msg_hdr.msg_name = &self.tx_addr[m]
            self.tx_msgs[m].msg_hdr.msg_namelen = sizeof(sockaddr_in)
            self.tx_msgs[m].msg_hdr.msg_iov = &self.tx_iov[m]
            self.tx_msgs[m].msg_hdr.msg_iovlen = 1
            self.tx_msg_segs[m] = 1
            i += 1
            m += 1
            if m == self.batch:
                self._tx_send(m)
                m = 0
        if m:
            self._tx_send(m)
        self.tx_nseg = 0
        self.tx_pos = 0

    cdef void _tx_send(self, int nmsg) noexcept nogil:
        """sendmmsg the prepared messages, resuming after partial sends and waiting out a full socket buffer."""
        cdef int start = 0, r, i
        cdef pollfd fds[2]
        while start < nmsg:
            r = sendmmsg(self.sock_fd, self.tx_msgs + start, nmsg - start, 0)
            if r > 0:
                self.counters[C_TX_SEND_CALLS] += 1
                for i in range(start, start + r):
                    self.counters[C_TX_PACKETS] += self.tx_msg_segs[i]
                    self.counters[C_TX_BYTES] += self.tx_iov[i].iov_len
                start += r
            elif errno == EINTR:
                continue
            elif errno == EAGAIN:
                fds[0].fd = self.sock_fd
                fds[0].events = POLLOUT
                fds[1].fd = self.stop_fd
                fds[1].events = POLLIN
                poll(fds, 2, -1)
                if fds[1].revents:
                    return
            else:
                # The message at `start` was refused (no route to the peer, EPERM from a firewall, ...).
                self.counters[D_TX_SEND_ERROR] += self.tx_msg_segs[start]
                start += 1

    # ---- RX: UDP -> TUN -------------------------------------------------------------------------------------

    cdef int _rx_loop(self) noexcept nogil:
        cdef pollfd fds[2]
        cdef int i
        for i in range(MAX_BATCH):
            self.rx_iov[i].iov_base = self.rx_bufs + <size_t>i * SLOT
            self.rx_iov[i].iov_len = SLOT
            self.rx_msgs[i].msg_hdr.msg_iov = &self.rx_iov[i]
            self.rx_msgs[i].msg_hdr.msg_iovlen = 1
            self.rx_msgs[i].msg_hdr.msg_name = &self.rx_addr[i]
        fds[0].fd = self.sock_fd
        fds[0].events = POLLIN
        fds[1].fd = self.stop_fd
        fds[1].events = POLLIN
        while True:
            if poll(fds, 2, -1) < 0:
                if errno == EINTR:
                    continue
                return errno
            if fds[1].revents:
                return 0
            while self._rx_batch():
                pass

    cdef bint _rx_batch(self) noexcept nogil:
        """Receive one batch of datagrams and deliver them; True if the socket may have more."""
        cdef int i, r
        for i in range(self.batch):
            self.rx_msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_in)
        r = recvmmsg(self.sock_fd, self.rx_msgs, self.batch, MSG_DONTWAIT, NULL)
        if r <= 0:
            return r < 0 and errno == EINTR
        self.counters[C_RX_RECV_CALLS] += 1
        cdef const pt_table *t = pt_acquire(self.routes, HAZARD_RX)
        for i in range(r):
            self._rx_packet(t, self.rx_bufs + <size_t>i * SLOT, self.rx_msgs[i].msg_len, &self.rx_addr[i])
        pt_release(self.routes, HAZARD_RX)
        return r == self.batch

    cdef void _rx_packet(self, const pt_table *t, uint8_t *p, size_t n, const sockaddr_in *src) noexcept nogil:
        """Validate one datagram from the wire, check its sender, and write it to the TUN."""
        cdef unsigned ihl, total
        if n < 20:
            self.counters[D_RX_SHORT] += 1
            return
        if (p[0] >> 4) != 4:
            self.counters[D_RX_NOT_IPV4] += 1
            return
        ihl = (p[0] & 0x0f) * 4
        if ihl < 20:
            self.counters[D_RX_BAD_IHL] += 1
            return
        total = ntohs(load16(p + 2))
        if total > n or total < ihl:
            self.counters[D_RX_BAD_LENGTH] += 1
            return
        if csum_fold(csum_partial(p, ihl, 0)) != 0xffff:
            self.counters[D_RX_BAD_CHECKSUM] += 1
            return
        if self.check_source and not self._sender_ok(t, p, src):
            return
        if not ttl_decrement(p):
            self.counters[D_RX_TTL_EXPIRED] += 1
            return
        if write(self.tun_fd, p, total) != total:
            self.counters[D_RX_TUN_WRITE_ERROR] += 1
            return
        self.counters[C_TUN_WRITES] += 1
        self.counters[C_RX_PACKETS] += 1
        self.counters[C_RX_BYTES] += total

    cdef bint _sender_ok(self, const pt_table *t, const uint8_t *p, const sockaddr_in *src) noexcept nogil:
        """The outer source must be the peer whose subnet holds the inner source; counts the drop if not."""
        cdef uint32_t h = pt_lookup(t, ntohl(load32(p + 12)))
        if h != 0 and t.hops[h].addr == src.sin_addr.s_addr:
            return True
        for h in range(1, t.nhops + 1):
            if t.hops[h].addr == src.sin_addr.s_addr:
                self.counters[D_RX_SPOOFED_SOURCE] += 1
                return False
        self.counters[D_RX_UNKNOWN_PEER] += 1
        return False
