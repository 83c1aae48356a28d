"""The vxlan backend: the kernel's VXLAN devices, programmed per lease (flannel pkg/backend/vxlan).

Lease attributes: BackendType "vxlan", BackendData {"VNI": <vni>, "VtepMAC": "<mac>"} for flannel.<VNI> and, on
a network with IPv6, BackendV6Data of the same form for flannel-v6.<VNI>. Backend options: VNI (default 1), Port
(default 0: the kernel's 8472), MTU (default the external MTU; the devices get MTU - 50, and MTU - 70 for
flannel-v6, see vxlan_device). FLANNEL_MTU is the smaller of the devices' MTUs, so a pod's packet fits either
family. GBP, Learning and DirectRouting are not supported.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from pyroute2 import IPRoute

from pyflannel.daemon.backend import vxlan_device
from pyflannel.daemon.backend.base import Context, Idle
from pyflannel.daemon.config import Address
from pyflannel.daemon.errors import FlannelError
from pyflannel.daemon.lease import Event, EventType, Lease, LeaseAttrs

log = logging.getLogger(__name__)
T = TypeVar("T")
MIN_MTU = 68 + vxlan_device.OVERHEAD6  # Backend.MTU leaving IPv4's minimum MTU on either family's VXLAN device


class VxlanNetwork(Idle):
    def __init__(self, lease: Lease, mtu: int, vteps: dict[int, vxlan_device.Vtep]) -> None:
        self.lease = lease
        self.mtu = mtu
        self.vteps = vteps  # by IP version

    def handle(self, events: list[Event]) -> None:
        with IPRoute() as ipr:
            for event in events:
                lease = event.lease
                if lease.attrs.backend_type != "vxlan":
                    log.warning("ignoring lease %s: backend type %r, not vxlan", lease, lease.attrs.backend_type)
                    continue
                for subnet, public in lease.routes():
                    mac = _vtep_mac(lease, subnet.version)
                    if mac is None:
                        log.warning("ignoring %s of lease %s: no VtepMAC in its Backend%sData", subnet, lease,
                                    "" if subnet.version == 4 else "V6")
                        continue
                    apply = vxlan_device.add_peer if event.type is EventType.ADDED else vxlan_device.del_peer
                    apply(ipr, self.vteps[subnet.version], subnet=subnet, public_ip=public, mac=mac)


def _vtep_mac(lease: Lease, version: int) -> str | None:
    data = lease.attrs.backend_data if version == 4 else lease.attrs.backend_v6_data
    mac = data.get("VtepMAC") if isinstance(data, dict) else None
    return mac if isinstance(mac, str) else None


async def register(ctx: Context) -> VxlanNetwork:
    for option in ("gbp", "learning", "directrouting"):
        if ctx.config.backend_option(option, False):
            raise FlannelError(f"vxlan option {option} is not supported by pyflannel")
    vni = ctx.config.backend_int("VNI", vxlan_device.DEFAULT_VNI, 0, (1 << 24) - 1)
    mtu = ctx.config.backend_int("MTU", ctx.ext.mtu, MIN_MTU, 65535)
    port = ctx.config.backend_int("Port", 0, 0, 65535)  # 0: the kernel's default, 8472
    locals_: list[Address] = [a for a in (ctx.ext.public_ip, ctx.ext.public_ipv6) if a is not None]
    vteps: dict[int, vxlan_device.Vtep] = {}
    for local in locals_:
        vteps[local.version] = await asyncio.to_thread(
            _netlink, vxlan_device.ensure_vtep, vni=vni, local=local, ext_index=ctx.ext.index, port=port,
            mtu=mtu - _overhead(local.version))
    data = {version: {"VNI": vni, "VtepMAC": vtep.mac} for version, vtep in vteps.items()}
    lease = await ctx.acquire(LeaseAttrs(public_ip=ctx.ext.public_ip, backend_type="vxlan", backend_data=data.get(4),
                                         public_ipv6=ctx.ext.public_ipv6, backend_v6_data=data.get(6)))
    for subnet in lease.subnets():
        await asyncio.to_thread(_netlink, vxlan_device.set_address, vteps[subnet.version], subnet)
    return VxlanNetwork(lease, min(mtu - _overhead(v) for v in vteps), vteps)


def _overhead(version: int) -> int:
    return vxlan_device.OVERHEAD if version == 4 else vxlan_device.OVERHEAD6


def _netlink(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    with IPRoute() as ipr:
        return fn(ipr, *args, **kwargs)
