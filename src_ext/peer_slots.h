/* Peer slots: where a peer's counters (and an IPv6 peer's address) live while a route leads to it, and how a
 * slot is reused once no engine thread can still see it. peer_stats.h (IPv4 peers) and peer6.h (IPv6 peers) are
 * built on it.
 *
 * A table has a fixed number of slots, each at a fixed place (a route to an IPv6 peer holds its slot's number),
 * and a hash index from a peer's address to its slot: an open-addressing array of cells holding slot + 1, empty
 * (ends a probe) or a tombstone (a peer that left: probes go on). The engine threads read both lock-free, while
 * they hold the prefix table (pt_acquire .. pt_release), which is what makes reuse safe:
 *
 * - A peer that gains its first route takes a free slot, filled before its cell is published.
 * - A peer that loses its last route leaves after the table without it is published: its cell becomes a
 *   tombstone and its slot is retired with the epoch of that moment; the epoch is then advanced once more
 *   (pt_bump), so a reader that enters later can reach the slot neither through a route nor through the index.
 * - A retired slot is handed out again only once every reader entered after it was retired (the prefix
 *   table's rule for its nodes): a reader never sees a slot change owner while it holds the table.
 * - Tombstones only pile up in an index, so when they fill a quarter of it, a new index without them is built
 *   and published, and the old one is freed by the prefix table's epochs like a trie node.
 *
 * So a table holds at most its number of peers at once, and any number over its life. The control side (one
 * writer at a time, the prefix table's) owns everything but the cells, the slots' state and their counters. */
#ifndef PYFLANNEL_PEER_SLOTS_H
#define PYFLANNEL_PEER_SLOTS_H

#include <stdint.h>
#include <stdlib.h>

#include "prefix_table.h"

#define PS_EMPTY 0u
#define PS_TOMB UINT32_MAX
#define PS_NONE UINT32_MAX      /* cell_of: a slot with no cell */

typedef struct {
    uint32_t slot;
    uint64_t tag;               /* the epoch it left at */
} ps_retired;

typedef struct {
    uint32_t *cells;            /* published (seq_cst); 2 * cap cells */
    /* control side only */
    uint32_t cap, mask;         /* slots; cells - 1 */
    uint32_t filled;            /* cells not empty */
    uint32_t *home;             /* per slot: the cell its probe starts at */
    uint32_t *cell_of;          /* per slot: its cell, PS_NONE while it has none */
    uint32_t *free;             /* slots to hand out now */
    uint32_t nfree;
    ps_retired *retired;        /* slots that left, oldest first */
    uint32_t nretired;
} ps_index;

/* The cells a reader probes (hold the prefix table while using them and what they lead to). */
static inline const uint32_t *ps_cells(const ps_index *x)
{
    return __atomic_load_n(&x->cells, __ATOMIC_SEQ_CST);
}

static inline uint32_t ps_cell(const uint32_t *cells, uint32_t i)
{
    return __atomic_load_n(&cells[i], __ATOMIC_SEQ_CST);
}

static void ps_destroy(ps_index *x)
{
    free(x->cells);
    free(x->home);
    free(x->cell_of);
    free(x->free);
    free(x->retired);
    memset(x, 0, sizeof(*x));
}

/* `cap` slots (a power of two), all free; -1 if memory ran out (then ps_destroy). */
static int ps_init(ps_index *x, uint32_t cap)
{
    memset(x, 0, sizeof(*x));
    x->cap = cap;
    x->mask = 2 * cap - 1;
    x->cells = (uint32_t *)calloc(2 * (size_t)cap, sizeof(uint32_t));
    x->home = (uint32_t *)calloc(cap, sizeof(uint32_t));
    x->cell_of = (uint32_t *)malloc(cap * sizeof(uint32_t));
    x->free = (uint32_t *)malloc(cap * sizeof(uint32_t));
    x->retired = (ps_retired *)malloc(cap * sizeof(ps_retired));
    if (!x->cells || !x->home || !x->cell_of || !x->free || !x->retired)
        return -1;
    for (uint32_t i = 0; i < cap; i++) {
        x->cell_of[i] = PS_NONE;
        x->free[i] = cap - 1 - i;   /* slot 0 is handed out first */
    }
    x->nfree = cap;
    return 0;
}

/* A free slot (retired ones no reader can see any more come back first), or -1: every slot is taken or still
 * visible to a reader. */
static int ps_take(ps_index *x, pt_handle *h)
{
    if (x->nfree == 0 && x->nretired) {
        uint64_t oldest = pt_oldest(h);
        uint32_t keep = 0;
        for (uint32_t i = 0; i < x->nretired; i++) {
            if (x->retired[i].tag < oldest)
                x->free[x->nfree++] = x->retired[i].slot;
            else
                x->retired[keep++] = x->retired[i];
        }
        x->nretired = keep;
    }
    return x->nfree ? (int)x->free[--x->nfree] : -1;
}

/* A slot taken but never published (its peer's route was not applied): free again at once. */
static void ps_untake(ps_index *x, uint32_t slot)
{
    x->free[x->nfree++] = slot;
}

static void ps_place(ps_index *x, uint32_t *cells, uint32_t slot)
{
    uint32_t i = x->home[slot];
    while (cells[i] != PS_EMPTY && cells[i] != PS_TOMB)
        i = (i + 1) & x->mask;
    if (cells[i] == PS_EMPTY)
        x->filled++;
    x->cell_of[slot] = i;
    __atomic_store_n(&cells[i], slot + 1, __ATOMIC_SEQ_CST);
}

/* A new index holding only the slots that have a cell, published at once; the old one is retired to the prefix
 * table. -1 (nothing changed) if memory ran out. */
static int ps_rebuild(ps_index *x, pt_handle *h)
{
    uint32_t *cells = (uint32_t *)calloc((size_t)x->mask + 1, sizeof(uint32_t));
    if (!cells || pt_retire(h, x->cells) < 0) {
        free(cells);
        return -1;
    }
    x->filled = 0;
    for (uint32_t slot = 0; slot < x->cap; slot++)
        if (x->cell_of[slot] != PS_NONE)
            ps_place(x, cells, slot);
    __atomic_store_n(&x->cells, cells, __ATOMIC_SEQ_CST);
    return 0;
}

/* Publish a filled slot under `hash`. An index three quarters full of cells is rebuilt first; if that cannot be
 * done, a tombstone on the probe is reused, and -1 means there is no room short of the last empty quarter
 * (readers need empty cells to end their probes). */
static int ps_publish(ps_index *x, pt_handle *h, uint32_t slot, uint32_t hash)
{
    x->home[slot] = hash & x->mask;
    if (x->filled >= (x->mask + 1) / 4 * 3 && ps_rebuild(x, h) < 0) {
        uint32_t i = x->home[slot];
        while (x->cells[i] != PS_EMPTY && x->cells[i] != PS_TOMB)
            i = (i + 1) & x->mask;
        if (x->cells[i] == PS_EMPTY)
            return -1;
    }
    ps_place(x, x->cells, slot);
    return 0;
}

/* The slot's peer left at epoch `tag` (its table is published already): no new reader can find it, and it is
 * handed out again once the readers of `tag` and before are gone. */
static void ps_retire(ps_index *x, uint32_t slot, uint64_t tag)
{
    __atomic_store_n(&x->cells[x->cell_of[slot]], PS_TOMB, __ATOMIC_SEQ_CST);
    x->cell_of[slot] = PS_NONE;
    x->retired[x->nretired].slot = slot;
    x->retired[x->nretired].tag = tag;
    x->nretired++;
}

#endif
