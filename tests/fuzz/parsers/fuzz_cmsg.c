/* libFuzzer harness: the control messages of one received datagram (src_ext/engine.pyx _rx_batch,
 * cmsg_parse_rx), any bytes in a buffer of exactly their size: whatever the lengths claim, nothing outside the
 * buffer is read, and the GRO size is read only from a whole UDP_GRO message. */
#include <assert.h>
#include <stdlib.h>
#include <string.h>

#include "cmsg.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct msghdr m;
    int gso_size = -1;
    uint32_t drops = 7;
    memset(&m, 0, sizeof(m));
    m.msg_control = malloc(size ? size : 1);
    memcpy(m.msg_control, data, size);
    m.msg_controllen = size;
    cmsg_parse_rx(&m, &gso_size, &drops);
    assert(gso_size == 0 || size >= CMSG_LEN(sizeof(int)));
    free(m.msg_control);
    return 0;
}
