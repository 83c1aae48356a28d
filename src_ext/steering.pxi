# Python entry points to steering.h: attaching the reuseport program (dataplane.udp), and the queue a packet is
# steered to, so that tests can check the kernel's choice against it.

import os

from steering cimport sock_filter, sock_fprog, STEER_INSNS, SO_ATTACH_REUSEPORT_CBPF, steer_hash, steer_program
from syscalls cimport setsockopt, SOL_SOCKET


def attach_steering(int sock_fd, int queues) -> None:
    """Steer the datagrams of sock_fd's SO_REUSEPORT group to its `queues` sockets by inner flow; OSError if the
    kernel refuses."""
    cdef sock_filter prog[STEER_INSNS]
    cdef sock_fprog fprog
    if not 2 <= queues <= MAX_QUEUES:
        raise ValueError(f"queues {queues} out of range 2-{MAX_QUEUES}")
    steer_program(prog, queues)
    fprog.len = STEER_INSNS
    fprog.filter = prog
    if setsockopt(sock_fd, SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, &fprog, sizeof(fprog)) < 0:
        raise OSError(errno, os.strerror(errno))


def steered_queue(const uint8_t[:] packet, int queues) -> int:
    """The queue (socket index) the attached program picks for a datagram carrying `packet`."""
    return steer_hash(&packet[0] if len(packet) else NULL, len(packet)) % queues


def steer_counts(const uint8_t[:] packets, int size, int queues) -> list[int]:
    """How many of `packets` (`size` bytes each, back to back) go to each queue: the engine's hash in a C loop,
    for bench/micro.py."""
    cdef uint64_t counts[PT_QUEUES]
    cdef Py_ssize_t off = 0
    if not 1 <= queues <= PT_QUEUES or size < 1:
        raise ValueError("queues or size out of range")
    memset(counts, 0, sizeof(counts))
    with nogil:
        while off + size <= packets.shape[0]:
            counts[steer_hash(&packets[off], size) % queues] += 1
            off += size
    return [counts[i] for i in range(queues)]
