# C declarations of ipv6.h (inner IPv6: prefix checks, link-scope traffic, ICMPv6 errors).

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "ipv6.h" nogil:
    enum:
        IP6_HLEN
        IP6_MIN_MTU
        ICMP6_DST_UNREACH
        ICMP6_PACKET_TOO_BIG
        ICMP6_TIME_EXCEEDED
    bint ip6_in_prefix(const uint8_t *addr, const uint8_t *net, unsigned plen)
    # To a multicast address, or from a link-local or the unspecified one: flannel0's own link traffic.
    bint ip6_link_scope(const uint8_t *p)
    # May an error of this ICMPv6 type be sent about this packet (RFC 4443 2.4)?
    bint ip6_error_allowed(const uint8_t *p, size_t n, uint8_t type)
    # The error about p, from src to p's source, built at out (IP6_MIN_MTU bytes); its length.
    size_t ip6_build_error(uint8_t *out, const uint8_t *p, size_t n, const uint8_t *src, uint8_t type,
                           uint8_t code, uint32_t param)
