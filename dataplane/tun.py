"""The TUN device: opened with python-pytun, configured with pyroute2, exactly as flannel's udp backend does.

python-pytun creates the device (TUNSETIFF with IFF_TUN|IFF_NO_PI, and IFF_VNET_HDR when offloads are wanted)
and hands out its fd, which the engine threads read and write directly. The device is not persistent: closing
the fd removes it together with its address and routes, so a crash leaves nothing configured.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
from dataclasses import dataclass

import pytun
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from dataplane.errors import DataplaneError

ENCAP_OVERHEAD = 28  # outer IPv4 header + UDP header (flannel's encapOverhead)


@dataclass
class TunDevice:
    """An open TUN device; `fd` is what the engine uses, `close()` removes the device."""

    name: str
    handle: pytun.TunTapDevice
    vnet_hdr: bool

    @property
    def fd(self) -> int:
        return int(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


def open_tun(name: str, *, vnet_hdr: bool = False) -> TunDevice:
    """Create the TUN device `name` (non-blocking) or raise DataplaneError saying why not."""
    if not os.path.exists("/dev/net/tun"):
        raise DataplaneError("/dev/net/tun does not exist: load the tun module (modprobe tun)")
    flags = pytun.IFF_TUN | pytun.IFF_NO_PI | (pytun.IFF_VNET_HDR if vnet_hdr else 0)
    try:
        handle = pytun.TunTapDevice(name=name, flags=flags)
    except pytun.Error as exc:
        raise DataplaneError(f"cannot create TUN device {name}: {_pytun_reason(exc)}") from None
    fd = handle.fileno()
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    return TunDevice(name=handle.name, handle=handle, vnet_hdr=vnet_hdr)


def _pytun_reason(exc: pytun.Error) -> str:
    text = str(exc)
    if "Operation not permitted" in text or "Permission denied" in text:
        return "permission denied (run as root or with CAP_NET_ADMIN)"
    if "busy" in text.lower():
        return "a device with that name already exists and is in use"
    return text


def configure_tun(name: str, *, subnet: ipaddress.IPv4Network, network: ipaddress.IPv4Network, mtu: int) -> None:
    """Address = subnet network address /32, the given MTU, link up, and a route for the whole network.

    The /32 (rather than the subnet's own prefix) keeps the kernel from adding a connected route and broadcast
    addresses for the subnet, which belongs to the local bridge, not to flannel0 (flannel's configureIface).
    """
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=name)[0]
        ipr.link("set", index=index, mtu=mtu, state="up")
        ipr.addr("add", index=index, address=str(subnet.network_address), prefixlen=32)
        try:
            ipr.route("add", dst=str(network), oif=index, scope=0)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise


def underlay_mtu(iface_ip: ipaddress.IPv4Address) -> int:
    """MTU of the interface that holds iface_ip; DataplaneError if no interface has it."""
    with IPRoute() as ipr:
        for addr in ipr.get_addr(family=2):
            if addr.get("IFA_ADDRESS") == str(iface_ip):
                link = ipr.get_links(addr["index"])[0]
                return int(link.get("IFLA_MTU"))
    raise DataplaneError(f"no local interface has address {iface_ip}")
