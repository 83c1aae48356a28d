/* The configured IPv4 peers: a slot per peer that a route leads to, found by the peer's address through a hash
 * index (peer_slots.h: how slots are reused once no reader can see them), holding its traffic counters. The
 * engine threads only look peers up (O(1)): to tell a spoofed datagram (a known peer, wrong inner source) from a
 * stranger's, and to count what was sent to or accepted from a peer. Nothing the wire sends can add a slot, so a
 * flood of made-up sources cannot crowd out the real peers.
 *
 * Writers: the control side writes addr and state (state last); the TX threads add to the tx counters and the
 * RX threads to the rx ones, with atomic adds (with several queues, several threads count for one peer), once
 * per message, not per packet. Readers never see a torn value (aligned words). Readers must hold the prefix
 * table (pt_acquire) from the lookup until the last use of the slot. */
#ifndef PYFLANNEL_PEER_STATS_H
#define PYFLANNEL_PEER_STATS_H

#include <stdint.h>

#include "peer_slots.h"

#define PEER_SLOTS 8192         /* IPv4 peers routed at once (a power of two); the index has twice as many cells */

enum { PEER_EMPTY, PEER_CONFIGURED, PEER_GONE };

typedef struct {
    uint32_t addr;              /* network byte order */
    uint32_t state;
    uint64_t tx_packets, tx_bytes, rx_packets, rx_bytes;
} peer_slot;

typedef struct {
    ps_index index;
    peer_slot slot[PEER_SLOTS];
} peer_table;

/* The cell a probe starts at: the top bits of a multiplicative hash, as many as the index has cells. */
static inline uint32_t peer_hash(uint32_t addr) { return (addr * 2654435761u) >> 18; }

/* The slot of a peer a route leads to, or NULL. */
static inline peer_slot *peer_find(peer_table *t, uint32_t addr)
{
    const uint32_t *cells = ps_cells(&t->index);
    for (uint32_t i = peer_hash(addr) & (2 * PEER_SLOTS - 1);; i = (i + 1) & (2 * PEER_SLOTS - 1)) {
        uint32_t c = ps_cell(cells, i);
        if (c == PS_EMPTY)
            return NULL;
        if (c == PS_TOMB)
            continue;
        peer_slot *s = &t->slot[c - 1];
        if (__atomic_load_n(&s->addr, __ATOMIC_RELAXED) == addr
                && __atomic_load_n(&s->state, __ATOMIC_SEQ_CST) == PEER_CONFIGURED)
            return s;
    }
}

static inline int peer_configured(peer_table *t, uint32_t addr)
{
    return peer_find(t, addr) != NULL;
}

static inline void peer_add(uint64_t *counter, uint64_t n)
{
    __atomic_fetch_add(counter, n, __ATOMIC_RELAXED);
}

/* ---- control side ----------------------------------------------------------------------------------------- */

static int peer_table_init(peer_table *t) { return ps_init(&t->index, PEER_SLOTS); }

static void peer_table_destroy(peer_table *t) { ps_destroy(&t->index); }

static void peer_slot_fill(peer_slot *s)
{
    s->tx_packets = s->tx_bytes = s->rx_packets = s->rx_bytes = 0;
    __atomic_store_n(&s->state, PEER_CONFIGURED, __ATOMIC_SEQ_CST);
}

/* A slot for addr (network order), which gains its first route; its number, or -1 when the table is full. */
static int peer_join(peer_table *t, pt_handle *h, uint32_t addr)
{
    int slot = ps_take(&t->index, h);
    if (slot < 0)
        return -1;
    __atomic_store_n(&t->slot[slot].addr, addr, __ATOMIC_RELAXED);
    peer_slot_fill(&t->slot[slot]);
    if (ps_publish(&t->index, h, (uint32_t)slot, peer_hash(addr)) < 0) {
        t->slot[slot].state = PEER_EMPTY;
        ps_untake(&t->index, (uint32_t)slot);
        return -1;
    }
    return slot;
}

/* The peer in `slot` lost its last route (published already); see peer_slots.h for `tag`. */
static void peer_leave(peer_table *t, int slot, uint64_t tag)
{
    __atomic_store_n(&t->slot[slot].state, PEER_GONE, __ATOMIC_SEQ_CST);
    ps_retire(&t->index, (uint32_t)slot, tag);
}

#endif
