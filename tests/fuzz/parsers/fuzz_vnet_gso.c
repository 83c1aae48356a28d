/* libFuzzer harness: one TUN read as the TX thread takes it (src_ext/engine.pyx _tx_offloaded): a virtio-net
 * header, then the packet. No GSO: the checksum is finished (vnet_finish_csum); GSO: the super-packet is split
 * (gso_split, IPv4 or IPv6, TCP or UDP) into a buffer sized as the engine's arena slack. Every segment must be
 * a whole packet of the length it claims, and they must fit where they were written. */
#include <assert.h>
#include <stdlib.h>
#include <string.h>

#include "offload.h"

#define SPLIT_SEGS 2048
#define ROOM (1 << 19)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static uint16_t seg_len[SPLIT_SEGS];
    static uint8_t out[ROOM];
    vnet_hdr h;
    if (size < VNET_HDR_LEN || size - VNET_HDR_LEN > 65535)
        return 0;
    memcpy(&h, data, VNET_HDR_LEN);
    size_t len = size - VNET_HDR_LEN;
    uint8_t *pkt = malloc(len ? len : 1);    /* exactly the packet: AddressSanitizer sees any read past it */
    memcpy(pkt, data + VNET_HDR_LEN, len);
    if (h.gso_type == VNET_GSO_NONE) {
        if (h.flags & VNET_F_NEEDS_CSUM)
            vnet_finish_csum(pkt, len, &h);
    } else {
        int n = gso_split(pkt, len, h.gso_type, h.gso_size, out, ROOM, seg_len, SPLIT_SEGS);
        size_t off = 0;
        for (int i = 0; i < n; i++) {
            const uint8_t *s = out + off;
            size_t claimed = (s[0] >> 4) == 6 ? 40u + get16(s + 4) : get16(s + 2);
            assert(seg_len[i] == claimed && seg_len[i] <= len);
            off += seg_len[i];
        }
        assert(off <= ROOM);
    }
    free(pkt);
    return 0;
}
