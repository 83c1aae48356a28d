"""Hostile input for the engine, from both sides, with the counter each packet must land in.

Every packet is built with exactly one defect (or none), so the engine counter it must end up in is known when
it is built, whatever order the engine runs its checks in. A seeded pool of a few thousand shots is built once
and sent round and round: building packets in Python is far slower than sending them.

Wire side: datagrams to flannel-tunnel's port from the peer's address and from a stranger's: random bytes,
short ones, bad header lengths, bad total lengths, bad checksums, TTL 0/1, spoofed inner sources, unknown outer
sources, inner fragments (valid, forwarded), datagrams big enough to be fragmented on the wire, and UDP_SEGMENT
trains of any of these; and inner IPv6 ones: short, bad payload lengths, hop limit 0/1, spoofed, unknown, valid.
TUN side: packets written into flannel0 through an AF_PACKET socket, as a pod with CAP_NET_RAW could: neither
IPv4 nor IPv6, malformed, no route, TTL or hop limit 0/1, spoofed, valid, of both families, and packets whose
checksum or total length is wrong, whose counter is left open (the engine may forward or drop them) but which
must still be counted once.

Forwarded packets are non-first fragments, to which no host answers (no ICMP error is sent for them), so the
fuzz does not make the kernels send traffic of their own through the tunnel and spoil the accounting.
"""

from __future__ import annotations

import errno
import ipaddress
import random
import socket
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from packets import checksum

UDP_SEGMENT = 103
IP_MTU_DISCOVER, IP_PMTUDISC_DONT = 10, 0
ETH_P_IP = 0x0800
PACE_EVERY = 128  # shots between two calls of send()'s pace
MAX_PLAIN = 1400  # fits the underlay and flannel0 without fragmenting


@dataclass(frozen=True)
class Hosts:
    """The addresses the packets are built from (a receives the wire fuzz and has flannel0 fuzzed)."""

    a_subnet: ipaddress.IPv4Network
    b_subnet: ipaddress.IPv4Network  # b is a's real peer
    fake_subnet: ipaddress.IPv4Network  # routed by a to another address of b's, where nothing listens
    unrouted: ipaddress.IPv4Network  # inside the network, no route on a
    a_subnet6: ipaddress.IPv6Network  # the same four for the IPv6 overlay
    b_subnet6: ipaddress.IPv6Network
    fake_subnet6: ipaddress.IPv6Network
    unrouted6: ipaddress.IPv6Network


@dataclass(frozen=True)
class Shot:
    """One send: `data` from `source` (an index into the senders), cut into UDP_SEGMENT pieces of `segment`
    bytes when it is not 0; each of the `count` packets must land in `counter` (None: any counter)."""

    data: bytes
    counter: str | None
    source: int = 0
    segment: int = 0

    @property
    def count(self) -> int:
        return -(-len(self.data) // self.segment) if self.segment else 1


def _addr(rng: random.Random, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bytes:
    return (net.network_address + rng.randrange(1, net.num_addresses - 1)).packed


def header(rng: random.Random, src: bytes, dst: bytes, payload: int, *, ttl: int | None = None,
           ihl: int | None = None, fragment: bool = False, total: int | None = None) -> bytes:
    """An IPv4 header (random options, protocol and id) with a correct checksum; `fragment` makes it a
    non-first fragment. `total` overrides the total length (a lie about the size)."""
    ihl = rng.randrange(5, 16) if ihl is None else ihl
    options = rng.randbytes(ihl * 4 - 20)
    flags = (rng.choice((0, 0x2000)) | rng.randrange(1, 0x2000)) if fragment else 0x4000
    head = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + payload if total is None else total,
                       rng.randrange(65536), flags, rng.randrange(2, 256) if ttl is None else ttl,
                       rng.randrange(256), 0, src, dst) + options
    return head[:10] + struct.pack("!H", checksum(head)) + head[12:]


def _packet(rng: random.Random, src: bytes, dst: bytes, *, ttl: int | None = None, fragment: bool = False) -> bytes:
    payload = rng.randrange(0, MAX_PLAIN - 60)
    return header(rng, src, dst, payload, ttl=ttl, fragment=fragment) + rng.randbytes(payload)


def _not_ip(rng: random.Random, size: int) -> bytes:
    version = rng.choice([v for v in range(16) if v not in (4, 6)])
    return bytes([version << 4 | rng.randrange(16)]) + rng.randbytes(size - 1)


def header6(rng: random.Random, src: bytes, dst: bytes, payload: int, *, hlim: int | None = None,
            length: int | None = None) -> bytes:
    """An IPv6 header and the fragment header of a non-first fragment (to which no host answers) ahead of
    `payload` bytes; `length` overrides the payload length (a lie about the size)."""
    fragment = struct.pack("!BBHI", rng.randrange(256), 0, rng.randrange(1, 8192) << 3 | rng.randrange(2),
                           rng.randrange(1 << 32))
    return struct.pack("!IHBB", 6 << 28 | rng.randrange(1 << 28), 8 + payload if length is None else length, 44,
                       rng.randrange(2, 256) if hlim is None else hlim) + src + dst + fragment


def _packet6(rng: random.Random, src: bytes, dst: bytes, *, hlim: int | None = None) -> bytes:
    payload = rng.randrange(0, MAX_PLAIN - 60)
    return header6(rng, src, dst, payload, hlim=hlim) + rng.randbytes(payload)


def _bad_length6(rng: random.Random, src: bytes, dst: bytes) -> bytes:
    """A payload length beyond the datagram."""
    payload = rng.randrange(0, 1000)
    return header6(rng, src, dst, payload, length=8 + payload + rng.randrange(1, 2000)) + rng.randbytes(payload)


def _short6(rng: random.Random, longest: int) -> bytes:
    return bytes([0x60 | rng.randrange(16)]) + rng.randbytes(rng.randrange(0, longest))


def _bad_checksum(packet: bytes) -> bytes:
    return packet[:10] + bytes([packet[10] ^ 0x5A]) + packet[11:]


def _malformed(rng: random.Random, src: bytes, dst: bytes) -> bytes:
    """Too short for a header, a header length under 20 bytes, or a header longer than the packet."""
    match rng.randrange(3):
        case 0:
            return bytes([0x45]) + rng.randbytes(rng.randrange(0, 19))
        case 1:
            return bytes([0x40 | rng.randrange(5)]) + rng.randbytes(rng.randrange(19, MAX_PLAIN))
        case _:
            ihl = rng.randrange(6, 16)
            return header(rng, src, dst, 0, ihl=ihl)[: rng.randrange(20, ihl * 4)]


def _bad_length(rng: random.Random, src: bytes, dst: bytes) -> bytes:
    """A total length beyond the datagram, or under the header length (the header checksum is right)."""
    payload = rng.randrange(0, 1000)
    ihl = rng.randrange(5, 16)
    total = rng.choice((ihl * 4 + payload + rng.randrange(1, 2000), rng.randrange(0, ihl * 4)))
    return header(rng, src, dst, payload, ihl=ihl, total=total) + rng.randbytes(payload)


def wire_shots(rng: random.Random, hosts: Hosts, n: int) -> list[Shot]:
    """n shots for a's UDP port; source 0 is a's peer b, source 1 a stranger on b's wire."""
    a_ip = (hosts.a_subnet.network_address + 1).packed
    a_ip6 = (hosts.a_subnet6.network_address + 1).packed

    def from_b() -> bytes:
        return _addr(rng, hosts.b_subnet)

    def from_b6() -> bytes:
        return _addr(rng, hosts.b_subnet6)

    kinds: list[Callable[[], Shot]] = [
        lambda: Shot(rng.randbytes(rng.randrange(0, 20)), "rx_short"),
        lambda: Shot(_not_ip(rng, rng.randrange(20, MAX_PLAIN)), "rx_not_ip"),
        lambda: Shot(_not_ip(rng, rng.randrange(1500, 9000)), "rx_not_ip"),  # fragmented on the wire
        lambda: Shot(bytes([0x40 | rng.randrange(5)]) + rng.randbytes(rng.randrange(19, MAX_PLAIN)), "rx_bad_ihl"),
        lambda: Shot(_bad_length(rng, from_b(), a_ip), "rx_bad_length"),
        lambda: Shot(_bad_checksum(_packet(rng, from_b(), a_ip, fragment=True)), "rx_bad_checksum"),
        lambda: Shot(_packet(rng, from_b(), a_ip, ttl=rng.randrange(2), fragment=True), "rx_ttl_expired"),
        lambda: Shot(_packet(rng, _addr(rng, hosts.fake_subnet), a_ip, fragment=True), "rx_spoofed_source"),
        lambda: Shot(_packet(rng, from_b(), a_ip, fragment=True), "rx_unknown_peer", source=1),
        lambda: Shot(_packet(rng, from_b(), a_ip, fragment=True), "rx_packets"),
        lambda: Shot(_short6(rng, 39), "rx_short"),
        lambda: Shot(_bad_length6(rng, from_b6(), a_ip6), "rx_bad_length"),
        lambda: Shot(_packet6(rng, from_b6(), a_ip6, hlim=rng.randrange(2)), "rx_ttl_expired"),
        lambda: Shot(_packet6(rng, _addr(rng, hosts.fake_subnet6), a_ip6), "rx_spoofed_source"),
        lambda: Shot(_packet6(rng, from_b6(), a_ip6), "rx_unknown_peer", source=1),
        lambda: Shot(_packet6(rng, from_b6(), a_ip6), "rx_packets"),
    ]
    shots = []
    for _ in range(n):
        shot = rng.choice(kinds)()
        if rng.random() < 0.05 and 0 < len(shot.data) <= MAX_PLAIN:  # a train of copies
            shot = Shot(shot.data * rng.randrange(2, 17), shot.counter, shot.source, len(shot.data))
        shots.append(shot)
    return shots


def tun_shots(rng: random.Random, hosts: Hosts, n: int) -> list[Shot]:
    """n packets for flannel0, as local processes on a would send them."""
    src = (hosts.a_subnet.network_address + 1).packed
    src6 = (hosts.a_subnet6.network_address + 1).packed

    def to_b() -> bytes:
        return _addr(rng, hosts.b_subnet)

    def to_b6() -> bytes:
        return _addr(rng, hosts.b_subnet6)

    kinds: list[Callable[[], Shot]] = [
        lambda: Shot(_not_ip(rng, rng.randrange(1, MAX_PLAIN)), "tx_not_ip"),
        lambda: Shot(_malformed(rng, src, to_b()), "tx_malformed"),
        lambda: Shot(_packet(rng, src, _addr(rng, hosts.unrouted)), "tx_no_route"),
        lambda: Shot(_packet(rng, src, to_b(), ttl=rng.randrange(2)), "tx_ttl_expired"),
        lambda: Shot(_packet(rng, src, to_b(), fragment=True), "tx_packets"),
        lambda: Shot(_bad_checksum(_packet(rng, src, to_b(), fragment=True)), "tx_bad_checksum"),
        lambda: Shot(_bad_length(rng, src, to_b()), "tx_malformed"),
        lambda: Shot(_packet(rng, _addr(rng, hosts.fake_subnet), to_b(), fragment=True), "tx_spoofed_source"),
        lambda: Shot(_short6(rng, 39), "tx_malformed"),
        lambda: Shot(_bad_length6(rng, src6, to_b6()), "tx_malformed"),
        lambda: Shot(_packet6(rng, src6, _addr(rng, hosts.unrouted6)), "tx_no_route"),
        lambda: Shot(_packet6(rng, src6, to_b6(), hlim=rng.randrange(2)), "tx_ttl_expired"),
        lambda: Shot(_packet6(rng, src6, to_b6()), "tx_packets"),
        lambda: Shot(_packet6(rng, _addr(rng, hosts.fake_subnet6), to_b6()), "tx_spoofed_source"),
    ]
    return [rng.choice(kinds)() for _ in range(n)]


def expected(shots: Sequence[Shot], rounds: int, rest: int) -> tuple[Counter[str | None], int]:
    """The counters `rounds` passes over shots and then shots[:rest] must add, and the packet total."""
    want: Counter[str | None] = Counter()
    for i, shot in enumerate(shots):
        want[shot.counter] += shot.count * (rounds + (i < rest))
    return want, sum(want.values())


def wire_sender(sock: socket.socket, dest: tuple[str, int]) -> Callable[[Shot], object]:
    """Send shots from sock to a's port: datagrams bigger than the MTU go out as fragments, trains as one
    UDP_SEGMENT message."""
    sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
    sock.connect(dest)

    def send(shot: Shot) -> object:
        if shot.segment:
            return sock.sendmsg([shot.data], [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", shot.segment))])
        return sock.send(shot.data)
    return send


def tun_sender(sock: socket.socket, tun: str) -> Callable[[Shot], object]:
    """Send shots into the TUN device through an AF_PACKET socket (the packet is the whole frame)."""
    return lambda shot: sock.sendto(shot.data, (tun, ETH_P_IP))


def send(shots: Sequence[Shot], total: int, senders: Sequence[Callable[[Shot], object]],
         pace: Callable[[int], None] | None = None) -> tuple[int, int]:
    """Send shots round and round until `total` packets have gone; returns (full rounds, shots in the last).
    `pace(packets sent so far)` is called every PACE_EVERY shots and may wait for the receiver to catch up. A send
    the kernel refuses for a moment (ENOBUFS) is repeated."""
    rounds, left = divmod(total, sum(shot.count for shot in shots))
    rest = 0
    while left > 0:
        left -= shots[rest].count
        rest += 1
    sent = 0
    for n in [len(shots)] * rounds + [rest]:
        for start in range(0, n, PACE_EVERY):
            for shot in shots[start:min(n, start + PACE_EVERY)]:
                _send_one(senders[shot.source], shot)
                sent += shot.count
            if pace is not None:
                pace(sent)
    return rounds, rest


def _send_one(sender: Callable[[Shot], object], shot: Shot) -> None:
    while True:
        try:
            sender(shot)
            return
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise
