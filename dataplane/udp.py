"""The underlay UDP sockets the engine sends and receives on (flannel binds one to the interface address): for an
IPv4 underlay, an IPv6 underlay, or both.

With several queues there is one socket per queue and family, those of a family all bound to the same address
and port with SO_REUSEPORT, and a reuseport program (dataplane._engine.attach_steering, src_ext/steering.h) picks
the socket of each arriving datagram by its inner flow, so that one flow always reaches the same engine thread
(the program sees the UDP payload, the inner packet, whichever the underlay family).

Besides binding, this is where the socket-side offloads are probed and switched on (UDP_SEGMENT for sends,
UDP_GRO for receives), where the buffers are enlarged (the default 208 KiB drops bursts, and drops become TCP
retransmits), and where SO_RXQ_OVFL is enabled so the engine can count what the socket buffer dropped.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from dataclasses import replace

from pyflannel.dataplane._engine import attach_steering
from pyflannel.dataplane.errors import DataplaneError
from pyflannel.dataplane.offload import Offloads

BUFFER_BYTES = 8 << 20
# include/uapi/linux/udp.h, asm-generic/socket.h
UDP_SEGMENT, UDP_GRO, SO_RXQ_OVFL = 103, 104, 40
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33


def open_udp_sockets(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int,
                     queues: int = 1) -> list[socket.socket]:
    """`queues` non-blocking UDP sockets of addr's family bound to addr:port, steered by flow when there are several, or
    DataplaneError naming the problem (nothing left open)."""
    if queues == 1:
        return [_open_socket(addr, port)]
    # SO_REUSEPORT would also join a group someone else bound (any process of the same user): a plain bind
    # first says whether the port is free, as it does for one queue.
    _open_socket(addr, port).close()
    socks: list[socket.socket] = []
    try:
        for _ in range(queues):
            socks.append(_open_socket(addr, port, reuseport=True))
        try:
            attach_steering(socks[0].fileno(), queues)
        except OSError as exc:
            raise DataplaneError(f"cannot steer UDP {addr}:{port} over {queues} sockets: {exc.strerror}") from None
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def _open_socket(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, *,
                 reuseport: bool = False) -> socket.socket:
    """A non-blocking UDP socket of addr's family bound to addr:port, or DataplaneError naming the problem."""
    sock = socket.socket(socket.AF_INET if addr.version == 4 else socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        if addr.version == 6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((str(addr), port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise DataplaneError(f"UDP port {port} on {addr} is already in use") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise DataplaneError(f"{addr} is not an address of this host") from None
        if exc.errno == errno.EACCES:
            raise DataplaneError(f"permission denied binding UDP port {port}") from None
        raise DataplaneError(f"cannot bind UDP {addr}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    _enlarge_buffers(sock)
    sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
    return sock


def _enlarge_buffers(sock: socket.socket) -> None:
    """*BUFFORCE ignores net.core.[rw]mem_max (needs CAP_NET_ADMIN); otherwise take what the sysctl allows."""
    for force, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, BUFFER_BYTES)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, BUFFER_BYTES)


def enable_offloads(sock: socket.socket, wanted: Offloads) -> Offloads:
    """Switch on UDP GSO/GRO where wanted and accepted; the returned record says which are on."""
    gso = wanted.gso and _sockopt_known(sock, UDP_SEGMENT)
    # getsockopt(UDP_GRO) exists from Linux 5.12, the first release whose UDP GRO wireguard-go trusts.
    gro = wanted.gro and _sockopt_known(sock, UDP_GRO)
    if gro:
        sock.setsockopt(socket.IPPROTO_UDP, UDP_GRO, 1)
    return replace(wanted, gso=gso, gro=gro)


def _sockopt_known(sock: socket.socket, option: int) -> bool:
    try:
        sock.getsockopt(socket.IPPROTO_UDP, option)
    except OSError:
        return False
    return True
