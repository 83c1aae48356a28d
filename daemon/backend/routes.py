"""Kernel routes for remote subnets: what the host-gw backend installs (flannel pkg/backend/route_network.go).

Each remote lease becomes `<subnet> via <its PublicIP> dev <external interface>`, and on a dual-stack network
also `<IPv6 subnet> via <its PublicIPv6>`. A route to the same subnet
through another gateway or link is replaced, not duplicated.
"""

from __future__ import annotations

import errno

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pyflannel.daemon.config import Address, Network


def add_route(ipr: IPRoute, *, subnet: Network, gateway: Address, ifindex: int) -> None:
    """Install (or replace) the route to subnet via gateway on the external interface."""
    ipr.route("replace", dst=str(subnet), gateway=str(gateway), oif=ifindex)


def add_blackhole(subnet: Network) -> None:
    """--ip-blackhole-route: traffic for unassigned addresses of our own subnet is dropped here, not routed on."""
    with IPRoute() as ipr:
        ipr.route("replace", dst=str(subnet), type="blackhole")


def del_route(ipr: IPRoute, *, subnet: Network) -> None:
    """Remove the route to subnet; a route that is already gone is fine."""
    try:
        ipr.route("del", dst=str(subnet))
    except NetlinkError as exc:
        if exc.code != errno.ESRCH:
            raise
