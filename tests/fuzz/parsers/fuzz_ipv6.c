/* libFuzzer harness: an inner IPv6 packet as the TX thread judges it when it has no route or its hop limit runs
 * out (src_ext/engine.pyx _tx_route6, _icmp6_error): link scope, the walk through the extension headers that
 * decides whether an ICMPv6 error may be sent (ip6_upper, ip6_error_allowed), and the error built (ip6_build_error)
 * within the IPv6 minimum MTU with a checksum that verifies. */
#include <assert.h>
#include <stdlib.h>
#include <string.h>

#include "ipv6.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static uint8_t out[IP6_MIN_MTU];
    if (size < IP6_HLEN)    /* the engine drops shorter ones before */
        return 0;
    uint8_t *p = malloc(size);
    memcpy(p, data, size);
    ip6_link_scope(p);
    const uint8_t types[] = {ICMP6_DST_UNREACH, ICMP6_PACKET_TOO_BIG, ICMP6_TIME_EXCEEDED};
    for (size_t i = 0; i < sizeof(types); i++) {
        if (!ip6_error_allowed(p, size, types[i]))
            continue;
        size_t n = ip6_build_error(out, p, size, p + 24, types[i], 0, 0);
        assert(n <= IP6_MIN_MTU && IP6_HLEN + get16(out + 4) == n);
        assert(csum_fold(csum_partial(out + IP6_HLEN, n - IP6_HLEN, csum_pseudo6(out, 58, (uint32_t)(n - IP6_HLEN))))
               == 0xffff);
    }
    free(p);
    return 0;
}
