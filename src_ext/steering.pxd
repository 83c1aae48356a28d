# C declarations of steering.h (which receive thread a datagram goes to with several queues).

from libc.stdint cimport uint8_t, uint16_t, uint32_t


cdef extern from "steering.h" nogil:
    struct sock_filter:
        uint16_t code
        uint8_t jt
        uint8_t jf
        uint32_t k
    struct sock_fprog:
        unsigned short len
        sock_filter *filter
    enum:
        STEER_INSNS
        STEER_MAX
        SO_ATTACH_REUSEPORT_CBPF
    # The 16-bit flow hash of an inner packet; the program that steers a datagram to socket hash % n.
    uint32_t steer_hash(const uint8_t *p, size_t n)
    void steer_program(sock_filter *out, uint32_t n)
