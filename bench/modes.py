"""The ways two hosts can be joined, one per flannel backend, each host's half done the way that backend does it.

A host's half comes in two steps, as in flanneld: prepare (what the host sets up before it knows any peer, and
the lease it publishes) and connect (what it does when the peer's lease appears). Everything a half creates is
registered on an ExitStack that removes it again; on a rig, deleting the namespaces removes it as well.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from pyflannel.bench.rig import NETWORK, Host, terminate
from pyflannel.daemon.backend import routes, vxlan_device

MODES = ("none", "host-gw", "vxlan", "udp", "udp-batch", "udp-basic")
TUNNEL = str(Path(sys.executable).with_name("flannel-tunnel"))
VTEP = f"flannel.{vxlan_device.DEFAULT_VNI}"


class ModeUnavailable(Exception):
    """This kernel cannot run the mode (the message says why); the benchmark skips it."""


@dataclass(frozen=True)
class Lease:
    """What a host publishes for its peer, as a flanneld lease does; plain strings, so that it travels as JSON."""

    public_ip: str
    subnet: str
    vtep_mac: str = ""

    @property
    def overlay_ip(self) -> str:
        """The pod-side endpoint behind the subnet (what Host.add_overlay_endpoint puts on lo)."""
        return str(IPv4Network(self.subnet).network_address + 1)


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


def prepare(mode: str, host: Host, undo: ExitStack) -> Lease:
    """The host's half before it knows its peer: the pod-side endpoint and, for vxlan, flannel.1."""
    mac = ""
    if mode != "none":
        host.add_overlay_endpoint()
        undo.callback(host.remove_overlay_endpoint)
    if mode == "vxlan":
        mac = _vtep(host, undo)
    return Lease(str(host.underlay), str(host.subnet), mac)


def connect(mode: str, host: Host, peer: Lease, undo: ExitStack, files: Path) -> Tunnel | None:
    """What the mode's backend does on the host when the peer's lease appears; the udp modes' engine, if any."""
    return CONNECT[mode](host, peer, undo, files)


def _none(host: Host, peer: Lease, undo: ExitStack, files: Path) -> None:
    return None


def _host_gw(host: Host, peer: Lease, undo: ExitStack, files: Path) -> None:
    subnet = IPv4Network(peer.subnet)
    with host.ipr() as ipr:
        try:
            routes.add_route(ipr, subnet=subnet, gateway=IPv4Address(peer.public_ip),
                             ifindex=ipr.link_lookup(ifname=host.iface)[0])
        except Exception as exc:
            raise ModeUnavailable(f"cannot route {subnet} via {peer.public_ip} (host-gw needs the hosts on one "
                                  f"L2 segment): {exc}") from None
    undo.callback(_del_route, host, subnet)


def _del_route(host: Host, subnet: IPv4Network) -> None:
    with host.ipr() as ipr:
        routes.del_route(ipr, subnet=subnet)


def _vtep(host: Host, undo: ExitStack) -> str:
    """flannel.1 on the underlay interface, with the subnet's address; its MAC goes into the lease."""
    with host.ipr() as ipr:
        try:
            ext = ipr.link_lookup(ifname=host.iface)[0]
            mtu = ipr.get_links(ext)[0].get("IFLA_MTU")
            vtep = vxlan_device.ensure_vtep(ipr, vni=vxlan_device.DEFAULT_VNI, local=host.underlay, ext_index=ext,
                                            port=0, mtu=mtu - vxlan_device.OVERHEAD)
            undo.callback(_del_vtep, host)
            vxlan_device.set_address(ipr, vtep, host.subnet)
        except Exception as exc:
            raise ModeUnavailable(f"cannot create a VXLAN device: {exc}") from None
    return vtep.mac


def _del_vtep(host: Host) -> None:
    """Deleting the device takes its address, neighbour, FDB and route entries with it."""
    with host.ipr() as ipr:
        for index in ipr.link_lookup(ifname=VTEP):
            ipr.link("del", index=index)


def _vxlan(host: Host, peer: Lease, undo: ExitStack, files: Path) -> None:
    with host.ipr() as ipr:
        vtep = vxlan_device.Vtep(index=ipr.link_lookup(ifname=VTEP)[0], name=VTEP, vni=vxlan_device.DEFAULT_VNI,
                                 mac="")
        vxlan_device.add_peer(ipr, vtep, subnet=IPv4Network(peer.subnet), public_ip=IPv4Address(peer.public_ip),
                              mac=peer.vtep_mac)


def _udp(host: Host, peer: Lease, undo: ExitStack, files: Path, *extra: str) -> Tunnel:
    """flannel-tunnel on the host: the same engine the udp backend drives."""
    stats, log = files / f"{host.subnet.network_address}-stats.json", files / f"{host.subnet.network_address}.log"
    with log.open("w") as err:
        proc = host.popen(TUNNEL, "--iface-ip", str(host.underlay), "--subnet", str(host.subnet), "--network",
                          str(NETWORK), "--peer", f"{peer.subnet}={peer.public_ip}", "--stats-file", str(stats),
                          *extra, stdout=subprocess.DEVNULL, stderr=err)
    undo.callback(terminate, proc)
    _wait_for_flannel0(host, proc, log)
    return Tunnel(proc, stats)


def _udp_batch(host: Host, peer: Lease, undo: ExitStack, files: Path) -> Tunnel:
    """Batching alone: recvmmsg/sendmmsg at the default batch, no offloads."""
    return _udp(host, peer, undo, files, "--offload", "off")


def _udp_basic(host: Host, peer: Lease, undo: ExitStack, files: Path) -> Tunnel:
    """The design of flannel's C proxy: no offloads, one packet per syscall, one thread each way."""
    return _udp(host, peer, undo, files, "--offload", "off", "--batch", "1", "--queues", "1")


def _wait_for_flannel0(host: Host, proc: subprocess.Popen[Any], log: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while f"{NETWORK} dev flannel0" not in host.run("ip", "route").stdout:
        if proc.poll() is not None or time.monotonic() > deadline:
            said = log.read_text().strip().splitlines()
            raise ModeUnavailable(f"flannel-tunnel did not bring up flannel0{': ' + said[-1] if said else ''}")
        time.sleep(0.05)


CONNECT: dict[str, Callable[[Host, Lease, ExitStack, Path], Tunnel | None]] = {
    "none": _none, "host-gw": _host_gw, "vxlan": _vxlan, "udp": _udp, "udp-batch": _udp_batch,
    "udp-basic": _udp_basic,
}
