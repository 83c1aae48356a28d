/* Longest-prefix-match table for IPv4, read lock-free by the engine threads, updated in O(changed routes).
 *
 * Shape: a four-level multibit trie with 8-bit strides. A node is 256 64-bit entries; an entry is either a leaf
 * (bit 0 set) holding the next hop itself (peer address and port) and the length of the prefix that owns the slot,
 * or a pointer to the node for the next 8 address bits. A lookup is at most four dependent loads whatever the
 * number of routes; a /24 lease costs three. The leaf carrying the hop (instead of an index into a hop array)
 * means a route change never rewrites anything but the slots of that prefix.
 *
 * Prefixes are expanded into slots (controlled prefix expansion). Because every slot records the length of the
 * prefix it came from, routes can be added and removed one at a time in any order: an added prefix takes the
 * slots in its range that belong to shorter prefixes, and a removed prefix hands its slots back to the next
 * shorter prefix that covers it (found by the caller, which knows the routes). A node whose 256 slots end up
 * holding one short prefix is folded back into its parent slot.
 *
 * Concurrency: published nodes are never written. The writer (one at a time) edits copies of the nodes on the
 * paths it changes (path copying: at most four nodes per /32, fewer for shorter prefixes), then publishes the new
 * root with one atomic store. Readers never wait and take no lock: each announces, in its own slot, the epoch
 * (number of publishes) it entered at, and the writer frees a replaced node only once every announcing reader
 * entered after the publish that replaced it (epoch-based reclamation). The writer never waits either: what it
 * cannot free yet stays on a list until a later publish or the table's end.
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

typedef struct {
    uint32_t addr;  /* peer IPv4, network byte order */
    uint16_t port;  /* peer UDP port, network byte order */
} pt_hop;

typedef struct pt_node {
    uint64_t gen;       /* the writer generation that created it: editable in place while that one lasts */
    uint64_t e[256];
} pt_node;

typedef pt_node pt_table;   /* a published root */

/* One change of a batch: set stores `leaf` (pt_leaf of the route); delete hands the prefix's slots to `leaf`
 * (the covering route's leaf, or PT_NONE). */
typedef struct {
    uint32_t net;       /* host byte order, host bits clear */
    uint8_t plen;
    uint8_t del;
    uint64_t leaf;
} pt_op;

typedef struct {
    pt_node *node;
    uint64_t tag;       /* the last epoch whose root could reach it */
} pt_retired;

typedef struct {
    pt_node *cur;                   /* the published root */
    uint64_t epoch;                 /* publishes so far */
    uint64_t active[PT_READERS];    /* per reader: the epoch it entered at, PT_IDLE outside */
    /* writer only */
    pt_node *work;                  /* the root being edited; cur when nothing is pending */
    uint64_t gen;
    pt_retired *retired;
    size_t nretired, cap_retired;
} pt_handle;

static inline uint64_t pt_leaf(pt_hop hop, unsigned plen)
{
    return ((uint64_t)hop.addr << 32) | ((uint64_t)hop.port << 16) | ((uint64_t)(plen + 1) << 1) | PT_LEAF;
}

static inline int pt_routed(uint64_t leaf) { return ((leaf >> 1) & 63) != 0; }

static inline pt_hop pt_leaf_hop(uint64_t leaf)
{
    pt_hop hop = { (uint32_t)(leaf >> 32), (uint16_t)(leaf >> 16) };
    return hop;
}

#define PT_CHILD(e) ((const pt_node *)(uintptr_t)(e))

/* The leaf for a host-order address (PT_NONE-like when nothing matches: test with pt_routed). */
static inline uint64_t pt_lookup(const pt_table *t, uint32_t addr)
{
    uint64_t e = t->e[addr >> 24];
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

static int pt_retire(pt_handle *h, pt_node *n)
{
    if (h->nretired == h->cap_retired) {
        size_t cap = h->cap_retired ? h->cap_retired * 2 : 64;
        pt_retired *r = (pt_retired *)realloc(h->retired, cap * sizeof(pt_retired));
        if (!r)
            return -1;
        h->retired = r;
        h->cap_retired = cap;
    }
    h->retired[h->nretired].node = n;
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
    unsigned owner = (slot >> 1) & 63, mine = op->plen + 1u;
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
    if (!(first & PT_LEAF) || ((first >> 1) & 63) > 8 * (depth + 1) + 1)
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

/* Apply op below *at (a node for address bits [24 - 8 * depth, 32 - 8 * depth)). */
static int pt_paint(pt_handle *h, pt_node **at, unsigned depth, const pt_op *op)
{
    unsigned shift = 24 - 8 * depth, span = 8 * (depth + 1);
    unsigned i = (op->net >> shift) & 0xff;
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

static void pt_undo(pt_handle *h)
{
    pt_undo_node(h, h->work);
    while (h->nretired && h->retired[h->nretired - 1].tag == h->epoch)
        h->nretired--;
    h->work = h->cur;
}

/* Free every retired node that no reader can reach any more. */
static void pt_reclaim(pt_handle *h)
{
    uint64_t oldest = PT_IDLE;
    for (int i = 0; i < PT_READERS; i++) {
        uint64_t e = __atomic_load_n(&h->active[i], __ATOMIC_SEQ_CST);
        if (e < oldest)
            oldest = e;
    }
    size_t keep = 0;
    for (size_t i = 0; i < h->nretired; i++) {
        if (h->retired[i].tag < oldest)
            free(h->retired[i].node);
        else
            h->retired[keep++] = h->retired[i];
    }
    h->nretired = keep;
}

/* Apply a batch of changes in order and publish the result at once; -1 (nothing changed) if memory ran out. */
static int pt_apply(pt_handle *h, const pt_op *ops, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (pt_paint(h, &h->work, 0, &ops[i]) < 0) {
            pt_undo(h);
            return -1;
        }
    }
    if (h->work != h->cur) {
        __atomic_store_n(&h->cur, h->work, __ATOMIC_SEQ_CST);
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
    h->cur = h->work = pt_new_node(0, PT_NONE);
    return h->cur ? 0 : -1;
}

static void pt_free_node(pt_node *n)
{
    for (int i = 0; i < 256; i++)
        if (!(n->e[i] & PT_LEAF))
            pt_free_node((pt_node *)(uintptr_t)n->e[i]);
    free(n);
}

/* Free everything; no reader may be left. */
static void pt_destroy(pt_handle *h)
{
    if (h->cur)
        pt_free_node(h->cur);
    for (size_t i = 0; i < h->nretired; i++)
        free(h->retired[i].node);
    free(h->retired);
    memset(h, 0, sizeof(*h));
}

#endif
