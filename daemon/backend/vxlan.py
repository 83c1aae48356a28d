"""The vxlan backend: the kernel's VXLAN device, programmed per lease (flannel pkg/backend/vxlan).

Lease attributes: BackendType "vxlan", BackendData {"VNI": <vni>, "VtepMAC": "<mac>"}. Backend options: VNI
(default 1), Port (default 0: the kernel's 8472), MTU (default the external MTU; the device gets MTU - 50).
GBP, Learning and DirectRouting are not supported.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from pyroute2 import IPRoute

from pyflannel.daemon.backend import vxlan_device
from pyflannel.daemon.backend.base import Context, Idle
from pyflannel.daemon.errors import FlannelError
from pyflannel.daemon.lease import Event, EventType, Lease, LeaseAttrs

log = logging.getLogger(__name__)
T = TypeVar("T")


class VxlanNetwork(Idle):
    def __init__(self, lease: Lease, mtu: int, vtep: vxlan_device.Vtep) -> None:
        self.lease = lease
        self.mtu = mtu
        self.vtep = vtep

    def handle(self, events: list[Event]) -> None:
        with IPRoute() as ipr:
            for event in events:
                lease = event.lease
                mac = _vtep_mac(lease)
                if lease.attrs.backend_type != "vxlan" or mac is None:
                    log.warning("ignoring lease %s: not a vxlan lease with a VtepMAC", lease.subnet)
                    continue
                if event.type is EventType.ADDED:
                    vxlan_device.add_peer(ipr, self.vtep, subnet=lease.subnet, public_ip=lease.attrs.public_ip,
                                          mac=mac)
                else:
                    vxlan_device.del_peer(ipr, self.vtep, subnet=lease.subnet, public_ip=lease.attrs.public_ip,
                                          mac=mac)


def _vtep_mac(lease: Lease) -> str | None:
    data = lease.attrs.backend_data
    mac = data.get("VtepMAC") if isinstance(data, dict) else None
    return mac if isinstance(mac, str) else None


async def register(ctx: Context) -> VxlanNetwork:
    for option in ("gbp", "learning", "directrouting"):
        if ctx.config.backend_option(option, False):
            raise FlannelError(f"vxlan option {option} is not supported by pyflannel")
    vni = int(ctx.config.backend_option("vni", vxlan_device.DEFAULT_VNI))
    mtu = int(ctx.config.backend_option("mtu", ctx.ext.mtu)) - vxlan_device.OVERHEAD
    port = int(ctx.config.backend_option("port", 0))
    vtep = await asyncio.to_thread(_netlink, vxlan_device.ensure_vtep, vni=vni, local=ctx.ext.public_ip,
                                   ext_index=ctx.ext.index, port=port, mtu=mtu)
    lease = await ctx.acquire(LeaseAttrs(public_ip=ctx.ext.public_ip, backend_type="vxlan",
                                         backend_data={"VNI": vni, "VtepMAC": vtep.mac}))
    await asyncio.to_thread(_netlink, vxlan_device.set_address, vtep, lease.subnet)
    return VxlanNetwork(lease, mtu, vtep)


def _netlink(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    with IPRoute() as ipr:
        return fn(ipr, *args, **kwargs)
