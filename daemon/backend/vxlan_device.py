"""The kernel VXLAN devices and their per-peer entries, built as flannel's vxlan backend builds them.

flannel pkg/backend/vxlan/device.go and vxlan_network.go: one device per family, `flannel.<VNI>` for IPv4 with
the node's PublicIP as local address and `flannel-v6.<VNI>` for IPv6 with its PublicIPv6 (so IPv6 pods travel
over an IPv6 underlay), each on the external interface, learning off, router advertisements ignored, a random
locally administered MAC, and the node's subnet network address as a /32 (/128). Each remote lease adds, per
family and in this order, a permanent neighbour entry (remote subnet's network address -> remote VTEP MAC), a
permanent FDB entry (remote VTEP MAC -> remote public address) and an onlink route (remote subnet via its
network address on the device); a failure undoes the earlier steps.

MTU: flannel gives both devices the external MTU - 50, which is right for an IPv4 underlay only: over IPv6 the
outer header is 20 bytes longer and every full-size packet would be fragmented. flannel-v6.<VNI> gets MTU - 70.
"""

from __future__ import annotations

import contextlib
import errno
import secrets
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pyflannel.daemon.config import Address, Network

DEFAULT_VNI = 1
DEFAULT_PORT = 8472  # the kernel's default for a dstport of 0
OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
OVERHEAD6 = 70  # the same over IPv6 (outer header 40)
IFA_F_NODAD = 0x02
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


def device_name(vni: int, version: int) -> str:
    return f"flannel.{vni}" if version == 4 else f"flannel-v6.{vni}"


def ensure_vtep(ipr: IPRoute, *, vni: int, local: Address, ext_index: int, port: int, mtu: int,
                mac: str | None = None) -> Vtep:
    """Create the device for local's family (flannel.<vni> or flannel-v6.<vni>), replacing any of that name.

    flannel keeps a compatible existing device (and so its MAC) across restarts; pass that MAC back in as `mac`.
    """
    name = device_name(vni, local.version)
    existing = ipr.link_lookup(ifname=name)
    if existing:
        ipr.link("del", index=existing[0])
    where = {"vxlan_local": str(local)} if local.version == 4 else {"vxlan_local6": str(local)}
    ipr.link("add", ifname=name, kind="vxlan", vxlan_id=vni, vxlan_link=ext_index, vxlan_port=port or DEFAULT_PORT,
             vxlan_learning=0, address=mac or random_mac(), **where)
    index = ipr.link_lookup(ifname=name)[0]
    _ignore_router_advertisements(name)
    ipr.link("set", index=index, mtu=mtu, state="up")
    link = ipr.get_links(index)[0]
    return Vtep(index=index, name=name, vni=vni, mac=str(link.get("IFLA_ADDRESS")))


def _ignore_router_advertisements(name: str) -> None:
    """accept_ra=0, as flannel sets it (a host with IPv6 off has no such file: nothing to ignore then)."""
    with contextlib.suppress(FileNotFoundError):
        Path(f"/proc/sys/net/ipv6/conf/{name}/accept_ra").write_text("0")


def set_address(ipr: IPRoute, vtep: Vtep, subnet: Network) -> None:
    """The lease's network address as a /32 (/128): no route for the whole network (flannel's vxlan does not add
    one). No duplicate address detection: nobody else can hold it, and a tentative address cannot be a source."""
    ipr.addr("add", index=vtep.index, address=str(subnet.network_address), prefixlen=subnet.max_prefixlen,
             flags=IFA_F_NODAD)


def add_peer(ipr: IPRoute, vtep: Vtep, *, subnet: Network, public_ip: Address, mac: str) -> None:
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


def del_peer(ipr: IPRoute, vtep: Vtep, *, subnet: Network, public_ip: Address, mac: str) -> None:
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
