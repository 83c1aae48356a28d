/* IPv6 for the packet engine: inner IPv6 packets (prefix match on 16-byte addresses, hop limit, the ICMPv6 errors
 * the engine sends back into flannel0) and the TSO6/USO6 super-packets the TUN hands over.
 *
 * Nothing here is on the IPv4 path. The IPv6 header has no checksum, so the hop limit is decremented in place;
 * what needs a checksum (ICMPv6, the TCP/UDP segments of a split) sums the IPv6 pseudo-header (RFC 8200 8.1).
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

#define IP6_HLEN 40
#define IP6_MIN_MTU 1280
#define ICMP6_DST_UNREACH 1      /* code 0: no route to destination */
#define ICMP6_PACKET_TOO_BIG 2
#define ICMP6_TIME_EXCEEDED 3    /* code 0: hop limit exceeded in transit */
#define VNET_GSO_TCPV6 4

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

/* Pseudo-header sum: both addresses of iph, the upper-layer length, the next header. */
static inline uint64_t csum_pseudo6(const uint8_t *iph, uint8_t proto, uint32_t l4len)
{
    const uint8_t tail[8] = { (uint8_t)(l4len >> 24), (uint8_t)(l4len >> 16), (uint8_t)(l4len >> 8), (uint8_t)l4len,
                              0, 0, 0, proto };
    return csum_partial(tail, 8, csum_partial(iph + 8, 32, 0));
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

/* Split a TSO6 (GSO_TCPV6) or USO (GSO_UDP_L4) IPv6 super-packet, as gso_split does IPv4 ones: each segment gets
 * its payload length, TCP sequence number and flags, or UDP length, and a full L4 checksum. Extension headers
 * are not expected from the local stack's TSO and make the packet malformed (-1). */
static int gso_split6(const uint8_t *pkt, size_t len, uint8_t gso_type, uint16_t gso_size,
                      uint8_t *out, size_t cap, uint16_t *seg_len, int max_segs)
{
    if (len < IP6_HLEN + 8 || (pkt[0] >> 4) != 6 || gso_size == 0)
        return -1;
    uint8_t proto = pkt[6];
    unsigned l4hl;
    if (gso_type == VNET_GSO_TCPV6 && proto == 6) {
        if (len < IP6_HLEN + 20u)
            return -1;
        l4hl = (pkt[IP6_HLEN + 12] >> 4) * 4u;
        if (l4hl < 20 || len < IP6_HLEN + l4hl)
            return -1;
    } else if (gso_type == VNET_GSO_UDP_L4 && proto == 17) {
        l4hl = 8;
    } else {
        return -1;
    }
    size_t hl = IP6_HLEN + l4hl, payload = len - hl;
    int nseg = payload ? (int)((payload + gso_size - 1) / gso_size) : 1;
    if (nseg > max_segs)
        return -1;
    uint32_t seq = proto == 6 ? get32(pkt + IP6_HLEN + 4) : 0;
    size_t off = 0;
    for (int i = 0; i < nseg; i++) {
        size_t from = (size_t)i * gso_size;
        size_t chunk = payload - from < gso_size ? payload - from : gso_size;
        size_t seglen = hl + chunk;
        if (off + seglen > cap)
            return -1;
        uint8_t *s = out + off, *l4 = s + IP6_HLEN;
        memcpy(s, pkt, hl);
        memcpy(s + hl, pkt + hl + from, chunk);
        put16(s + 4, (uint16_t)(l4hl + chunk));
        unsigned at = 16;
        if (proto == 6) {
            put32(l4 + 4, seq + (uint32_t)from);
            if (i != nseg - 1)
                l4[13] &= (uint8_t)~(TCP_FIN | TCP_PSH);
            if (i != 0)
                l4[13] &= (uint8_t)~TCP_CWR;
        } else {
            put16(l4 + 4, (uint16_t)(8 + chunk));
            at = 6;
        }
        l4[at] = l4[at + 1] = 0;
        uint16_t c = csum_finish(csum_partial(l4, l4hl + chunk, csum_pseudo6(s, proto, (uint32_t)(l4hl + chunk))));
        if (proto == 17 && c == 0)
            c = 0xffff;          /* a zero UDP checksum is not allowed over IPv6 (RFC 8200 8.1) */
        memcpy(l4 + at, &c, 2);
        seg_len[i] = (uint16_t)seglen;
        off += seglen;
    }
    return nseg;
}

/* gso_split or gso_split6, by the packet's IP version. */
static inline int ip_gso_split(const uint8_t *pkt, size_t len, uint8_t gso_type, uint16_t gso_size,
                               uint8_t *out, size_t cap, uint16_t *seg_len, int max_segs)
{
    if (len && (pkt[0] >> 4) == 6)
        return gso_split6(pkt, len, gso_type, gso_size, out, cap, seg_len, max_segs);
    return gso_split(pkt, len, gso_type, gso_size, out, cap, seg_len, max_segs);
}

#endif
