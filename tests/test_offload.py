"""The pure-C offload helpers (split, coalesce, checksum) against Python references, without a TUN."""

from __future__ import annotations

import struct

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from packets import checksum as ref_checksum
from packets import ipv4

from pyflannel.dataplane._testing import (
    GSO_TCPV4,
    GSO_UDP_L4,
    checksum,
    coalesce,
    coalesce_iovecs,
    finish_checksum,
    split,
)

ACK, PSH, FIN, CWR = 0x10, 0x08, 0x01, 0x80
SRC, DST = "10.244.1.2", "10.244.2.3"


def pseudo_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """The folded (not complemented) pseudo-header sum: what CHECKSUM_PARTIAL leaves in the checksum field."""
    return ~ref_checksum(src + dst + struct.pack("!BBH", 0, proto, length)) & 0xFFFF


def tcp_super(payload: bytes, *, seq: int = 1000, flags: int = ACK, options: bytes = b"", ident: int = 7,
              ip_options: bytes = b"", frag: int = 0x4000, src: str = SRC, dst: str = DST) -> bytes:
    """A TSO super-packet as the kernel hands it over: header checksum right, TCP checksum only seeded."""
    doff = (20 + len(options)) // 4
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 77, doff << 4, flags, 512, 0, 0) + options
    packet = bytearray(ipv4(src, dst, 6, tcp + payload, ident=ident))
    if ip_options:
        packet = bytearray(_with_ip_options(bytes(packet), ip_options))
    ihl = (packet[0] & 15) * 4
    packet[2:4] = struct.pack("!H", len(packet))
    struct.pack_into("!H", packet, 6, frag)
    packet[10:12] = b"\0\0"
    packet[10:12] = struct.pack("!H", ref_checksum(bytes(packet[:ihl])))
    seed = pseudo_sum(bytes(packet[12:16]), bytes(packet[16:20]), 6, len(packet) - ihl)
    packet[ihl + 16:ihl + 18] = struct.pack("!H", seed)
    return bytes(packet)


def _with_ip_options(packet: bytes, options: bytes) -> bytes:
    header = bytearray(packet[:20]) + options
    header[0] = 0x40 | (len(header) // 4)
    return bytes(header) + packet[20:]


def assert_valid_segment(seg: bytes) -> None:
    ihl = (seg[0] & 15) * 4
    assert struct.unpack("!H", seg[2:4])[0] == len(seg)
    assert ref_checksum(seg[:ihl]) == 0, "IPv4 header checksum"
    proto = seg[9]
    pseudo = seg[12:20] + struct.pack("!BBH", 0, proto, len(seg) - ihl)
    assert ref_checksum(pseudo + seg[ihl:]) == 0, "full L4 checksum"


def unmerged(packets: list[bytes]) -> list[tuple[tuple[int, int, int, int, int, int], bytes]]:
    """What a coalesced write refused by the kernel leaves to write instead: each packet as it arrived."""
    return [((0, 0, 0, 0, 0, 0), p) for p in packets]


def in_place(packets: list[bytes], hl: int) -> list[tuple[int, int, int]]:
    """Where a merged write of these packets (each with hl bytes of headers) must point: the first packet whole,
    then each further one's payload, where they were received."""
    return [(0, 0, len(packets[0]))] + [(i, hl, len(p) - hl) for i, p in enumerate(packets) if i]


def tcp_fields(seg: bytes) -> tuple[int, int, bytes]:
    ihl = (seg[0] & 15) * 4
    seq = struct.unpack("!I", seg[ihl + 4:ihl + 8])[0]
    thl = (seg[ihl + 12] >> 4) * 4
    return seq, seg[ihl + 13], seg[ihl + thl:]


options_st = st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(range(8)), b"\x02\x04\x05\xb4\x01\x01\x04\x02"])


@settings(max_examples=200, deadline=None)
@given(
    mss=st.integers(8, 1460),
    nseg=st.integers(1, 64),
    tail=st.integers(0, 1459),
    seq=st.one_of(st.integers(0, 2**32 - 1), st.integers(2**32 - 70000, 2**32 - 1)),
    psh=st.booleans(),
    options=options_st,
)
def test_split_then_coalesce_is_the_identity(mss: int, nseg: int, tail: int, seq: int, psh: bool,
                                             options: bytes) -> None:
    size = (nseg - 1) * mss + (tail % mss or mss)
    hl = 40 + len(options)
    size = min(size, 65535 - hl)
    payload = bytes((i * 7 + 3) & 0xFF for i in range(size))
    original = tcp_super(payload, seq=seq, flags=ACK | (PSH if psh else 0), options=options)
    segments = split(original, GSO_TCPV4, mss)
    assert len(segments) == -(-size // mss)
    for i, seg in enumerate(segments):
        assert_valid_segment(seg)
        s, flags, data = tcp_fields(seg)
        assert s == (seq + i * mss) % 2**32
        assert data == payload[i * mss:(i + 1) * mss]
        assert struct.unpack("!H", seg[4:6])[0] == 7 + i, "IPv4 id counts up"
        assert bool(flags & PSH) == (psh and i == len(segments) - 1), "PSH only on the last segment"
    written = coalesce(segments)
    if len(segments) == 1:
        assert written == [((0, 0, 0, 0, 0, 0), segments[0])]
        return
    assert len(written) == 1
    header, packet = written[0]
    assert header == (1, GSO_TCPV4, hl, mss, 20, 16)
    assert packet == original
    assert coalesce_iovecs(segments) == [in_place(segments, hl)], "nothing copied"
    assert coalesce(segments, refused=True) == unmerged(segments)


def test_fin_and_cwr_stay_on_the_end_segments() -> None:
    payload = bytes(range(256)) * 10
    segments = split(tcp_super(payload, flags=ACK | FIN | CWR | PSH), GSO_TCPV4, 1000)
    flags = [tcp_fields(s)[1] for s in segments]
    assert flags == [ACK | CWR, ACK, ACK | FIN | PSH]
    # CWR and FIN make the first and last segments unmergeable; the middle one goes alone.
    assert [len(p) for _, p in coalesce(segments)] == [len(s) for s in segments]


def test_a_64k_super_packet_at_the_smallest_mss_is_split_whole() -> None:
    """MSS 48 is the kernel's floor (net.ipv4.tcp_min_snd_mss): 1,365 segments, more than the old 1,024 cap."""
    payload = bytes(range(256)) * 255 + bytes(range(215))  # 65,495 bytes: 40 of headers make a full 64 KiB read
    segments = split(tcp_super(payload, seq=5), GSO_TCPV4, 48)
    assert len(segments) == 1365
    for i, seg in enumerate(segments):
        assert_valid_segment(seg)
        assert tcp_fields(seg)[0] == 5 + 48 * i
    assert b"".join(tcp_fields(seg)[2] for seg in segments) == payload


def test_psh_in_the_middle_ends_the_merge() -> None:
    payload = bytes(4000)
    segments = [bytearray(s) for s in split(tcp_super(payload), GSO_TCPV4, 1000)]
    segments[1][33] |= PSH
    segments[1][36:38] = b"\0\0"
    segments[1][36:38] = struct.pack("!H", ref_checksum(bytes(segments[1][12:20]) + b"\0\x06" +
                                                        struct.pack("!H", len(segments[1]) - 20) +
                                                        bytes(segments[1][20:])))
    written = coalesce([bytes(s) for s in segments])
    assert [h[3] for h, _ in written] == [1000, 1000]
    assert [len(p) for _, p in written] == [40 + 2000, 40 + 2000]


def test_ip_options_and_fragments_are_left_alone() -> None:
    with_options = split(tcp_super(bytes(3000), ip_options=b"\x01\x01\x01\x00"), GSO_TCPV4, 1000)
    assert all(s[0] == 0x46 for s in with_options)
    for seg in with_options:
        assert_valid_segment(seg)
    assert [h for h, _ in coalesce(with_options)] == [(0, 0, 0, 0, 0, 0)] * 3
    fragments = split(tcp_super(bytes(3000), frag=0x2000), GSO_TCPV4, 1000)
    assert len(coalesce(fragments)) == 3


def test_a_bad_checksum_is_not_merged() -> None:
    segments = [bytearray(s) for s in split(tcp_super(bytes(3000)), GSO_TCPV4, 1000)]
    segments[1][-1] ^= 0xFF
    assert len(coalesce([bytes(s) for s in segments])) == 3


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from([0, 1, 2]), min_size=2, max_size=60))
def test_interleaved_flows_are_merged_per_flow_in_order(order: list[int]) -> None:
    flows = [tcp_super(bytes([n]) * 1000 * order.count(n), seq=10 * n, src=f"10.244.1.{n + 2}")
             for n in range(3)]
    per_flow = [split(f, GSO_TCPV4, 1000) if order.count(n) else [] for n, f in enumerate(flows)]
    taken = [0, 0, 0]
    batch = []
    for n in order:
        batch.append(per_flow[n][taken[n]])
        taken[n] += 1
    written = coalesce(batch)
    firsts = list(dict.fromkeys(order))
    assert [p[15] - 2 for _, p in written] == firsts, "one write per flow, in order of first arrival"
    for (_, packet), n in zip(written, firsts, strict=True):
        assert packet == (flows[n] if order.count(n) > 1 else per_flow[n][0])
    refused = coalesce(batch, refused=True)
    assert refused == unmerged([p for n in firsts for p in per_flow[n]]), "each flow's segments as they arrived"


def test_uso_split() -> None:
    data = bytes(range(256)) * 12
    udp = struct.pack("!HHHH", 5000, 6000, 8 + len(data), 0) + data
    packet = bytearray(ipv4(SRC, DST, 17, udp))
    packet[26:28] = struct.pack("!H", pseudo_sum(bytes(packet[12:16]), bytes(packet[16:20]), 17, len(udp)))
    segments = split(bytes(packet), GSO_UDP_L4, 1200)
    assert [len(s) for s in segments] == [1228, 1228, 28 + 672]
    for seg in segments:
        assert_valid_segment(seg)
        assert struct.unpack("!H", seg[24:26])[0] == len(seg) - 20
    assert b"".join(s[28:] for s in segments) == data


def _udp_super(data: bytes, *, sport: int = 5000) -> bytes:
    """A USO super-packet as the kernel hands it over: UDP checksum only seeded."""
    udp = struct.pack("!HHHH", sport, 6000, 8 + len(data), 0) + data
    packet = bytearray(ipv4(SRC, DST, 17, udp))
    packet[26:28] = struct.pack("!H", pseudo_sum(bytes(packet[12:16]), bytes(packet[16:20]), 17, len(udp)))
    return bytes(packet)


@settings(max_examples=100, deadline=None)
@given(size=st.integers(1, 1400), nseg=st.integers(1, 64), tail=st.integers(1, 1400))
def test_udp_datagrams_of_one_flow_become_one_uso_write_that_splits_back(size: int, nseg: int, tail: int) -> None:
    length = (nseg - 1) * size + min(tail, size)
    assume(28 + length <= 65535)
    data = (bytes(range(256)) * (length // 256 + 1))[:length]
    datagrams = split(_udp_super(data), GSO_UDP_L4, size)
    written = coalesce(datagrams, udp=True)
    if len(datagrams) == 1:
        assert written == [((0, 0, 0, 0, 0, 0), datagrams[0])]
        return
    [(header, packet)] = written
    assert header == (1, GSO_UDP_L4, 28, size, 20, 6)
    assert packet[28:] == data and struct.unpack("!H", packet[24:26])[0] == len(packet) - 20
    assert split(finish_checksum(packet, 20, 6), GSO_UDP_L4, size) == datagrams
    assert coalesce_iovecs(datagrams, udp=True) == [in_place(datagrams, 28)], "nothing copied"
    assert coalesce(datagrams, udp=True, refused=True) == unmerged(datagrams)
    assert len(coalesce(datagrams)) == len(datagrams), "without USO every datagram is its own write"


def test_merged_writes_point_into_the_received_packets() -> None:
    """No payload is copied, and each flow's write points at its own packets: the first whole, then each further
    payload right after its own headers."""
    tcp = split(tcp_super(bytes(range(250)) * 12), GSO_TCPV4, 1000)
    udp = split(_udp_super(bytes(300)), GSO_UDP_L4, 100)
    lone = split(tcp_super(bytes(10), src="10.244.1.9"), GSO_TCPV4, 1000)
    assert coalesce_iovecs([tcp[0], udp[0], tcp[1], lone[0], udp[1], tcp[2], udp[2]], udp=True) == [
        [(0, 0, 1040), (2, 40, 1000), (5, 40, 1000)],
        [(1, 0, 128), (4, 28, 100), (6, 28, 100)],
        [(3, 0, 50)],
    ]


def test_udp_is_merged_per_flow_and_only_what_is_safe() -> None:
    a = split(_udp_super(bytes(300)), GSO_UDP_L4, 100)
    b = split(_udp_super(bytes(200), sport=5001), GSO_UDP_L4, 100)
    written = coalesce([a[0], b[0], a[1], b[1], a[2]], udp=True)
    assert [(h[1], len(p)) for h, p in written] == [(GSO_UDP_L4, 328), (GSO_UDP_L4, 228)], "per flow, in order"
    no_checksum, bad_checksum, fragment = (bytearray(d) for d in split(_udp_super(bytes(300)), GSO_UDP_L4, 100)[:3])
    no_checksum[26:28] = b"\0\0"
    bad_checksum[-1] ^= 0xFF
    fragment[6] = 0x20
    fragment[10:12] = b"\0\0"
    fragment[10:12] = struct.pack("!H", ref_checksum(bytes(fragment[:20])))
    for odd in (no_checksum, bad_checksum, fragment):
        assert len(coalesce([a[0], bytes(odd), a[1]], udp=True)) == 3, "never merged, nor merged across"
    bigger = split(_udp_super(bytes(150)), GSO_UDP_L4, 150)
    assert len(coalesce([a[0], bigger[0]], udp=True)) == 2, "a datagram larger than the first does not follow it"


def test_split_refuses_garbage() -> None:
    for bad in (b"", b"\x45" * 30, tcp_super(b"x")[:30]):
        try:
            split(bad, GSO_TCPV4, 100)
        except ValueError:
            continue
        raise AssertionError(f"split accepted {bad!r}")


@given(st.binary(max_size=3000))
def test_checksum_matches_reference(data: bytes) -> None:
    assert checksum(data) == ref_checksum(data)


@pytest.mark.parametrize("size", [63, 64, 65, 79, 80, 65535, 1 << 20])
@pytest.mark.parametrize("fill", [0x00, 0xFF, 0x5A])
def test_checksum_of_long_runs(size: int, fill: int) -> None:
    """Where the four-accumulator loop starts and ends, and runs of all-ones words (the largest sums), up to 1 MiB:
    every length from 64 on goes through it."""
    data = bytes([fill]) * (size - 1) + b"\x01"
    assert checksum(data) == ref_checksum(data)


def test_finish_checksum() -> None:
    packet = tcp_super(bytes(range(200)))
    assert_valid_segment(finish_checksum(packet, 20, 16))
