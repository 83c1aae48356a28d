"""The kernel VXLAN device and its per-peer entries, built as flannel's vxlan backend builds them.

flannel pkg/backend/vxlan/device.go and vxlan_network.go: a device `flannel.<VNI>` with the node's public IP as
local address on the external interface, learning off, MTU = external MTU - 50, a random locally administered
MAC, and the node's subnet network address as a /32. Each remote lease adds, in this order, a permanent
neighbour entry (remote subnet .0 -> remote VTEP MAC), a permanent FDB entry (remote VTEP MAC -> remote public
IP) and an onlink route (remote subnet via its .0 on the device); a failure undoes the earlier steps.
"""

from __future__ import annotations

import errno
import ipaddress
import secrets
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

DEFAULT_VNI = 1
DEFAULT_PORT = 8472  # the kernel's default for a dstport of 0
OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
AF_BRIDGE = 7
RTNH_F_ONLINK = 4


@dataclass(frozen=True)
class Vtep:
    """A VXLAN endpoint as it appears in a lease's BackendData."""

    index: int
    name: str
    vni: int
    mac: str


def random_mac() -> str:
    """A locally administered unicast MAC (first octet: bit 1 set, bit 0 clear), as flannel generates."""
    octets = bytearray(secrets.token_bytes(6))
    octets[0] = (octets[0] | 0x02) & 0xFE
    return ":".join(f"{b:02x}" for b in octets)


def ensure_vtep(ipr: IPRoute, *, vni: int, local: ipaddress.IPv4Address, ext_index: int, port: int, mtu: int,
                mac: str | None = None) -> Vtep:
    """Create flannel.<vni>, replacing any device of that name.

    flannel keeps a compatible existing device (and so its MAC) across restarts; pass that MAC back in as `mac`.
    """
    name = f"flannel.{vni}"
    existing = ipr.link_lookup(ifname=name)
    if existing:
        ipr.link("del", index=existing[0])
    ipr.link("add", ifname=name, kind="vxlan", vxlan_id=vni, vxlan_local=str(local), vxlan_link=ext_index,
             vxlan_port=port or DEFAULT_PORT, vxlan_learning=0, address=mac or random_mac())
    index = ipr.link_lookup(ifname=name)[0]
    ipr.link("set", index=index, mtu=mtu, state="up")
    link = ipr.get_links(index)[0]
    return Vtep(index=index, name=name, vni=vni, mac=str(link.get("IFLA_ADDRESS")))


def set_address(ipr: IPRoute, vtep: Vtep, subnet: ipaddress.IPv4Network) -> None:
    """The lease's network address as a /32: no route for the whole network (flannel's vxlan does not add one)."""
    ipr.addr("add", index=vtep.index, address=str(subnet.network_address), prefixlen=32)


def add_peer(ipr: IPRoute, vtep: Vtep, *, subnet: ipaddress.IPv4Network, public_ip: ipaddress.IPv4Address,
             mac: str) -> None:
    """Neighbour, FDB and route for one remote lease; undo the earlier steps if a later one fails."""
    gateway = str(subnet.network_address)
    ipr.neigh("replace", ifindex=vtep.index, dst=gateway, lladdr=mac, state=NUD_PERMANENT)
    try:
        ipr.fdb("replace", ifindex=vtep.index, lladdr=mac, dst=str(public_ip), state=NUD_PERMANENT, flags=NTF_SELF)
        try:
            ipr.route("replace", dst=str(subnet), gateway=gateway, oif=vtep.index, flags=RTNH_F_ONLINK)
        except NetlinkError:
            _ignore_missing(ipr.fdb, "del", ifindex=vtep.index, lladdr=mac, dst=str(public_ip))
            raise
    except NetlinkError:
        _ignore_missing(ipr.neigh, "del", ifindex=vtep.index, dst=gateway, lladdr=mac)
        raise


def del_peer(ipr: IPRoute, vtep: Vtep, *, subnet: ipaddress.IPv4Network, public_ip: ipaddress.IPv4Address,
             mac: str) -> None:
    """Remove what add_peer installed; entries already gone are fine."""
    _ignore_missing(ipr.route, "del", dst=str(subnet), oif=vtep.index)
    _ignore_missing(ipr.fdb, "del", ifindex=vtep.index, lladdr=mac, dst=str(public_ip))
    _ignore_missing(ipr.neigh, "del", ifindex=vtep.index, dst=str(subnet.network_address), lladdr=mac)


def _ignore_missing(call: object, *args: object, **kwargs: object) -> None:
    try:
        call(*args, **kwargs)  # type: ignore[operator]
    except NetlinkError as exc:
        if exc.code not in (errno.ENOENT, errno.ESRCH):
            raise
