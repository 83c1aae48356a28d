/* IPv6 for the packet engine: what inner IPv6 packets need beyond the IPv4 path (source prefix check, link-scope
 * traffic, the ICMPv6 errors the engine sends back into flannel0). Super-packets of both families are split by
 * offload.h's gso_split.
 *
 * The IPv6 header has no checksum, so the hop limit is decremented in place; ICMPv6 sums the pseudo-header.
 * ICMPv6 errors follow RFC 4443 2.4: never about an ICMPv6 error, nor about a packet to a multicast address
 * (Packet Too Big excepted), nor about a non-first fragment; as much of the offending packet is quoted as keeps
 * the error within the IPv6 minimum MTU.
 */
#ifndef PYFLANNEL_IPV6_H
#define PYFLANNEL_IPV6_H

#include <stdint.h>
#include <string.h>

#include "csum.h"
#include "offload.h"

#define IP6_MIN_MTU 1280
#define ICMP6_DST_UNREACH 1      /* code 0: no route to destination */
#define ICMP6_PACKET_TOO_BIG 2
#define ICMP6_TIME_EXCEEDED 3    /* code 0: hop limit exceeded in transit */

/* Whether addr (16 bytes) lies in net/plen. */
static inline int ip6_in_prefix(const uint8_t *addr, const uint8_t *net, unsigned plen)
{
    unsigned whole = plen / 8, bits = plen % 8;
    if (memcmp(addr, net, whole) != 0)
        return 0;
    return bits == 0 || ((addr[whole] ^ net[whole]) & (uint8_t)(0xff00 >> bits)) == 0;
}

/* Traffic that belongs to flannel0's own link and never crosses the overlay: to a multicast address, or from a
 * link-local or the unspecified address (the kernel's neighbour discovery and MLD on the device). */
static inline int ip6_link_scope(const uint8_t *p)
{
    static const uint8_t unspecified[16];
    return p[24] == 0xff || (p[8] == 0xfe && (p[9] & 0xc0) == 0x80) || memcmp(p + 8, unspecified, 16) == 0;
}

/* The upper-layer protocol and its offset, past the extension headers an error decision needs to see through;
 * -1 for a non-first fragment or a header chain that does not fit in the n bytes. */
static inline int ip6_upper(const uint8_t *p, size_t n, uint8_t *proto, size_t *off)
{
    uint8_t next = p[6];
    size_t at = IP6_HLEN;
    for (int hops = 0; hops < 8; hops++) {
        if (next != 0 && next != 43 && next != 44 && next != 60) {
            *proto = next;
            *off = at;
            return 0;
        }
        if (at + 8 > n)
            return -1;
        if (next == 44 && (get16(p + at + 2) & 0xfff8) != 0)
            return -1;
        size_t len = next == 44 ? 8 : ((size_t)p[at + 1] + 1) * 8;
        next = p[at];
        at += len;
    }
    return -1;
}

/* May an error of this type be sent about packet p (RFC 4443 2.4 (e))? */
static inline int ip6_error_allowed(const uint8_t *p, size_t n, uint8_t type)
{
    uint8_t proto;
    size_t off;
    if (ip6_upper(p, n, &proto, &off) < 0)
        return 0;
    if (proto == 58 && (off >= n || p[off] < 128))
        return 0;           /* about an ICMPv6 error (or one too short to tell) */
    if (p[8] == 0xff)
        return 0;           /* from a multicast source */
    return type == ICMP6_PACKET_TOO_BIG || p[24] != 0xff;
}

/* Build at `out` (IP6_MIN_MTU bytes of room) the ICMPv6 error (type, code, 32-bit param) about the n-byte packet
 * p, sent from `src` to p's source with hop limit 64; returns its length. */
static size_t ip6_build_error(uint8_t *out, const uint8_t *p, size_t n, const uint8_t *src, uint8_t type,
                              uint8_t code, uint32_t param)
{
    size_t quote = n < IP6_MIN_MTU - IP6_HLEN - 8 ? n : IP6_MIN_MTU - IP6_HLEN - 8;
    size_t l4len = 8 + quote;
    memset(out, 0, IP6_HLEN + 8);
    out[0] = 0x60;
    put16(out + 4, (uint16_t)l4len);
    out[6] = 58;
    out[7] = 64;
    memcpy(out + 8, src, 16);
    memcpy(out + 24, p + 8, 16);
    uint8_t *icmp = out + IP6_HLEN;
    icmp[0] = type;
    icmp[1] = code;
    put32(icmp + 4, param);
    memcpy(icmp + 8, p, quote);
    uint16_t c = csum_finish(csum_partial(icmp, l4len, csum_pseudo6(out, 58, (uint32_t)l4len)));
    memcpy(icmp + 2, &c, 2);
    return IP6_HLEN + l4len;
}

#endif
