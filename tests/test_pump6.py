"""The engine in-process with both underlay sockets and both overlay families (the API flanneld's udp backend
uses): what leaves flannel0 for an IPv6 peer arrives on the peer's plain socket as flannel's wire format, what the
peer sends arrives in the host's stack, and a deleted flannel0 comes back with its IPv6 address and route."""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import host_socket, inside
from test_tunnel6 import _udp6, overlay6, subnet6, underlay6

from pyflannel.bench.rig import NETWORK, Rig
from pyflannel.dataplane import offload
from pyflannel.dataplane.keeper import Keeper, PumpSpec
from pyflannel.dataplane.pump import Pump, open_pump

NETWORK6 = ipaddress.IPv6Network("fd00:10:244::/48")


@pytest.fixture
def rig6() -> Iterator[Rig]:
    with Rig(tag="pp6") as rig:
        for host in rig.hosts:
            with host.ipr() as ipr:
                eth0, lo = ipr.link_lookup(ifname="eth0")[0], ipr.link_lookup(ifname="lo")[0]
                ipr.addr("add", index=eth0, address=underlay6(host), prefixlen=64, family=socket.AF_INET6,
                         flags=0x02)  # IFA_F_NODAD
                ipr.addr("add", index=lo, address=overlay6(host), prefixlen=128, family=socket.AF_INET6)
        yield rig


def _spec(rig: Rig, offloads: str) -> PumpSpec:
    a, _ = rig.hosts
    assert isinstance(a.underlay, ipaddress.IPv4Address) and isinstance(a.subnet, ipaddress.IPv4Network)
    return PumpSpec(iface_ip=a.underlay, iface_ip6=ipaddress.IPv6Address(underlay6(a)), port=8285,
                    tun_name="flannel0", subnet=a.subnet, network=NETWORK, subnet6=subnet6(a), network6=NETWORK6,
                    mtu=1400, wanted=offload.wanted(offloads))


def _wait_for(cond: Any, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.mark.parametrize("offloads", ["auto", "off"])
def test_both_families_to_an_ipv6_peer_in_flannels_wire_format(rig6: Rig, offloads: str) -> None:
    a, b = rig6.hosts
    with inside(a):
        pump = _spec(rig6, offloads).open()
    try:
        pump.update_routes(set=[(str(subnet6(b)), underlay6(b), 8285), (str(b.subnet), underlay6(b), 8285)])
        with inside(a):
            pump.start()
        with host_socket(b, family=socket.AF_INET6) as peer, host_socket(a, family=socket.AF_INET6) as app:
            peer.bind((underlay6(b), 8285))
            peer.settimeout(5)
            app.bind((overlay6(a), 7001))
            app.settimeout(5)
            app.sendto(b"to b", (overlay6(b), 9))
            datagram, sender = peer.recvfrom(2000)
            assert sender[:2] == (underlay6(a), 8285)
            assert datagram[0] >> 4 == 6 and datagram[7] == 63 and datagram[-4:] == b"to b", "raw inner packet"
            peer.sendto(_udp6(overlay6(b), overlay6(a), b"to a", dport=7001), (underlay6(a), 8285))
            assert app.recvfrom(100)[0] == b"to a"
        # counted once the send returns and once the receive's batch ends: the packets may be seen before that
        _wait_for(lambda: pump.stats()["peers"][underlay6(b)]["rx_packets"] == 1)
        counts = pump.stats()["peers"][underlay6(b)]
        assert counts["tx_packets"] == 1 and counts["rx_packets"] == 1
    finally:
        pump.close()


def test_a_peer_of_a_family_without_a_socket_is_refused(rig6: Rig) -> None:
    a, _ = rig6.hosts
    assert isinstance(a.underlay, ipaddress.IPv4Address) and isinstance(a.subnet, ipaddress.IPv4Network)
    with inside(a):
        pump: Pump = open_pump(iface_ip=a.underlay, port=8285, tun_name="flannel0", subnet=a.subnet,
                               network=NETWORK, mtu=1400, wanted=offload.NONE)
    try:
        with pytest.raises(ValueError, match="no IPv6 underlay socket"):
            pump.update_routes(set=[(str(subnet6(a)), "2001:2::9", 8285)])
        assert len(pump.routes) == 0
    finally:
        pump.close()


def test_keeper_recreates_flannel0_with_its_ipv6_address_and_route(rig6: Rig) -> None:
    a, _ = rig6.hosts
    keeper = Keeper(_spec(rig6, "off"))
    with inside(a):
        keeper.start({"fd00:10:244:2::/64": (underlay6(rig6.hosts[1]), 8285)})
    try:
        a.run("ip", "link", "del", "flannel0")
        with inside(a):
            keeper.check()
        routes = a.run("ip", "-6", "route").stdout
        assert f"{NETWORK6} dev flannel0" in routes
        assert f"inet6 {subnet6(a).network_address}/128 " in a.run("ip", "-6", "addr", "show", "dev", "flannel0").stdout
        assert keeper.pump.routes.lookup("fd00:10:244:2::1") == (underlay6(rig6.hosts[1]), 8285)
        a.run("ip", "-6", "route", "del", str(NETWORK6), "dev", "flannel0")
        with inside(a):
            keeper.check()
        assert f"{NETWORK6} dev flannel0" in a.run("ip", "-6", "route").stdout
    finally:
        keeper.close()
