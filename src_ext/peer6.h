/* The IPv6 underlay peers: an open-addressing hash keyed by the peer's IPv6 address, holding each peer's traffic
 * counters, like peer_stats.h for IPv4 peers. One difference: a 64-bit prefix-table leaf cannot hold an IPv6
 * address, so a route to an IPv6 peer stores the peer's slot index instead (PT_HOP6), and the TX thread reads
 * the address to send to from the slot.
 *
 * A slot therefore keeps its address for good once given one: a reader holding an older table may still follow
 * a leaf to it, and must find the same peer there. A peer that loses its last route is marked gone and gets its
 * own slot back if it returns; other addresses never take it. So at most PEER6_MAX distinct IPv6 peer addresses
 * can be routed over one engine's life (the table is new whenever the engine is); past that, a route to a new
 * one is refused (peer6_reserve returns -1).
 *
 * Writers: the control side writes addr and state (state last, with release order); the TX thread writes only
 * the tx counters and the RX thread only the rx ones, as in peer_stats.h. */
#ifndef PYFLANNEL_PEER6_H
#define PYFLANNEL_PEER6_H

#include <stdint.h>
#include <string.h>

#include "peer_stats.h"

#define PEER6_SLOTS 4096            /* power of two */
#define PEER6_MAX (PEER6_SLOTS / 2)

typedef struct {
    uint8_t addr[16];
    peer_slot peer;                 /* state and counters as for an IPv4 peer (its addr unused) */
} peer6_slot;

typedef struct {
    uint32_t used;                  /* slots not EMPTY (control side only) */
    peer6_slot slot[PEER6_SLOTS];
} peer6_table;

static inline uint32_t peer6_hash(const uint8_t *addr)
{
    uint64_t a, b;
    memcpy(&a, addr, 8);
    memcpy(&b, addr + 8, 8);
    uint64_t h = (a ^ (b * 0x9e3779b97f4a7c15ull)) * 0xff51afd7ed558ccdull;
    return (uint32_t)(h >> 52) & (PEER6_SLOTS - 1);
}

/* The slot of addr (configured or gone), or NULL. */
static inline peer6_slot *peer6_find(peer6_table *t, const uint8_t *addr)
{
    for (uint32_t h = peer6_hash(addr);; h = (h + 1) & (PEER6_SLOTS - 1)) {
        peer6_slot *s = &t->slot[h];
        if (__atomic_load_n(&s->peer.state, __ATOMIC_ACQUIRE) == PEER_EMPTY)
            return NULL;
        if (memcmp(s->addr, addr, 16) == 0)
            return s;
    }
}

static inline int peer6_configured(peer6_table *t, const uint8_t *addr)
{
    peer6_slot *s = peer6_find(t, addr);
    return s && __atomic_load_n(&s->peer.state, __ATOMIC_RELAXED) == PEER_CONFIGURED;
}

/* Control side: the slot index for addr, taking a free one (marked gone: no route yet) if it has none; -1 when
 * PEER6_MAX addresses already have one. */
static int peer6_reserve(peer6_table *t, const uint8_t *addr)
{
    peer6_slot *s = peer6_find(t, addr);
    if (s)
        return (int)(s - t->slot);
    if (t->used >= PEER6_MAX)
        return -1;
    for (uint32_t h = peer6_hash(addr);; h = (h + 1) & (PEER6_SLOTS - 1)) {
        s = &t->slot[h];
        if (s->peer.state == PEER_EMPTY) {
            t->used++;
            memcpy(s->addr, addr, 16);
            __atomic_store_n(&s->peer.state, PEER_GONE, __ATOMIC_RELEASE);
            return (int)h;
        }
    }
}

/* Control side: the reserved slot `index` gains its first route (on) or loses its last (off). */
static inline void peer6_configure(peer6_table *t, int index, int on)
{
    __atomic_store_n(&t->slot[index].peer.state, on ? PEER_CONFIGURED : PEER_GONE, __ATOMIC_RELEASE);
}

#endif
