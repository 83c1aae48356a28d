/* Offload helpers: the virtio-net header, TSO/USO super-packet splitting (TX) and TCP coalescing (RX).
 *
 * The TUN device, opened with IFF_VNET_HDR, prefixes every packet with a 10-byte struct virtio_net_hdr (legacy
 * layout, host byte order: TUNSETVNETHDRSZ and TUNSETVNETLE are never called). With TUN_F_TSO4/TSO6 the kernel
 * hands us TCP super-packets (IPv4/IPv6) of up to 64 KiB and a gso_size (the MSS); gso_split() cuts them into
 * wire-size segments.
 * On the way in, gro_add() merges consecutive segments of one TCP flow (IPv4 or IPv6) so that one writev() carries
 * many packets without copying any of them (an iovec list: the first packet, then each further payload where it
 * was received), following the kernel's GRO rules (net/ipv4/tcp_offload.c tcp_gro_receive; the same rules
 * wireguard-go's tcpGRO applies); when the TUN takes USO, consecutive datagrams of one UDP flow (either family)
 * too (one GSO_UDP_L4 write, which the kernel cuts back into the same datagrams, as wireguard-go's udpGRO).
 * Everything here is pure C over caller-owned buffers so it can be tested without a TUN.
 */
#ifndef PYFLANNEL_OFFLOAD_H
#define PYFLANNEL_OFFLOAD_H

#include <stdint.h>
#include <string.h>
#include <arpa/inet.h>
#include <sys/uio.h>

#include "csum.h"

#define VNET_HDR_LEN 10
#define VNET_F_NEEDS_CSUM 1
#define VNET_GSO_NONE 0
#define VNET_GSO_TCPV4 1
#define VNET_GSO_TCPV6 4
#define VNET_GSO_UDP_L4 5        /* USO, Linux >= 6.2 */
#define IP6_HLEN 40

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_PSH 0x08
#define TCP_ACK 0x10
#define TCP_URG 0x20
#define TCP_ECE 0x40
#define TCP_CWR 0x80

#define GSO_MAX_SEGS 64          /* UDP_MAX_SEGMENTS in older kernels: the portable cap per GSO send */

typedef struct __attribute__((packed)) {
    uint8_t flags;
    uint8_t gso_type;
    uint16_t hdr_len;
    uint16_t gso_size;
    uint16_t csum_start;
    uint16_t csum_offset;
} vnet_hdr;

static inline void put16(uint8_t *p, uint16_t host) { uint16_t v = htons(host); memcpy(p, &v, 2); }
static inline uint16_t get16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return ntohs(v); }
static inline uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return ntohl(v); }
static inline void put32(uint8_t *p, uint32_t host) { uint32_t v = htonl(host); memcpy(p, &v, 4); }

/* Finish a CHECKSUM_PARTIAL packet: the field at csum_start+csum_offset holds the pseudo-header sum as a seed. */
static inline int vnet_finish_csum(uint8_t *pkt, size_t len, const vnet_hdr *h)
{
    if ((size_t)h->csum_start + h->csum_offset + 2 > len)
        return -1;
    uint16_t c = csum_finish(csum_partial(pkt + h->csum_start, len - h->csum_start, 0));
    memcpy(pkt + h->csum_start + h->csum_offset, &c, 2);
    return 0;
}

/* L4 checksum over [l4, l4+l4len) with the pseudo-header of iph (IPv4 or IPv6), written at field offset `at`. */
static inline void l4_set_check(uint8_t *iph, uint8_t *l4, size_t l4len, uint8_t proto, unsigned at)
{
    l4[at] = l4[at + 1] = 0;
    uint64_t pseudo = (iph[0] >> 4) == 6 ? csum_pseudo6(iph, proto, (uint32_t)l4len)
                                         : csum_pseudo4(iph, proto, (uint16_t)l4len);
    uint16_t c = csum_finish(csum_partial(l4, l4len, pseudo));
    if (proto == 17 && c == 0)
        c = 0xffff;              /* 0 means "no checksum" for UDP over IPv4 (RFC 768), and is not allowed over IPv6 */
    memcpy(l4 + at, &c, 2);
}

/* Split a TSO (GSO_TCPV4, GSO_TCPV6) or USO (GSO_UDP_L4) super-packet into segments of gso_size payload bytes,
 * written back to back at out. Each segment gets its own IPv4 total length, id (first id + index) and header
 * checksum, or IPv6 payload length; TCP segments get their sequence number, FIN/PSH only on the last and CWR only
 * on the first (RFC 3168 6.1.2); every segment gets a full L4 checksum. The header length is derived from the
 * packet, never taken from the virtio header (the kernel may report the whole packet there on forwarding paths);
 * IPv6 extension headers are not expected from the local stack's TSO and make the packet malformed.
 * Returns the number of segments (lengths in seg_len), or -1 if the packet is malformed or does not fit. */
static int gso_split(const uint8_t *pkt, size_t len, uint8_t gso_type, uint16_t gso_size,
                     uint8_t *out, size_t cap, uint16_t *seg_len, int max_segs)
{
    if (len < 20 || gso_size == 0)
        return -1;
    int v6 = (pkt[0] >> 4) == 6;
    if (!v6 && (pkt[0] >> 4) != 4)
        return -1;
    unsigned ihl = v6 ? IP6_HLEN : (pkt[0] & 0x0f) * 4u, l4hl;
    uint8_t proto = pkt[v6 ? 6 : 9];
    if (ihl < 20 || len < ihl + 8u)
        return -1;
    if (gso_type == (v6 ? VNET_GSO_TCPV6 : VNET_GSO_TCPV4) && proto == 6) {
        if (len < ihl + 20u)
            return -1;
        l4hl = (pkt[ihl + 12] >> 4) * 4u;
        if (l4hl < 20 || len < ihl + l4hl)
            return -1;
    } else if (gso_type == VNET_GSO_UDP_L4 && proto == 17) {
        l4hl = 8;
    } else {
        return -1;
    }
    size_t hl = ihl + l4hl, payload = len - hl;
    int nseg = payload ? (int)((payload + gso_size - 1) / gso_size) : 1;
    if (nseg > max_segs)
        return -1;
    uint16_t id = get16(pkt + 4);
    uint32_t seq = proto == 6 ? get32(pkt + ihl + 4) : 0;
    size_t off = 0;
    for (int i = 0; i < nseg; i++) {
        size_t from = (size_t)i * gso_size;
        size_t chunk = payload - from < gso_size ? payload - from : gso_size;
        size_t seglen = hl + chunk;
        if (off + seglen > cap)
            return -1;
        uint8_t *s = out + off, *l4 = s + ihl;
        memcpy(s, pkt, hl);
        memcpy(s + hl, pkt + hl + from, chunk);
        if (v6) {
            put16(s + 4, (uint16_t)(seglen - IP6_HLEN));
        } else {
            put16(s + 2, (uint16_t)seglen);
            put16(s + 4, (uint16_t)(id + i));
            ip4_set_check(s, ihl);
        }
        if (proto == 6) {
            put32(l4 + 4, seq + (uint32_t)from);
            if (i != nseg - 1)
                l4[13] &= (uint8_t)~(TCP_FIN | TCP_PSH);
            if (i != 0)
                l4[13] &= (uint8_t)~TCP_CWR;
            l4_set_check(s, l4, l4hl + chunk, 6, 16);
        } else {
            put16(l4 + 4, (uint16_t)(8 + chunk));
            l4_set_check(s, l4, 8 + chunk, 17, 6);
        }
        seg_len[i] = (uint16_t)seglen;
        off += seglen;
    }
    return nseg;
}

/* ---- TCP (and UDP) coalescing -------------------------------------------------------------------------------- */

#define GRO_BUCKETS 4096          /* flow buckets, power of two */
#define GRO_IOVS (GSO_MAX_SEGS + 1) /* a merged item's write: the virtio header, then one entry per segment */
#define GRO_KEY_WORDS 9           /* both addresses (IPv6: 32 bytes) and both ports */

/* A merged item is never copied: iov[1] is its first packet, in the caller's receive buffer (gro_finish fixes its
 * header up in place), and iov[2..segs] the payload of each further segment, where it was received; iov[0] is
 * left for the virtio header. So the caller's buffers must stay untouched until the batch is written. */
typedef struct {
    uint8_t *pkt;                 /* the (first) packet, in the caller's receive buffer */
    uint32_t len;                 /* of the whole item: the first packet and every payload appended */
    uint32_t next_seq;            /* sequence number the next segment must carry */
    uint16_t mss;                 /* payload size of the first segment (datagram): later ones must not exceed it */
    uint16_t segs;
    uint8_t open;                 /* more segments may still be appended */
    uint16_t check[2];            /* the first packet's IPv4 header and L4 checksums before gro_finish */
    struct iovec *iov;            /* GRO_IOVS entries from the pool once a second segment joins, else NULL */
} gro_item;

typedef struct {
    gro_item *items;              /* in arrival order: the order the writes go out */
    int nitems, max_items;
    struct iovec *pool;           /* npool iovec lists of GRO_IOVS entries */
    int npool, used_pool;
    uint32_t gen;                 /* bucket entries from earlier batches are stale */
    uint32_t bucket_gen[GRO_BUCKETS];
    int32_t bucket_item[GRO_BUCKETS];
    uint32_t bucket_key[GRO_BUCKETS][GRO_KEY_WORDS];
    int udp;                      /* UDP datagrams are merged too (the TUN takes GSO_UDP_L4 writes) */
} gro_table;

static inline void gro_reset(gro_table *t)
{
    t->nitems = 0;
    t->used_pool = 0;
    t->gen++;
}

/* The IP header length of a packet gro_add took as TCP or UDP: 20 (IPv4 without options) or 40 (IPv6, no
 * extension headers); the TCP or UDP header follows it. */
static inline unsigned gro_iphl(const uint8_t *p) { return (p[0] >> 4) == 6 ? IP6_HLEN : 20; }

/* Its L4 protocol: 6 (TCP) or 17 (UDP). */
static inline uint8_t gro_proto(const uint8_t *p) { return p[(p[0] >> 4) == 6 ? 6 : 9]; }

/* The pseudo-header sum of a packet whose L4 part starts at gro_iphl. */
static inline uint64_t gro_pseudo(const uint8_t *p, uint32_t len)
{
    unsigned hl = gro_iphl(p);
    return hl == IP6_HLEN ? csum_pseudo6(p, p[6], len - hl) : csum_pseudo4(p, p[9], (uint16_t)(len - hl));
}

/* The IP header a candidate must have: plain IPv4 (no options, no fragment) or IPv6 (the L4 header right after
 * it), carrying proto, with at least min_l4 bytes after it. */
static inline int gro_plain_ip(const uint8_t *p, uint32_t len, uint8_t proto, unsigned min_l4)
{
    if ((p[0] >> 4) == 6)
        return len >= IP6_HLEN + min_l4 && p[6] == proto;
    return len >= 20 + min_l4 && p[0] == 0x45 && p[9] == proto && (get16(p + 6) & 0x3fff) == 0;
}

/* A TCP segment that may be merged: a plain IP header, ACK or ACK|PSH only, some payload, and a correct checksum
 * (the merged packet goes up with CHECKSUM_PARTIAL, so nobody would check it later). */
static int gro_candidate(const uint8_t *p, uint32_t len)
{
    if (!gro_plain_ip(p, len, 6, 20))
        return 0;
    unsigned hl = gro_iphl(p), thl = (p[hl + 12] >> 4) * 4u;
    uint8_t flags = p[hl + 13];
    if (thl < 20 || len <= hl + thl || (flags & ~TCP_PSH) != TCP_ACK)
        return 0;
    return csum_fold(csum_partial(p + hl, len - hl, gro_pseudo(p, len))) == 0xffff;
}

/* A UDP datagram that may be merged: a plain IP header, its UDP length the rest of the packet, some payload, and
 * a checksum that is present and correct (for the same reason as TCP's). */
static int gro_candidate_udp(const uint8_t *p, uint32_t len)
{
    if (!gro_plain_ip(p, len, 17, 9))
        return 0;
    unsigned hl = gro_iphl(p);
    if (get16(p + hl + 4) != len - hl || get16(p + hl + 6) == 0)
        return 0;
    return csum_fold(csum_partial(p + hl, len - hl, gro_pseudo(p, len))) == 0xffff;
}

/* The bytes before the payload of a candidate: the IP header and the TCP or UDP header. */
static inline unsigned gro_hdr_len(const uint8_t *p)
{
    unsigned hl = gro_iphl(p);
    return hl + (gro_proto(p) == 6 ? (p[hl + 12] >> 4) * 4u : 8u);
}

/* May segment (or datagram) p, a candidate, follow item it? Same addresses and ports were checked by the
 * caller. */
static int gro_can_append(const gro_table *t, const gro_item *it, const uint8_t *p, uint32_t len)
{
    const uint8_t *q = it->pkt;
    unsigned hl = gro_iphl(p);
    uint32_t payload = len - gro_hdr_len(p);
    if (!it->open || gro_iphl(q) != hl || gro_proto(q) != gro_proto(p) || (!it->iov && t->used_pool == t->npool))
        return 0;
    if (it->len + payload > 65535 || payload > it->mss || it->segs >= GSO_MAX_SEGS)
        return 0;
    /* IPv4: ToS, DF/reserved flags and TTL equal; IPv6: traffic class, flow label and hop limit equal. */
    if (hl == 20 ? p[1] != q[1] || p[6] != q[6] || p[8] != q[8] : memcmp(p, q, 4) != 0 || p[7] != q[7])
        return 0;
    if (gro_proto(p) == 17)
        return 1;
    if (get32(p + hl + 8) != get32(q + hl + 8) || get32(p + hl + 4) != it->next_seq)  /* same ACK, contiguous seq */
        return 0;
    /* TCP header length and options byte-identical. */
    return p[hl + 12] == q[hl + 12] && memcmp(p + hl + 20, q + hl + 20, gro_hdr_len(p) - hl - 20) == 0;
}

static void gro_append(gro_table *t, gro_item *it, uint8_t *p, uint32_t len)
{
    unsigned hl = gro_iphl(p), l4hl = gro_hdr_len(p);
    uint32_t payload = len - l4hl;
    if (!it->iov) {
        it->iov = t->pool + (size_t)t->used_pool++ * GRO_IOVS;
        it->iov[1].iov_base = it->pkt;
        it->iov[1].iov_len = it->len;
    }
    it->iov[it->segs + 1].iov_base = p + l4hl;
    it->iov[it->segs + 1].iov_len = payload;
    it->len += payload;
    it->segs++;
    it->next_seq += payload;
    if (gro_proto(p) == 6 && p[hl + 13] & TCP_PSH) {
        it->pkt[hl + 13] |= TCP_PSH;
        it->open = 0;            /* nothing may follow a PSH */
    }
    if (payload < it->mss)
        it->open = 0;            /* a short segment ends the run */
}

static int gro_new_item(gro_table *t, uint8_t *p, uint32_t len, int open)
{
    if (t->nitems == t->max_items)
        return -1;
    gro_item *it = &t->items[t->nitems];
    it->pkt = p;
    it->len = len;
    it->segs = 1;
    it->iov = NULL;
    it->open = (uint8_t)open;
    if (open) {
        unsigned hl = gro_iphl(p);
        it->mss = (uint16_t)(len - gro_hdr_len(p));
        if (gro_proto(p) == 6) {
            it->next_seq = get32(p + hl + 4) + it->mss;
            if (p[hl + 13] & TCP_PSH)
                it->open = 0;
        }
    }
    return t->nitems++;
}

/* The flow key of a TCP or UDP packet: both addresses and both ports, zero-padded for IPv4. */
static inline void gro_key(const uint8_t *p, uint32_t key[GRO_KEY_WORDS])
{
    memset(key, 0, GRO_KEY_WORDS * 4);
    if ((p[0] >> 4) == 6) {
        memcpy(key, p + 8, 32);
        memcpy(key + 8, p + IP6_HLEN, 4);
    } else {
        memcpy(key, p + 12, 8);
        memcpy(key + 2, p + (p[0] & 0x0f) * 4u, 4);
    }
}

/* Add one packet (owned by the caller until the batch is written). Packets of a TCP (or UDP) flow land in the
 * flow's newest item or start a new one, so writes keep each flow's order. Returns -1 when the item list is
 * full. */
static int gro_add(gro_table *t, uint8_t *p, uint32_t len)
{
    int v6 = (p[0] >> 4) == 6;
    size_t ihl = v6 ? IP6_HLEN : (size_t)(p[0] & 0x0f) * 4;
    uint8_t proto = len >= IP6_HLEN || (!v6 && len >= 20) ? gro_proto(p) : 0;
    int is_tcp = (v6 || (p[0] >> 4) == 4) && proto == 6 && len >= 40 && ihl + 20 <= len;
    int is_udp = t->udp && (v6 || (p[0] >> 4) == 4) && proto == 17 && len >= 28 && ihl + 8 <= len;
    if (!is_tcp && !is_udp)
        return gro_new_item(t, p, len, 0);
    uint32_t key[GRO_KEY_WORDS], h = 0;
    gro_key(p, key);
    for (int i = 0; i < GRO_KEY_WORDS; i++)
        h = (h ^ key[i]) * 2654435761u;
    uint32_t b = (h ^ (h >> 15)) & (GRO_BUCKETS - 1);
    /* Linear probing; a full table just stops coalescing new flows. */
    for (int probe = 0; probe < 8; probe++, b = (b + 1) & (GRO_BUCKETS - 1)) {
        if (t->bucket_gen[b] == t->gen && memcmp(t->bucket_key[b], key, sizeof(key)) != 0)
            continue;
        int cand = is_tcp ? gro_candidate(p, len) : gro_candidate_udp(p, len);
        if (t->bucket_gen[b] == t->gen && cand) {
            gro_item *it = &t->items[t->bucket_item[b]];
            if (gro_can_append(t, it, p, len)) {
                gro_append(t, it, p, len);
                return t->bucket_item[b];
            }
        }
        int idx = gro_new_item(t, p, len, cand);
        if (idx >= 0) {
            t->bucket_gen[b] = t->gen;
            memcpy(t->bucket_key[b], key, sizeof(key));
            t->bucket_item[b] = idx;
        }
        return idx;
    }
    return gro_new_item(t, p, len, 0);
}

/* Fix up a finished item for writing and fill its virtio header: a merged packet gets its IPv4 length and
 * header checksum (or IPv6 payload length) and its UDP length, the pseudo-header sum as the L4 checksum seed, and
 * GSO_TCPV4, GSO_TCPV6 or GSO_UDP_L4 with NEEDS_CSUM so the kernel finishes the checksum; iov[0] points at the
 * header, so iov[0..segs] is the write. A lone packet goes out untouched behind a zeroed header. */
static void gro_finish(gro_item *it, vnet_hdr *h)
{
    memset(h, 0, sizeof(*h));
    if (it->segs < 2)
        return;
    uint8_t *p = it->pkt;
    unsigned hl = gro_iphl(p);
    int udp = gro_proto(p) == 17;
    memcpy(&it->check[1], p + hl + (udp ? 6 : 16), 2);
    it->iov[0].iov_base = h;
    it->iov[0].iov_len = VNET_HDR_LEN;
    if (hl == IP6_HLEN) {
        put16(p + 4, (uint16_t)(it->len - IP6_HLEN));
    } else {
        memcpy(&it->check[0], p + 10, 2);
        put16(p + 2, (uint16_t)it->len);
        ip4_set_check(p, 20);
    }
    if (udp)
        put16(p + hl + 4, (uint16_t)(it->len - hl));
    uint16_t seed = csum_fold(gro_pseudo(p, it->len));
    memcpy(p + hl + (udp ? 6 : 16), &seed, 2);
    h->flags = VNET_F_NEEDS_CSUM;
    h->gso_type = udp ? VNET_GSO_UDP_L4 : hl == IP6_HLEN ? VNET_GSO_TCPV6 : VNET_GSO_TCPV4;
    h->hdr_len = (uint16_t)gro_hdr_len(p);
    h->gso_size = it->mss;
    h->csum_start = (uint16_t)hl;
    h->csum_offset = udp ? 6 : 16;
}

/* Undo the merge of a finished item whose GSO write the kernel refused: afterwards iov[1..segs] are its packets
 * exactly as they were added (the first one's header put back: lengths, checksums, no PSH carried over from a
 * later segment, which gro_new_item would have closed it for), each to be written on its own. */
static void gro_unmerge(gro_item *it)
{
    uint8_t *p = it->pkt;
    unsigned hl = gro_iphl(p), l4hl = gro_hdr_len(p);
    uint32_t first = (uint32_t)it->iov[1].iov_len;
    int udp = gro_proto(p) == 17;
    if (hl == IP6_HLEN) {
        put16(p + 4, (uint16_t)(first - IP6_HLEN));
    } else {
        put16(p + 2, (uint16_t)first);
        memcpy(p + 10, &it->check[0], 2);
    }
    if (udp)
        put16(p + hl + 4, (uint16_t)(first - hl));
    else
        p[hl + 13] &= (uint8_t)~TCP_PSH;
    memcpy(p + hl + (udp ? 6 : 16), &it->check[1], 2);
    for (int k = 2; k <= it->segs; k++) {     /* each payload is still preceded by its own untouched headers */
        it->iov[k].iov_base = (uint8_t *)it->iov[k].iov_base - l4hl;
        it->iov[k].iov_len += l4hl;
    }
}

#endif
