"""Hand-built IPv4 packets: what a flannel peer puts in a UDP datagram, built without the code under test."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass


def checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum, the slow obvious way."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(src: str, dst: str, proto: int, payload: bytes, *, ttl: int = 64, ident: int = 1) -> bytes:
    """An IPv4 packet with a correct header checksum and no options."""
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000, ttl, proto, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + payload


def udp4(src: str, dst: str, sport: int, dport: int, data: bytes, *, ttl: int = 64) -> bytes:
    """An IPv4/UDP packet with both checksums right."""
    length = 8 + len(data)
    pseudo = ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed + struct.pack("!BBH", 0, 17, length)
    head = struct.pack("!HHHH", sport, dport, length, 0)
    csum = checksum(pseudo + head + data) or 0xFFFF
    return ipv4(src, dst, 17, struct.pack("!HHHH", sport, dport, length, csum) + data, ttl=ttl)


@dataclass(frozen=True)
class Parsed:
    version: int
    ihl: int
    total: int
    ttl: int
    proto: int
    src: str
    dst: str
    header_ok: bool
    payload: bytes


def parse_ipv4(packet: bytes) -> Parsed:
    """The fields the tests look at, plus whether the header checksum holds."""
    ihl = (packet[0] & 0x0F) * 4
    total = int.from_bytes(packet[2:4], "big")
    return Parsed(
        version=packet[0] >> 4,
        ihl=ihl,
        total=total,
        ttl=packet[8],
        proto=packet[9],
        src=str(ipaddress.IPv4Address(packet[12:16])),
        dst=str(ipaddress.IPv4Address(packet[16:20])),
        header_ok=checksum(packet[:ihl]) == 0,
        payload=packet[ihl:total],
    )
