"""The keeper under a host's ordinary events: flannel0 deleted, set down, stripped of its address or route."""

from __future__ import annotations

import ipaddress
import logging
import sys
import textwrap
import time

import pytest
from conftest import Tunnel, inside

from pyflannel.bench.rig import Host, Rig
from pyflannel.daemon.backend.udp import UdpNetwork
from pyflannel.daemon.lease import Event, EventType, Lease, LeaseAttrs
from pyflannel.dataplane import offload
from pyflannel.dataplane._engine import PEER_CAPACITY
from pyflannel.dataplane.keeper import Keeper, PumpSpec

ROUTE = "route to 10.244.0.0/16 re-added"


def _ping_once(a: Host, b: Host) -> bool:
    return a.run("ping", "-c", "1", "-W", "1", "-I", str(a.overlay_ip), str(b.overlay_ip), check=False).returncode == 0


def _wait_for_ping(a: Host, b: Host, seconds: float) -> float:
    """Seconds until a ping from a to b gets through; fails after `seconds`."""
    start = time.monotonic()
    while not _ping_once(a, b):
        assert time.monotonic() - start < seconds, f"no ping through after {seconds} s"
    return time.monotonic() - start



def test_a_deleted_flannel0_is_recreated_with_its_address_mtu_and_routes(rig: Rig, tunnels: tuple[Tunnel, Tunnel]
                                                                          ) -> None:
    a, b = rig.hosts
    assert _ping_once(a, b)
    a.run("ip", "link", "del", "flannel0")
    assert _wait_for_ping(a, b, 5) < 4
    assert "inet 10.244.1.0/32 scope global flannel0" in a.run("ip", "addr", "show", "dev", "flannel0").stdout
    assert "mtu 1472" in a.run("ip", "link", "show", "flannel0").stdout
    assert "10.244.0.0/16 dev flannel0" in a.run("ip", "route").stdout
    stats = tunnels[0].stats()
    assert stats["peers"]["198.18.0.2"]["tx_packets"] >= 1, "the recreated engine forwards to the old peer"
    assert "flannel0 was deleted; recreated it with 1 routes" in tunnels[0].stop_and_log()


@pytest.mark.parametrize(
    ("break_it", "line"),
    [
        ([["ip", "link", "set", "flannel0", "down"]], f"flannel0: was down, brought it up, {ROUTE}"),
        ([["ip", "link", "set", "flannel0", "down"], ["ip", "link", "set", "flannel0", "up"]],
         f"flannel0: {ROUTE}"),
        ([["ip", "route", "del", "10.244.0.0/16"]], f"flannel0: {ROUTE}"),
        ([["ip", "addr", "flush", "dev", "flannel0"]], f"flannel0: address 10.244.1.0/32 re-added, {ROUTE}"),
    ],
    ids=["down", "down-up", "route-deleted", "address-deleted"],
)
def test_what_is_taken_from_flannel0_is_put_back(rig: Rig, tunnels: tuple[Tunnel, Tunnel], break_it: list[list[str]],
                                                  line: str) -> None:
    a, b = rig.hosts
    for cmd in break_it:
        a.run(*cmd)
    assert not _ping_once(a, b), "broken for real"
    assert _wait_for_ping(a, b, 5) < 4
    assert "10.244.0.0/16 dev flannel0" in a.run("ip", "route").stdout
    log = tunnels[0].stop_and_log()
    assert f"{line}" in log, log
    assert sum("flannel0:" in entry for entry in log) == 1, "one line per event"


KEEPER_SCRIPT = """
import ipaddress, subprocess
from pyflannel.dataplane.keeper import Keeper, PumpSpec
from pyflannel.dataplane.offload import wanted
keeper = Keeper(PumpSpec(iface_ip=ipaddress.IPv4Address("198.18.0.1"), port=8285, tun_name="flannel%d",
                         subnet=ipaddress.IPv4Network("10.244.1.0/24"), network=ipaddress.IPv4Network("10.244.0.0/16"),
                         mtu=1400, wanted=wanted("auto")))
keeper.start({"10.244.2.0/24": ("198.18.0.2", 8285), "10.244.3.0/24": ("198.18.0.3", 8285)})
assert keeper.failure is None
first = keeper.pump
print(keeper.replace_routes({"10.244.2.9/24": ("198.18.0.2", 8285), "10.244.4.0/24": ("198.18.0.4", 8285)}))
keeper.set_route("10.244.5.0/24", "198.18.0.5", 9000)
keeper.del_route("10.244.4.0/24")
subprocess.run(["ip", "link", "del", keeper.spec.tun_name], check=True)
keeper.check()
assert keeper.pump is not first and keeper.pump.alive() and keeper.failure is None
print(keeper.spec.tun_name, sorted(keeper.pump.routes), sorted(keeper.routes.items()))
keeper.pump.stop()
print(keeper.failure)
keeper.check()
keeper.close()
print(keeper.failure)
"""


def test_keeper_routes_survive_a_recreate(rig: Rig) -> None:
    """The keeper as flanneld's udp backend uses it: kernel-named device, routes changed through it, a deleted
    device and a stopped engine each replaced with every route."""
    out = rig.hosts[0].run(sys.executable, "-c", textwrap.dedent(KEEPER_SCRIPT))
    assert out.stdout.splitlines() == [
        "(1, 1)",
        "flannel0 [('10.244.2.0/24', '198.18.0.2', 8285), ('10.244.5.0/24', '198.18.0.5', 9000)] "
        "[('10.244.2.0/24', ('198.18.0.2', 8285)), ('10.244.5.0/24', ('198.18.0.5', 9000))]",
        "engine not running",
        "the dataplane is not started",
    ]
    assert "flannel0 was deleted; recreated it with 2 routes" in out.stderr
    assert "flannel0's engine stopped (engine not running); recreated it with 2 routes" in out.stderr


def test_a_flannel0_taken_over_by_another_device_ends_the_tunnel(rig: Rig, tunnels: tuple[Tunnel, Tunnel]) -> None:
    a, _ = rig.hosts
    a.run("sh", "-c", "ip link del flannel0 && ip link add flannel0 type veth peer name other0")
    proc = tunnels[0].proc
    assert proc.wait(timeout=20) == 1
    assert proc.stderr is not None
    assert str(proc.stderr.read()).splitlines()[1:] == [
        "flannel-tunnel: error: flannel0 was deleted; could not recreate it (5 attempts): a network device named "
        "flannel0 already exists and is not ours: delete it (ip link del flannel0) or use another name"]


def _spec(host: Host) -> PumpSpec:
    assert isinstance(host.underlay, ipaddress.IPv4Address) and isinstance(host.subnet, ipaddress.IPv4Network)
    return PumpSpec(iface_ip=host.underlay, port=8285, tun_name="flannel0", subnet=host.subnet,
                    network=ipaddress.IPv4Network("10.244.0.0/16"), mtu=1400, wanted=offload.NONE)


def _lease(subnet: str, peer: str) -> Lease:
    return Lease(ipaddress.IPv4Network(subnet), LeaseAttrs(public_ip=ipaddress.IPv4Address(peer)))


def test_the_udp_backend_applies_a_batch_of_lease_events_in_order() -> None:
    """A lease added and removed in one watch response (a node that joined and left at once) ends unrouted; one
    removed and added again ends routed; of two versions of a lease, the later one wins."""
    a, b, c = _lease("10.244.7.0/24", "198.18.0.7"), _lease("10.244.8.0/24", "198.18.0.8"), _lease(
        "10.244.9.0/24", "198.18.0.9")
    keeper = Keeper(PumpSpec(iface_ip=ipaddress.IPv4Address("198.18.0.1"), port=8285, tun_name="flannel0",
                             subnet=None, network=None, mtu=1400, wanted=offload.NONE))
    network = UdpNetwork(_lease("10.244.1.0/24", "198.18.0.1"), 1400, keeper, 8285)
    network.handle([Event(EventType.ADDED, b), Event(EventType.ADDED, c)])
    network.handle([Event(EventType.ADDED, a), Event(EventType.REMOVED, a), Event(EventType.REMOVED, b),
                    Event(EventType.ADDED, b), Event(EventType.ADDED, _lease("10.244.9.0/24", "198.18.0.10")),
                    Event(EventType.ADDED, c)])
    assert sorted(keeper.table) == [("10.244.8.0/24", "198.18.0.8", 8285), ("10.244.9.0/24", "198.18.0.9", 8285)]
    assert keeper.routes == {"10.244.8.0/24": ("198.18.0.8", 8285), "10.244.9.0/24": ("198.18.0.9", 8285)}
    assert network.unrouted() is None


def test_a_refused_route_is_retried_until_it_takes_and_visible_meanwhile(rig: Rig, caplog: pytest.LogCaptureFixture
                                                                         ) -> None:
    """The IPv4 peer table full: one more peer's route is refused with one log line and one count, reported as
    unrouted (and the subnet left without its old route), retried at every check without another line, and in
    place at the first check after a slot is free; a peer of a family without an underlay is refused alike."""
    a, _ = rig.hosts
    keeper = Keeper(_spec(a))
    full = {f"10.{i >> 8 & 255}.{i & 255}.0/24": (str(ipaddress.IPv4Address(0x0B000000 + i)), 8285)
            for i in range(PEER_CAPACITY[4])}
    with inside(a):
        keeper.start({**full, "10.244.7.0/24": ("11.0.0.5", 8285)})
    try:
        caplog.set_level(logging.INFO)
        assert keeper.update({"10.244.7.0/24": ("198.18.0.7", 8285), "10.244.8.0/24": ("2001:2::8", 8285)}) == (0, 1)
        assert keeper.unrouted == {"10.244.7.0/24": f"the IPv4 peer table is full ({PEER_CAPACITY[4]} peers)",
                                   "10.244.8.0/24": "peer 2001:2::8: no IPv6 underlay socket (open_pump's iface_ip6)"}
        assert keeper.table.route("10.244.7.0/24") is None, "no route to the subnet's old peer"
        assert keeper.routes["10.244.7.0/24"] == ("198.18.0.7", 8285)
        for _ in range(3):
            with inside(a):
                keeper.check()
        stats = keeper.stats()
        assert stats is not None and stats["routes"] == {"routed": PEER_CAPACITY[4], "unrouted": 2, "refused": 2}
        refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert refusals == [
            f"route 10.244.7.0/24 -> 198.18.0.7:8285 refused: the IPv4 peer table is full ({PEER_CAPACITY[4]} peers); "
            "trying again every check",
            "route 10.244.8.0/24 -> 2001:2::8:8285 refused: peer 2001:2::8: no IPv6 underlay socket (open_pump's "
            "iface_ip6); trying again every check"]
        keeper.update({"10.0.0.0/24": None, "10.244.8.0/24": None})
        with inside(a):
            keeper.check()
        assert keeper.unrouted == {} and keeper.table.route("10.244.7.0/24") == ("198.18.0.7", 8285)
        assert "route 10.244.7.0/24 -> 198.18.0.7:8285 in place (refused before: the IPv4 peer table is full " \
               f"({PEER_CAPACITY[4]} peers))" in caplog.messages
        assert "198.18.0.7" in keeper.pump.stats()["peers"] and "11.0.0.0" not in keeper.pump.stats()["peers"]
    finally:
        keeper.close()
