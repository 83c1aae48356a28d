"""Traffic for the tests: TCP transfers whose bytes are hashed at both ends, run on threads."""

from __future__ import annotations

import hashlib
import socket
import threading
from dataclasses import dataclass, field

from conftest import host_socket

from pyflannel.bench.rig import Host

CHUNK = 1 << 16


@dataclass
class Transfer:
    """One TCP connection from sender to receiver carrying `size` pseudo-random bytes."""

    size: int
    sent: str = ""
    received: str = ""
    received_bytes: int = 0
    errors: list[BaseException] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def join(self, timeout: float = 120) -> None:
        for thread in self.threads:
            thread.join(timeout)
            assert not thread.is_alive(), "transfer did not finish"
        if self.errors:
            raise self.errors[0]


def _payload() -> bytes:
    """Deterministic bytes that do not compress or repeat on a short period."""
    return b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(CHUNK // 32))


def start_transfer(src: Host, dst: Host, size: int, port: int = 5001, *, addrs: tuple[str, str] | None = None,
                   src_port: int = 0) -> Transfer:
    """Send size bytes from src's overlay address (and src_port, any if 0) to dst's (or between the `addrs` given,
    IPv4 or IPv6); both ends hash what they see."""
    t = Transfer(size)
    src_ip, dst_ip = addrs or (str(src.overlay_ip), str(dst.overlay_ip))
    family = socket.AF_INET6 if ":" in dst_ip else socket.AF_INET
    listener = host_socket(dst, socket.SOCK_STREAM, family=family)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((dst_ip, port))
    listener.listen(1)
    listener.settimeout(60)
    client = host_socket(src, socket.SOCK_STREAM, family=family)
    client.bind((src_ip, src_port))
    client.settimeout(60)

    def receive() -> None:
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(60)
                h = hashlib.sha256()
                while data := conn.recv(1 << 20):
                    h.update(data)
                    t.received_bytes += len(data)
                t.received = h.hexdigest()
        except BaseException as exc:
            t.errors.append(exc)
        finally:
            listener.close()

    def send() -> None:
        try:
            with client:
                client.connect((dst_ip, port))
                h = hashlib.sha256()
                block = bytearray(_payload())
                left = size
                i = 0
                while left:
                    # Vary every block so a dropped or duplicated block changes the hash.
                    block[:8] = i.to_bytes(8, "big")
                    piece = bytes(block[: min(left, CHUNK)])
                    client.sendall(piece)
                    h.update(piece)
                    left -= len(piece)
                    i += 1
                client.shutdown(socket.SHUT_WR)
                t.sent = h.hexdigest()
        except BaseException as exc:
            t.errors.append(exc)

    for fn in (receive, send):
        thread = threading.Thread(target=fn, daemon=True)
        thread.start()
        t.threads.append(thread)
    return t
