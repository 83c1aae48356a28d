"""The engine under fuzzed input from the wire and from flannel0, then still forwarding, every packet counted.

The suite sends 200,000 packets each way; `make fuzz` sends 10 million (PYFLANNEL_FUZZ_PACKETS). Each packet
must land in the counter it was built for (fuzzing.py), and the counters must add up to what was sent.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Tunnel, host_socket, inside, start_tunnel
from fuzzing import ETH_P_IP, Hosts, Shot, expected, send, tun_sender, tun_shots, wire_sender, wire_shots
from pyroute2 import IPRoute
from traffic import start_transfer

from pyflannel.bench.rig import Host, Rig

PACKETS = int(os.environ.get("PYFLANNEL_FUZZ_PACKETS", "200000"))
POOL = 4096
TUN_WINDOW = 256
FAKE_PEER, STRANGER = "198.18.0.3", "198.18.0.4"  # extra addresses on b; nothing of ours listens there
HOSTS = Hosts(a_subnet=ipaddress.IPv4Network("10.244.1.0/24"), b_subnet=ipaddress.IPv4Network("10.244.2.0/24"),
              fake_subnet=ipaddress.IPv4Network("10.244.3.0/24"), unrouted=ipaddress.IPv4Network("10.244.200.0/24"),
              a_subnet6=ipaddress.IPv6Network("fd00:10:244:1::/64"),
              b_subnet6=ipaddress.IPv6Network("fd00:10:244:2::/64"),
              fake_subnet6=ipaddress.IPv6Network("fd00:10:244:3::/64"),
              unrouted6=ipaddress.IPv6Network("fd00:10:244:c8::/64"))
NETWORK6 = "fd00:10:244::/48"


@pytest.fixture
def fuzz_rig(tmp_path: Path) -> Iterator[tuple[Rig, Tunnel, Tunnel]]:
    """a and b, each the other's peer for both overlay families over the IPv4 underlay; a also routes a fake
    peer's subnets to an address of b's. What the kernels send of their own through flannel0 is link-scope
    IPv6 (tx_link_scope), which the accounting leaves out."""
    with Rig(tag="pfz") as rig:
        a, b = rig.hosts
        for host in rig.hosts:
            host.add_overlay_endpoint()
        for extra in (FAKE_PEER, STRANGER):
            b.run("ip", "addr", "add", f"{extra}/24", "dev", "eth0")
        ta = start_tunnel(a, [b], tmp_path, "--peer", f"{HOSTS.fake_subnet}={FAKE_PEER}", "--network", NETWORK6,
                          "--subnet", str(HOSTS.a_subnet6), "--peer", f"{HOSTS.b_subnet6}={b.underlay}",
                          "--peer", f"{HOSTS.fake_subnet6}={FAKE_PEER}")
        tb = start_tunnel(b, [a], tmp_path, "--network", NETWORK6, "--subnet", str(HOSTS.b_subnet6),
                          "--peer", f"{HOSTS.a_subnet6}={a.underlay}")
        yield rig, ta, tb


def _settled(tunnel: Tunnel, total: Callable[[dict[str, Any]], int], want: int) -> dict[str, Any]:
    """Stats once `total` of them reaches `want` (the engine has worked through its queue), or stops moving."""
    last, still_since = -1, time.monotonic()
    while True:
        stats = tunnel.stats()
        now = total(stats)
        if now >= want or time.monotonic() - still_since > 3:
            return stats
        if now != last:
            last, still_since = now, time.monotonic()
        time.sleep(0.2)


def _delta(after: dict[str, Any], before: dict[str, Any], prefix: str) -> Counter[str]:
    """Per counter (drops by reason, and the packets count) what changed, for one direction; not tx_link_scope,
    which the kernel's own IPv6 traffic on flannel0 moves."""
    flat = {**after["drops"], f"{prefix}_packets": after[f"{prefix}_packets"]}
    old = {**before["drops"], f"{prefix}_packets": before[f"{prefix}_packets"]}
    return Counter({k: v - old[k] for k, v in flat.items()
                    if k.startswith(prefix) and v != old[k] and k != "tx_link_scope"})


def _kernel_stats(host: Host, dev: str) -> dict[str, dict[str, int]]:
    return dict(json.loads(host.run("ip", "-s", "-j", "link", "show", "dev", dev).stdout)[0]["stats64"])


def _tun_pace(ipr: IPRoute) -> Callable[[int], None]:
    """Wait while more than TUN_WINDOW packets sent into flannel0 are not yet read by the engine: the TUN's
    queue (500 packets) drops what does not fit, and a Python sender can outrun one engine thread."""
    index = ipr.link_lookup(ifname="flannel0")[0]

    def handled() -> int:  # the TUN counts a packet as sent when it is read from the fd, or dropped
        tx = ipr.get_links(index)[0].get("IFLA_STATS64")
        return int(tx["tx_packets"] + tx["tx_dropped"])

    start = handled()

    def pace(sent: int) -> None:
        while start + sent - handled() > TUN_WINDOW:
            time.sleep(0.0005)
    return pace


def _check(name: str, shots: list[Shot], rounds_rest: tuple[int, int], got: Counter[str], extra: int) -> None:
    """Each packet counted once, in the counter it was built for; open ones (None) in any. `extra`: packets the
    kernel dropped before the engine could see them."""
    want, total = expected(shots, *rounds_rest)
    print(f"{name}: {total} packets sent; engine counters {dict(sorted(got.items()))}; kernel drops {extra}")
    assert extra == 0, f"{name}: the kernel dropped {extra} before the engine saw them"
    assert sum(got.values()) == total, f"{name}: {sum(got.values())} counted of {total} sent"
    short = {k: (got[k], v) for k, v in want.items() if k is not None and got[k] < v}
    assert not short, f"{name}: counters below what was sent for them (got, sent): {short}"
    assert sum(got[k] - v for k, v in want.items() if k is not None) == want[None]


def test_fuzz_both_sides_then_an_intact_transfer(fuzz_rig: tuple[Rig, Tunnel, Tunnel]) -> None:
    rig, ta, _ = fuzz_rig
    a, b = rig.hosts
    rng = random.Random(8285)

    shots = wire_shots(rng, HOSTS, POOL)
    before, dropped = ta.stats(), _kernel_stats(a, "eth0")["rx"]["dropped"]
    with host_socket(b) as peer, host_socket(b) as stranger:
        peer.bind((str(b.underlay), 0))
        stranger.bind((STRANGER, 0))
        sent = send(shots, PACKETS, [wire_sender(sock, (str(a.underlay), 8285)) for sock in (peer, stranger)])
    total = expected(shots, *sent)[1]
    after = _settled(ta, lambda s: sum(_delta(s, before, "rx").values()), total)
    extra = after["rx_socket_overflow"] - before["rx_socket_overflow"]
    extra += _kernel_stats(a, "eth0")["rx"]["dropped"] - dropped
    _check("wire", shots, sent, _delta(after, before, "rx"), extra)
    assert after["rx_gro_trains"] > 0 or not after["offloads"]["gro"], "the UDP_SEGMENT trains came as trains"

    shots = tun_shots(rng, HOSTS, POOL)
    before, dropped = ta.stats(), _kernel_stats(a, "flannel0")["tx"]["dropped"]
    with inside(a):
        raw = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
    with raw, a.ipr() as ipr:
        sent = send(shots, PACKETS, [tun_sender(raw, "flannel0")], _tun_pace(ipr))
    total = expected(shots, *sent)[1]
    after = _settled(ta, lambda s: sum(_delta(s, before, "tx").values()), total)
    _check("tun", shots, sent, _delta(after, before, "tx"), _kernel_stats(a, "flannel0")["tx"]["dropped"] - dropped)

    for src, dst in ((a, b), (b, a)):
        transfer = start_transfer(src, dst, 16 << 20)
        transfer.join()
        assert transfer.received == transfer.sent and transfer.received_bytes == 16 << 20
    assert ta.proc.poll() is None and ta.stop() == 0
