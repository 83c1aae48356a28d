/* The IPv6 underlay peers: a slot per peer that a route leads to, found by the peer's IPv6 address through a
 * hash index, holding its traffic counters, as peer_stats.h does for IPv4 peers (peer_slots.h: how slots are
 * reused once no reader can see them). One difference: a 64-bit prefix-table leaf cannot hold an IPv6 address,
 * so a route to an IPv6 peer stores the peer's slot number instead (PT_HOP6), and the TX thread reads the
 * address to send to from the slot; a slot keeps its peer for as long as any reader may follow such a leaf.
 *
 * Writers: the control side writes addr and state (state last); the TX threads write only the tx counters and
 * the RX threads only the rx ones, as in peer_stats.h. */
#ifndef PYFLANNEL_PEER6_H
#define PYFLANNEL_PEER6_H

#include <stdint.h>
#include <string.h>

#include "peer_stats.h"

#define PEER6_SLOTS 8192            /* IPv6 peers routed at once (a power of two) */

typedef struct {
    uint8_t addr[16];
    peer_slot peer;                 /* state and counters as for an IPv4 peer (its addr unused) */
} peer6_slot;

typedef struct {
    ps_index index;
    peer6_slot slot[PEER6_SLOTS];
} peer6_table;

static inline uint32_t peer6_hash(const uint8_t *addr)
{
    uint64_t a, b;
    memcpy(&a, addr, 8);
    memcpy(&b, addr + 8, 8);
    uint64_t h = (a ^ (b * 0x9e3779b97f4a7c15ull)) * 0xff51afd7ed558ccdull;
    return (uint32_t)(h >> 50);    /* as many bits as the index has cells (2 * PEER6_SLOTS) */
}

/* The slot of a peer a route leads to, or NULL. */
static inline peer6_slot *peer6_find(peer6_table *t, const uint8_t *addr)
{
    const uint32_t *cells = ps_cells(&t->index);
    for (uint32_t i = peer6_hash(addr) & (2 * PEER6_SLOTS - 1);; i = (i + 1) & (2 * PEER6_SLOTS - 1)) {
        uint32_t c = ps_cell(cells, i);
        if (c == PS_EMPTY)
            return NULL;
        if (c == PS_TOMB)
            continue;
        peer6_slot *s = &t->slot[c - 1];
        if (memcmp(s->addr, addr, 16) == 0 && __atomic_load_n(&s->peer.state, __ATOMIC_SEQ_CST) == PEER_CONFIGURED)
            return s;
    }
}

static inline int peer6_configured(peer6_table *t, const uint8_t *addr)
{
    return peer6_find(t, addr) != NULL;
}

/* ---- control side ----------------------------------------------------------------------------------------- */

static int peer6_table_init(peer6_table *t) { return ps_init(&t->index, PEER6_SLOTS); }

static void peer6_table_destroy(peer6_table *t) { ps_destroy(&t->index); }

/* A slot for addr (16 bytes), which gains its first route: its number (what the route's leaf holds), or -1 when
 * the table is full. */
static int peer6_join(peer6_table *t, pt_handle *h, const uint8_t *addr)
{
    int slot = ps_take(&t->index, h);
    if (slot < 0)
        return -1;
    memcpy(t->slot[slot].addr, addr, 16);
    peer_slot_fill(&t->slot[slot].peer);
    if (ps_publish(&t->index, h, (uint32_t)slot, peer6_hash(addr)) < 0) {
        t->slot[slot].peer.state = PEER_EMPTY;
        ps_untake(&t->index, (uint32_t)slot);
        return -1;
    }
    return slot;
}

/* The peer in `slot` lost its last route (published already); see peer_slots.h for `tag`. */
static void peer6_leave(peer6_table *t, int slot, uint64_t tag)
{
    __atomic_store_n(&t->slot[slot].peer.state, PEER_GONE, __ATOMIC_SEQ_CST);
    ps_retire(&t->index, (uint32_t)slot, tag);
}

#endif
