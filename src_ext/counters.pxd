# C declarations of counters.h: the counters' enum (the names the engine indexes with) and the table Python reads
# their names and metric families from.

cdef extern from "counters.h" nogil:
    enum:
        N_COUNTERS
        C_tx_packets
        C_tx_bytes
        C_tx_send_calls
        C_tx_gso_messages
        C_tun_reads
        C_tun_super_packets
        C_rx_packets
        C_rx_bytes
        C_rx_recv_calls
        C_rx_gro_trains
        C_tun_writes
        C_tun_coalesced_writes
        C_icmp_unreachable_sent
        C_gso_fallbacks
        C_coalesce_fallbacks
        C_rx_socket_overflow
        C_icmp_unreachable_rate_limited
        C_icmp6_unreachable_sent
        C_icmp6_time_exceeded_sent
        C_wakeups
        C_spin_catches
        C_helper_on
        C_helper_off
        C_tx_not_ip
        C_tx_link_scope
        C_tx_malformed
        C_tx_bad_checksum
        C_tx_spoofed_source
        C_tx_no_route
        C_tx_ttl_expired
        C_tx_send_error
        C_rx_short
        C_rx_not_ip
        C_rx_bad_ihl
        C_rx_bad_length
        C_rx_bad_checksum
        C_rx_ttl_expired
        C_rx_unknown_peer
        C_rx_spoofed_source
        C_rx_tun_write_error
    ctypedef struct counter_info:
        const char *name
        const char *family
        const char *label
        const char *value
        int drop
    const counter_info COUNTER_INFO_TABLE[]
