/* Longest-prefix-match table for IPv4 and IPv6, read lock-free by the engine threads, updated in O(changed
 * routes).
 *
 * Shape: two multibit tries with 8-bit strides, one per family, published together as one pair of roots (so a
 * reader pins both with one epoch). The IPv4 trie has four levels, the IPv6 one sixteen; the writer is the same
 * code for both (a key is the address's bytes, one level per byte). A node is 256 64-bit entries; an entry is
 * either a leaf (bit 0 set) holding the next hop itself (peer address and port, or an IPv6 peer's slot) and the
 * length of the prefix that owns the slot, or a pointer to the node for the next 8 address bits. An IPv4 lookup
 * is at most four dependent loads whatever the number of routes (a /24 lease costs three); an IPv6 /64 lease
 * costs eight. The leaf carrying the hop (instead of an index into a hop array) means a route change never
 * rewrites anything but the slots of that prefix.
 *
 * Prefixes are expanded into slots (controlled prefix expansion). Because every slot records the length of the
 * prefix it came from, routes can be added and removed one at a time in any order: an added prefix takes the
 * slots in its range that belong to shorter prefixes, and a removed prefix hands its slots back to the next
 * shorter prefix that covers it (found by the caller, which knows the routes). A node whose 256 slots end up
 * holding one short prefix is folded back into its parent slot.
 *
 * Concurrency: published nodes are never written. The writer (one at a time) edits copies of the nodes on the
 * paths it changes (path copying: at most one node per key byte), then publishes the new pair of roots with one
 * atomic store. Readers never wait and take no lock: each announces, in its own slot, the epoch
 * (number of publishes) it entered at, and the writer frees a replaced node only once every announcing reader
 * entered after the publish that replaced it (epoch-based reclamation). The writer never waits either: what it
 * cannot free yet stays on a list until a later publish or the table's end. Peer slots (peer_slots.h) are
 * reused by the same rule.
 */
#ifndef PYFLANNEL_PREFIX_TABLE_H
#define PYFLANNEL_PREFIX_TABLE_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PT_QUEUES 8                         /* engine queues, each a TX and an RX reader */
#define PT_READERS (2 * PT_QUEUES + 2)      /* ... and two more: the Python side's and a test's */
#define PT_IDLE UINT64_MAX
#define PT_LEAF 1ull
#define PT_NONE PT_LEAF        /* a leaf of no prefix: no route */

#define PT_HOP6 (1ull << 9)  /* the hop's addr is an IPv6 peer's slot in peer6.h, not an IPv4 address */

/* A leaf: bit 0 set; bits 1-8 the owning prefix length + 1 (0: no route); bit 9 PT_HOP6; bits 16-31 the port;
 * bits 32-63 the IPv4 peer address or the IPv6 peer's slot. */
typedef struct {
    uint32_t addr;  /* peer IPv4, network byte order; or with v6, the peer's slot in the IPv6 peer table */
    uint16_t port;  /* peer UDP port, network byte order */
    uint8_t v6;     /* the peer is reached over the IPv6 underlay */
} pt_hop;

typedef struct pt_node {
    uint64_t gen;       /* the writer generation that created it: editable in place while that one lasts */
    uint64_t e[256];
} pt_node;

enum { PT_V4, PT_V6 };

typedef struct {
    pt_node *root[2];   /* PT_V4, PT_V6 */
} pt_table;             /* a published pair of roots */

/* One change of a batch: set stores `leaf` (pt_leaf of the route); delete hands the prefix's slots to `leaf`
 * (the covering route's leaf, or PT_NONE). */
typedef struct {
    uint8_t key[16];    /* the network address's bytes (network order), host bits clear; IPv4 uses 4 */
    uint8_t plen;
    uint8_t del;
    uint8_t family;     /* PT_V4 or PT_V6 */
    uint64_t leaf;
} pt_op;

typedef struct {
    void *mem;          /* a node, or a pair of roots */
    uint64_t tag;       /* the last epoch whose root could reach it */
} pt_retired;

typedef struct {
    pt_table *cur;                  /* the published roots */
    uint64_t epoch;                 /* publishes so far */
    uint64_t active[PT_READERS];    /* per reader: the epoch it entered at, PT_IDLE outside */
    /* writer only */
    pt_node *work[2];               /* the roots being edited; cur's when nothing is pending */
    uint64_t gen;
    pt_retired *retired;
    size_t nretired, cap_retired;
} pt_handle;

static inline uint64_t pt_leaf(pt_hop hop, unsigned plen)
{
    return ((uint64_t)hop.addr << 32) | ((uint64_t)hop.port << 16) | (hop.v6 ? PT_HOP6 : 0)
           | ((uint64_t)(plen + 1) << 1) | PT_LEAF;
}

static inline unsigned pt_owner(uint64_t leaf) { return (leaf >> 1) & 255; }

static inline int pt_routed(uint64_t leaf) { return pt_owner(leaf) != 0; }

static inline pt_hop pt_leaf_hop(uint64_t leaf)
{
    pt_hop hop = { (uint32_t)(leaf >> 32), (uint16_t)(leaf >> 16), (leaf & PT_HOP6) != 0 };
    return hop;
}

#define PT_CHILD(e) ((const pt_node *)(uintptr_t)(e))

/* The leaf for a host-order IPv4 address (PT_NONE-like when nothing matches: test with pt_routed). */
static inline uint64_t pt_lookup(const pt_table *t, uint32_t addr)
{
    uint64_t e = t->root[PT_V4]->e[addr >> 24];
    if (e & PT_LEAF)
        return e;
    e = PT_CHILD(e)->e[(addr >> 16) & 0xff];
    if (e & PT_LEAF)
        return e;
    e = PT_CHILD(e)->e[(addr >> 8) & 0xff];
    if (e & PT_LEAF)
        return e;
    return PT_CHILD(e)->e[addr & 0xff];
}

/* The leaf for an IPv6 address (16 bytes, network order). */
static inline uint64_t pt_lookup6(const pt_table *t, const uint8_t *addr)
{
    uint64_t e = t->root[PT_V6]->e[addr[0]];
    for (int i = 1; !(e & PT_LEAF); i++)
        e = PT_CHILD(e)->e[addr[i]];
    return e;
}

/* ---- readers ---------------------------------------------------------------------------------------------- */

/* Pin the current root in reader slot `slot` until pt_release; never waits. */
static inline const pt_table *pt_acquire(pt_handle *h, int slot)
{
    __atomic_store_n(&h->active[slot], __atomic_load_n(&h->epoch, __ATOMIC_SEQ_CST), __ATOMIC_SEQ_CST);
    return __atomic_load_n(&h->cur, __ATOMIC_SEQ_CST);
}

static inline void pt_release(pt_handle *h, int slot)
{
    __atomic_store_n(&h->active[slot], PT_IDLE, __ATOMIC_RELEASE);
}

/* ---- writer ----------------------------------------------------------------------------------------------- */

static pt_node *pt_new_node(uint64_t gen, uint64_t fill)
{
    pt_node *n = (pt_node *)malloc(sizeof(pt_node));
    if (!n)
        return NULL;
    n->gen = gen;
    for (int i = 0; i < 256; i++)
        n->e[i] = fill;
    return n;
}

static int pt_retire(pt_handle *h, void *mem)
{
    if (h->nretired == h->cap_retired) {
        size_t cap = h->cap_retired ? h->cap_retired * 2 : 64;
        pt_retired *r = (pt_retired *)realloc(h->retired, cap * sizeof(pt_retired));
        if (!r)
            return -1;
        h->retired = r;
        h->cap_retired = cap;
    }
    h->retired[h->nretired].mem = mem;
    h->retired[h->nretired].tag = h->epoch;
    h->nretired++;
    return 0;
}

/* A node of this batch that may be edited in place: n itself if this batch made it, else a copy (n retired). */
static pt_node *pt_writable(pt_handle *h, pt_node *n)
{
    if (n->gen == h->gen)
        return n;
    pt_node *c = (pt_node *)malloc(sizeof(pt_node));
    if (!c)
        return NULL;
    if (pt_retire(h, n) < 0) {
        free(c);
        return NULL;
    }
    memcpy(c, n, sizeof(pt_node));
    c->gen = h->gen;
    return c;
}

static inline int pt_takes(uint64_t slot, const pt_op *op)
{
    unsigned owner = pt_owner(slot), mine = op->plen + 1u;
    return op->del ? owner == mine : owner <= mine;
}

static void pt_fold(pt_handle *h, pt_node *parent, unsigned i, unsigned depth);

/* Apply op to every slot of *at in [lo, lo + n), descending into children (which the op covers whole). */
static int pt_paint_range(pt_handle *h, pt_node **at, unsigned depth, unsigned lo, unsigned n, const pt_op *op)
{
    pt_node *node = pt_writable(h, *at);
    if (!node)
        return -1;
    *at = node;
    for (unsigned i = lo; i < lo + n; i++) {
        uint64_t e = node->e[i];
        if (!(e & PT_LEAF)) {
            pt_node *child = (pt_node *)(uintptr_t)e;
            if (pt_paint_range(h, &child, depth + 1, 0, 256, op) < 0)
                return -1;
            node->e[i] = (uint64_t)(uintptr_t)child;
            pt_fold(h, node, i, depth);
        } else if (pt_takes(e, op)) {
            node->e[i] = op->leaf;
        }
    }
    return 0;
}

/* Fold a child whose slots all hold one leaf that fits the parent slot (a prefix no longer than the slot's). A
 * published child is retired (left in place if that cannot be recorded); one of this batch is freed at once. */
static void pt_fold(pt_handle *h, pt_node *parent, unsigned i, unsigned depth)
{
    pt_node *c = (pt_node *)(uintptr_t)parent->e[i];
    uint64_t first = c->e[0];
    if (!(first & PT_LEAF) || pt_owner(first) > 8 * (depth + 1) + 1)
        return;
    for (int k = 1; k < 256; k++)
        if (c->e[k] != first)
            return;
    if (c->gen != h->gen && pt_retire(h, c) < 0)
        return;
    parent->e[i] = first;
    if (c->gen == h->gen)
        free(c);
}

/* Apply op below *at (a node for key byte `depth`). */
static int pt_paint(pt_handle *h, pt_node **at, unsigned depth, const pt_op *op)
{
    unsigned span = 8 * (depth + 1);
    unsigned i = op->key[depth];
    if (op->plen <= span)
        return pt_paint_range(h, at, depth, i, 1u << (span - op->plen), op);
    uint64_t e = (*at)->e[i];
    if ((e & PT_LEAF) && op->del)
        return 0;           /* the prefix owns no slot below a leaf */
    pt_node *node = pt_writable(h, *at);
    if (!node)
        return -1;
    *at = node;
    if (e & PT_LEAF) {
        pt_node *child = pt_new_node(h->gen, e);
        if (!child)
            return -1;
        node->e[i] = (uint64_t)(uintptr_t)child;
    }
    pt_node *child = (pt_node *)(uintptr_t)node->e[i];
    if (pt_paint(h, &child, depth + 1, op) < 0)
        return -1;
    node->e[i] = (uint64_t)(uintptr_t)child;
    pt_fold(h, node, i, depth);
    return 0;
}

/* Free what this batch made (nodes of the current generation under the work root) and forget what it retired:
 * the table is as it was published. */
static void pt_undo_node(pt_handle *h, pt_node *n)
{
    if (n->gen != h->gen)
        return;
    for (int i = 0; i < 256; i++)
        if (!(n->e[i] & PT_LEAF))
            pt_undo_node(h, (pt_node *)(uintptr_t)n->e[i]);
    free(n);
}

static void pt_undo(pt_handle *h, size_t retired_before)
{
    for (int f = PT_V4; f <= PT_V6; f++) {
        pt_undo_node(h, h->work[f]);
        h->work[f] = h->cur->root[f];
    }
    h->nretired = retired_before;
}

/* The epoch the oldest reader entered at (PT_IDLE: none is reading): what was retired before it is unreachable. */
static uint64_t pt_oldest(const pt_handle *h)
{
    uint64_t oldest = PT_IDLE;
    for (int i = 0; i < PT_READERS; i++) {
        uint64_t e = __atomic_load_n(&h->active[i], __ATOMIC_SEQ_CST);
        if (e < oldest)
            oldest = e;
    }
    return oldest;
}

/* Start a new epoch without a new table: whatever the writer hid from readers before this, a reader that
 * enters from now on cannot see (peer_slots.h retires its slots this way). */
static void pt_bump(pt_handle *h)
{
    __atomic_store_n(&h->epoch, h->epoch + 1, __ATOMIC_SEQ_CST);
}

/* Free every retired node that no reader can reach any more. */
static void pt_reclaim(pt_handle *h)
{
    uint64_t oldest = pt_oldest(h);
    size_t keep = 0;
    for (size_t i = 0; i < h->nretired; i++) {
        if (h->retired[i].tag < oldest)
            free(h->retired[i].mem);
        else
            h->retired[keep++] = h->retired[i];
    }
    h->nretired = keep;
}

/* Apply a batch of changes in order and publish the result at once; -1 (nothing changed) if memory ran out. */
static int pt_apply(pt_handle *h, const pt_op *ops, size_t n)
{
    size_t retired_before = h->nretired;
    for (size_t i = 0; i < n; i++) {
        if (pt_paint(h, &h->work[ops[i].family], 0, &ops[i]) < 0) {
            pt_undo(h, retired_before);
            return -1;
        }
    }
    if (h->work[PT_V4] != h->cur->root[PT_V4] || h->work[PT_V6] != h->cur->root[PT_V6]) {
        pt_table *next = (pt_table *)malloc(sizeof(pt_table));
        if (!next || pt_retire(h, h->cur) < 0) {
            free(next);
            pt_undo(h, retired_before);
            return -1;
        }
        next->root[PT_V4] = h->work[PT_V4];
        next->root[PT_V6] = h->work[PT_V6];
        __atomic_store_n(&h->cur, next, __ATOMIC_SEQ_CST);
        __atomic_store_n(&h->epoch, h->epoch + 1, __ATOMIC_SEQ_CST);
        h->gen++;
    }
    pt_reclaim(h);
    return 0;
}

/* An empty table (gen 0 is the first batch's). */
static int pt_init(pt_handle *h)
{
    memset(h, 0, sizeof(*h));
    for (int i = 0; i < PT_READERS; i++)
        h->active[i] = PT_IDLE;
    h->gen = 1;
    h->cur = (pt_table *)malloc(sizeof(pt_table));
    if (!h->cur)
        return -1;
    h->cur->root[PT_V4] = h->work[PT_V4] = pt_new_node(0, PT_NONE);
    h->cur->root[PT_V6] = h->work[PT_V6] = pt_new_node(0, PT_NONE);
    return h->work[PT_V4] && h->work[PT_V6] ? 0 : -1;
}

static void pt_free_node(pt_node *n)
{
    if (!n)
        return;
    for (int i = 0; i < 256; i++)
        if (!(n->e[i] & PT_LEAF))
            pt_free_node((pt_node *)(uintptr_t)n->e[i]);
    free(n);
}

/* Free everything; no reader may be left. */
static void pt_destroy(pt_handle *h)
{
    if (h->cur) {
        pt_free_node(h->cur->root[PT_V4]);
        pt_free_node(h->cur->root[PT_V6]);
        free(h->cur);
    }
    for (size_t i = 0; i < h->nretired; i++)
        free(h->retired[i].mem);
    free(h->retired);
    memset(h, 0, sizeof(*h));
}

#endif
