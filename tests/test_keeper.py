"""The keeper under a host's ordinary events: flannel0 deleted, set down, stripped of its address or route."""

from __future__ import annotations

import sys
import textwrap
import time

import pytest
from conftest import Tunnel

from pyflannel.bench.rig import Host, Rig

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
