"""Choosing the external interface and public IP, as flanneld does (main.go, pkg/ipmatch).

--iface (names or addresses, in order), then --iface-regex (matched against addresses first, then names), then
--iface-can-reach (the route to that address), then the interface holding --public-ip, then the interface of the
default route. The public IP is --public-ip if
given, else the chosen interface's first global IPv4 address.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from pyroute2 import IPRoute

from pyflannel.daemon.errors import FlannelError


@dataclass(frozen=True)
class ExternalInterface:
    name: str
    index: int
    addr: ipaddress.IPv4Address  # the interface's own address (what the udp socket binds to)
    public_ip: ipaddress.IPv4Address  # what goes into the lease
    mtu: int


def _links(ipr: IPRoute) -> list[tuple[int, str, int, list[ipaddress.IPv4Address]]]:
    """(index, name, mtu, global IPv4 addresses) for every link."""
    addrs: dict[int, list[ipaddress.IPv4Address]] = {}
    for a in ipr.get_addr(family=2):
        if a["scope"] == 0:  # RT_SCOPE_UNIVERSE: no link-local, no host-scope
            addrs.setdefault(a["index"], []).append(ipaddress.IPv4Address(a.get("IFA_ADDRESS")))
    return [(link["index"], link.get("IFLA_IFNAME"), int(link.get("IFLA_MTU")), addrs.get(link["index"], []))
            for link in ipr.get_links()]


def select(*, iface: list[str], iface_regex: list[str], can_reach: str, public_ip: str) -> ExternalInterface:
    with IPRoute() as ipr:
        links = _links(ipr)
        chosen = _by_iface(links, iface) if iface else None
        if chosen is None and iface_regex:
            chosen = _by_regex(links, iface_regex)
        if chosen is None and can_reach:
            chosen = _by_route(ipr, links, can_reach)
        if (iface or iface_regex or can_reach) and chosen is None:
            raise FlannelError(f"no interface matches --iface {iface} / --iface-regex {iface_regex} / "
                               f"--iface-can-reach {can_reach!r}")
        if chosen is None and public_ip:
            chosen = next(((i, n, m, [a]) for i, n, m, addrs in links for a in addrs if str(a) == public_ip), None)
            if chosen is None:
                raise FlannelError(f"--public-ip {public_ip} is not an address of this host; set --iface as well")
        if chosen is None:
            chosen = _default_route(ipr, links)
    index, name, mtu, addrs = chosen
    if not addrs:
        raise FlannelError(f"interface {name} has no IPv4 address")
    try:
        public = ipaddress.IPv4Address(public_ip) if public_ip else addrs[0]
    except ValueError:
        raise FlannelError(f"--public-ip {public_ip!r} is not an IPv4 address", status=2) from None
    return ExternalInterface(name=name, index=index, addr=addrs[0], public_ip=public, mtu=mtu)


Link = tuple[int, str, int, list[ipaddress.IPv4Address]]


def _by_iface(links: list[Link], wanted: list[str]) -> Link | None:
    for want in wanted:
        for index, name, mtu, addrs in links:
            if want == name:
                return index, name, mtu, addrs
            match = [a for a in addrs if str(a) == want]
            if match:
                return index, name, mtu, match
    return None


def _by_regex(links: list[Link], patterns: list[str]) -> Link | None:
    for pattern in patterns:
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise FlannelError(f"invalid --iface-regex {pattern!r}: {exc}", status=2) from None
        for index, name, mtu, addrs in links:
            match = [a for a in addrs if rx.search(str(a))]
            if match:
                return index, name, mtu, match
        for index, name, mtu, addrs in links:
            if rx.search(name):
                return index, name, mtu, addrs
    return None


def _by_route(ipr: IPRoute, links: list[Link], target: str) -> Link | None:
    """The interface the kernel would use to reach target (ip route get)."""
    try:
        routes = ipr.route("get", dst=str(ipaddress.IPv4Address(target)))
    except ValueError:
        raise FlannelError(f"--iface-can-reach {target!r} is not an IPv4 address", status=2) from None
    except Exception:
        return None
    oif = routes[0].get("RTA_OIF") if routes else None
    return next((link for link in links if link[0] == oif), None)


def _default_route(ipr: IPRoute, links: list[Link]) -> Link:
    for route in ipr.get_routes(family=2, table=254):
        if route["dst_len"] == 0 and route.get("RTA_OIF"):
            for link in links:
                if link[0] == route.get("RTA_OIF"):
                    return link
    raise FlannelError("failed to find the interface to use: no default route (use --iface or --public-ip)")
