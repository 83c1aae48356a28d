/* The engine's counters, defined once. Everything else is made from this list: the C enum the engine indexes
 * with (C_<name>), the names Python sees (Engine.stats(), COUNTERS, DROPS), the Prometheus family and label each
 * is exported under (EXPORTED, read by dataplane.metrics), and so the metrics and the stub cannot drift from the
 * engine. COUNT(name, family, label, value) is an event count; DROP(name) a packet dropped for that reason
 * (exported as flannel_drops_total{reason="name"}). */
#ifndef PYFLANNEL_COUNTERS_H
#define PYFLANNEL_COUNTERS_H

#define ENGINE_COUNTERS(COUNT, DROP)                                                  \
    COUNT(tx_packets, "packets", "direction", "tx")                                  \
    COUNT(tx_bytes, "bytes", "direction", "tx")                                      \
    COUNT(tx_send_calls, "syscalls", "call", "sendmmsg")                             \
    COUNT(tx_gso_messages, "offload_events", "event", "gso_send")                    \
    COUNT(tun_reads, "syscalls", "call", "tun_read")                                 \
    COUNT(tun_super_packets, "offload_events", "event", "tso_read")                  \
    COUNT(rx_packets, "packets", "direction", "rx")                                  \
    COUNT(rx_bytes, "bytes", "direction", "rx")                                      \
    COUNT(rx_recv_calls, "syscalls", "call", "recvmmsg")                             \
    COUNT(rx_gro_trains, "offload_events", "event", "gro_train")                     \
    COUNT(tun_writes, "syscalls", "call", "tun_write")                               \
    COUNT(tun_coalesced_writes, "offload_events", "event", "coalesced_write")        \
    COUNT(icmp_unreachable_sent, "icmp_unreachable", "outcome", "sent")              \
    COUNT(gso_fallbacks, "offload_events", "event", "gso_fallback")                  \
    COUNT(coalesce_fallbacks, "offload_events", "event", "coalesce_fallback")        \
    COUNT(rx_socket_overflow, "drops", "reason", "rx_socket_overflow")               \
    COUNT(icmp_unreachable_rate_limited, "icmp_unreachable", "outcome", "rate_limited") \
    COUNT(icmp6_unreachable_sent, "icmp6_errors", "type", "unreachable")             \
    COUNT(icmp6_time_exceeded_sent, "icmp6_errors", "type", "time_exceeded")         \
    COUNT(wakeups, "worker_events", "event", "wakeup")                               \
    COUNT(spin_catches, "worker_events", "event", "spin_catch")                      \
    COUNT(helper_on, "worker_events", "event", "helper_on")                          \
    COUNT(helper_off, "worker_events", "event", "helper_off")                        \
    DROP(tx_not_ip)                                                                  \
    DROP(tx_link_scope)                                                              \
    DROP(tx_malformed)                                                               \
    DROP(tx_bad_checksum)                                                            \
    DROP(tx_spoofed_source)                                                          \
    DROP(tx_no_route)                                                                \
    DROP(tx_ttl_expired)                                                             \
    DROP(tx_send_error)                                                              \
    DROP(rx_short)                                                                   \
    DROP(rx_not_ip)                                                                  \
    DROP(rx_bad_ihl)                                                                 \
    DROP(rx_bad_length)                                                              \
    DROP(rx_bad_checksum)                                                            \
    DROP(rx_ttl_expired)                                                             \
    DROP(rx_unknown_peer)                                                            \
    DROP(rx_spoofed_source)                                                          \
    DROP(rx_tun_write_error)

#define COUNTER_ENUM(name, ...) C_##name,
enum { ENGINE_COUNTERS(COUNTER_ENUM, COUNTER_ENUM) N_COUNTERS };
#undef COUNTER_ENUM

typedef struct {
    const char *name, *family, *label, *value;  /* a drop: family "drops", label "reason", value its name */
    int drop;
} counter_info;

#define COUNTER_INFO(name, family, label, value) {#name, family, label, value, 0},
#define DROP_INFO(name) {#name, "drops", "reason", #name, 1},
static const counter_info COUNTER_INFO_TABLE[N_COUNTERS] = { ENGINE_COUNTERS(COUNTER_INFO, DROP_INFO) };
#undef COUNTER_INFO
#undef DROP_INFO

#endif
