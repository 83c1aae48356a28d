/* Flow steering for the multi-queue engine: which of N receive threads a datagram from the wire goes to.
 *
 * With N queues, N UDP sockets share port 8285 (SO_REUSEPORT), one per engine thread pair, and a classic BPF
 * program attached to the group (SO_ATTACH_REUSEPORT_CBPF) picks the socket for every arriving datagram: the
 * kernel runs it with the packet data starting at the UDP payload, which in flannel's wire format is the inner
 * IPv4 or IPv6 packet (whichever the underlay family: an IPv6 underlay is a second group, with its own copy of
 * the program), and delivers to the socket whose index (order of bind) it returns. A flannel peer sends to port
 * 8285 only, so the port cannot be what spreads the load; the inner flow is.
 *
 * The hash, on the inner packet (steer_hash below is the same computation in C):
 *   x = src ^ dst                         (addresses, as big-endian numbers; IPv6: the XOR of the eight
 *                                         32-bit words of both addresses)
 *   x ^= sport << 16 | dport              only for TCP and UDP, and only if not a fragment (MF clear, offset 0):
 *                                         the other fragments of a datagram carry no ports, and the bytes where
 *                                         ports would be in ICMP (its checksum) change from packet to packet;
 *                                         IPv6: only when TCP or UDP is the next header (so never for fragments,
 *                                         whose next header is the fragment header)
 *   x = (x ^ x >> 16) & 0xffff            16 bits in which swapping the two ends changes nothing
 *   h = (x * 0x9e3779b1 mod 2^32) >> 16   multiplicative mixing: Linux gives connect() even source ports, so
 *                                         the low bits alone would send every flow to an even queue
 *   queue = h % N                         anything not IP (or too short to read) goes to queue 0
 *
 * Why a flow is never reordered: the hash depends only on the flow's addresses, protocol and ports, so every
 * datagram of one flow lands on one socket, one RX thread, which writes them into its own TUN queue in the order
 * the socket received them. The hash is symmetric, so a flow's replies are steered to the same queue number; the
 * TUN's own flow table (automq) sends a flow's outgoing packets on the queue that last wrote that flow (its hash
 * is symmetric too), so after the first packet each way, both directions of a flow stay on one TX/RX pair on
 * each host and leave in order through that pair's one socket. A GSO send is one skb on the receiver and the
 * program sees only its first segment, so the TX side never puts segments of different hashes into one send
 * (steer_hash in _tx_message): a train is steered as its first segment would be. Left to the kernel's GRO on a
 * real NIC: it merges consecutive datagrams of one outer 4-tuple into one train whatever their inner flows, and
 * such a train follows its first packet (PYFLANNEL_DISABLE_OFFLOADS=gro turns socket GRO off if that matters).
 */
#ifndef PYFLANNEL_STEERING_H
#define PYFLANNEL_STEERING_H

#include <stdint.h>
#include <string.h>
#include <arpa/inet.h>
#include <linux/filter.h>

#ifndef SO_ATTACH_REUSEPORT_CBPF
#define SO_ATTACH_REUSEPORT_CBPF 51     /* asm-generic/socket.h, Linux 4.5 */
#endif

#define STEER_MUL 0x9e3779b1u
#define STEER_INSNS 62
#define STEER_MAX 256   /* sockets in a group: one per TUN queue, and a TUN has at most 256 (MAX_TAP_QUEUES) */

static inline uint32_t steer_load32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return ntohl(v);
}

/* The 16-bit flow hash of an inner packet of n bytes (0 if it is not IP or too short to read). */
static inline uint32_t steer_hash(const uint8_t *p, size_t n)
{
    uint32_t x = 0;
    if (n >= 40 && (p[0] >> 4) == 6) {
        for (unsigned i = 8; i < 40; i += 4)
            x ^= steer_load32(p + i);
        if (p[6] == 6 || p[6] == 17) {
            if (n < 44)
                return 0;       /* the program's load past the end returns 0 too */
            x ^= steer_load32(p + 40);
        }
    } else if (n >= 20 && (p[0] >> 4) == 4) {
        x = steer_load32(p + 12) ^ steer_load32(p + 16);
        unsigned ihl = (p[0] & 0x0f) * 4;
        uint16_t frag = (uint16_t)(p[6] << 8 | p[7]);
        if (!(frag & 0x3fff) && (p[9] == 6 || p[9] == 17)) {
            if (n < ihl + 4)
                return 0;
            x ^= steer_load32(p + ihl);
        }
    } else {
        return 0;
    }
    x = (x ^ (x >> 16)) & 0xffff;
    return (x * STEER_MUL) >> 16;
}

/* The reuseport program for n queues (STEER_INSNS instructions into out): steer_hash(payload) % n. */
static inline void steer_program(struct sock_filter *out, uint32_t n)
{
    struct sock_filter prog[STEER_INSNS] = {
        /* 0 */ BPF_STMT(BPF_LD | BPF_B | BPF_ABS, 0),
        /* 1 */ BPF_STMT(BPF_ALU | BPF_AND | BPF_K, 0xf0),
        /* 2 */ BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0x40, 33, 0),             /* IPv4: 36 */
        /* 3 */ BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0x60, 0, 57),             /* neither: 61 */
        /* IPv6: the XOR of the eight address words (a load past the end: ret 0) */
        /* 4 */ BPF_STMT(BPF_LD | BPF_W | BPF_ABS, 8),
        /* 5 */ BPF_STMT(BPF_MISC | BPF_TAX, 0),
        /* 6 */ BPF_STMT(BPF_LD | BPF_W | BPF_ABS, 12),
        /* 7 */ BPF_STMT(BPF_ALU | BPF_XOR | BPF_X, 0),
        /* 8 */ BPF_STMT(BPF_MISC | BPF_TAX, 0),
        /* 9 */ BPF_STMT(BPF_LD | BPF_W | BPF_ABS, 16),
        /* 10 */ BPF_STMT(BPF_ALU | BPF_XOR | BPF_X, 0),
        /* 11 */ BPF_STMT(BPF_MISC | BPF_TAX, 0),
        /* 12 */ BPF_STMT(BPF_LD | BPF_W | BPF_ABS, 20),
        /* 13 */ BPF_STMT(BPF_ALU | BPF_XOR | BPF_X, 0),
        /* 14 */ BPF_STMT(BPF_MISC | BPF_TAX, 0),
        /* 15 */ BPF_STMT(BPF_LD | BPF_W | BPF_ABS, 24),
        /* 16 */ BPF_STMT(BPF_ALU | BPF_XOR | BPF_X, 0),
        /* 17 */ BPF_STMT(BPF_MISC | BPF_TAX, 0),
        /* 18 */ BPF_STMT(BPF_LD | BPF_W | BPF_ABS, 28),
        /* 19 */ BPF_STMT(BPF_ALU | BPF_XOR | BPF_X, 0),
        /* 20 */ BPF_STMT(BPF_MISC | BPF_TAX, 0),
        /* 21 */ BPF_STMT(BPF_LD | BPF_W | BPF_ABS, 32),
        /* 22 */ BPF_STMT(BPF_ALU | BPF_XOR | BPF_X, 0),
        /* 23 */ BPF_STMT(BPF_MISC | BPF_TAX, 0),
        /* 24 */ BPF_STMT(BPF_LD | BPF_W | BPF_ABS, 36),
        /* 25 */ BPF_STMT(BPF_ALU | BPF_XOR | BPF_X, 0),
        /* 26 */ BPF_STMT(BPF_ST, 0),                                          /* M[0] = the addresses */
        /* 27 */ BPF_STMT(BPF_LD | BPF_B | BPF_ABS, 6),
        /* 28 */ BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 6, 1, 0),                /* TCP: 30 */
        /* 29 */ BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 17, 0, 22),              /* neither TCP nor UDP: 52 */
        /* 30 */ BPF_STMT(BPF_LD | BPF_W | BPF_ABS, 40),                      /* the ports */
        /* 31 */ BPF_STMT(BPF_MISC | BPF_TAX, 0),
        /* 32 */ BPF_STMT(BPF_LD | BPF_MEM, 0),
        /* 33 */ BPF_STMT(BPF_ALU | BPF_XOR | BPF_X, 0),
        /* 34 */ BPF_STMT(BPF_ST, 0),                                          /* M[0] ^= ports */
        /* 35 */ BPF_STMT(BPF_JMP | BPF_JA, 16),                              /* 52 */
        /* IPv4 */
        /* 36 */ BPF_STMT(BPF_LD | BPF_W | BPF_ABS, 12),
        /* 37 */ BPF_STMT(BPF_MISC | BPF_TAX, 0),
        /* 38 */ BPF_STMT(BPF_LD | BPF_W | BPF_ABS, 16),
        /* 39 */ BPF_STMT(BPF_ALU | BPF_XOR | BPF_X, 0),
        /* 40 */ BPF_STMT(BPF_ST, 0),                                          /* M[0] = src ^ dst */
        /* 41 */ BPF_STMT(BPF_LD | BPF_H | BPF_ABS, 6),
        /* 42 */ BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, 0x3fff, 9, 0),          /* a fragment: 52 */
        /* 43 */ BPF_STMT(BPF_LD | BPF_B | BPF_ABS, 9),
        /* 44 */ BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 6, 1, 0),                /* TCP: 46 */
        /* 45 */ BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 17, 0, 6),               /* neither TCP nor UDP: 52 */
        /* 46 */ BPF_STMT(BPF_LDX | BPF_B | BPF_MSH, 0),                      /* X = ihl */
        /* 47 */ BPF_STMT(BPF_LD | BPF_W | BPF_IND, 0),                       /* the ports (past the end: ret 0) */
        /* 48 */ BPF_STMT(BPF_MISC | BPF_TAX, 0),
        /* 49 */ BPF_STMT(BPF_LD | BPF_MEM, 0),
        /* 50 */ BPF_STMT(BPF_ALU | BPF_XOR | BPF_X, 0),
        /* 51 */ BPF_STMT(BPF_ST, 0),                                          /* M[0] ^= ports */
        /* Both: fold and mix */
        /* 52 */ BPF_STMT(BPF_LD | BPF_MEM, 0),
        /* 53 */ BPF_STMT(BPF_MISC | BPF_TAX, 0),
        /* 54 */ BPF_STMT(BPF_ALU | BPF_RSH | BPF_K, 16),
        /* 55 */ BPF_STMT(BPF_ALU | BPF_XOR | BPF_X, 0),
        /* 56 */ BPF_STMT(BPF_ALU | BPF_AND | BPF_K, 0xffff),
        /* 57 */ BPF_STMT(BPF_ALU | BPF_MUL | BPF_K, STEER_MUL),
        /* 58 */ BPF_STMT(BPF_ALU | BPF_RSH | BPF_K, 16),
        /* 59 */ BPF_STMT(BPF_ALU | BPF_MOD | BPF_K, n),
        /* 60 */ BPF_STMT(BPF_RET | BPF_A, 0),
        /* 61 */ BPF_STMT(BPF_RET | BPF_K, 0),
    };
    memcpy(out, prog, sizeof(prog));
}

#endif
