"""The host-gw backend: a kernel route per remote lease via that node's public address (flannel
pkg/backend/hostgw), for each family the network has: the IPv4 subnet via PublicIP, the IPv6 one via PublicIPv6.

It refuses to start when a public address is not the interface's own (host-gw cannot cross NAT), ignores leases
of other backend types with a warning, and re-adds any of its routes that went missing every 10 s.
"""

from __future__ import annotations

import asyncio
import logging

from pyroute2 import IPRoute

from pyflannel.daemon.backend import routes
from pyflannel.daemon.backend.base import Context, Idle
from pyflannel.daemon.config import Address, Network
from pyflannel.daemon.errors import FlannelError
from pyflannel.daemon.lease import Event, EventType, Lease, LeaseAttrs

log = logging.getLogger(__name__)
RECHECK_SECONDS = 10


class HostGwNetwork(Idle):
    def __init__(self, lease: Lease, mtu: int, ifindex: int) -> None:
        self.lease = lease
        self.mtu = mtu
        self.ifindex = ifindex
        self.routes: dict[Network, Address] = {}

    def handle(self, events: list[Event]) -> None:
        with IPRoute() as ipr:
            for event in events:
                lease = event.lease
                if event.type is EventType.REMOVED:
                    for subnet in lease.subnets():
                        if self.routes.pop(subnet, None) is not None:
                            routes.del_route(ipr, subnet=subnet)
                elif lease.attrs.backend_type != "host-gw":
                    log.warning("ignoring lease %s: backend type %r, not host-gw", lease, lease.attrs.backend_type)
                else:
                    for subnet, gateway in lease.routes():
                        routes.add_route(ipr, subnet=subnet, gateway=gateway, ifindex=self.ifindex)
                        self.routes[subnet] = gateway

    async def run(self) -> None:
        while True:
            await asyncio.sleep(RECHECK_SECONDS)
            await asyncio.to_thread(self._readd_missing)

    def _readd_missing(self) -> None:
        with IPRoute() as ipr:
            present = {(r["family"], r.get("RTA_DST"), r["dst_len"]) for family in (2, 10)
                       for r in ipr.get_routes(family=family, table=254)}
            for subnet, gateway in list(self.routes.items()):
                family = 2 if subnet.version == 4 else 10
                if (family, str(subnet.network_address), subnet.prefixlen) not in present:
                    log.info("re-adding missing route %s via %s", subnet, gateway)
                    routes.add_route(ipr, subnet=subnet, gateway=gateway, ifindex=self.ifindex)


async def register(ctx: Context) -> HostGwNetwork:
    ext = ctx.ext
    for public, own in ((ext.public_ip, ext.addr), (ext.public_ipv6, ext.addr6)):
        if public != own:
            raise FlannelError(f"your public address ({public}) differs from the interface's ({own}): host-gw "
                               "cannot work through NAT")
    lease = await ctx.acquire(LeaseAttrs(public_ip=ext.public_ip, backend_type="host-gw",
                                         public_ipv6=ext.public_ipv6))
    return HostGwNetwork(lease, ext.mtu, ext.index)
