/* Per-peer traffic counters: a small open-addressing table keyed by the peer's IPv4 address. Each direction has
 * its own table, written only by that direction's thread; the control side reads it without a lock (a slot is
 * published with a release store of `used`, and the 64-bit counters are aligned, so reads are never torn). */
#ifndef PYFLANNEL_PEER_STATS_H
#define PYFLANNEL_PEER_STATS_H

#include <stdint.h>

#define PEER_SLOTS 1024   /* power of two; peers beyond this many are not counted */

typedef struct {
    uint32_t addr;        /* network byte order */
    uint32_t used;
    uint64_t packets;
    uint64_t bytes;
} peer_slot;

typedef struct {
    peer_slot slot[PEER_SLOTS];
} peer_table;

static inline void peer_count(peer_table *t, uint32_t addr, uint64_t packets, uint64_t bytes)
{
    uint32_t h = (addr * 2654435761u) >> 22;
    for (int i = 0; i < PEER_SLOTS; i++, h = (h + 1) & (PEER_SLOTS - 1)) {
        peer_slot *s = &t->slot[h];
        if (!__atomic_load_n(&s->used, __ATOMIC_ACQUIRE)) {
            s->addr = addr;
            s->packets = packets;
            s->bytes = bytes;
            __atomic_store_n(&s->used, 1, __ATOMIC_RELEASE);
            return;
        }
        if (s->addr == addr) {
            __atomic_store_n(&s->packets, s->packets + packets, __ATOMIC_RELAXED);
            __atomic_store_n(&s->bytes, s->bytes + bytes, __ATOMIC_RELAXED);
            return;
        }
    }
}

#endif
