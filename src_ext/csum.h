/* Internet checksum (RFC 1071) helpers for the packet engine.
 *
 * The sum is accumulated unfolded in 64 bits, which is what makes a full L4 checksum per segment affordable. Long
 * runs add 32-bit words into four independent 64-bit accumulators (no carries to chase: 2^32 additions would be
 * needed to overflow one), so the additions do not wait on each other: twice the speed of one add-with-carry
 * chain over 8-byte words (32 against 16-18 GB/s for a 1500-byte segment or a 64 KiB super-packet here), which
 * the TSO split (one sum per segment) and the coalescing check (one per received segment) pay over every byte.
 * Short inputs (headers) keep the add-with-carry chain, which is as fast there. Values are kept in network
 * byte order throughout: the one's complement sum is byte-order independent as long as every input is in the
 * same order, so no byte swapping happens until a caller needs a number.
 */
#ifndef PYFLANNEL_CSUM_H
#define PYFLANNEL_CSUM_H

#include <stdint.h>
#include <string.h>

static inline uint64_t csum_add64(uint64_t sum, uint64_t v)
{
    sum += v;
    return sum + (sum < v);
}

/* Unfolded sum of len bytes at p, added to seed. */
static inline uint64_t csum_partial(const void *p, size_t len, uint64_t seed)
{
    const uint8_t *b = (const uint8_t *)p;
    uint64_t sum = seed, w;
    if (len >= 64) {
        uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        while (len >= 16) {
            uint32_t a, c, d, e;
            memcpy(&a, b, 4); memcpy(&c, b + 4, 4); memcpy(&d, b + 8, 4); memcpy(&e, b + 12, 4);
            s0 += a; s1 += c; s2 += d; s3 += e;
            b += 16; len -= 16;
        }
        sum = csum_add64(csum_add64(csum_add64(sum, s0), s1), csum_add64(s2, s3));
    }
    while (len >= 32) {
        uint64_t a, c, d, e;
        memcpy(&a, b, 8); memcpy(&c, b + 8, 8); memcpy(&d, b + 16, 8); memcpy(&e, b + 24, 8);
        sum = csum_add64(sum, a); sum = csum_add64(sum, c);
        sum = csum_add64(sum, d); sum = csum_add64(sum, e);
        b += 32; len -= 32;
    }
    while (len >= 8) { memcpy(&w, b, 8); sum = csum_add64(sum, w); b += 8; len -= 8; }
    if (len) {
        /* Trailing bytes keep their position in the word, padded with zeros (RFC 1071 odd-length rule). */
        w = 0;
        memcpy(&w, b, len);
        sum = csum_add64(sum, w);
    }
    return sum;
}

/* Fold a 64-bit accumulator to 16 bits (not complemented). */
static inline uint16_t csum_fold(uint64_t sum)
{
    sum = (sum & 0xffffffffu) + (sum >> 32);
    sum = (sum & 0xffffffffu) + (sum >> 32);
    sum = (sum & 0xffffu) + (sum >> 16);
    sum = (sum & 0xffffu) + (sum >> 16);
    return (uint16_t)sum;
}

/* The checksum field value for len bytes at p: complement of the folded sum. */
static inline uint16_t csum_finish(uint64_t sum)
{
    return (uint16_t)~csum_fold(sum);
}

/* IPv4 pseudo-header sum (addresses as they sit in the packet, protocol, L4 length). */
static inline uint64_t csum_pseudo4(const uint8_t *iph, uint8_t proto, uint16_t l4len)
{
    uint32_t addrs[2], tail;
    const uint8_t t[4] = { 0, proto, (uint8_t)(l4len >> 8), (uint8_t)l4len };
    memcpy(addrs, iph + 12, 8);
    memcpy(&tail, t, 4);
    return csum_add64(csum_add64(addrs[0], addrs[1]), tail);
}

/* IPv6 pseudo-header sum (RFC 8200 8.1): both addresses of iph, the upper-layer length, the next header. */
static inline uint64_t csum_pseudo6(const uint8_t *iph, uint8_t proto, uint32_t l4len)
{
    const uint8_t tail[8] = { (uint8_t)(l4len >> 24), (uint8_t)(l4len >> 16), (uint8_t)(l4len >> 8), (uint8_t)l4len,
                              0, 0, 0, proto };
    return csum_partial(tail, 8, csum_partial(iph + 8, 32, 0));
}

/* RFC 1624 incremental update: a 16-bit field (network order) changed from old to new. */
static inline uint16_t csum_replace2(uint16_t check, uint16_t old, uint16_t new_)
{
    uint32_t sum = (uint16_t)~check + (uint16_t)~old + (uint32_t)new_;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

/* Recompute the IPv4 header checksum in place (ihl in bytes). */
static inline void ip4_set_check(uint8_t *iph, unsigned ihl)
{
    iph[10] = iph[11] = 0;
    uint16_t c = csum_finish(csum_partial(iph, ihl, 0));
    memcpy(iph + 10, &c, 2);
}

#endif
