"""Several queues: engines of one thread each, each serving BUCKETS of flannel0's TUN queues (IFF_MULTI_QUEUE)
with one socket each on port 8285, steered by inner flow. Flows spread over the engines, no flow is reordered,
counters add up, and the tunnel stops and survives a deleted flannel0 as with one queue."""

from __future__ import annotations

import ipaddress
import itertools
import select
import socket
import struct
import subprocess
import time
from pathlib import Path

from conftest import TUNNEL, host_socket, inside, start_tunnel
from daemons import scrape
from packets import ipv4, udp4
from traffic import start_transfer

from pyflannel.bench.rig import Host, Rig
from pyflannel.dataplane._engine import COUNTERS, attach_steering
from pyflannel.dataplane._testing import steered_queue
from pyflannel.dataplane.pump import BUCKETS

MB = 1 << 20
STEER_PORT = 18285  # the steering test's own group, apart from any tunnel's 8285


def _tcp_header(src: str, dst: str, sport: int, dport: int) -> bytes:
    """A TCP packet's first bytes: enough for the steering program, which reads addresses and ports only."""
    return ipv4(src, dst, 6, struct.pack("!HHII", sport, dport, 1, 0) + bytes(12))


def _ipv6(src: str, dst: str, next_header: int, payload: bytes) -> bytes:
    """An inner IPv6 packet: enough for the steering program (addresses, next header, ports)."""
    addrs = ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
    return struct.pack("!IHBB", 6 << 28, len(payload), next_header, 64) + addrs + payload


def _receiving_socket(socks: list[socket.socket]) -> int:
    """The index of the one socket a datagram arrived on, once it arrived (each is drained)."""
    poller = select.poll()
    for sock in socks:
        poller.register(sock, select.POLLIN)
    assert poller.poll(5000), "the datagram arrived on no socket"
    got = []
    for i, sock in enumerate(socks):
        try:
            while True:
                sock.recv(65536)
                got.append(i)
        except BlockingIOError:
            pass
    assert len(got) == 1, got
    return got[0]


def test_the_kernel_steers_each_flow_where_the_engine_says(rig: Rig) -> None:
    """The reuseport program and the engine's own hash (steered_queue) agree for TCP and UDP flows both ways
    (inner IPv4 and IPv6), fragments, ICMP, ICMPv6, non-IP and short datagrams, with 2 and 3 sockets; flows with
    even source ports (what connect() picks) spread over every socket, for either inner family."""
    a, b = rig.hosts
    x, y = str(a.overlay_ip), str(b.overlay_ip)
    flows = [_tcp_header(x, y, sport, 5201) for sport in range(40000, 40032, 2)]
    flows += [_tcp_header(y, x, 5201, sport) for sport in range(40000, 40032, 2)]
    flows += [udp4(x, y, sport, 53, b"q") for sport in range(33000, 33016)]
    fragment = bytearray(udp4(x, y, 1, 2, b"more"))
    fragment[6] = 0x20  # MF: a first fragment, whose ports the others lack
    x6, y6 = "fd00:10:244:1::2", "fd00:10:244:2::3"
    def tcp(sport: int, dport: int) -> bytes:
        return struct.pack("!HHII", sport, dport, 1, 0) + bytes(12)

    flows6 = [_ipv6(x6, y6, 6, tcp(sport, 5201)) for sport in range(40000, 40032, 2)]
    flows6 += [_ipv6(y6, x6, 6, tcp(5201, sport)) for sport in range(40000, 40032, 2)]
    flows6 += [_ipv6(x6, y6, 17, struct.pack("!HHHH", sport, 53, 9, 0) + b"q") for sport in range(33000, 33016)]
    others = [bytes(fragment), ipv4(x, y, 1, bytes(8)), _ipv6(x6, y6, 58, bytes(8)), _ipv6(x6, y6, 44, bytes(16)),
              _ipv6(x6, y6, 6, b"\x9c")[:42], b"\x60" + bytes(30), b"\x20" + bytes(39), b"\x45\x00", b""]
    for queues in (2, 3):
        socks = []
        with inside(b):
            for _ in range(queues):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind((str(b.underlay), STEER_PORT))
                sock.setblocking(False)
                socks.append(sock)
        attach_steering(socks[0].fileno(), queues)
        seen = []
        with host_socket(a) as sender:
            for packet in flows + flows6 + others:
                sender.sendto(packet, (str(b.underlay), STEER_PORT))
                seen.append(_receiving_socket(socks))
        for sock in socks:
            sock.close()
        assert seen == [steered_queue(packet, queues) for packet in flows + flows6 + others]
        n = len(range(40000, 40032, 2))
        for first in (0, len(flows)):
            assert seen[first:first + n] == seen[first + n:first + 2 * n], "a flow's replies are steered like it"
            assert set(seen[first:first + n]) == set(range(queues)), "even source ports spread over every queue"
        assert seen[-5:] == [0, 0, 0, 0, 0], "no ports to read, not IP, or too short to read: queue 0"


def _source_ports(a: Host, b: Host, port: int, queues: int, per_queue: int) -> list[int]:
    """Source ports for TCP flows from a to b:port, per_queue of them steered to each engine (socket i of the
    group is bucket i % BUCKETS of engine i // BUCKETS)."""
    chosen: dict[int, list[int]] = {q: [] for q in range(queues)}
    for sport in range(41000, 42000, 2):
        q = steered_queue(_tcp_header(str(a.overlay_ip), str(b.overlay_ip), sport, port), queues * BUCKETS) // BUCKETS
        if len(chosen[q]) < per_queue:
            chosen[q].append(sport)
    return [sport for ports in chosen.values() for sport in ports]


def _tcp_out_of_order(host: Host) -> int:
    """Segments the host's TCP put in its out-of-order queue so far (TcpExt TCPOFOQueue, per namespace)."""
    lines = [line.split() for line in host.run("cat", "/proc/net/netstat").stdout.splitlines()]
    for names, values in itertools.pairwise(lines):
        if names[0] == "TcpExt:" and values[0] == "TcpExt:":
            return int(values[names.index("TCPOFOQueue")])
    raise AssertionError("no TcpExt counters")


def _udp_in_order(a: Host, b: Host, count: int) -> list[int]:
    """Numbered datagrams of one UDP flow from a to b, sent in bursts; the numbers as they arrived."""
    with host_socket(b) as rx, host_socket(a) as tx:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        rx.bind((str(b.overlay_ip), 7100))
        rx.settimeout(2)
        tx.bind((str(a.overlay_ip), 7101))
        for i in range(count):
            tx.sendto(i.to_bytes(4, "big") * 100, (str(b.overlay_ip), 7100))
            if i % 200 == 199:
                time.sleep(0.005)  # flannel0's transmit queue never overflows
        got: list[int] = []
        try:
            while len(got) < count:
                got.append(int.from_bytes(rx.recv(65536)[:4], "big"))
        except TimeoutError:
            pass
    return got


def test_two_queues_carry_parallel_flows_intact_in_order_and_count_them(rig: Rig, tmp_path: Path) -> None:
    a, b = rig.hosts
    ta = start_tunnel(a, [b], tmp_path, "--queues", "2", "--metrics-addr", "127.0.0.1:9465")
    tb = start_tunnel(b, [a], tmp_path, "--queues", "2")
    ofo = _tcp_out_of_order(b)
    ports = _source_ports(a, b, 5001, 2, 2)
    transfers = [start_transfer(a, b, 40 * MB, 5001 + i, src_port=sport) for i, sport in enumerate(ports)]
    got = _udp_in_order(a, b, 3000)  # meanwhile
    for t in transfers:
        t.join()
        assert (t.received_bytes, t.received) == (40 * MB, t.sent)
    assert got == sorted(got) and len(got) > 2500, "one UDP flow arrives in order"
    assert _tcp_out_of_order(b) == ofo, "no TCP segment arrived out of order"
    for tunnel, moved in ((ta, "tx_packets"), (tb, "rx_packets")):
        stats = tunnel.stats()
        queues = stats["queues"]
        assert len(queues) == 2 and all(q[moved] > 1000 for q in queues), [q[moved] for q in queues]
        for name in COUNTERS:
            assert sum(q[name] for q in queues) == stats[name], name
        for reason, count in stats["drops"].items():
            assert sum(q["drops"][reason] for q in queues) == count, reason
    samples = scrape(a, 9465)
    per_queue = [samples[("flannel_queue_packets_total", (("direction", "tx"), ("queue", q)))] for q in "01"]
    assert all(n > 1000 for n in per_queue)
    assert sum(per_queue) == samples[("flannel_packets_total", (("direction", "tx"),))]
    for tunnel in (ta, tb):
        assert any("queues 2" in line for line in tunnel.stop_and_log())


def _queues_of(host: Host) -> int:
    return len([q for q in host.run("ls", "/sys/class/net/flannel0/queues").stdout.split() if q.startswith("tx-")])


def test_with_four_queues_a_deleted_flannel0_comes_back_and_the_stop_is_clean(rig: Rig, tmp_path: Path) -> None:
    a, b = rig.hosts
    tunnels = [start_tunnel(a, [b], tmp_path, "--queues", "4"), start_tunnel(b, [a], tmp_path, "--queues", "4")]
    assert _queues_of(a) == 4 * BUCKETS
    a.run("ip", "link", "del", "flannel0")
    deadline = time.monotonic() + 10
    while a.run("ping", "-c", "1", "-W", "1", "-I", str(a.overlay_ip), str(b.overlay_ip), check=False).returncode:
        assert time.monotonic() < deadline, "flannel0 did not come back"
    assert _queues_of(a) == 4 * BUCKETS
    t = start_transfer(a, b, 20 * MB)
    t.join()
    assert (t.received_bytes, t.received) == (20 * MB, t.sent)
    assert "flannel0 was deleted; recreated it with 1 routes" in tunnels[0].stop_and_log()
    tunnels[1].stop_and_log()
    for host in (a, b):
        assert "flannel0" not in host.run("ip", "link").stdout
        with host_socket(host) as sock:
            sock.bind((str(host.underlay), 8285))  # every socket of the group is gone


def test_a_port_in_use_is_refused_and_never_shared(rig: Rig, tmp_path: Path) -> None:
    """SO_REUSEPORT must not make the port look free: not to a plain socket's owner, not to a second tunnel."""
    a, b = rig.hosts
    with host_socket(a) as taken:
        taken.bind((str(a.underlay), 8285))
        proc = a.popen(*_tunnel_argv(a, b, "--queues", "2"), stderr=subprocess.PIPE, text=True)
        assert proc.wait(timeout=20) == 1
        assert proc.stderr is not None and "UDP port 8285 on 198.18.0.1 is already in use" in proc.stderr.read()
    first = start_tunnel(a, [b], tmp_path, "--queues", "2")
    second = a.popen(*_tunnel_argv(a, b, "--queues", "2", "--tun", "flannel9"), stderr=subprocess.PIPE, text=True)
    assert second.wait(timeout=20) == 1
    first.stop_and_log()


def _tunnel_argv(host: Host, peer: Host, *extra: str) -> list[str]:
    return [TUNNEL, "--iface-ip", str(host.underlay), "--subnet", str(host.subnet), "--network", "10.244.0.0/16",
            "--peer", f"{peer.subnet}={peer.underlay}", *extra]

