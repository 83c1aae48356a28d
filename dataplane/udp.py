"""The underlay UDP socket the engine sends and receives on (flannel binds it to the interface address)."""

from __future__ import annotations

import errno
import ipaddress
import socket

from dataplane.errors import DataplaneError


def open_udp_socket(addr: ipaddress.IPv4Address, port: int) -> socket.socket:
    """A non-blocking UDP socket bound to addr:port, or DataplaneError naming the problem."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
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
    return sock
