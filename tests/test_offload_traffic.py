"""Offloads through real kernels: TSO/USO through flannel0, UDP GSO/GRO on the veth, coalesced TUN writes."""

from __future__ import annotations

import re
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import Tunnel, flannel_peer_and_app, host_socket, start_tunnel
from packets import parse_ipv4, udp4
from traffic import start_transfer

from pyflannel.bench.rig import Rig

GB = 1 << 30
MB = 1 << 20
UDP_SEGMENT = 103
FAULTS = Path(__file__).parent / "faults"


def _tunnels(rig: Rig, tmp_path: Path, env: dict[str, str] | None = None) -> tuple[Tunnel, Tunnel]:
    a, b = rig.hosts
    return start_tunnel(a, [b], tmp_path, env=env), start_tunnel(b, [a], tmp_path, env=env)


def test_1gb_with_offloads_on(rig: Rig, tmp_path: Path) -> None:
    ta, tb = _tunnels(rig, tmp_path)
    t = start_transfer(rig.hosts[0], rig.hosts[1], GB)
    t.join()
    assert t.received_bytes == GB and t.received == t.sent
    sa, sb = ta.stats(), tb.stats()
    every = {"tso": True, "tso6": True, "uso": True, "vnet_hdr": True, "gso": True, "gro": True, "coalesce": True}
    assert sa["offloads"] == sb["offloads"] == every
    assert sa["tun_super_packets"] > 0, "TSO handed over super-packets"
    assert sa["tx_gso_messages"] > 0, "UDP_SEGMENT sends happened"
    assert sa["tx_send_calls"] * 4 < sa["tx_packets"], "several packets per send call"
    assert sb["rx_gro_trains"] > 0, "UDP_GRO delivered trains"
    assert sb["tun_coalesced_writes"] > 0 and sb["tun_writes"] * 4 < sb["rx_packets"], "coalesced TUN writes"


@pytest.mark.parametrize("disabled", ["tso", "gso", "gro", "coalesce", "uso"])
def test_1gb_with_one_offload_off(rig: Rig, tmp_path: Path, disabled: str) -> None:
    ta, tb = _tunnels(rig, tmp_path, env={"PYFLANNEL_DISABLE_OFFLOADS": disabled})
    t = start_transfer(rig.hosts[0], rig.hosts[1], GB)
    t.join()
    assert t.received_bytes == GB and t.received == t.sent
    sa, sb = ta.stats(), tb.stats()
    for offloads in (sa["offloads"], sb["offloads"]):
        assert [name for name, on in offloads.items() if not on] == [disabled], "only the one offload is off"
    moved = {
        "tso": sa["tun_super_packets"],
        "gso": sa["tx_gso_messages"],
        "gro": sb["rx_gro_trains"],
        "coalesce": sb["tun_coalesced_writes"],
    }
    if disabled in moved:
        assert moved.pop(disabled) == 0, f"{disabled} was switched off"
    if disabled == "tso":
        moved.pop("gso")  # without super-packets there are rarely runs of segments to one peer in one read
    if disabled == "gso":
        # A veth does no GRO of its own: the trains the receiver sees are the sender's GSO sends, kept whole.
        assert moved.pop("gro") == 0
    assert all(moved.values()), moved


def test_mixed_traffic_at_once(rig: Rig, tunnels: tuple[Tunnel, Tunnel]) -> None:
    a, b = rig.hosts
    bulk = start_transfer(a, b, 300 * MB)
    back = start_transfer(b, a, 100 * MB, port=5002)
    received: list[bytes] = []
    rx = host_socket(b)
    rx.bind((str(b.overlay_ip), 6100))
    rx.settimeout(2)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)

    def collect() -> None:
        try:
            while len(received) < 500:
                received.append(rx.recv(100))
        except OSError:
            pass

    collector = threading.Thread(target=collect)
    collector.start()
    with host_socket(a) as tx:
        tx.bind((str(a.overlay_ip), 0))
        for i in range(500):
            tx.sendto(struct.pack("!I", i) * 8, (str(b.overlay_ip), 6100))
    ping = a.run("ping", "-c", "20", "-i", "0.05", "-I", str(a.overlay_ip), str(b.overlay_ip), check=False).stdout
    bulk.join()
    back.join()
    collector.join()
    rx.close()
    assert bulk.received == bulk.sent and back.received == back.sent
    # UDP and ping under a saturating TCP transfer may lose a few to full queues on 2 CPUs (as on any link), so
    # what is asserted is that what arrives is intact and unduplicated, and that nearly all of it does.
    sent = {struct.pack("!I", i) * 8 for i in range(500)}
    assert set(received) <= sent and len(set(received)) == len(received) >= 450, len(received)
    replies = re.search(r"(\d+) received", ping)
    assert replies is not None and int(replies.group(1)) >= 18, ping


def test_gso_refused_by_the_kernel_falls_back(rig: Rig, tmp_path: Path) -> None:
    a, b = rig.hosts
    ta = start_tunnel(a, [b], tmp_path, env={"LD_PRELOAD": _shim(tmp_path, "gso_eio")})
    start_tunnel(b, [a], tmp_path)
    t = start_transfer(a, b, 300 * MB)
    t.join()
    assert t.received == t.sent
    stats = ta.stats()
    assert stats["gso_fallbacks"] == 1 and stats["offloads"]["gso"] is False
    assert stats["drops"]["tx_send_error"] == 0


def _shim(tmp_path: Path, name: str) -> str:
    """An LD_PRELOAD shim from tests/faults, built for this test."""
    shim = tmp_path / f"{name}.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(shim), str(FAULTS / f"{name}.c"), "-ldl"], check=True)
    return str(shim)


def test_coalesced_writes_refused_by_the_kernel_fall_back_to_one_write_per_segment(rig: Rig, tmp_path: Path
                                                                                   ) -> None:
    """The receiving engine's merged TUN writes refused with EINVAL (tests/faults/writev_einval.c): coalescing
    goes off once, the refused packets' segments are written as they arrived, and every byte gets through."""
    a, b = rig.hosts
    start_tunnel(a, [b], tmp_path)
    tb = start_tunnel(b, [a], tmp_path, env={"LD_PRELOAD": _shim(tmp_path, "writev_einval")})
    t = start_transfer(a, b, 100 * MB)
    t.join()
    assert t.received == t.sent
    stats = tb.stats()
    assert stats["coalesce_fallbacks"] == 1 and stats["offloads"]["coalesce"] is False
    assert stats["tun_coalesced_writes"] == 0 and stats["drops"]["rx_tun_write_error"] == 0
    assert stats["tun_writes"] == stats["rx_packets"] > 0, "one write per packet received"


def test_flannel_peer_without_offloads(rig: Rig, tmp_path: Path) -> None:
    """Our side with every offload on; the peer is a plain socket, as flannel's C proxy is."""
    a, b = rig.hosts
    ta = start_tunnel(a, [b], tmp_path)
    flannel_peer, app = flannel_peer_and_app(a, b)
    with flannel_peer, app:
        app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # the burst must not overflow the app
        # One send of 40 datagrams through UDP_SEGMENT: a USO super-packet on flannel0, split by the engine.
        app.setsockopt(socket.IPPROTO_UDP, UDP_SEGMENT, 1000)
        app.sendto(bytes(range(250)) * 160, (str(b.overlay_ip), 7002))
        for i in range(40):
            pkt = parse_ipv4(flannel_peer.recv(65536))
            assert pkt.header_ok and pkt.total == 1028 and pkt.ttl == 63
            assert pkt.payload[8:] == (bytes(range(250)) * 160)[i * 1000:(i + 1) * 1000]
        # A burst of plain datagrams from the peer must reach the app complete and in order.
        for i in range(200):
            flannel_peer.sendto(udp4(str(b.overlay_ip), str(a.overlay_ip), 7002, 7001, struct.pack("!I", i) * 100),
                                (str(a.underlay), 8285))
        got = [app.recv(1000) for _ in range(200)]
        assert got == [struct.pack("!I", i) * 100 for i in range(200)]
    assert ta.stats()["tun_super_packets"] >= 1


@pytest.mark.parametrize("disable", ["", "uso"])
def test_udp_bursts_are_written_as_uso_packets_and_arrive_whole_in_order(rig: Rig, tmp_path: Path,
                                                                         disable: str) -> None:
    """With the TUN taking USO, datagrams of one flow that arrive together are one GSO_UDP_L4 write, which the
    receiving kernel cuts back into the same datagrams; without it (PYFLANNEL_DISABLE_OFFLOADS=uso), one write
    each."""
    a, b = rig.hosts
    ta, tb = _tunnels(rig, tmp_path, env={"PYFLANNEL_DISABLE_OFFLOADS": disable})
    before = tb.stats()
    got: list[bytes] = []
    with host_socket(b) as rx, host_socket(a) as tx:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        rx.bind((str(b.overlay_ip), 6200))
        rx.settimeout(2)
        tx.bind((str(a.overlay_ip), 6201))
        sent = [struct.pack("!I", i) * 250 for i in range(3000)]
        for i, datagram in enumerate(sent):
            tx.sendto(datagram, (str(b.overlay_ip), 6200))
            if i % 300 == 299:
                time.sleep(0.01)  # flannel0's transmit queue never overflows
        try:
            while len(got) < len(sent):
                got.append(rx.recv(2000))
        except TimeoutError:
            pass
    after = tb.stats()
    assert got == sent[:len(got)] and len(got) >= 2900, "whole, unduplicated and in order"
    merged = after["tun_coalesced_writes"] - before["tun_coalesced_writes"]
    writes = after["tun_writes"] - before["tun_writes"]
    assert (merged > 0 and writes < len(got) // 2) if not disable else (merged == 0 and writes >= len(got))
    assert after["offloads"]["uso"] is not bool(disable)
    ta.stop_and_log()
    tb.stop_and_log()
