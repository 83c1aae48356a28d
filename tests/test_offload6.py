"""IPv6 super-packets (TSO6, USO over IPv6) split, and IPv6 TCP segments and UDP datagrams coalesced, in C,
checked against Python references, without a TUN."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from packets import checksum as ref_checksum
from test_offload import _udp_super as udp_super4
from test_offload import in_place, unmerged
from test_offload import tcp_super as tcp_super4

from pyflannel.dataplane._testing import (
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP_L4,
    coalesce,
    coalesce_iovecs,
    finish_checksum,
    split,
)

ACK, PSH, FIN, CWR = 0x10, 0x08, 0x01, 0x80
SRC = ipaddress.IPv6Address("fd00:10:244:1::2").packed
DST = ipaddress.IPv6Address("fd00:10:244:2::3").packed


def ipv6(proto: int, payload: bytes, *, hlim: int = 64) -> bytes:
    return struct.pack("!IHBB", 6 << 28, len(payload), proto, hlim) + SRC + DST + payload


def l4_ok(seg: bytes) -> bool:
    """The full L4 checksum over the IPv6 pseudo-header holds."""
    pseudo = seg[8:40] + struct.pack("!IxxxB", len(seg) - 40, seg[6])
    return ref_checksum(pseudo + seg[40:]) == 0


def tcp_super(payload: bytes, *, seq: int = 1000, flags: int = ACK, options: bytes = b"") -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 77, ((20 + len(options)) // 4) << 4, flags, 512, 0, 0)
    return ipv6(6, tcp + options + payload)


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=0, max_size=20_000), st.integers(48, 1440), st.sampled_from([b"", b"\x01\x01\x08\x0a" +
       bytes(8)]), st.integers(0, 2**32 - 1), st.sampled_from([ACK, ACK | PSH, ACK | FIN | PSH, ACK | CWR]))
def test_tcp6_split_matches_reference(payload: bytes, mss: int, options: bytes, seq: int, flags: int) -> None:
    segments = split(tcp_super(payload, seq=seq, flags=flags, options=options), GSO_TCPV6, mss)
    hl = 40 + 20 + len(options)
    assert len(segments) == max(1, -(-len(payload) // mss))
    assert b"".join(s[hl:] for s in segments) == payload
    for i, seg in enumerate(segments):
        assert struct.unpack("!H", seg[4:6])[0] == len(seg) - 40, "payload length"
        assert seg[:4] == tcp_super(b"")[:4] and seg[6:40] == tcp_super(b"")[6:40], "rest of the header kept"
        assert struct.unpack("!I", seg[44:48])[0] == (seq + i * mss) % 2**32
        last, first = i == len(segments) - 1, i == 0
        assert seg[53] == flags & ~((0 if last else FIN | PSH) | (0 if first else CWR))
        assert seg[60:hl] == options and l4_ok(seg)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=0, max_size=9_000), st.integers(8, 1400))
def test_udp6_split_matches_reference(payload: bytes, size: int) -> None:
    segments = split(ipv6(17, struct.pack("!HHHH", 1, 2, 8 + len(payload), 0) + payload), GSO_UDP_L4, size)
    assert b"".join(s[48:] for s in segments) == payload
    for seg in segments:
        assert struct.unpack("!H", seg[44:46])[0] == len(seg) - 40 == struct.unpack("!H", seg[4:6])[0]
        assert seg[46:48] != b"\0\0" and l4_ok(seg), "UDP over IPv6 always carries a checksum"


@pytest.mark.parametrize("packet", [
    ipv6(17, bytes(20)),                       # UDP under a TCP gso type
    ipv6(0, bytes(40)),                        # an extension header first: not from the local stack's TSO
    tcp_super(b"x")[:50],                      # TCP header cut short
    b"\x60" + bytes(30),                       # IPv6 header cut short
])
def test_malformed_super_packets_are_refused(packet: bytes) -> None:
    with pytest.raises(ValueError):
        split(packet, GSO_TCPV6, 1000)


def seeded(packet: bytes) -> bytes:
    """The TCP checksum field holding the folded pseudo-header sum, as a TSO6 super-packet from the kernel has it
    (and as a coalesced write hands it back)."""
    pseudo = packet[8:40] + struct.pack("!IxxxB", len(packet) - 40, 6)
    return packet[:56] + struct.pack("!H", ~ref_checksum(pseudo) & 0xFFFF) + packet[58:]


@settings(max_examples=100, deadline=None)
@given(st.integers(48, 1440), st.integers(2, 44), st.integers(0, 2**32 - 1), st.booleans())
def test_split_then_coalesce_is_the_identity(mss: int, nseg: int, seq: int, psh: bool) -> None:
    payload = bytes((i * 7 + 3) & 0xFF for i in range(nseg * mss - mss // 2))
    original = seeded(tcp_super(payload, seq=seq, flags=ACK | (PSH if psh else 0)))
    segments = split(original, GSO_TCPV6, mss)
    assert len(segments) == nseg
    assert coalesce(segments) == [((1, GSO_TCPV6, 60, mss, 40, 16), original)]
    assert coalesce_iovecs(segments) == [in_place(segments, 60)], "nothing copied"
    assert coalesce(segments, refused=True) == unmerged(segments)


def test_flows_of_both_families_are_merged_each_on_its_own() -> None:
    six = split(seeded(tcp_super(bytes(3000))), GSO_TCPV6, 1000)
    four = split(tcp_super4(bytes(3000)), GSO_TCPV4, 1000)
    written = coalesce([six[0], four[0], six[1], four[1], six[2], four[2]])
    assert [(h[1], len(p)) for h, p in written] == [(GSO_TCPV6, 60 + 3000), (GSO_TCPV4, 40 + 3000)]


def test_a_bad_checksum_or_a_changed_hop_limit_is_not_merged() -> None:
    segments = [bytearray(s) for s in split(seeded(tcp_super(bytes(3000))), GSO_TCPV6, 1000)]
    segments[1][-1] ^= 0xFF
    assert len(coalesce([bytes(s) for s in segments])) == 3
    segments = [bytearray(s) for s in split(seeded(tcp_super(bytes(3000))), GSO_TCPV6, 1000)]
    segments[2][7] = 9
    assert [len(p) for _, p in coalesce([bytes(s) for s in segments])] == [60 + 2000, 60 + 1000]


def udp_super(data: bytes, *, sport: int = 1) -> bytes:
    """A USO super-packet over IPv6 as the kernel hands it over: UDP checksum only seeded."""
    udp = struct.pack("!HHHH", sport, 2, 8 + len(data), 0) + data
    pseudo = SRC + DST + struct.pack("!IxxxB", len(udp), 17)
    return ipv6(17, udp[:6] + struct.pack("!H", ~ref_checksum(pseudo) & 0xFFFF) + udp[8:])


@settings(max_examples=100, deadline=None)
@given(size=st.integers(1, 1400), nseg=st.integers(2, 44), tail=st.integers(1, 1400))
def test_udp6_datagrams_of_one_flow_become_one_uso_write_that_splits_back(size: int, nseg: int, tail: int) -> None:
    data = bytes((i * 5 + 1) & 0xFF for i in range((nseg - 1) * size + min(tail, size)))
    datagrams = split(udp_super(data), GSO_UDP_L4, size)
    [(header, packet)] = coalesce(datagrams, udp=True)
    assert header == (1, GSO_UDP_L4, 48, size, 40, 6)
    assert packet[48:] == data
    assert struct.unpack("!H", packet[44:46])[0] == len(packet) - 40 == struct.unpack("!H", packet[4:6])[0]
    assert split(finish_checksum(packet, 40, 6), GSO_UDP_L4, size) == datagrams
    assert coalesce_iovecs(datagrams, udp=True) == [in_place(datagrams, 48)], "nothing copied"
    assert coalesce(datagrams, udp=True, refused=True) == unmerged(datagrams)
    assert len(coalesce(datagrams)) == len(datagrams), "without USO every datagram is its own write"


def test_udp_flows_of_both_families_are_merged_each_on_its_own() -> None:
    six = split(udp_super(bytes(300)), GSO_UDP_L4, 100)
    four = split(udp_super4(bytes(300)), GSO_UDP_L4, 100)
    tcp = split(seeded(tcp_super(bytes(300))), GSO_TCPV6, 100)
    written = coalesce([six[0], four[0], tcp[0], six[1], four[1], tcp[1], six[2], four[2], tcp[2]], udp=True)
    assert [(h[1], len(p)) for h, p in written] == [(GSO_UDP_L4, 348), (GSO_UDP_L4, 328), (GSO_TCPV6, 360)]
    bad = bytearray(six[1])
    bad[-1] ^= 0xFF
    assert len(coalesce([six[0], bytes(bad), six[2]], udp=True)) == 3, "a bad checksum is never merged"
