/* libFuzzer harness: one receive batch as the RX thread coalesces it (src_ext/engine.pyx _rx_accept and
 * _rx_write_coalesced). The input is a flags byte (bit 0: the TUN takes USO, so UDP is merged too; bit 1: the
 * kernel refuses the merged writes, so they are unmerged), then packets, each a 2-byte length and its bytes.
 * Each packet lives in a buffer of exactly its size; a merged write must gather exactly the item's length, and an
 * unmerged one give back the packets' own lengths. */
#include <assert.h>
#include <stdlib.h>
#include <string.h>

#include "offload.h"

#define MAX_PACKETS 256
#define POOL 64

static gro_table *table(int udp)
{
    static gro_table *t;
    if (!t) {
        t = calloc(1, sizeof(gro_table));
        t->items = calloc(MAX_PACKETS, sizeof(gro_item));
        t->pool = calloc((size_t)POOL * GRO_IOVS, sizeof(struct iovec));
        t->max_items = MAX_PACKETS;
        t->npool = POOL;
    }
    t->udp = udp;
    gro_reset(t);
    return t;
}

static void write_out(gro_table *t, int refused)
{
    vnet_hdr h;
    for (int i = 0; i < t->nitems; i++) {
        gro_item *it = &t->items[i];
        gro_finish(it, &h);
        if (it->segs < 2)
            continue;
        size_t gathered = 0;
        for (int k = 1; k <= it->segs; k++)
            gathered += it->iov[k].iov_len;
        assert(gathered == it->len);
        if (refused) {
            gro_unmerge(it);
            for (int k = 1; k <= it->segs; k++)
                assert(it->iov[k].iov_len >= 20);
        }
    }
    gro_reset(t);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint8_t *packets[MAX_PACKETS];
    int n = 0;
    if (size < 1)
        return 0;
    gro_table *t = table(data[0] & 1);
    size_t at = 1;
    while (n < MAX_PACKETS && at + 2 <= size) {
        size_t len = get16(data + at);
        at += 2;
        if (len > size - at)
            len = size - at;
        packets[n] = malloc(len ? len : 1);
        memcpy(packets[n], data + at, len);
        at += len;
        if (gro_add(t, packets[n], (uint32_t)len) < 0) {    /* the batch is full: written, then a new one */
            write_out(t, data[0] & 2);
            gro_add(t, packets[n], (uint32_t)len);
        }
        n++;
    }
    write_out(t, data[0] & 2);
    while (n)
        free(packets[--n]);
    return 0;
}
