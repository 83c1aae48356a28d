"""The engine in-process on a real TUN device in a namespace: what it does when flannel0 is deleted under it,
how it checks what local processes write into flannel0, and how it rate-limits its ICMP errors."""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from conftest import host_socket, inside, start_tunnel
from packets import parse_ipv4, udp4
from traffic import start_transfer

from pyflannel.bench.rig import NETWORK, Rig
from pyflannel.dataplane import offload
from pyflannel.dataplane.errors import DataplaneError
from pyflannel.dataplane.pump import Pump, open_pump
from pyflannel.dataplane.tun import TXQUEUELEN

ETH_P_IP = 0x0800
MB = 1 << 20


def _wait_for(cond: Any, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.002)


@contextmanager
def _pump(rig: Rig, offloads: str, **kw: Any) -> Iterator[Pump]:
    """A started Pump on the rig's first host (its subnet is the pump's own); the second host is its peer."""
    a, b = rig.hosts
    assert isinstance(a.underlay, IPv4Address) and isinstance(a.subnet, IPv4Network), "an IPv4 rig"
    with inside(a):
        p = open_pump(iface_ip=a.underlay, port=8285, tun_name="flannel0", subnet=a.subnet, network=NETWORK,
                      mtu=1400, wanted=offload.wanted(offloads), **kw)
        p.set_route(str(b.subnet), str(b.underlay))
        p.start()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture(params=["auto", "off"])
def pump(rig: Rig, request: pytest.FixtureRequest) -> Iterator[Pump]:
    with _pump(rig, request.param) as p:
        yield p


@pytest.fixture
def inject(rig: Rig) -> Iterator[socket.socket]:
    """A packet socket on the first host: what it sends goes straight into flannel0, unchecked by the kernel."""
    with inside(rig.hosts[0]):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
    with s:
        yield s


@pytest.fixture
def peer(rig: Rig) -> Iterator[socket.socket]:
    """The second host's :8285 as a plain socket (flannel's proxy): what the engine sends arrives here."""
    with host_socket(rig.hosts[1]) as s:
        s.bind((str(rig.hosts[1].underlay), 8285))
        s.settimeout(5)
        yield s


def test_deleted_tun_stops_both_threads_and_says_why(rig: Rig, pump: Pump) -> None:
    a, b = rig.hosts
    assert pump.alive() and pump.failure() is None
    a.run("ip", "link", "del", "flannel0")
    _wait_for(lambda: pump.failure() is not None, timeout=2)
    assert pump.failure() == "flannel0: TX stopped: File descriptor in bad state (EBADFD)"
    assert not pump.alive()
    cpu = time.process_time()
    time.sleep(1)
    assert time.process_time() - cpu < 0.1, "no engine thread spins on the dead device"
    # The RX thread finds out on its next write to the TUN, and stops as well.
    with host_socket(b) as sender:
        sender.bind((str(b.underlay), 0))
        sender.sendto(udp4(str(b.overlay_ip), str(a.overlay_ip), 1, 9, b"late"), (str(a.underlay), 8285))
    _wait_for(lambda: not any(t.is_alive() for t in pump._threads), timeout=2)
    assert pump.failure() == "flannel0: TX stopped: File descriptor in bad state (EBADFD)", "the first reason stays"
    pump.stop()
    pump.stop()


def test_stop_after_a_clean_run_reports_nothing(pump: Pump) -> None:
    pump.stop()
    assert pump.failure() is None and not pump.alive()


def _tx_drops(pump: Pump) -> dict[str, int]:
    """TX drops but tx_link_scope, which the kernel's own IPv6 chatter on flannel0 moves at any time."""
    return {r: n for r, n in pump.stats()["drops"].items() if r.startswith("tx_") and r != "tx_link_scope"}


def _send_alone(pump: Pump, inject: socket.socket, packets: list[bytes]) -> dict[str, int]:
    """Write packets into flannel0; the TX drops they caused, once there are as many as packets."""
    before = _tx_drops(pump)
    for packet in packets:
        inject.sendto(packet, ("flannel0", ETH_P_IP))
    _wait_for(lambda: sum(_tx_drops(pump).values()) >= sum(before.values()) + len(packets))
    after = _tx_drops(pump)
    return {r: after[r] - before[r] for r in after if after[r] != before[r]}


def test_local_packets_are_checked_before_they_leave(rig: Rig, pump: Pump, inject: socket.socket,
                                                     peer: socket.socket) -> None:
    a, b = (str(h.overlay_ip) for h in rig.hosts)
    good = udp4(a, b, 1, 9, b"good")
    bad_checksum = bytearray(good)
    bad_checksum[10] ^= 0xFF
    wrong_length = bytearray(good)
    wrong_length[3] += 1
    kinds = {
        "tx_spoofed_source": [udp4("10.244.77.7", b, 1, 9, b"x"), udp4(b, b, 1, 9, b"x")],
        "tx_bad_checksum": [bytes(bad_checksum)],
        "tx_malformed": [good[:-1], good + b"\0", bytes(wrong_length)],
    }
    for reason, packets in kinds.items():
        # One kind at a time, so that a drop counted under the wrong reason fails the test.
        assert _send_alone(pump, inject, packets) == {reason: len(packets)}
    inject.sendto(good, ("flannel0", ETH_P_IP))
    sent = parse_ipv4(peer.recv(65536))
    assert (sent.src, sent.dst, sent.payload[8:], sent.header_ok) == (a, b, b"good", True), "nothing else left"


def test_without_source_check_any_local_source_leaves(rig: Rig, inject: socket.socket, peer: socket.socket) -> None:
    with _pump(rig, "auto", check_source=False):
        inject.sendto(udp4("10.244.77.7", str(rig.hosts[1].overlay_ip), 1, 9, b"x"), ("flannel0", ETH_P_IP))
        assert parse_ipv4(peer.recv(65536)).src == "10.244.77.7"


def test_icmp_unreachables_are_rate_limited_like_the_kernel(rig: Rig, pump: Pump, inject: socket.socket) -> None:
    """1,000 a second in bursts of 50 (net.ipv4.icmp_msgs_per_sec, icmp_msgs_burst); the rest are counted."""
    _check_icmp_limit(rig, pump, inject)


def test_with_two_queues_the_limit_is_shared_and_a_deleted_tun_stops_every_thread(rig: Rig,
                                                                                   inject: socket.socket) -> None:
    with _pump(rig, "auto", queues=2) as pump:
        _check_icmp_limit(rig, pump, inject)
        assert all(q["drops"]["tx_no_route"] > 0 for q in pump.stats()["queues"]), "both queues had some"
        rig.hosts[0].run("ip", "link", "del", "flannel0")
        _wait_for(lambda: not any(t.is_alive() for t in pump._threads[::2]), timeout=2)
        assert pump.failure() == "flannel0: TX of queue 0 stopped: File descriptor in bad state (EBADFD)"


def _check_icmp_limit(rig: Rig, pump: Pump, inject: socket.socket) -> None:
    a = str(rig.hosts[0].overlay_ip)
    before = pump.stats()
    start = time.monotonic()
    for chunk in range(20):  # in chunks, so that flannel0's transmit queue (500) never overflows
        for i in range(100):
            inject.sendto(udp4(a, "10.244.99.1", 1, 9 + i, b"?"), ("flannel0", ETH_P_IP))
        target = before["drops"]["tx_no_route"] + 100 * (chunk + 1)
        _wait_for(lambda t=target: pump.stats()["drops"]["tx_no_route"] == t)
    elapsed = time.monotonic() - start
    after = pump.stats()
    sent = after["icmp_unreachable_sent"] - before["icmp_unreachable_sent"]
    limited = after["icmp_unreachable_rate_limited"] - before["icmp_unreachable_rate_limited"]
    assert sent + limited == 2_000
    assert 0 < sent <= 50 + 1_000 * elapsed + 1, (sent, elapsed)


def test_route_changes_under_traffic_lose_nothing(rig: Rig, tmp_path: Path) -> None:
    """A 300 MB transfer through the engine while another thread keeps changing routes in batches: other peers'
    subnets come and go, a covering /16 to a stranger appears and goes, the live peer's route is set again."""
    a, b = rig.hosts
    start_tunnel(b, [a], tmp_path)
    with _pump(rig, "auto") as pump:
        done = threading.Event()
        changes = 0

        def churn() -> None:
            nonlocal changes
            others = [f"10.244.{128 + i // 16}.{(i % 16) * 16}/28" for i in range(1_000)]
            cover_and_live = [("10.244.0.0/16", "198.18.0.78", 8285), (str(b.subnet), str(b.underlay), 8285)]
            while not done.is_set():
                pump.update_routes(set=[(s, "198.18.0.77", 8285) for s in others] + cover_and_live)
                pump.update_routes(delete=[*others, "10.244.0.0/16"])
                for s in others[:100]:
                    pump.set_route(s, "198.18.0.79")
                    pump.del_route(s)
                changes += 2 * len(others) + len(cover_and_live) + 1 + 200

        churner = threading.Thread(target=churn)
        churner.start()
        transfer = start_transfer(a, b, 300 * MB)
        try:
            transfer.join()
        finally:
            done.set()
            churner.join()
        assert transfer.received == transfer.sent and transfer.received_bytes == 300 * MB
        assert changes >= 10_000, changes
        assert pump.failure() is None and list(pump.routes) == [(str(b.subnet), str(b.underlay), 8285)]


def test_a_transfer_while_the_threads_hand_the_receiving_side_back_and_forth(rig: Rig, tmp_path: Path) -> None:
    """An engine whose second thread takes the RX side and gives it back every window (2 ms): every byte arrives,
    in order (TCP would see a reordering as out-of-order segments; the hash would see a loss or a duplicate)."""
    a, b = rig.hosts
    start_tunnel(b, [a], tmp_path)
    with _pump(rig, "auto", handover=(0, 1000)) as pump:
        transfer = start_transfer(a, b, 200 * MB)
        reverse = start_transfer(b, a, 50 * MB, 5002)
        transfer.join()
        reverse.join()
        assert transfer.received == transfer.sent and transfer.received_bytes == 200 * MB
        assert reverse.received == reverse.sent and reverse.received_bytes == 50 * MB
        stats = pump.stats()
        assert stats["helper_on"] >= 10 and stats["helper_off"] >= 10, (stats["helper_on"], stats["helper_off"])
        assert pump.failure() is None


def test_stop_is_prompt_under_a_flood_from_both_sides(rig: Rig, pump: Pump, inject: socket.socket) -> None:
    """Datagrams from the wire and packets into flannel0 as fast as two senders can go: stop() still returns
    within a second (each pass of a thread is bounded)."""
    a, b = rig.hosts
    wire = b.popen(sys.executable, "-c", FLOOD, str(b.underlay), str(a.underlay),
                   udp4(str(b.overlay_ip), str(a.overlay_ip), 1, 9, bytes(1000)).hex())
    packet = udp4(str(a.overlay_ip), str(b.overlay_ip), 1, 9, bytes(1000))
    flooding = threading.Event()

    def from_tun() -> None:
        while flooding.is_set():
            for _ in range(100):
                with contextlib.suppress(OSError):
                    inject.sendto(packet, ("flannel0", ETH_P_IP))

    flooding.set()
    injector = threading.Thread(target=from_tun)
    injector.start()
    try:
        _wait_for(lambda: pump.stats()["rx_packets"] > 10_000 and pump.stats()["tx_packets"] > 10_000, timeout=20)
        pump.stop(timeout=1.0)
        assert not pump.alive() and pump.failure() is None
    finally:
        flooding.clear()
        injector.join()
        wire.kill()
        wire.wait()


FLOOD = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
packet, peer = bytes.fromhex(sys.argv[3]), (sys.argv[2], 8285)
while True:
    try:
        s.sendto(packet, peer)
    except OSError:
        pass
"""


def test_a_thread_that_does_not_stop_is_named(pump: Pump) -> None:
    """stop() waits only so long for each thread, then says which would not stop (and leaves its fds open)."""
    hold = threading.Event()
    stuck = threading.Thread(target=hold.wait, name="pump-stuck")
    stuck.start()
    pump._threads.append(stuck)
    try:
        with pytest.raises(DataplaneError, match=r"^flannel0: pump-stuck did not stop within 0.2 s$"):
            pump.stop(timeout=0.2)
    finally:
        hold.set()
        stuck.join()
    pump.stop()
    assert not pump.alive()


def test_flannel0_queues_more_than_the_default_500_packets(rig: Rig, pump: Pump) -> None:
    link = rig.hosts[0].run("ip", "-o", "link", "show", "flannel0").stdout
    assert f"qlen {TXQUEUELEN}" in link, link
