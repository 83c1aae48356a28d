"""The TUN device: opened with python-pytun, configured with pyroute2, exactly as flannel's udp backend does.

python-pytun creates the device (TUNSETIFF with IFF_TUN|IFF_NO_PI, plus IFF_VNET_HDR when offloads are wanted)
and hands out its fd, which the engine threads read and write directly; the offload ioctl goes to that fd. With
several queues the device is IFF_MULTI_QUEUE and each queue is one more fd attached to it (TUNSETIFF again with
the same name): the kernel spreads outgoing flows over the queues by their hash, and sends a flow on the queue
that last wrote it (its flow table), so each flow stays with one engine. The device is not persistent: closing
its fds removes it together with its address and routes, so a crash leaves nothing configured.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass, replace
from typing import Any

import pytun
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pyflannel.dataplane.errors import DataplaneError
from pyflannel.dataplane.offload import Offloads

ENCAP_OVERHEAD = 28  # outer IPv4 header + UDP header (flannel's encapOverhead)
ENCAP_OVERHEAD6 = 48  # outer IPv6 header + UDP header
# flannel0's transmit queue in packets. Measured with udp-batch (bench/RESULTS.md): 500 (the default) 12,162
# retransmits, 1000 1,046, 5000 none, and +4% throughput.
TXQUEUELEN = 5000

# include/uapi/linux/if_tun.h
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_USO4, TUN_F_USO6 = 0x01, 0x02, 0x04, 0x20, 0x40
IFF_UP = 0x1  # include/uapi/linux/if.h
RT_TABLE_MAIN = 254
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class TunDevice:
    """An open TUN device; `fds` are what the engines use (one per queue), `close()` removes the device.

    `offloads` starts as what was wanted and is narrowed to what the kernel accepts by open_tun (TSO, USO) and
    configure_tun (coalesced writes); the socket-side entries (gso, gro) are left for dataplane.udp.
    """

    name: str
    queues: list[pytun.TunTapDevice]
    offloads: Offloads

    @property
    def fds(self) -> list[int]:
        return [int(queue.fileno()) for queue in self.queues]

    def close(self) -> None:
        for queue in self.queues:
            queue.close()


def open_tun(name: str, wanted: Offloads, queues: int = 1) -> TunDevice:
    """Create the TUN device `name` with `queues` queues (non-blocking), or raise DataplaneError saying why not.
    One queue is a plain TUN device, as flannel's."""
    if not os.path.exists("/dev/net/tun"):
        raise DataplaneError("/dev/net/tun does not exist: load the tun module (modprobe tun)")
    _refuse_existing(name)
    flags = (pytun.IFF_TUN | pytun.IFF_NO_PI | (pytun.IFF_VNET_HDR if wanted.vnet_hdr else 0)
             | (pytun.IFF_MULTI_QUEUE if queues > 1 else 0))
    tun = TunDevice(name=name, queues=[], offloads=wanted)
    try:
        for _ in range(queues):
            tun.queues.append(_open_queue(tun.name, flags))
            tun.name = tun.queues[0].name  # flannel%d is named by the kernel; the other queues attach to it
    except BaseException:
        tun.close()
        raise
    fd = tun.fds[0]
    if wanted.vnet_hdr:
        tun.offloads = _negotiate(fd, wanted)
    return tun


def _open_queue(name: str, flags: int) -> pytun.TunTapDevice:
    try:
        queue = pytun.TunTapDevice(name=name, flags=flags)
    except pytun.Error as exc:
        raise DataplaneError(f"cannot create TUN device {name}: {_pytun_reason(exc)}") from None
    fd = queue.fileno()
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    return queue


def _negotiate(fd: int, wanted: Offloads) -> Offloads:
    """The richest set of TUN offloads out of `wanted` that the kernel takes: USO goes with TSO (the kernel takes
    both USO flags or neither, and only from 6.2), then TSO6 is given up, then TSO."""
    def flags(tso: bool, tso6: bool) -> int:
        return TUN_F_CSUM | (TUN_F_TSO4 if tso else 0) | (TUN_F_TSO6 if tso6 else 0)

    if wanted.uso and _tunsetoffload(fd, flags(wanted.tso, wanted.tso6) | TUN_F_USO4 | TUN_F_USO6):
        return wanted
    for tso, tso6 in ((wanted.tso, wanted.tso6), (wanted.tso, False), (False, False)):
        if _tunsetoffload(fd, flags(tso, tso6)):
            return replace(wanted, tso=tso, tso6=tso6, uso=False)
    return replace(wanted, tso=False, tso6=False, uso=False)


def _refuse_existing(name: str) -> None:
    """A device of that name that we did not create is not ours to take over: TUNSETIFF would attach to a
    persistent TUN left by someone else, and anything else would fail later with a bare EEXIST. (A name with
    %d is numbered by the kernel and cannot clash.)"""
    if "%" in name:
        return
    with IPRoute() as ipr:
        if ipr.link_lookup(ifname=name):
            raise DataplaneError(f"a network device named {name} already exists and is not ours: "
                                 f"delete it (ip link del {name}) or use another name")


def _tunsetoffload(fd: int, flags: int) -> bool:
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
    except OSError:
        return False
    return True


def _pytun_reason(exc: pytun.Error) -> str:
    text = str(exc)
    if "Operation not permitted" in text or "Permission denied" in text:
        return "permission denied (run as root or with CAP_NET_ADMIN)"
    if "busy" in text.lower():
        return "a device with that name already exists and is in use"
    return text


def configure_tun(tun: TunDevice, *, subnets: list[Network], networks: list[Network], mtu: int) -> None:
    """For each subnet (one IPv4, one IPv6, or both) its network address as a /32 or /128, the given MTU, link
    up; DataplaneError if another device already routes one of the networks. The network routes themselves come
    with ensure_configured, once the engine forwards, so the kernel never sends traffic into a device nobody
    reads.

    The transmit queue is TXQUEUELEN packets instead of the kernel's 500: a burst that the TX thread has not
    yet drained (a sender looping sendto, the segments of TCP without TSO) overflowed 500 and was dropped.

    The /32 (rather than the subnet's own prefix) keeps the kernel from adding a connected route and broadcast
    addresses for the subnet, which belongs to the local bridge, not to flannel0 (flannel's configureIface).
    """
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=tun.name)[0]
        ipr.link("set", index=index, mtu=mtu, txqlen=TXQUEUELEN)
        _ensure_link(ipr, index, subnets)
        for network in networks:
            _ensure_route(ipr, index, network, add=False)
    if tun.offloads.coalesce and not _coalesced_write_works(tun.fds[0]):
        tun.offloads = replace(tun.offloads, coalesce=False)


def ensure_configured(ipr: IPRoute, index: int, *, subnets: list[Network], networks: list[Network]) -> list[str]:
    """Bring the link up and add its addresses and network routes, each only if missing; returns what it did.
    Setting a link down makes the kernel delete the routes through it, and nothing puts them back when the link
    comes up again: this does, and is cheap enough to run every second."""
    done = _ensure_link(ipr, index, subnets)
    for network in networks:
        done += _ensure_route(ipr, index, network, add=True)
    return done


def present(*nets: Network | None) -> list[Network]:
    """The subnets (or networks) of the families in use, IPv4 first."""
    return [net for net in nets if net is not None]


def _family(net: Network | ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    return socket.AF_INET if net.version == 4 else socket.AF_INET6


def _ensure_link(ipr: IPRoute, index: int, subnets: list[Network]) -> list[str]:
    done = []
    if not ipr.get_links(index)[0]["flags"] & IFF_UP:
        ipr.link("set", index=index, state="up")
        done.append("was down, brought it up")
    for subnet in subnets:
        address, plen = str(subnet.network_address), subnet.max_prefixlen
        if not any(a.get_attr("IFA_ADDRESS") == address for a in ipr.get_addr(family=_family(subnet), index=index)):
            try:
                ipr.addr("add", index=index, address=address, prefixlen=plen, family=_family(subnet))
            except NetlinkError as exc:
                raise DataplaneError(f"cannot add {address}/{plen} to the TUN device: {exc.args[-1]}"
                                     + (" (is IPv6 disabled?)" if subnet.version == 6 else "")) from None
            done.append(f"address {address}/{plen} re-added")
    return done


def _ensure_route(ipr: IPRoute, index: int, network: Network, *, add: bool) -> list[str]:
    routes = _routes_to(ipr, network)
    if any(r.get("oif") == index for r in routes):
        return []
    if routes:
        oif = routes[0].get("oif")
        other = ipr.get_links(oif)[0].get("ifname") if oif else "a route with no device"
        raise DataplaneError(f"{network} is already routed through {other}: is another tunnel running?")
    if not add:
        return []
    ipr.route("add", dst=str(network), oif=index, scope=0, family=_family(network))
    return [f"route to {network} re-added"]


def _routes_to(ipr: IPRoute, network: Network) -> list[Any]:
    """The main table's routes for exactly `network` (any device)."""
    return [r for r in ipr.get_routes(family=_family(network), table=RT_TABLE_MAIN)
            if r.get("dst") == str(network.network_address) and r["dst_len"] == network.prefixlen]


def _coalesced_write_works(fd: int) -> bool:
    """Can this kernel take a GSO write through the TUN? Some cannot (the 6.6.44-era regression in
    virtio_net_hdr_to_skb refused short tails with EINVAL). The probe is a two-segment TCP packet from 0.0.0.0
    to 0.0.0.0: the write is accepted or refused, and the stack then drops the packet as a martian."""
    payload = 100 + 60  # one full 100-byte segment and a shorter tail
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + payload, 0, 0x4000, 64, 6, 0, bytes(4), bytes(4))
    tcp = struct.pack("!HHIIBBHHH", 9, 9, 1, 1, 0x50, 0x10, 65535, 0, 0)
    vnet = struct.pack("=BBHHHH", 1, 1, 40, 100, 20, 16)  # NEEDS_CSUM, GSO_TCPV4, hdr_len, gso_size, csum at 20+16
    try:
        os.write(fd, vnet + ip + tcp + bytes(payload))
    except OSError:
        return False
    return True


def underlay_mtu(iface_ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    """MTU of the interface that holds iface_ip; DataplaneError if no interface has it."""
    with IPRoute() as ipr:
        for addr in ipr.get_addr(family=_family(iface_ip)):
            if addr.get("IFA_ADDRESS") == str(iface_ip):
                link = ipr.get_links(addr["index"])[0]
                return int(link.get("IFLA_MTU"))
    raise DataplaneError(f"no local interface has address {iface_ip}")
