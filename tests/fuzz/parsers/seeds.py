"""Writes the checked-in seed corpus of the libFuzzer harnesses (tests/fuzz/parsers/corpus/<harness>/): a few
valid inputs per parser, so that a bounded run starts past the checks that random bytes rarely pass. Run from
the repository as `PYTHONPATH=tests .venv/bin/python tests/fuzz/parsers/seeds.py`; deterministic."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import test_offload as v4
import test_offload6 as v6
from packets import udp4

from pyflannel.dataplane._testing import GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, split

CORPUS = Path(__file__).with_name("corpus")
VNET_F_NEEDS_CSUM = 1


def vnet(flags: int, gso_type: int, gso_size: int, csum_start: int, csum_offset: int, packet: bytes) -> bytes:
    """A TUN read: the virtio-net header (little-endian, as the kernel writes it), then the packet."""
    return struct.pack("<BBHHHH", flags, gso_type, 0, gso_size, csum_start, csum_offset) + packet


def batch(flags: int, packets: list[bytes]) -> bytes:
    """A coalescing input: flags (bit 0 USO, bit 1 writes refused), then each packet after its 2-byte length."""
    return bytes([flags]) + b"".join(struct.pack("!H", len(p)) + p for p in packets)


def cmsg(level: int, kind: int, value: bytes) -> bytes:
    """One control message as the kernel lays it out on x86-64 (16-byte header, 8-byte alignment)."""
    data = struct.pack("=QII", 16 + len(value), level, kind) + value
    return data + bytes(-len(data) % 8)


def seeds() -> dict[str, list[bytes]]:
    payload = bytes(range(256)) * 12
    tcp4 = v4.tcp_super(payload, options=b"\x01\x01\x08\x0a" + bytes(8))
    tcp6 = v6.tcp_super(payload)
    udp6 = v6.udp_super(payload[:2900])
    hop_by_hop = struct.pack("!BBxxxxxx", 58, 0)  # next header ICMPv6, 8 bytes
    fragment = struct.pack("!BxHI", 17, 0, 7)  # a first fragment of a UDP datagram
    icmp_echo = struct.pack("!BBHHH", 128, 0, 0, 1, 1) + b"ping"
    return {
        "vnet_gso": [
            vnet(VNET_F_NEEDS_CSUM, GSO_TCPV4, 1000, 20, 16, tcp4),
            vnet(VNET_F_NEEDS_CSUM, GSO_TCPV6, 1200, 40, 16, tcp6),
            vnet(VNET_F_NEEDS_CSUM, GSO_UDP_L4, 1000, 40, 6, udp6),
            vnet(VNET_F_NEEDS_CSUM, 0, 0, 20, 6, udp4("10.244.1.2", "10.244.2.3", 1, 2, b"plain")),
        ],
        "coalesce": [
            batch(0, split(tcp4, GSO_TCPV4, 1000)),
            batch(2, split(tcp6, GSO_TCPV6, 1200)),
            batch(1, split(udp6, GSO_UDP_L4, 1000)),
            batch(1, [udp4("10.244.1.2", "10.244.2.3", 1, 2, bytes(500)) for _ in range(3)]),
            batch(2, split(v4.tcp_super(payload, flags=v4.ACK | v4.PSH), GSO_TCPV4, 1400)),
            batch(3, split(udp6, GSO_UDP_L4, 700)),
        ],
        "ipv6": [
            v6.ipv6(17, struct.pack("!HHHH", 1, 2, 12, 0) + b"data"),
            v6.ipv6(0, hop_by_hop + icmp_echo),
            v6.ipv6(44, fragment + struct.pack("!HHHH", 1, 2, 12, 0) + b"frag"),
            v6.ipv6(58, struct.pack("!BBHI", 1, 0, 0, 0) + bytes(40)),  # an ICMPv6 error: never answered
        ],
        "cmsg": [
            cmsg(socket.SOL_UDP, 104, struct.pack("=i", 1400)),  # UDP_GRO
            cmsg(socket.SOL_SOCKET, 40, struct.pack("=I", 3)) + cmsg(socket.SOL_UDP, 104, struct.pack("=i", 1200)),
        ],
    }


def main() -> None:
    for harness, inputs in seeds().items():
        where = CORPUS / harness
        where.mkdir(parents=True, exist_ok=True)
        for old in where.iterdir():
            old.unlink()
        for n, data in enumerate(inputs):
            (where / f"seed-{n}").write_bytes(data)


if __name__ == "__main__":
    main()
