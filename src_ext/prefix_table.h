/* Longest-prefix-match table for IPv4, read lock-free by the engine threads.
 *
 * Shape: a three-level multibit trie with strides 16/8/8 (DIR-16-8-8, a smaller cousin of DIR-24-8). Level 1 is
 * a flat array of 65536 entries indexed by the top 16 address bits; an entry is either a next-hop index or, with
 * PT_CHUNK set, the index of a 256-entry chunk for the next 8 bits, and so again for the last 8 bits. A lookup is
 * at most three dependent loads whatever the number of routes. The common overlay case (/24 leases inside a /16)
 * costs two. DIR-24-8 would save one load but costs 64 MiB per table, and every update builds a fresh table.
 *
 * Prefixes are expanded in order of increasing length, so a longer prefix simply overwrites the slots of the
 * shorter ones it lies inside; a chunk created under a slot inherits that slot's next hop.
 *
 * Concurrency: tables are immutable once built. The control side builds a new one and publishes it with one
 * atomic pointer exchange. Each reader announces the table it uses in its own hazard slot for the span of one
 * batch; the writer frees the old table once no slot holds it. Readers never wait or take a lock.
 */
#ifndef PYFLANNEL_PREFIX_TABLE_H
#define PYFLANNEL_PREFIX_TABLE_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define PT_CHUNK 0x80000000u
#define PT_READERS 4

typedef struct {
    uint32_t addr;  /* peer IPv4, network byte order */
    uint16_t port;  /* peer UDP port, network byte order */
} pt_hop;

typedef struct {
    uint32_t net;   /* host byte order, host bits clear */
    uint8_t plen;
    pt_hop hop;
} pt_route;

typedef struct {
    uint32_t nhops;
    uint32_t nchunks;
    uint32_t cap_chunks;
    pt_hop *hops;       /* index 0 is "no route" */
    uint32_t *chunks;   /* nchunks * 256 entries */
    uint32_t l1[65536];
} pt_table;

typedef struct {
    pt_table *cur;
    pt_table *hazard[PT_READERS];
} pt_handle;

/* Next-hop index for a host-order address, 0 when nothing matches. */
static inline uint32_t pt_lookup(const pt_table *t, uint32_t addr)
{
    uint32_t e = t->l1[addr >> 16];
    if (e & PT_CHUNK) {
        e = t->chunks[((e & ~PT_CHUNK) << 8) | ((addr >> 8) & 0xff)];
        if (e & PT_CHUNK)
            e = t->chunks[((e & ~PT_CHUNK) << 8) | (addr & 0xff)];
    }
    return e;
}

static void pt_free(pt_table *t)
{
    if (!t)
        return;
    free(t->hops);
    free(t->chunks);
    free(t);
}

/* A new chunk whose 256 slots all inherit `fill`; returns its entry value, 0 on allocation failure. */
static uint32_t pt_new_chunk(pt_table *t, uint32_t fill)
{
    if (t->nchunks == t->cap_chunks) {
        uint32_t cap = t->cap_chunks ? t->cap_chunks * 2 : 16;
        uint32_t *c = (uint32_t *)realloc(t->chunks, (size_t)cap * 256 * sizeof(uint32_t));
        if (!c)
            return 0;
        t->chunks = c;
        t->cap_chunks = cap;
    }
    uint32_t *slot = t->chunks + ((size_t)t->nchunks << 8);
    for (int i = 0; i < 256; i++)
        slot[i] = fill;
    return PT_CHUNK | t->nchunks++;
}

static int pt_cmp_plen(const void *a, const void *b)
{
    return (int)((const pt_route *)a)->plen - (int)((const pt_route *)b)->plen;
}

/* Point every slot that route r covers at hop index h, splitting slots into chunks as needed. */
static int pt_insert(pt_table *t, const pt_route *r, uint32_t h)
{
    uint32_t net = r->net;
    unsigned plen = r->plen;
    if (plen <= 16) {
        uint32_t lo = net >> 16, n = 1u << (16 - plen);
        for (uint32_t i = 0; i < n; i++)
            t->l1[lo + i] = h;
        return 0;
    }
    /* Chunks are addressed by index, never by pointer: pt_new_chunk may move the array. */
    if (!(t->l1[net >> 16] & PT_CHUNK)) {
        uint32_t c = pt_new_chunk(t, t->l1[net >> 16]);
        if (!c)
            return -1;
        t->l1[net >> 16] = c;
    }
    size_t base2 = (size_t)(t->l1[net >> 16] & ~PT_CHUNK) << 8;
    if (plen <= 24) {
        uint32_t lo = (net >> 8) & 0xff, n = 1u << (24 - plen);
        for (uint32_t i = 0; i < n; i++)
            t->chunks[base2 + lo + i] = h;
        return 0;
    }
    size_t i2 = base2 + ((net >> 8) & 0xff);
    if (!(t->chunks[i2] & PT_CHUNK)) {
        uint32_t c = pt_new_chunk(t, t->chunks[i2]);
        if (!c)
            return -1;
        t->chunks[i2] = c;
    }
    size_t base3 = (size_t)(t->chunks[i2] & ~PT_CHUNK) << 8;
    uint32_t lo = net & 0xff, n = 1u << (32 - plen);
    for (uint32_t i = 0; i < n; i++)
        t->chunks[base3 + lo + i] = h;
    return 0;
}

/* Build a table from n routes (sorted here by prefix length). Returns NULL on allocation failure. */
static pt_table *pt_build(pt_route *routes, uint32_t n)
{
    pt_table *t = (pt_table *)calloc(1, sizeof(pt_table));
    if (!t)
        return NULL;
    t->hops = (pt_hop *)calloc((size_t)n + 1, sizeof(pt_hop));
    if (!t->hops) {
        pt_free(t);
        return NULL;
    }
    qsort(routes, n, sizeof(pt_route), pt_cmp_plen);
    for (uint32_t i = 0; i < n; i++) {
        t->hops[i + 1] = routes[i].hop;
        if (pt_insert(t, &routes[i], i + 1) < 0) {
            pt_free(t);
            return NULL;
        }
    }
    t->nhops = n;
    return t;
}

/* Reader side: pin the current table in hazard slot `slot` until pt_release. */
static inline const pt_table *pt_acquire(pt_handle *h, int slot)
{
    pt_table *t = __atomic_load_n(&h->cur, __ATOMIC_SEQ_CST);
    for (;;) {
        __atomic_store_n(&h->hazard[slot], t, __ATOMIC_SEQ_CST);
        pt_table *again = __atomic_load_n(&h->cur, __ATOMIC_SEQ_CST);
        if (again == t)
            return t;
        t = again;
    }
}

static inline void pt_release(pt_handle *h, int slot)
{
    __atomic_store_n(&h->hazard[slot], NULL, __ATOMIC_RELEASE);
}

/* Writer side: publish t, then free the previous table once no reader holds it. */
static void pt_publish(pt_handle *h, pt_table *t)
{
    pt_table *old = __atomic_exchange_n(&h->cur, t, __ATOMIC_SEQ_CST);
    const struct timespec pause = { 0, 20000 };
    for (int i = 0; i < PT_READERS; i++)
        while (__atomic_load_n(&h->hazard[i], __ATOMIC_SEQ_CST) == old)
            nanosleep(&pause, NULL);
    pt_free(old);
}

#endif
