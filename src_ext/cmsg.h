/* Control messages on the underlay socket: UDP_SEGMENT on sends, UDP_GRO and SO_RXQ_OVFL on receives.
 * Kept in C because the CMSG_* macros do the alignment arithmetic that is easy to get wrong by hand. */
#ifndef PYFLANNEL_CMSG_H
#define PYFLANNEL_CMSG_H

#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <netinet/in.h>

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif
#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef SO_RXQ_OVFL
#define SO_RXQ_OVFL 40
#endif

/* Room for every control message one datagram can carry here. */
#define CMSG_ROOM (CMSG_SPACE(sizeof(int)) + CMSG_SPACE(sizeof(uint32_t)) + 16)

/* Ask the kernel to cut this message's payload into datagrams of `size` bytes (the last may be shorter). */
static inline void cmsg_set_segment(struct msghdr *m, void *room, uint16_t size)
{
    memset(room, 0, CMSG_SPACE(sizeof(uint16_t)));
    m->msg_control = room;
    m->msg_controllen = CMSG_SPACE(sizeof(uint16_t));
    struct cmsghdr *c = CMSG_FIRSTHDR(m);
    c->cmsg_level = SOL_UDP;
    c->cmsg_type = UDP_SEGMENT;
    c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
    memcpy(CMSG_DATA(c), &size, sizeof(size));
}

/* Whether message c carries at least n bytes of data inside m's control buffer (CMSG_NXTHDR checks where the
 * next message starts, not that this one's length fits). */
static inline int cmsg_has(const struct msghdr *m, const struct cmsghdr *c, size_t n)
{
    const uint8_t *end = (const uint8_t *)m->msg_control + m->msg_controllen;
    return c->cmsg_len >= CMSG_LEN(n) && (const uint8_t *)CMSG_DATA(c) + n <= end;
}

/* Read the GRO segment size (0 if the datagram was not coalesced) and the socket's cumulative drop count
 * (left unchanged if absent). Walks every message: UDP_GRO is not always the first one. A message too short
 * for its value is skipped (never from the kernel; tests/fuzz/parsers feeds it anything). */
static inline void cmsg_parse_rx(struct msghdr *m, int *gso_size, uint32_t *drops)
{
    *gso_size = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(m); c; c = CMSG_NXTHDR(m, c)) {
        if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO && cmsg_has(m, c, sizeof(int)))
            memcpy(gso_size, CMSG_DATA(c), sizeof(int));
        else if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SO_RXQ_OVFL && cmsg_has(m, c, sizeof(uint32_t)))
            memcpy(drops, CMSG_DATA(c), sizeof(uint32_t));
    }
}

#endif
