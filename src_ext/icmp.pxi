# The errors the TX side writes back into flannel0: ICMP net unreachable for a destination no lease covers, and
# ICMPv6 destination unreachable / time exceeded; all under one rate limit shared by the engines of a tunnel.
#
# flannel sends its unreachable from flannel0's own address, which the kernel then drops as a martian (a local
# source arriving from outside, unless accept_local is set), so flannel's errors never reach the sender. Ours come
# from the unreachable destination itself: not a local address, and routed via flannel0, so reverse-path checks
# pass and the sender sees ENETUNREACH. Unlike flannel's they are rate-limited like the kernel's own.

cdef enum:
    ICMP_PER_SEC = 1000      # the kernel's net.ipv4.icmp_msgs_per_sec ...
    ICMP_BURST = 50          # ... and net.ipv4.icmp_msgs_burst


cdef inline bint icmp_is_error(uint8_t type) noexcept nogil:
    """An ICMP error message (RFC 1122 3.2.2: never answered with another error): destination unreachable,
    source quench, redirect, time exceeded, parameter problem. An echo request is not one: a ping to an unleased
    address gets its unreachable like any other packet."""
    return type == 3 or type == 4 or type == 5 or type == 11 or type == 12


cdef void icmp_unreachable(engine *e, int tun, const uint8_t *p, ssize_t n, unsigned ihl) noexcept nogil:
    """ICMP 3/0 back into the TUN queue from the destination's address (not about an ICMP error, not for non-first
    fragments: flannel's exceptions, narrowed to the errors RFC 1122 names)."""
    if (p[9] == 1 and (n <= ihl or icmp_is_error(p[ihl]))) or (load16(p + 6) & htons(0x1fff)) != 0:
        return
    if not icmp_allowed(e):
        e.counters[C_icmp_unreachable_rate_limited] += 1
        return
    cdef unsigned quote = ihl + (ICMP_QUOTE if n - ihl >= ICMP_QUOTE else n - ihl)
    cdef unsigned total = 20 + 8 + quote
    cdef uint8_t *o = e.tx.icmp
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
    if tun_write_plain(e, tun, o, total, SIDE_TX) == 0:
        e.counters[C_icmp_unreachable_sent] += 1


cdef void icmp6_error(engine *e, int tun, const uint8_t *p, ssize_t n, uint8_t type, int counter) noexcept nogil:
    """An ICMPv6 error (code 0) back into the TUN queue from the packet's destination, as icmp_unreachable does
    for IPv4 (RFC 4443's exceptions: ipv6.h), under the same rate limit."""
    cdef size_t total
    if not ip6_error_allowed(p, n, type):
        return
    if not icmp_allowed(e):
        e.counters[C_icmp_unreachable_rate_limited] += 1
        return
    total = ip6_build_error(e.tx.icmp6, p, n, p + 24, type, 0, 0)
    if tun_write_plain(e, tun, e.tx.icmp6, total, SIDE_TX) == 0:
        e.counters[counter] += 1


cdef bint icmp_allowed(engine *e) noexcept nogil:
    """A rate limit like the kernel's global ICMP limit: ICMP_PER_SEC errors a second, bursts of ICMP_BURST
    (flannel has none: one error per packet, so a sender to nowhere got as many as it sent). A token bucket in one
    word (GCRA: the time at which the bucket is full again), so that the engines of a tunnel share it with one
    compare-and-swap."""
    cdef uint64_t cost = 1000000000 // ICMP_PER_SEC, t = now_ns(), next_tat
    cdef uint64_t tat = load64(e.icmp_tat)
    while True:
        next_tat = max(tat, t) + cost
        if next_tat - t > ICMP_BURST * cost:
            return False
        if cas64(e.icmp_tat, &tat, next_tat):
            return True
