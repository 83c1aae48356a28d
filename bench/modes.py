"""The ways two rig hosts can be joined, one per flannel backend, each set up the way that backend does it.

A mode takes a freshly built rig and returns where the measurement traffic goes: from the client host's
address to the server host's. Everything a mode creates lives in the rig's namespaces and goes with them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyflannel.bench.rig import NETWORK, Host, Rig
from pyflannel.daemon.backend import routes, vxlan_device

MODES = ("none", "host-gw", "vxlan", "udp", "udp-batch", "udp-basic")
TUNNEL = str(Path(sys.executable).with_name("flannel-tunnel"))


class ModeUnavailable(Exception):
    """This kernel cannot run the mode (the message says why); the benchmark skips it."""


@dataclass(frozen=True)
class Endpoints:
    """Where measurement traffic flows: client host and address, server host and address."""

    client: Host
    client_addr: str
    server: Host
    server_addr: str
    tunnels: tuple[Tunnel, Tunnel] | None = None   # the udp modes' engines: client's, server's


@dataclass(frozen=True)
class Tunnel:
    """A running flannel-tunnel, whose counters SIGUSR1 writes to stats_file."""

    proc: subprocess.Popen[Any]
    stats_file: Path

    def stats(self, timeout: float = 5) -> dict[str, Any]:
        """The engine's counters now: signal, then wait for the file to be replaced (a new inode)."""
        before = _inode(self.stats_file)
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while _inode(self.stats_file) == before:
            if time.monotonic() > deadline:
                raise ModeUnavailable("flannel-tunnel wrote no counters")
            time.sleep(0.01)
        return dict(json.loads(self.stats_file.read_text()))


def _inode(path: Path) -> int:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return 0


def setup(mode: str, rig: Rig) -> Endpoints:
    """Join the rig's two hosts as `mode` does; ModeUnavailable if this kernel cannot."""
    a, b = rig.hosts
    if mode == "none":
        return Endpoints(a, str(a.underlay), b, str(b.underlay))
    for host in rig.hosts:
        host.add_overlay_endpoint()
    tunnels = SETUPS[mode](rig)
    return Endpoints(a, str(a.overlay_ip), b, str(b.overlay_ip), tunnels)


def _host_gw(rig: Rig) -> None:
    for host, peer in _pairs(rig):
        with host.ipr() as ipr:
            routes.add_route(ipr, subnet=peer.subnet, gateway=peer.underlay, ifindex=ipr.link_lookup(ifname="eth0")[0])


def _vxlan(rig: Rig) -> None:
    vteps = {}
    for host in rig.hosts:
        with host.ipr() as ipr:
            try:
                vteps[host.ns] = vxlan_device.ensure_vtep(
                    ipr, vni=vxlan_device.DEFAULT_VNI, local=host.underlay, ext_index=ipr.link_lookup(ifname="eth0")[0],
                    port=0, mtu=rig.mtu - vxlan_device.OVERHEAD)
                vxlan_device.set_address(ipr, vteps[host.ns], host.subnet)
            except Exception as exc:
                raise ModeUnavailable(f"cannot create a VXLAN device: {exc}") from None
    for host, peer in _pairs(rig):
        with host.ipr() as ipr:
            vxlan_device.add_peer(ipr, vteps[host.ns], subnet=peer.subnet, public_ip=peer.underlay,
                                  mac=vteps[peer.ns].mac)


def _udp(rig: Rig, *extra: str) -> tuple[Tunnel, Tunnel]:
    """flannel-tunnel on both hosts: the same engine the udp backend drives."""
    tunnels = []
    for host, peer in _pairs(rig):
        stats = rig.files / f"{host.ns}-stats.json"
        proc = host.popen(TUNNEL, "--iface-ip", str(host.underlay), "--subnet", str(host.subnet), "--network",
                          str(NETWORK), "--peer", f"{peer.subnet}={peer.underlay}", "--stats-file", str(stats),
                          *extra, stderr=subprocess.DEVNULL)
        tunnels.append(Tunnel(proc, stats))
    for host in rig.hosts:
        _wait_for_route(host, f"{NETWORK} dev flannel0")
    return tunnels[0], tunnels[1]


def _udp_batch(rig: Rig) -> tuple[Tunnel, Tunnel]:
    """Batching alone: recvmmsg/sendmmsg at the default batch, no offloads."""
    return _udp(rig, "--offload", "off")


def _udp_basic(rig: Rig) -> tuple[Tunnel, Tunnel]:
    """The design of flannel's C proxy: no offloads, one packet per syscall."""
    return _udp(rig, "--offload", "off", "--batch", "1")


def _wait_for_route(host: Host, route: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while route not in host.run("ip", "route").stdout:
        if time.monotonic() > deadline:
            raise ModeUnavailable(f"flannel-tunnel did not bring up flannel0 on {host.ns}")
        time.sleep(0.05)


def _pairs(rig: Rig) -> list[tuple[Host, Host]]:
    a, b = rig.hosts
    return [(a, b), (b, a)]


SETUPS: dict[str, Callable[[Rig], tuple[Tunnel, Tunnel] | None]] = {
    "host-gw": _host_gw, "vxlan": _vxlan, "udp": _udp, "udp-batch": _udp_batch, "udp-basic": _udp_basic,
}
