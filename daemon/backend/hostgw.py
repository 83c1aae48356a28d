"""The host-gw backend: a kernel route per remote lease via that node's public IP (flannel pkg/backend/hostgw).

It refuses to start when the public IP is not the interface's own address (host-gw cannot cross NAT), ignores
leases of other backend types with a warning, and re-adds any of its routes that went missing every 10 s.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging

from pyroute2 import IPRoute

from pyflannel.daemon.backend import routes
from pyflannel.daemon.backend.base import Context, Idle
from pyflannel.daemon.errors import FlannelError
from pyflannel.daemon.lease import Event, EventType, Lease, LeaseAttrs

log = logging.getLogger(__name__)
RECHECK_SECONDS = 10


class HostGwNetwork(Idle):
    def __init__(self, lease: Lease, mtu: int, ifindex: int) -> None:
        self.lease = lease
        self.mtu = mtu
        self.ifindex = ifindex
        self.routes: dict[ipaddress.IPv4Network, ipaddress.IPv4Address] = {}

    def handle(self, events: list[Event]) -> None:
        with IPRoute() as ipr:
            for event in events:
                subnet, attrs = event.lease.subnet, event.lease.attrs
                if event.type is EventType.REMOVED:
                    if self.routes.pop(subnet, None) is not None:
                        routes.del_route(ipr, subnet=subnet)
                elif attrs.backend_type != "host-gw":
                    log.warning("ignoring lease %s: backend type %r, not host-gw", subnet, attrs.backend_type)
                else:
                    routes.add_route(ipr, subnet=subnet, gateway=attrs.public_ip, ifindex=self.ifindex)
                    self.routes[subnet] = attrs.public_ip

    async def run(self) -> None:
        while True:
            await asyncio.sleep(RECHECK_SECONDS)
            await asyncio.to_thread(self._readd_missing)

    def _readd_missing(self) -> None:
        with IPRoute() as ipr:
            present = {r.get("RTA_DST") for r in ipr.get_routes(family=2, table=254)}
            for subnet, gateway in list(self.routes.items()):
                if str(subnet.network_address) not in present:
                    log.info("re-adding missing route %s via %s", subnet, gateway)
                    routes.add_route(ipr, subnet=subnet, gateway=gateway, ifindex=self.ifindex)


async def register(ctx: Context) -> HostGwNetwork:
    if ctx.ext.public_ip != ctx.ext.addr:
        raise FlannelError(f"your PublicIP ({ctx.ext.public_ip}) differs from the interface IP ({ctx.ext.addr}): "
                           "host-gw cannot work through NAT")
    lease = await ctx.acquire(LeaseAttrs(public_ip=ctx.ext.public_ip, backend_type="host-gw"))
    return HostGwNetwork(lease, ctx.ext.mtu, ctx.ext.index)
