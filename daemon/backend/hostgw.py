"""The host-gw backend: a kernel route per remote lease via that node's public address (flannel
pkg/backend/hostgw), for each family the network has: the IPv4 subnet via PublicIP, the IPv6 one via PublicIPv6.

It refuses to start when a public address is not the interface's own (host-gw cannot cross NAT), ignores leases
of other backend types with a warning, and re-adds any of its routes that went missing every 10 s. A route the
kernel refuses (a gateway not on the interface's link, say) stays wanted: it is logged once, tried again at each
recheck, and reported as unrouted (/readyz) until it is in place; the other routes of the batch go in regardless.
"""

from __future__ import annotations

import asyncio
import logging

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pyflannel.daemon.backend import routes
from pyflannel.daemon.backend.base import Context, Idle, unrouted_line
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
        self.routes: dict[Network, Address] = {}  # wanted, in place or not
        self.refused: dict[Network, str] = {}  # wanted routes the kernel refused so far, and why

    def handle(self, events: list[Event]) -> None:
        with IPRoute() as ipr:
            for event in events:
                lease = event.lease
                if event.type is EventType.REMOVED:
                    for subnet in lease.subnets():
                        self.refused.pop(subnet, None)
                        if self.routes.pop(subnet, None) is not None:
                            routes.del_route(ipr, subnet=subnet)
                elif lease.attrs.backend_type != "host-gw":
                    log.warning("ignoring lease %s: backend type %r, not host-gw", lease, lease.attrs.backend_type)
                else:
                    for subnet, gateway in lease.routes():
                        self.routes[subnet] = gateway
                        self._install(ipr, subnet, gateway)

    def _install(self, ipr: IPRoute, subnet: Network, gateway: Address) -> None:
        try:
            routes.add_route(ipr, subnet=subnet, gateway=gateway, ifindex=self.ifindex)
        except NetlinkError as exc:
            if self.refused.get(subnet) != exc.args[1]:
                log.warning("route %s via %s refused: %s; trying again every %d s", subnet, gateway, exc.args[1],
                            RECHECK_SECONDS)
            self.refused[subnet] = exc.args[1]
            return
        if self.refused.pop(subnet, None) is not None:
            log.info("route %s via %s in place", subnet, gateway)

    def unrouted(self) -> str | None:
        return unrouted_line(self.refused)

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
                    if subnet not in self.refused:
                        log.info("re-adding missing route %s via %s", subnet, gateway)
                    self._install(ipr, subnet, gateway)


async def register(ctx: Context) -> HostGwNetwork:
    ext = ctx.ext
    for public, own in ((ext.public_ip, ext.addr), (ext.public_ipv6, ext.addr6)):
        if public != own:
            raise FlannelError(f"your public address ({public}) differs from the interface's ({own}): host-gw "
                               "cannot work through NAT")
    lease = await ctx.acquire(LeaseAttrs(public_ip=ext.public_ip, backend_type="host-gw",
                                         public_ipv6=ext.public_ipv6))
    return HostGwNetwork(lease, ext.mtu, ext.index)
