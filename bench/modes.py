"""The ways two hosts can be joined, one per flannel backend, each host's half done the way that backend does it.

A host's half comes in two steps, as in flanneld: prepare (what the host sets up before it knows any peer, and
the lease it publishes) and connect (what it does when the peer's lease appears). Everything a half creates is
registered on an ExitStack that removes it again; on a rig, deleting the namespaces removes it as well.

Each mode with a 6 at the end (none6, host-gw6, vxlan6, udp6) is its IPv4 namesake on an IPv6 underlay carrying an
IPv6 overlay, set up as flanneld sets up an IPv6 network; the halves below take the family from the addresses
they are given, so one function serves both.
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
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

from pyflannel.bench.rig import Host, endpoint, network, terminate
from pyflannel.daemon.backend import routes, vxlan_device
from pyflannel.daemon.config import Address, Network

MODES = ("none", "host-gw", "vxlan", "udp", "udp-batch", "udp-basic", "flannel-c")
MODES6 = ("none6", "host-gw6", "vxlan6", "udp6")
TUNNEL = str(Path(sys.executable).with_name("flannel-tunnel"))
VTEPS = tuple(vxlan_device.device_name(vxlan_device.DEFAULT_VNI, version) for version in (4, 6))


def version(mode: str) -> int:
    """The IP version of a mode's underlay and overlay: 6 for the modes named with a 6 at the end."""
    return 6 if mode in MODES6 else 4


def backend(mode: str) -> str:
    """The backend a mode is, whatever its family: host-gw6 is host-gw over IPv6."""
    return mode.removesuffix("6") if mode in MODES6 else mode


def reference(mode: str) -> str:
    """The plain underlay of the mode's family, which its penalty is measured against."""
    return "none6" if version(mode) == 6 else "none"


class ModeUnavailable(Exception):
    """This kernel cannot run the mode (the message says why); the benchmark skips it."""


@dataclass(frozen=True)
class Lease:
    """What a host publishes for its peer, as a flanneld lease does (PublicIP or PublicIPv6, the subnet, the VTEP
    MAC), in one family; to_json/from_json carry it through the --remote session."""

    public_ip: Address
    subnet: Network
    vtep_mac: str = ""

    @property
    def overlay_ip(self) -> Address:
        """The pod-side endpoint behind the subnet (what Host.add_overlay_endpoint puts on lo)."""
        return endpoint(self.subnet)

    def to_json(self) -> dict[str, str]:
        return {"public_ip": str(self.public_ip), "subnet": str(self.subnet), "vtep_mac": self.vtep_mac}

    @classmethod
    def from_json(cls, data: dict[str, str]) -> Lease:
        return cls(ip_address(data["public_ip"]), ip_network(data["subnet"]), data.get("vtep_mac", ""))


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
    """The host's half before it knows its peer: the pod-side endpoint and, for vxlan, flannel.1 (flannel-v6.1).

    The host must be of the mode's family (a rig built for it, or the --remote end of that family)."""
    if host.underlay.version != version(mode):
        raise ModeUnavailable(f"{mode} needs an IPv{version(mode)} underlay; this end has {host.underlay}")
    mac = ""
    if backend(mode) != "none":
        host.add_overlay_endpoint()
        undo.callback(host.remove_overlay_endpoint)
    if backend(mode) == "vxlan":
        mac = _vtep(host, undo)
    return Lease(host.underlay, host.subnet, mac)


def connect(mode: str, host: Host, peer: Lease, undo: ExitStack, files: Path) -> Tunnel | None:
    """What the mode's backend does on the host when the peer's lease appears; the udp modes' engine, if any."""
    return CONNECT[backend(mode)](host, peer, undo, files)


def _none(host: Host, peer: Lease, undo: ExitStack, files: Path) -> None:
    return None


def _host_gw(host: Host, peer: Lease, undo: ExitStack, files: Path) -> None:
    subnet = peer.subnet
    with host.ipr() as ipr:
        try:
            routes.add_route(ipr, subnet=subnet, gateway=peer.public_ip, ifindex=ipr.link_lookup(ifname=host.iface)[0])
        except Exception as exc:
            raise ModeUnavailable(f"cannot route {subnet} via {peer.public_ip} (host-gw needs the hosts on one "
                                  f"L2 segment): {exc}") from None
    undo.callback(_del_route, host, subnet)


def _del_route(host: Host, subnet: Network) -> None:
    with host.ipr() as ipr:
        routes.del_route(ipr, subnet=subnet)


def _vtep(host: Host, undo: ExitStack) -> str:
    """flannel.1 (flannel-v6.1 over IPv6: 20 bytes more outer header) on the underlay interface, with the subnet's
    address; its MAC goes into the lease."""
    overhead = vxlan_device.OVERHEAD if host.underlay.version == 4 else vxlan_device.OVERHEAD6
    with host.ipr() as ipr:
        try:
            ext = ipr.link_lookup(ifname=host.iface)[0]
            mtu = ipr.get_links(ext)[0].get("IFLA_MTU")
            vtep = vxlan_device.ensure_vtep(ipr, vni=vxlan_device.DEFAULT_VNI, local=host.underlay, ext_index=ext,
                                            port=0, mtu=mtu - overhead)
            undo.callback(_del_vtep, host)
            vxlan_device.set_address(ipr, vtep, host.subnet)
        except Exception as exc:
            raise ModeUnavailable(f"cannot create a VXLAN device: {exc}") from None
    return vtep.mac


def _vtep_name(host: Host) -> str:
    return vxlan_device.device_name(vxlan_device.DEFAULT_VNI, host.underlay.version)


def _del_vtep(host: Host) -> None:
    """Deleting the device takes its address, neighbour, FDB and route entries with it."""
    with host.ipr() as ipr:
        for index in ipr.link_lookup(ifname=_vtep_name(host)):
            ipr.link("del", index=index)


def _vxlan(host: Host, peer: Lease, undo: ExitStack, files: Path) -> None:
    name = _vtep_name(host)
    with host.ipr() as ipr:
        vtep = vxlan_device.Vtep(index=ipr.link_lookup(ifname=name)[0], name=name, vni=vxlan_device.DEFAULT_VNI,
                                 mac="")
        vxlan_device.add_peer(ipr, vtep, subnet=peer.subnet, public_ip=peer.public_ip, mac=peer.vtep_mac)


def _udp(host: Host, peer: Lease, undo: ExitStack, files: Path, *extra: str) -> Tunnel:
    """flannel-tunnel on the host: the same engine the udp backend drives, given the addresses of one family
    (IPv6 ones for udp6: --iface-ip, --subnet and --network are taken once per family)."""
    stats = files / f"{host.subnet.network_address}-stats.json"
    proc = _start(host, undo, files, "flannel-tunnel", TUNNEL, "--iface-ip", str(host.underlay),
                  "--subnet", str(host.subnet), "--network", str(network(host.subnet.version)),
                  "--peer", f"{peer.subnet}={peer.public_ip}", "--stats-file", str(stats), *extra)
    return Tunnel(proc, stats)


def _flannel_c(host: Host, peer: Lease, undo: ExitStack, files: Path) -> None:
    """flannel's own udp design (bench.flannel_c), the reference for every mode's latency; IPv4 only, as flannel's
    udp backend."""
    _start(host, undo, files, "flannel-c", sys.executable, "-m", "pyflannel.bench.flannel_c", str(host.underlay),
           str(host.subnet), str(network(4)), f"{peer.subnet}={peer.public_ip}")


def _start(host: Host, undo: ExitStack, files: Path, name: str, *argv: str) -> subprocess.Popen[Any]:
    """A program that brings up flannel0 on the host, once flannel0 routes the network. Tied to this process: if
    it is killed, the program still stops and removes its flannel0."""
    log = files / f"{host.subnet.network_address}.log"
    with log.open("w") as err:
        proc = host.popen(*argv, tied=True, stdout=subprocess.DEVNULL, stderr=err)
    undo.callback(terminate, proc)
    _wait_for_flannel0(host, proc, name, log)
    return proc


def _udp_batch(host: Host, peer: Lease, undo: ExitStack, files: Path) -> Tunnel:
    """Batching alone: recvmmsg/sendmmsg at the default batch, no offloads."""
    return _udp(host, peer, undo, files, "--offload", "off")


def _udp_basic(host: Host, peer: Lease, undo: ExitStack, files: Path) -> Tunnel:
    """The design of flannel's C proxy in this engine: no offloads, one packet per syscall, one queue and one
    thread, which sleeps as soon as it is idle."""
    return _udp(host, peer, undo, files, "--offload", "off", "--batch", "1", "--queues", "1")


def _wait_for_flannel0(host: Host, proc: subprocess.Popen[Any], name: str, log: Path, timeout: float = 15) -> None:
    """Until the network's route is on flannel0 (the engine is then up), or what flannel-tunnel said last if it
    exited (a flannel-tunnel without IPv6 refuses udp6's addresses in one line)."""
    family = host.subnet.version
    deadline = time.monotonic() + timeout
    while f"{network(family)} dev flannel0" not in host.run("ip", f"-{family}", "route").stdout:
        if proc.poll() is not None or time.monotonic() > deadline:
            said = log.read_text().strip().splitlines()
            raise ModeUnavailable(f"{name} did not bring up flannel0{': ' + said[-1] if said else ''}")
        time.sleep(0.05)


CONNECT: dict[str, Callable[[Host, Lease, ExitStack, Path], Tunnel | None]] = {
    "none": _none, "host-gw": _host_gw, "vxlan": _vxlan, "udp": _udp, "udp-batch": _udp_batch,
    "udp-basic": _udp_basic, "flannel-c": _flannel_c,
}
