"""flannel-tunnel carrying IPv6: both inner families over an IPv6 underlay and over an IPv4 one, hop limit and
ICMPv6 errors, and inner IPv6 sources checked against the sending peer.

Hosts get an IPv6 underlay address (2001:2::/48, RFC 5180) beside the rig's IPv4 one, and an IPv6 overlay
endpoint (fd00:10:244:N::1 on lo) beside the IPv4 one; the tunnel runs over one underlay family at a time.
"""

from __future__ import annotations

import errno
import ipaddress
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import TUNNEL, Tunnel, host_socket
from daemons import scrape
from packets import udp4
from traffic import start_transfer

from pyflannel.bench.rig import Host, Rig
from pyflannel.dataplane._testing import steered_queue
from pyflannel.dataplane.errors import DataplaneError
from pyflannel.dataplane.pump import BUCKETS
from pyflannel.dataplane.tunnel import all_peers, parse_config

NETWORK6 = ipaddress.IPv6Network("fd00:10:244::/48")
MB = 1 << 20


def underlay6(host: Host) -> str:
    return f"2001:2::{host.underlay.packed[-1]}"


def subnet6(host: Host) -> ipaddress.IPv6Network:
    return ipaddress.IPv6Network(f"fd00:10:244:{host.subnet.network_address.packed[2]:x}::/64")


def overlay6(host: Host) -> str:
    return str(subnet6(host).network_address + 1)


def _start(host: Host, peers: list[Host], tmp_path: Path, underlay: int, *extra: str) -> Tunnel:
    """flannel-tunnel with both overlay families, every peer reached over the `underlay` family (0: both
    underlays, each overlay family over its own, and the peers in `extra`); returns once both network routes
    are on flannel0."""
    stats = tmp_path / f"{host.ns}.stats.json"
    local = {4: [str(host.underlay)], 6: [underlay6(host)], 0: [str(host.underlay), underlay6(host)]}[underlay]
    argv = [TUNNEL, *(arg for ip in local for arg in ("--iface-ip", ip)), "--subnet", str(host.subnet), "--subnet",
            str(subnet6(host)), "--network", "10.244.0.0/16", "--network", str(NETWORK6), "--stats-file", str(stats),
            *extra]
    for peer in peers:
        addr = str(peer.underlay) if underlay == 4 else underlay6(peer)
        argv += ["--peer", f"{peer.subnet}={addr}", "--peer", f"{subnet6(peer)}={addr}"]
    proc = host.popen(*argv, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 15
    while f"{NETWORK6} dev flannel0" not in host.run("ip", "-6", "route").stdout:
        if proc.poll() is not None:
            raise RuntimeError(f"flannel-tunnel exited: {proc.stderr.read() if proc.stderr else ''}")
        assert time.monotonic() < deadline, "flannel0 did not come up"
        time.sleep(0.05)
    return Tunnel(host, proc, stats)


@pytest.fixture
def rig6() -> Iterator[Rig]:
    """The rig's two hosts with IPv6 underlay addresses and overlay endpoints of both families."""
    with Rig(tag="pf6") as rig:
        for host in rig.hosts:
            host.add_overlay_endpoint()
            host.run("ip", "-6", "addr", "add", f"{underlay6(host)}/64", "dev", "eth0", "nodad")
            host.run("ip", "-6", "addr", "add", f"{overlay6(host)}/128", "dev", "lo")
        yield rig


def _pair(rig: Rig, tmp_path: Path, underlay: int, *extra: str) -> tuple[Tunnel, Tunnel]:
    a, b = rig.hosts
    return _start(a, [b], tmp_path, underlay, *extra), _start(b, [a], tmp_path, underlay, *extra)


def _ping6(src: Host, dst: str, *extra: str) -> str:
    return src.run("ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", "-I", overlay6(src), *extra, dst,
                   check=False).stdout


def _wait_for(cond: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


@pytest.mark.parametrize("underlay", [6, 4])
def test_ping_both_families_both_ways(rig6: Rig, tmp_path: Path, underlay: int) -> None:
    ta, tb = _pair(rig6, tmp_path, underlay)
    a, b = rig6.hosts
    for src, dst in ((a, b), (b, a)):
        out = _ping6(src, overlay6(dst))
        assert "3 received" in out and "ttl=62" in out, out   # the hop limit drops once on each side
        out = src.run("ping", "-c", "3", "-i", "0.2", "-W", "2", "-I", str(src.overlay_ip), str(dst.overlay_ip),
                      check=False).stdout
        assert "3 received" in out and "ttl=62" in out, out
    peer = underlay6(b) if underlay == 6 else str(b.underlay)
    counts = ta.stats()["peers"][peer]
    assert counts["tx_packets"] >= 12 and counts["rx_packets"] >= 12, "per-peer counters, keyed by its address"
    assert tb.stop_and_log() and ta.stop() == 0


@pytest.mark.parametrize(("underlay", "offload"), [(6, "auto"), (6, "off"), (4, "auto"), (4, "off")])
def test_tcp_transfers_of_both_families_arrive_intact(rig6: Rig, tmp_path: Path, underlay: int, offload: str
                                                      ) -> None:
    ta, tb = _pair(rig6, tmp_path, underlay, "--offload", offload)
    a, b = rig6.hosts
    for addrs in ((str(a.overlay_ip), str(b.overlay_ip)), (overlay6(a), overlay6(b))):
        before, before_b = ta.stats(), tb.stats()
        transfer = start_transfer(a, b, 32 * MB, addrs=addrs)
        transfer.join()
        assert transfer.received_bytes == 32 * MB and transfer.received == transfer.sent, addrs
    after, after_b = ta.stats(), tb.stats()
    if offload == "auto":   # what the IPv6 transfer did
        assert after["offloads"]["tso6"] and after["offloads"]["gso"], "TSO6 and GSO on this kernel"
        assert after["tun_super_packets"] > before["tun_super_packets"], "IPv6 TCP came as super-packets"
        assert after_b["tun_coalesced_writes"] > before_b["tun_coalesced_writes"], "and went in coalesced"
        assert after_b["coalesce_fallbacks"] == 0
    else:
        assert after["tun_super_packets"] == 0 and not after["offloads"]["tso6"]
    assert after["drops"]["tx_malformed"] == 0 and after["drops"]["tx_send_error"] == 0


def test_two_queues_spread_ipv6_flows_over_an_ipv6_underlay(rig6: Rig, tmp_path: Path) -> None:
    """With two queues, each queue's IPv6 socket is in a steered SO_REUSEPORT group: inner IPv6 TCP flows
    that the hash puts on different queues are received by both queues' engines, intact."""
    ta, tb = _pair(rig6, tmp_path, 6, "--queues", "2")
    a, b = rig6.hosts
    src, dst = ipaddress.IPv6Address(overlay6(a)).packed, ipaddress.IPv6Address(overlay6(b)).packed
    ports: dict[int, int] = {}
    for sport in range(41000, 42000, 2):
        header = struct.pack("!IHBB", 6 << 28, 20, 6, 64) + src + dst + struct.pack("!HH", sport, 5201 + len(ports))
        ports.setdefault(steered_queue(header, 2 * BUCKETS) // BUCKETS, sport)   # socket i is engine i // BUCKETS
    assert set(ports) == {0, 1}
    transfers = [start_transfer(a, b, 16 * MB, 5201 + i, addrs=(overlay6(a), overlay6(b)), src_port=ports[q])
                 for i, q in enumerate(ports)]
    for t in transfers:
        t.join()
        assert (t.received_bytes, t.received) == (16 * MB, t.sent)
    queues = tb.stats()["queues"]
    assert len(queues) == 2 and all(q["rx_packets"] > 1000 for q in queues), [q["rx_packets"] for q in queues]
    assert ta.stats()["peers"][underlay6(b)]["tx_packets"] > 2000, "per-peer counters summed over both queues"
    assert tb.stop_and_log() and ta.stop() == 0


def test_hop_limit_one_gets_time_exceeded(rig6: Rig, tmp_path: Path) -> None:
    ta, tb = _pair(rig6, tmp_path, 6)
    a, b = rig6.hosts
    before = ta.stats()
    out = _ping6(a, overlay6(b), "-t", "1")
    assert "Time exceeded: Hop limit" in out and f"From {overlay6(b)}" in out, out
    after = ta.stats()
    assert after["drops"]["tx_ttl_expired"] == before["drops"]["tx_ttl_expired"] + 3
    assert after["icmp6_time_exceeded_sent"] == before["icmp6_time_exceeded_sent"] + 3
    # The receiving side drops a datagram whose inner hop limit would reach zero there (no error: as for IPv4).
    before_b = tb.stats()["drops"]["rx_ttl_expired"]
    with host_socket(a, family=socket.AF_INET6) as sock:
        sock.bind((underlay6(a), 0))
        sock.sendto(_udp6(overlay6(a), overlay6(b), b"hop", hlim=1), (underlay6(b), 8285))
    _wait_for(lambda: tb.stats()["drops"]["rx_ttl_expired"] == before_b + 1)


def test_unknown_destination_gets_icmp6_unreachable(rig6: Rig, tmp_path: Path) -> None:
    ta, _ = _pair(rig6, tmp_path, 6)
    a, _ = rig6.hosts
    before = ta.stats()
    nowhere = "fd00:10:244:99::1"  # inside the network, but no peer owns fd00:10:244:99::/64
    out = _ping6(a, nowhere, "-c", "1")
    assert f"From {nowhere}" in out and "Destination unreachable: No route" in out, out
    with host_socket(a, family=socket.AF_INET6) as s:
        s.bind((overlay6(a), 0))
        s.setsockopt(socket.IPPROTO_IPV6, 25, 1)  # IPV6_RECVERR: report the (non-fatal) unreachable
        s.connect((nowhere, 9))
        s.settimeout(5)
        s.send(b"anyone?")
        with pytest.raises(OSError) as exc:
            s.recv(100)
    assert exc.value.errno == errno.ENETUNREACH, "ICMPv6 1/0 came back through flannel0"
    after = ta.stats()
    sent = after["icmp6_unreachable_sent"] - before["icmp6_unreachable_sent"]
    assert sent == 2 and after["drops"]["tx_no_route"] == before["drops"]["tx_no_route"] + 2


def test_spoofed_inner_source_and_strangers_are_dropped_and_counted(rig6: Rig, tmp_path: Path) -> None:
    """From the peer's own underlay address: an inner source outside its subnets (an IPv6 one in a peer-less
    subnet or in the receiver's own subnet, an IPv4 one) is spoofed; from an address that is no peer, unknown; a
    correct datagram is delivered. Each counter moves by exactly what was sent."""
    _, tb = _pair(rig6, tmp_path, 6)
    a, b = rig6.hosts
    a.run("ip", "-6", "addr", "add", "2001:2::99/64", "dev", "eth0", "nodad")
    before = tb.stats()
    with host_socket(a, family=socket.AF_INET6) as peer, host_socket(a, family=socket.AF_INET6) as stranger:
        peer.bind((underlay6(a), 0))
        stranger.bind(("2001:2::99", 0))
        for src in ("fd00:10:244:77::7", overlay6(b)):
            peer.sendto(_udp6(src, overlay6(b), b"spoof"), (underlay6(b), 8285))
        peer.sendto(udp4("10.244.77.7", str(b.overlay_ip), 1, 9, b"spoof"), (underlay6(b), 8285))
        stranger.sendto(_udp6(overlay6(a), overlay6(b), b"hi"), (underlay6(b), 8285))
        with host_socket(b, family=socket.AF_INET6) as app:
            app.bind((overlay6(b), 7001))
            app.settimeout(5)
            peer.sendto(_udp6(overlay6(a), overlay6(b), b"real", dport=7001), (underlay6(b), 8285))
            assert app.recvfrom(100) == (b"real", (overlay6(a), 1, 0, 0))
    after = tb.stats()["drops"]
    moved = {k: n - before["drops"][k] for k, n in after.items() if n != before["drops"][k]}
    assert moved == {"rx_spoofed_source": 3, "rx_unknown_peer": 1}


def test_ipv6_datagrams_are_validated(rig6: Rig, tmp_path: Path) -> None:
    _, tb = _pair(rig6, tmp_path, 6)
    a, b = rig6.hosts
    good = _udp6(overlay6(a), overlay6(b), b"payload")
    cases = {"rx_short": good[:39], "rx_bad_length": good[:-1], "rx_not_ip": b"\x70" + good[1:]}
    with host_socket(a, family=socket.AF_INET6) as peer:
        peer.bind((underlay6(a), 0))
        for reason, datagram in cases.items():
            before = tb.stats()["drops"][reason]
            peer.sendto(datagram, (underlay6(b), 8285))
            _wait_for(lambda: tb.stats()["drops"][reason] == before + 1)  # noqa: B023  # waited for here


def _udp6(src: str, dst: str, data: bytes, *, hlim: int = 64, dport: int = 9) -> bytes:
    """An IPv6/UDP packet with a correct checksum, built by hand."""
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    length = 8 + len(data)
    pseudo = s + d + struct.pack("!IxxxB", length, 17)
    head = struct.pack("!HHHH", 1, dport, length, 0)
    total = pseudo + head + data + b"\0" * (len(data) % 2)
    csum = sum(struct.unpack(f"!{len(total) // 2}H", total))
    while csum >> 16:
        csum = (csum & 0xFFFF) + (csum >> 16)
    udp = struct.pack("!HHHH", 1, dport, length, (~csum & 0xFFFF) or 0xFFFF) + data
    return struct.pack("!IHBB", 0x6 << 28, len(udp), 17, hlim) + s + d + udp


def test_flags_for_both_families(tmp_path: Path) -> None:
    """Bad dual-stack flags: one line on stderr and exit 2, before anything is set up."""
    cases = {
        ("--network", "fd00::/48"): "--network fd00::/48 has no IPv6 --subnet",
        ("--subnet", "fd00:1::/64", "--network", "fd00::/48"): "--subnet fd00:1::/64 is outside --network fd00::/48",
        ("--iface-ip", "2001:2::1", "--iface-ip", "2001:2::2"): "--iface-ip given twice for IPv6",
        ("--subnet", "fd00::/64", "--network", "fd00::/48", "--peer", "fd00::/80=198.18.0.2"):
            "--peer subnet fd00::/80 overlaps --subnet fd00::/64",
        ("--peer", "fd00:5::/64=198.18.0.2"): "--peer subnet fd00:5::/64: no IPv6 --network",
        ("--peer", "10.244.2.0/24=2001:2::2"): "--peer address 2001:2::2: no IPv6 --iface-ip",
    }
    base = ["--iface-ip", "198.18.0.1", "--subnet", "10.244.1.0/24", "--network", "10.244.0.0/16"]
    for extra, message in cases.items():
        done = subprocess.run([TUNNEL, *base, *extra], capture_output=True, text=True, timeout=30)
        assert done.returncode == 2 and done.stderr.startswith("flannel-tunnel: error: "), (extra, done.stderr)
        assert message in done.stderr and len(done.stderr.splitlines()) == 1, (extra, done.stderr)


def test_stranger_flood_over_ipv6_never_gets_a_peer_slot(rig6: Rig, tmp_path: Path) -> None:
    """Made-up IPv6 senders are unknown, never counted per peer (the IPv6 peer table only holds routed ones)."""
    _, tb = _pair(rig6, tmp_path, 6)
    a, b = rig6.hosts
    before = tb.stats()["drops"]["rx_unknown_peer"]
    for i in range(20):
        a.run("ip", "-6", "addr", "add", f"2001:2::1:{i:x}/64", "dev", "eth0", "nodad")
    for i in range(20):
        with host_socket(a, family=socket.AF_INET6) as s:
            s.bind((f"2001:2::1:{i:x}", 0))
            s.sendto(_udp6(overlay6(a), overlay6(b), b"x"), (underlay6(b), 8285))
    _wait_for(lambda: tb.stats()["drops"]["rx_unknown_peer"] == before + 20)
    assert list(tb.stats()["peers"]) == [underlay6(a)]


def test_peers_file_lines_of_both_families(tmp_path: Path) -> None:
    """--peers-file takes IPv6 subnets and addresses like --peer, with the overlap check within each family."""
    peers = tmp_path / "peers"
    peers.write_text("fd00:10:244:2::/64=2001:2::2  # b\n10.244.2.0/24=2001:2::2\nfd00:10:244:3::/64=198.18.0.3\n")
    argv = ["--iface-ip", "198.18.0.1", "--iface-ip", "2001:2::1", "--subnet", "10.244.1.0/24",
            "--subnet", "fd00:10:244:1::/64", "--network", "10.244.0.0/16", "--network", str(NETWORK6),
            "--peers-file", str(peers)]
    found = {(str(p.subnet), str(p.addr)) for p in all_peers(parse_config(argv))}
    assert found == {("fd00:10:244:2::/64", "2001:2::2"), ("10.244.2.0/24", "2001:2::2"),
                     ("fd00:10:244:3::/64", "198.18.0.3")}
    peers.write_text("fd00:10:244:2::/64=2001:2::2\nfd00:10:244:2:8000::/65=2001:2::3\n")
    with pytest.raises(DataplaneError, match=r":2: subnet fd00:10:244:2:8000::/65 overlaps .*:1: fd00:10:244:2::/64"):
        all_peers(parse_config(argv))


def _peer_lines(peers: list[tuple[str, str]]) -> str:
    return "".join(f"{subnet}={addr}\n" for subnet, addr in peers)


def test_tens_of_thousands_of_peers_come_and_go_over_sighup(rig6: Rig, tmp_path: Path) -> None:
    """--peers-file rewritten with 3,000 new IPv4 and 3,000 new IPv6 peers and SIGHUP, eight times: 48,000
    distinct peer addresses through one engine (before, the 2,049th IPv6 one ended flannel-tunnel with a
    traceback). Then the file names only b, which still carries a checked transfer of each family, and every
    departed peer has left /metrics."""
    a, b = rig6.hosts
    peers = tmp_path / "peers"
    peers.write_text("")
    ta = _start(a, [], tmp_path, 0, "--peers-file", str(peers), "--metrics-addr", "127.0.0.1:9466")
    for r in range(8):
        batch = []
        for i in range(3_000):
            n = r * 3_000 + i
            batch += [(f"10.244.{16 + i // 16}.{i % 16 * 16}/28", str(ipaddress.IPv4Address("198.18.16.0") + n)),
                      (f"fd00:10:244:{0x100 + i:x}::/64", f"2001:2::1:{n:x}")]
        peers.write_text(_peer_lines(batch))
        ta.proc.send_signal(signal.SIGHUP)
        stats = ta.stats()  # served after the SIGHUP
        assert stats["routes"] == {"routed": 6_000, "unrouted": 0, "refused": 0}
        assert len(stats["peers"]) == 6_000 and f"2001:2::1:{r * 3_000:x}" in stats["peers"]
    both = [(str(b.subnet), str(b.underlay)), (str(subnet6(b)), underlay6(b))]
    peers.write_text(_peer_lines(both))
    ta.proc.send_signal(signal.SIGHUP)
    assert ta.stats()["routes"]["routed"] == 2
    (tmp_path / "b-peers").write_text(_peer_lines([(str(a.subnet), str(a.underlay)), (str(subnet6(a)), underlay6(a))]))
    tb = _start(b, [], tmp_path, 0, "--peers-file", str(tmp_path / "b-peers"))
    for addrs in ((str(a.overlay_ip), str(b.overlay_ip)), (overlay6(a), overlay6(b))):
        transfer = start_transfer(a, b, 8 * MB, addrs=addrs)
        transfer.join()
        assert transfer.received_bytes == 8 * MB and transfer.received == transfer.sent, addrs
    series = {dict(labels)["peer"] for (name, labels) in scrape(a, 9466) if name == "flannel_peer_packets_total"}
    assert series == {str(b.underlay), underlay6(b)}
    log = ta.stop_and_log()
    assert f"SIGHUP: 2 peers from {peers}: 2 routes added or changed, 6000 removed" in log, log[-3:]
    assert tb.stop() == 0
