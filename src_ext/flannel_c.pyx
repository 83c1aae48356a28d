# cython: language_level=3, boundscheck=False, wraparound=False
"""flannel's udp proxy, the design: flannel-bench's reference for what flannel's own udp backend costs here.

flannel moves its udp backend's packets in one C thread (pkg/backend/udp/proxy_amd64.c): poll() on the TUN and
the socket; once woken, read one packet from the TUN and send it, receive one datagram and write it, again and
again until neither has anything, then poll. No batches, no offloads, the socket's default buffers, a linear
route scan with move-to-front, the TTL decremented each way with an incremental checksum fix. This is that loop,
written here, so that `flannel-bench --modes flannel-c` runs flannel's design on any machine and every other
mode's latency can be set against it in one run. Left out, as they cost nothing per packet: ICMP errors, the
control socket (routes are given at start; stop is a readable fd).
"""

from cpython.mem cimport PyMem_Malloc, PyMem_Free
from libc.stdint cimport uint8_t, uint32_t
from libc.string cimport memcpy
from posix.unistd cimport read, write

from syscalls cimport sockaddr_in, htons, htonl, ntohl, pollfd, poll, POLLIN, MSG_DONTWAIT, recv, sendto

cdef enum:
    MAX_ROUTES = 64
    BUF = 65536
    AF_INET = 2


cdef struct route:
    uint32_t net        # host order
    uint32_t mask
    sockaddr_in peer


cdef struct proxy:
    int tun, sock
    int nroutes
    route routes[MAX_ROUTES]
    uint8_t buf[BUF]


cdef bint ttl_down(uint8_t *p) noexcept nogil:
    """TTL - 1 and the header checksum + 0x0100 (RFC 1624), as flannel's decrement_ttl; False at 0."""
    cdef uint32_t sum
    if p[8] <= 1:
        return False
    p[8] -= 1
    sum = (p[10] << 8 | p[11]) + 0x0100
    sum = (sum & 0xffff) + (sum >> 16)
    p[10] = sum >> 8
    p[11] = sum & 0xff
    return True


cdef route *find_route(proxy *px, uint32_t dst) noexcept nogil:
    """The first route holding dst, moved to the front (flannel's find_route)."""
    cdef int i
    cdef route found
    for i in range(px.nroutes):
        if dst & px.routes[i].mask == px.routes[i].net:
            found = px.routes[i]
            while i > 0:
                px.routes[i] = px.routes[i - 1]
                i -= 1
            px.routes[0] = found
            return &px.routes[0]
    return NULL


cdef bint tun_to_udp(proxy *px) noexcept nogil:
    cdef ssize_t n = read(px.tun, px.buf, BUF)
    cdef uint32_t dst
    cdef route *r
    if n < 20:
        return n > 0
    memcpy(&dst, px.buf + 16, 4)
    r = find_route(px, ntohl(dst))
    if r != NULL and ttl_down(px.buf):
        sendto(px.sock, px.buf, n, 0, &r.peer, sizeof(sockaddr_in))
    return True


cdef bint udp_to_tun(proxy *px) noexcept nogil:
    cdef ssize_t n = recv(px.sock, px.buf, BUF, MSG_DONTWAIT)
    if n < 20:
        return n >= 0
    if ttl_down(px.buf):
        write(px.tun, px.buf, n)
    return True


cdef void serve(proxy *px, int stop_fd) noexcept nogil:
    cdef pollfd fds[3]
    cdef bint busy
    cdef int i
    fds[0].fd = px.tun
    fds[1].fd = px.sock
    fds[2].fd = stop_fd
    for i in range(3):
        fds[i].events = POLLIN
    while True:
        if poll(fds, 3, -1) < 0:
            continue
        if fds[2].revents:
            return
        busy = True
        while busy:
            busy = tun_to_udp(px)
            busy = udp_to_tun(px) or busy


def run(int tun_fd, int sock_fd, int stop_fd, routes) -> None:
    """Forward between a non-blocking TUN fd and an IPv4 UDP socket until stop_fd is readable. routes:
    (network, netmask, peer address, port) tuples, the first three as host-order integers."""
    cdef proxy *px
    if len(routes) > MAX_ROUTES:
        raise ValueError(f"at most {MAX_ROUTES} routes")
    px = <proxy *>PyMem_Malloc(sizeof(proxy))
    if px == NULL:
        raise MemoryError()
    try:
        px.tun, px.sock, px.nroutes = tun_fd, sock_fd, len(routes)
        for i, (net, mask, peer, port) in enumerate(routes):
            px.routes[i].net, px.routes[i].mask = net, mask
            px.routes[i].peer.sin_family = AF_INET
            px.routes[i].peer.sin_port = htons(port)
            px.routes[i].peer.sin_addr.s_addr = htonl(peer)
        with nogil:
            serve(px, stop_fd)
    finally:
        PyMem_Free(px)

