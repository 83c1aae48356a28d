# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The packet engine: flannel0 (TUN) <-> UDP in C with the GIL released, one thread per engine, one engine per
queue of flannel0 (dataplane.pump), each engine serving a few of flannel0's TUN queues and their sockets.

Where things are (each part a file of src_ext/, included below):
- state.pxi   the engine's C state (one struct: configuration, buckets, the TX and RX sides), TUN writes
- tx.pxi      TUN -> UDP: read, check, route, split TSO super-packets, send (sendmmsg, UDP_SEGMENT trains)
- rx.pxi      UDP -> TUN: receive (recvmmsg, UDP_GRO trains), validate, check the sender, coalesce, write
- icmp.pxi    the errors written back into flannel0 (no route, hop limit), under one rate limit
- worker.pxi  the thread: what it waits on, in which order it serves, when it sleeps
- counters.h  every counter, once; prefix_table.h the route table; offload.h the virtio header, GSO split and
              coalescing; steering.h which bucket a flow lands in; peer_stats.h/peer6.h the configured peers

What is flannel's and what is ours:
- Wire format is flannel's udp backend, bit for bit: the UDP payload is the raw inner IPv4 packet, nothing more,
  default port 8285 (pkg/backend/udp). A flannel node and a pyflannel node exchange packets unchanged.
- Ours: dual stack. The inner packet may be IPv6 and is carried the same way (the receiver tells the families
  apart by the version nibble, and a flannel node never routes IPv6 to the udp backend, so never sees one). The
  underlay may be IPv6 too: a socket of each family per bucket; either inner family travels over either underlay,
  chosen per route by the peer's address family.
- Ours: batches and offloads. recvmmsg/sendmmsg; with a virtio header the kernel hands over 64 KiB TSO
  super-packets, which TX splits; runs of equal-size segments to one peer leave as one UDP_SEGMENT message (each
  datagram on the wire still one inner packet: flannel's format); UDP_GRO delivers trains; consecutive segments
  of one flow are merged again into one GSO write into flannel0 (UDP ones too when the TUN takes USO). Each
  offload is optional (dataplane.offload probes them), and a send refused with EIO turns GSO off, a merged write
  refused with EINVAL turns coalescing off. With batch 1 and no offloads each direction is one packet per
  syscall, and the thread sleeps at once: flannel's C proxy design, the baseline of every speed figure.
- Ours: buckets and fairness (worker.pxi). flannel0 has several TUN queues per engine, each with its own socket
  of a SO_REUSEPORT group, and the kernel keeps each flow in one bucket both ways (steering.h): a flow is never
  reordered, and a request is not stuck behind another flow's bulk data in one queue.
- The routing table is a prefix_table.h table read lock-free: the thread pins the current table in the reader slot
  of the side it serves for one quantum, up to the last use of what its routes led to (the peers' slots: the sends
  and the per-peer counts), so a route change never waits for traffic, and traffic never waits for a change (a
  thread waiting for socket space only delays the freeing of what changes replaced). The sender check and the
  per-peer counters are O(1) lookups in the peer slots (peer_stats.h, peer6.h), which are reused once no thread
  can see them (peer_slots.h). Per quantum, not per packet: a run of packets to one destination looks its route up
  once, a run from one sender and inner source is checked once, per-peer counters are added once per run.
- A side whose TUN or socket is gone (a deleted flannel0 answers EBADFD to everything and POLLERR to poll) stops
  the engine for good and records why (Engine.failure()); it never retries in a loop. A TUN that is merely down
  refuses writes with EIO: a per-packet drop, not a failure.
- Nothing here allocates or touches a Python object per packet; all buffers are allocated at construction.
"""

import ipaddress

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset
from libc.stdlib cimport calloc, free
from libc.errno cimport errno, EAGAIN, EINTR, EIO, EINVAL, EBADF, EBADFD, ENODEV, ENXIO, ENOTSOCK, EFAULT
from posix.unistd cimport read, write, close
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

from syscalls cimport (
    iovec, readv, writev, sockaddr_in, sockaddr_in6, htons, ntohs, htonl, ntohl, mmsghdr, recvmmsg, sendmmsg,
    MSG_DONTWAIT, pollfd, poll, POLLIN, POLLOUT, POLLERR, POLLHUP, POLLNVAL, eventfd, EFD_NONBLOCK, EFD_CLOEXEC,
    sched_yield,
)
from prefix_table cimport (
    pt_table, pt_handle, pt_hop, pt_lookup, pt_lookup6, pt_routed, pt_leaf_hop, pt_acquire, pt_release, PT_QUEUES,
)
from offload cimport (
    csum_partial, csum_fold, csum_finish, csum_replace2, ip4_set_check, VNET_HDR_LEN, VNET_F_NEEDS_CSUM,
    VNET_GSO_NONE, GSO_MAX_SEGS, GRO_IOVS, vnet_hdr, gro_item, gro_table, vnet_finish_csum, gso_split, gro_reset, gro_add,
    gro_finish, gro_unmerge, CMSG_ROOM, cmsg_set_segment, cmsg_parse_rx,
    peer_slot, peer_table, peer_find, peer_configured, peer_add,
    peer6_slot, peer6_table, peer6_find, peer6_configured,
)
from ipv6 cimport (
    IP6_HLEN, IP6_MIN_MTU, ICMP6_DST_UNREACH, ICMP6_TIME_EXCEEDED, ip6_in_prefix, ip6_link_scope, ip6_error_allowed,
    ip6_build_error,
)
from steering cimport steer_hash


include "prefix_table.pxi"
include "offload.pxi"
include "steering.pxi"
include "state.pxi"
include "icmp.pxi"
include "tx.pxi"
include "rx.pxi"
include "worker.pxi"


MAX_QUEUES = PT_QUEUES       # engines that can share one prefix table (a reader slot per side each)
BUCKETS_MAX = MAX_BUCKETS    # TUN queues one engine can serve

COUNTERS = tuple(COUNTER_INFO_TABLE[i].name.decode() for i in range(N_COUNTERS) if not COUNTER_INFO_TABLE[i].drop)
DROPS = tuple(COUNTER_INFO_TABLE[i].name.decode() for i in range(N_COUNTERS) if COUNTER_INFO_TABLE[i].drop)
EXPORTED = {COUNTER_INFO_TABLE[i].name.decode(): (COUNTER_INFO_TABLE[i].family.decode(),
                                                  COUNTER_INFO_TABLE[i].label.decode(),
                                                  COUNTER_INFO_TABLE[i].value.decode())
            for i in range(N_COUNTERS)}


cdef class Engine:
    """Moves packets between TUN queues and UDP sockets (IPv4, and IPv6 when given), one bucket per TUN queue, in
    one thread, or two under load: run() and run_helper() block, with the GIL released, until stop(). The fds stay
    the caller's. The offload switches must match how the fds were set up (dataplane.offload probes and enables
    them)."""

    cdef engine *e
    cdef readonly PrefixTable table
    cdef object icmp_owner          # the engine whose ICMP rate limit this one shares, kept alive here
    # How many of the engine's own eventfds (stop_fd, then wake_fd[0], wake_fd[1]) are open. A count that starts at
    # zero, not fds of -1 written by __cinit__: when the arguments do not parse, __dealloc__ runs on zeroed fields
    # before any line of __cinit__, and fd 0 is somebody's stdin.
    cdef int owned_fds

    def __cinit__(self, tun_fds, socks, PrefixTable table not None, *, socks6=(), int batch=64,
                  bint check_source=True, bint vnet_hdr=False, bint gso=False, bint gro=False, bint coalesce=False,
                  bint uso=False, local_subnet=None, local_subnet6=None, int queue=0, Engine icmp_shared_with=None,
                  spin_us=None, bint helper=False, handover=None):
        """One bucket per TUN fd in `tun_fds`, each with the socket at the same place in `socks` (IPv4) and in
        `socks6` (IPv6): either list may be empty (no underlay of that family), not both. `queue`: which of the
        table's engines this is (0 to MAX_QUEUES - 1: its reader slots). `icmp_shared_with`: another engine of the
        same tunnel, whose ICMP rate limit this one shares. `uso`: the TUN takes GSO_UDP_L4 writes, so coalescing
        merges UDP flows too. `spin_us`: how long a thread looks for more work before it sleeps (default: none
        with batch 1, as flannel's proxy; else worker.pxi's SPIN_NS). `helper`: a second thread will call
        run_helper() and take the RX side while one thread is not enough; `handover` (heavy, light), in permille
        of a window, says when (worker.pxi: HEAVY_PERMILLE, LIGHT_PERMILLE; (0, 1000) hands over every window,
        which the tests use)."""
        tun_fds, socks, socks6 = [int(fd) for fd in tun_fds], [int(fd) for fd in socks], [int(fd) for fd in socks6]
        if not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"batch {batch} out of range 1-{MAX_BATCH}")
        if not 0 <= queue < MAX_QUEUES:
            raise ValueError(f"queue {queue} out of range 0-{MAX_QUEUES - 1}")
        if not 1 <= len(tun_fds) <= MAX_BUCKETS:
            raise ValueError(f"{len(tun_fds)} TUN queues; an engine serves 1-{MAX_BUCKETS}")
        if not socks and not socks6:
            raise ValueError("no underlay socket")
        if any(family and len(family) != len(tun_fds) for family in (socks, socks6)):
            raise ValueError(f"{len(tun_fds)} TUN queues but {len(socks)} IPv4 and {len(socks6)} IPv6 sockets")
        if coalesce and not vnet_hdr:
            raise ValueError("coalescing needs a TUN with virtio headers")
        self.e = <engine *>calloc(1, sizeof(engine))
        if self.e == NULL:
            raise MemoryError()
        cdef engine *e = self.e
        e.batch = batch
        e.helper = helper
        e.heavy_permille, e.light_permille = (HEAVY_PERMILLE, LIGHT_PERMILLE) if handover is None else handover
        e.spin_ns = (0 if batch == 1 else SPIN_NS) if spin_us is None else int(spin_us * 1000)
        e.vnet_hdr, e.gso, e.gro, e.coalesce = vnet_hdr, gso, gro, coalesce
        e.check_source = check_source
        e.check_tx_source = check_source and (local_subnet is not None or local_subnet6 is not None)
        _set_subnets(e, local_subnet, local_subnet6)
        e.nbuckets = len(tun_fds)
        for i, fd in enumerate(tun_fds):
            e.buckets[i].tun = fd
            e.buckets[i].sock[FAM4] = socks[i] if socks else -1
            e.buckets[i].sock[FAM6] = socks6[i] if socks6 else -1
        e.reader[SIDE_TX] = SIDE_TX + 2 * queue
        e.reader[SIDE_RX] = SIDE_RX + 2 * queue
        self.table = table
        e.routes = table._handle()
        e.peers = table._peer_table()
        e.peers6 = table._peer6_table()
        self.icmp_owner = icmp_shared_with
        e.icmp_tat = &e.icmp_tat_own if icmp_shared_with is None else icmp_shared_with.e.icmp_tat
        if not _allocate(e, uso):
            raise MemoryError()
        rx_setup(e)
        cdef int *fds[3]
        fds[0], fds[1], fds[2] = &e.stop_fd, &e.wake_fd[LEAD], &e.wake_fd[HELPER]
        for i in range(3):
            fds[i][0] = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
            if fds[i][0] < 0:
                raise OSError(errno, "eventfd failed")
            self.owned_fds += 1

    def __dealloc__(self):
        if self.e == NULL:
            return
        for fd in (self.e.stop_fd, self.e.wake_fd[LEAD], self.e.wake_fd[HELPER])[:self.owned_fds]:
            close(fd)
        _release(self.e)
        free(self.e)

    def run(self) -> None:
        """The lead thread: both directions of every bucket (only TX while the helper has RX) until stop(), or
        until a TUN queue or a socket is gone (then failure() says why)."""
        with nogil:
            serve(self.e, LEAD)

    def run_helper(self) -> None:
        """The helper thread (with helper=True): parked until the lead hands it the RX side, until stop() or a
        failure."""
        if not self.e.helper:
            raise RuntimeError("this engine was built without a helper")
        with nogil:
            serve(self.e, HELPER)

    def failure(self) -> tuple[str, int] | None:
        """("TX" or "RX", errno) for a side that stopped the engine on its own, None while it runs or was stopped."""
        for side, name in ((SIDE_TX, "TX"), (SIDE_RX, "RX")):
            if acquire32(&self.e.failed[side]):
                return name, acquire32(&self.e.failed[side])
        return None

    def stop(self) -> None:
        """Wake the threads and make them return; idempotent."""
        cdef uint64_t one = 1
        write(self.e.stop_fd, &one, 8)

    def memory(self) -> dict[str, int]:
        """Bytes this engine allocated, by what for (_allocate says why each is that size); the kernel's socket and
        TUN queues come on top, and only while packets wait in them."""
        return {name: self.e.allocated[kind] for kind, name in MEMORY.items()}

    def stats(self) -> dict:
        """Counters as plain ints (COUNTERS), drops by reason under "drops" (DROPS), the offloads in use under
        "offloads", and per configured peer address under "peers" (tx: inner packets sent to it; rx: packets
        accepted from it)."""
        cdef engine *e = self.e
        e.counters[C_rx_socket_overflow] = rx_socket_drops(e)
        values = {COUNTER_INFO_TABLE[i].name.decode(): e.counters[i] for i in range(N_COUNTERS)}
        out = {name: values[name] for name in COUNTERS}
        out["drops"] = {name: values[name] for name in DROPS}
        out["offloads"] = {"vnet_hdr": e.vnet_hdr, "gso": e.gso, "gro": e.gro, "coalesce": e.coalesce}
        out["peers"] = self.table.peer_counts()
        return out


cdef void _set_subnets(engine *e, local_subnet, local_subnet6) except *:
    """This node's subnets, which the inner sources of what it sends must be in."""
    if local_subnet is not None:
        subnet = ipaddress.IPv4Network(local_subnet)
        e.has_subnet4 = True
        e.local_net = int(subnet.network_address)
        e.local_mask = int(subnet.netmask)
    if local_subnet6 is not None:
        subnet6 = ipaddress.IPv6Network(local_subnet6)
        net6 = subnet6.network_address.packed
        e.has_subnet6 = True
        memcpy(e.local_net6, <const char *>net6, 16)
        e.local_plen6 = subnet6.prefixlen


MEMORY = {MEM_RX_SLOTS: "rx_slots", MEM_TX_ARENA: "tx_arena", MEM_TX_READ: "tx_read", MEM_TX_SEGMENTS: "tx_segments",
          MEM_GRO_TABLE: "gro_table", MEM_MESSAGES: "messages", MEM_ENGINE: "engine"}
assert sorted(MEMORY) == list(range(MEM_KINDS)), "every kind of engine memory has a name"


cdef bint _allocate(engine *e, bint uso) noexcept:
    """Every buffer of both sides, sized for the engine's batch, and how much went where (Engine.memory()); False
    when memory runs out (what was allocated is freed by _release). Why each is that size:
      rx_slots    batch receive slots of 64 KiB: with UDP_GRO any one message may be a 64 KiB train, and a slot
                  too small for it would truncate it (the kernel drops the rest)
      tx_arena    what one quantum reads before it is sent: up to 1 MiB, and room past it for the segments of the
                  last super-packet read (a 64 KiB TSO read splits into 64 KiB and a header per segment)
      tx_read     one TUN read, which may be a 64 KiB super-packet (split from there into the arena)
      tx_segments per-segment offset, length and route, for as many segments as the arena can hold
      gro_table   what coalescing tracks per receive: an item per inner packet of a full batch of trains
      messages    the mmsghdr, iovec, address and control room of `batch` messages, each way"""
    cdef tx_state *tx = &e.tx
    cdef rx_state *rx = &e.rx
    rx.bufs = <uint8_t *>_take(e, MEM_RX_SLOTS, e.batch, SLOT)
    tx.arena = <uint8_t *>_take(e, MEM_TX_ARENA, ARENA + ARENA_SLACK, 1)
    tx.rbuf = <uint8_t *>_take(e, MEM_TX_READ, READ_MAX + 1, 1)
    tx.seg_off = <uint32_t *>_take(e, MEM_TX_SEGMENTS, MAX_SEGS, sizeof(uint32_t))
    tx.seg_len = <uint16_t *>_take(e, MEM_TX_SEGMENTS, MAX_SEGS, sizeof(uint16_t))
    tx.seg_hop = <pt_hop *>_take(e, MEM_TX_SEGMENTS, MAX_SEGS, sizeof(pt_hop))
    tx.msgs = <mmsghdr *>_take(e, MEM_MESSAGES, e.batch, sizeof(mmsghdr))
    tx.iov = <iovec *>_take(e, MEM_MESSAGES, e.batch, sizeof(iovec))
    tx.addr = <sockaddr_in6 *>_take(e, MEM_MESSAGES, e.batch, sizeof(sockaddr_in6))
    tx.cmsg = <uint8_t *>_take(e, MEM_MESSAGES, e.batch, CMSG_ROOM)
    tx.msg_segs = <int *>_take(e, MEM_MESSAGES, e.batch, sizeof(int))
    tx.msg_first = <int *>_take(e, MEM_MESSAGES, e.batch, sizeof(int))
    rx.msgs = <mmsghdr *>_take(e, MEM_MESSAGES, e.batch, sizeof(mmsghdr))
    rx.iov = <iovec *>_take(e, MEM_MESSAGES, e.batch, sizeof(iovec))
    rx.addr = <sockaddr_in6 *>_take(e, MEM_MESSAGES, e.batch, sizeof(sockaddr_in6))
    rx.cmsg = <uint8_t *>_take(e, MEM_MESSAGES, e.batch, CMSG_ROOM)
    rx.flows = new_gro_table(e.batch * GSO_MAX_SEGS, GRO_POOL)
    e.allocated[MEM_GRO_TABLE] = gro_table_size(e.batch * GSO_MAX_SEGS, GRO_POOL)
    e.allocated[MEM_ENGINE] = sizeof(engine)
    if rx.flows:
        rx.flows.udp = e.coalesce and uso
    return (tx.rbuf and tx.arena and tx.seg_off and tx.seg_len and tx.seg_hop and tx.msgs and tx.iov and tx.addr
            and tx.cmsg and tx.msg_segs and tx.msg_first and rx.bufs and rx.msgs and rx.iov and rx.addr and rx.cmsg
            and rx.flows)


cdef void *_take(engine *e, int what, size_t count, size_t size) noexcept:
    """calloc, counted under `what`."""
    e.allocated[what] += count * size
    return calloc(count, size)


cdef void _release(engine *e) noexcept:
    free(e.tx.rbuf)
    free(e.tx.arena)
    free(e.tx.seg_off)
    free(e.tx.seg_len)
    free(e.tx.seg_hop)
    free(e.tx.msgs)
    free(e.tx.iov)
    free(e.tx.addr)
    free(e.tx.cmsg)
    free(e.tx.msg_segs)
    free(e.tx.msg_first)
    free(e.rx.bufs)
    free(e.rx.msgs)
    free(e.rx.iov)
    free(e.rx.addr)
    free(e.rx.cmsg)
    free_gro_table(e.rx.flows)
