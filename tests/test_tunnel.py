"""flannel-tunnel between two namespaces: traffic both ways, TTL, ICMP, and hostile input from the wire."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import time

import pytest
from conftest import Tunnel, host_socket, inside
from packets import ipv4, udp4
from traffic import start_transfer

from pyflannel.bench.rig import Rig

MTU = 1500 - 28
MB = 1 << 20


def _ping(rig: Rig, src: int, dst: int, *extra: str) -> str:
    a, b = rig.hosts[src], rig.hosts[dst]
    return a.run("ping", "-c", "3", "-i", "0.2", "-W", "2", "-I", str(a.overlay_ip), *extra, str(b.overlay_ip),
                 check=False).stdout


def test_ping_both_ways(rig: Rig, tunnels: tuple[Tunnel, Tunnel]) -> None:
    for src, dst in ((0, 1), (1, 0)):
        out = _ping(rig, src, dst)
        assert "3 received" in out, out
        assert "ttl=62" in out, "each side decrements the TTL once, as flannel does"
    a, b = tunnels
    sa, sb = a.stats(), b.stats()
    assert sa["tx_packets"] >= 6 and sb["rx_packets"] >= 6
    assert sa["peers"]["198.18.0.2"]["tx_packets"] >= 6 and sa["peers"]["198.18.0.2"]["rx_packets"] >= 6
    assert sb["peers"]["198.18.0.1"]["rx_bytes"] >= 6 * 84, "per-peer counters, each way"


def test_200mb_tcp_transfer_arrives_intact(rig: Rig, tunnels: tuple[Tunnel, Tunnel]) -> None:
    t = start_transfer(rig.hosts[0], rig.hosts[1], 200 * MB)
    t.join()
    assert t.received_bytes == 200 * MB
    assert t.received == t.sent


def test_udp_datagrams_of_every_size_up_to_the_mtu(rig: Rig, tunnels: tuple[Tunnel, Tunnel]) -> None:
    a, b = rig.hosts
    rx = host_socket(b)
    tx = host_socket(a)
    with rx, tx:
        rx.bind((str(b.overlay_ip), 6000))
        rx.settimeout(5)
        tx.bind((str(a.overlay_ip), 0))
        sizes = range(1, MTU - 28 + 1)
        seen: dict[int, bytes] = {}
        for size in sizes:
            tx.sendto(os.urandom(4) * (size // 4) + b"x" * (size % 4), (str(b.overlay_ip), 6000))
            # Lock-step so no datagram can be lost to a full receive buffer.
            data = rx.recv(65536)
            seen[size] = data
        assert [len(seen[s]) for s in sizes] == list(sizes)
        assert all(seen[s][:4] * (s // 4) == seen[s][: 4 * (s // 4)] for s in sizes)
    with pytest.raises(OSError) as exc, host_socket(a) as big:
        big.bind((str(a.overlay_ip), 0))
        big.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO: no fragmenting
        big.sendto(b"x" * (MTU - 28 + 1), (str(b.overlay_ip), 6000))
    assert exc.value.errno == errno.EMSGSIZE, "flannel0's MTU is the underlay's minus 28"


def test_ttl_one_is_dropped_and_counted(rig: Rig, tunnels: tuple[Tunnel, Tunnel]) -> None:
    a, b = tunnels
    before = a.stats()["drops"]["tx_ttl_expired"]
    out = _ping(rig, 0, 1, "-t", "1")
    assert "0 received" in out
    assert a.stats()["drops"]["tx_ttl_expired"] == before + 3
    # The receiving side drops a datagram whose inner TTL would reach zero there.
    before = b.stats()["drops"]["rx_ttl_expired"]
    with host_socket(rig.hosts[0]) as raw:
        raw.bind((str(rig.hosts[0].underlay), 0))
        inner = udp4(str(rig.hosts[0].overlay_ip), str(rig.hosts[1].overlay_ip), 1, 9, b"ttl", ttl=1)
        raw.sendto(inner, (str(rig.hosts[1].underlay), 8285))
    _wait_for(lambda: b.stats()["drops"]["rx_ttl_expired"] == before + 1)


def test_unknown_destination_gets_net_unreachable(rig: Rig, tunnels: tuple[Tunnel, Tunnel]) -> None:
    a, _ = tunnels
    before = a.stats()
    with host_socket(rig.hosts[0]) as s:
        s.setsockopt(socket.IPPROTO_IP, 11, 1)  # IP_RECVERR: report the (non-fatal) net unreachable
        s.bind((str(rig.hosts[0].overlay_ip), 0))
        s.connect(("10.244.99.1", 9))  # inside the network, but no peer owns 10.244.99.0/24
        s.settimeout(5)
        s.send(b"anyone?")
        with pytest.raises(OSError) as exc:
            s.recv(100)
    assert exc.value.errno == errno.ENETUNREACH, "ICMP type 3 code 0 came back through flannel0"
    # An echo request is no ICMP error: a ping to nowhere is answered too (flannel answers no ICMP at all).
    out = rig.hosts[0].run("ping", "-c", "1", "-W", "1", "10.244.99.1", check=False).stdout
    assert "Destination Net Unreachable" in out
    after = a.stats()
    assert after["icmp_unreachable_sent"] == before["icmp_unreachable_sent"] + 2
    assert after["drops"]["tx_no_route"] == before["drops"]["tx_no_route"] + 2
    # An ICMP error gets none back (RFC 1122 3.2.2), whatever its type: dropped and counted, not answered.
    with host_socket(rig.hosts[0], socket.SOCK_RAW, socket.IPPROTO_ICMP) as raw:
        raw.bind((str(rig.hosts[0].overlay_ip), 0))
        for icmp_type in (3, 4, 5, 11, 12):
            raw.sendto(bytes([icmp_type, 0, 0, 0, 0, 0, 0, 0]) + bytes(28), ("10.244.99.1", 0))
    _wait_for(lambda: a.stats()["drops"]["tx_no_route"] == after["drops"]["tx_no_route"] + 5)
    assert a.stats()["icmp_unreachable_sent"] == after["icmp_unreachable_sent"]


def _wait_for(cond: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def _garbage(a_overlay: str, b_overlay: str) -> dict[str, list[bytes]]:
    """Datagrams per drop reason that each must produce exactly once."""
    good = udp4(a_overlay, b_overlay, 1, 9, b"payload")
    bad_csum = bytearray(good)
    bad_csum[10] ^= 0xFF
    return {
        "rx_short": [b"", b"\x45", os.urandom(19)],
        "rx_not_ip": [b"\x70" + os.urandom(39), b"\x00" * 40],
        "rx_bad_ihl": [b"\x44" + good[1:], b"\x41" + good[1:]],
        "rx_bad_length": [good[:-3], good[:2] + struct.pack("!H", 19) + good[4:], good[:2] + b"\xff\xff" + good[4:]],
        "rx_bad_checksum": [bytes(bad_csum)],
        "rx_spoofed_source": [udp4("10.244.77.7", b_overlay, 1, 9, b"spoof"), udp4(b_overlay, b_overlay, 1, 9, b"")],
    }


def _rx_drops(tunnel: Tunnel) -> dict[str, int]:
    return {reason: n for reason, n in tunnel.stats()["drops"].items() if reason.startswith("rx_")}


def _new_drops(tunnel: Tunnel, before: dict[str, int], count: int) -> dict[str, int]:
    """The rx drops counted since `before`, once there are `count` of them."""
    _wait_for(lambda: sum(_rx_drops(tunnel).values()) >= sum(before.values()) + count)
    after = _rx_drops(tunnel)
    return {reason: after[reason] - before[reason] for reason in after if after[reason] != before[reason]}


def test_garbage_is_dropped_and_counted_while_a_transfer_stays_intact(
    rig: Rig, tunnels: tuple[Tunnel, Tunnel]
) -> None:
    a, b = rig.hosts
    _, tb = tunnels
    transfer = start_transfer(a, b, 100 * MB)
    garbage = _garbage(str(a.overlay_ip), str(b.overlay_ip))
    with host_socket(a) as raw:
        raw.bind((str(a.underlay), 0))  # a real peer's address, any port
        for reason, datagrams in garbage.items():
            # One kind at a time, so that a drop counted under the wrong reason fails the test.
            before = _rx_drops(tb)
            for d in datagrams:
                raw.sendto(d, (str(b.underlay), 8285))
            assert _new_drops(tb, before, len(datagrams)) == {reason: len(datagrams)}
        before = _rx_drops(tb)
        for _ in range(200):  # random bytes: dropped for one reason or another, never delivered
            raw.sendto(os.urandom(int.from_bytes(os.urandom(2)) % 1500), (str(b.underlay), 8285))
    # A sender that is not a configured peer at all.
    with inside(a):
        a.run("ip", "addr", "add", "198.18.0.99/24", "dev", "eth0")
    with host_socket(a) as stranger:
        stranger.bind(("198.18.0.99", 0))
        stranger.sendto(udp4(str(a.overlay_ip), str(b.overlay_ip), 1, 9, b"hi"), (str(b.underlay), 8285))
    _wait_for(lambda: _rx_drops(tb)["rx_unknown_peer"] == before["rx_unknown_peer"] + 1)
    transfer.join()
    assert transfer.received == transfer.sent and transfer.received_bytes == 100 * MB
    after = _rx_drops(tb)
    random_drops = sum(after[r] - before[r] for r in after) - 1
    assert random_drops >= 190, "random datagrams must be dropped (a few may pass as spoofed IPv4 only by luck)"


def test_made_up_senders_are_unknown_and_never_crowd_out_the_real_peer(
    rig: Rig, tunnels: tuple[Tunnel, Tunnel]
) -> None:
    """1,100 outer source addresses that are no peer: each datagram is counted as rx_unknown_peer, none gets a
    per-peer counter, and the real peer's traffic is still counted afterwards."""
    a, b = rig.hosts
    _, tb = tunnels
    before = _rx_drops(tb)["rx_unknown_peer"]
    inner = udp4(str(a.overlay_ip), str(b.overlay_ip), 1, 9, b"flood")
    datagram = struct.pack("!HHHH", 40000, 8285, 8 + len(inner), 0) + inner  # UDP checksum 0: none, for IPv4
    with host_socket(a, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        for i in range(1_100):
            source = str(ipaddress.IPv4Address("198.19.0.1") + i)
            raw.sendto(ipv4(source, str(b.underlay), 17, datagram), (str(b.underlay), 0))
    _wait_for(lambda: _rx_drops(tb)["rx_unknown_peer"] == before + 1_100)
    assert "3 received" in _ping(rig, 0, 1)
    peers = tb.stats()["peers"]
    assert list(peers) == [str(a.underlay)], "only configured peers have counters"
    assert peers[str(a.underlay)]["rx_packets"] >= 3


def test_stop_removes_flannel0_and_frees_the_port(rig: Rig, tunnels: tuple[Tunnel, Tunnel]) -> None:
    a, _ = tunnels
    assert a.stop() == 0
    assert "flannel0" not in rig.hosts[0].run("ip", "link").stdout
    with host_socket(rig.hosts[0]) as s:
        s.bind((str(rig.hosts[0].underlay), 8285))
