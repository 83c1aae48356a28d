/* The configured peers: an open-addressing hash keyed by the peer's IPv4 address, holding each peer's traffic
 * counters. The control side adds a peer when its first route appears and marks it gone with its last route; the
 * engine threads only look peers up (O(1)): to tell a spoofed datagram (a known peer, wrong inner source) from a
 * stranger's, and to count what was sent to or accepted from a peer. Nothing the wire sends can add a slot, so a
 * flood of made-up sources cannot crowd out the real peers.
 *
 * Writers: the control side writes addr and state (state last, with release order); the TX threads add to the
 * tx counters and the RX threads to the rx ones, with atomic adds (with several queues, several threads count
 * for one peer), once per message, not per packet. Readers never see a torn value (aligned words); a peer
 * reusing a gone peer's slot may lose or gain a few packets counted in that instant, which is all a race costs. */
#ifndef PYFLANNEL_PEER_STATS_H
#define PYFLANNEL_PEER_STATS_H

#include <stdint.h>

#define PEER_SLOTS 16384        /* power of two */
#define PEER_MAX (PEER_SLOTS / 2)   /* peers beyond this many (present or gone) are not counted */

enum { PEER_EMPTY, PEER_CONFIGURED, PEER_GONE };

typedef struct {
    uint32_t addr;              /* network byte order */
    uint32_t state;
    uint64_t tx_packets, tx_bytes, rx_packets, rx_bytes;
} peer_slot;

typedef struct {
    uint32_t used;              /* slots not EMPTY (control side only) */
    peer_slot slot[PEER_SLOTS];
} peer_table;

static inline uint32_t peer_hash(uint32_t addr) { return (addr * 2654435761u) >> 18; }

/* The slot of addr (configured or gone), or NULL. */
static inline peer_slot *peer_find(peer_table *t, uint32_t addr)
{
    for (uint32_t h = peer_hash(addr);; h = (h + 1) & (PEER_SLOTS - 1)) {
        peer_slot *s = &t->slot[h];
        uint32_t state = __atomic_load_n(&s->state, __ATOMIC_ACQUIRE);
        if (state == PEER_EMPTY)
            return NULL;
        if (__atomic_load_n(&s->addr, __ATOMIC_RELAXED) == addr)
            return s;
    }
}

static inline int peer_configured(peer_table *t, uint32_t addr)
{
    peer_slot *s = peer_find(t, addr);
    return s && __atomic_load_n(&s->state, __ATOMIC_RELAXED) == PEER_CONFIGURED;
}

static inline void peer_add(uint64_t *counter, uint64_t n)
{
    __atomic_fetch_add(counter, n, __ATOMIC_RELAXED);
}

/* Control side: addr gains its first route (on) or loses its last (off). A new peer takes a gone peer's slot
 * (its counters start again) before an empty one; past PEER_MAX it is simply not counted. */
static void peer_configure(peer_table *t, uint32_t addr, int on)
{
    peer_slot *s = peer_find(t, addr);
    if (s || !on) {
        if (s)
            __atomic_store_n(&s->state, on ? PEER_CONFIGURED : PEER_GONE, __ATOMIC_RELEASE);
        return;
    }
    for (uint32_t h = peer_hash(addr);; h = (h + 1) & (PEER_SLOTS - 1)) {
        s = &t->slot[h];
        if (s->state == PEER_GONE || (s->state == PEER_EMPTY && t->used < PEER_MAX)) {
            t->used += s->state == PEER_EMPTY;
            __atomic_store_n(&s->addr, addr, __ATOMIC_RELAXED);
            s->tx_packets = s->tx_bytes = s->rx_packets = s->rx_bytes = 0;
            __atomic_store_n(&s->state, PEER_CONFIGURED, __ATOMIC_RELEASE);
            return;
        }
        if (s->state == PEER_EMPTY)
            return;
    }
}

#endif
