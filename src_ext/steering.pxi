# Attaching steering.h's reuseport program to a socket group (dataplane.udp).

import os

from steering cimport sock_filter, sock_fprog, STEER_INSNS, STEER_MAX, SO_ATTACH_REUSEPORT_CBPF, steer_program
from syscalls cimport setsockopt, SOL_SOCKET


def attach_steering(int sock_fd, int queues) -> None:
    """Steer the datagrams of sock_fd's SO_REUSEPORT group to its `queues` sockets by inner flow; OSError if the
    kernel refuses."""
    cdef sock_filter prog[STEER_INSNS]
    cdef sock_fprog fprog
    if not 2 <= queues <= STEER_MAX:
        raise ValueError(f"queues {queues} out of range 2-{STEER_MAX}")
    steer_program(prog, queues)
    fprog.len = STEER_INSNS
    fprog.filter = prog
    if setsockopt(sock_fd, SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, &fprog, sizeof(fprog)) < 0:
        raise OSError(errno, os.strerror(errno))
