"""Choosing the external interface and public addresses, as flanneld does (main.go, pkg/ipmatch).

--iface (names or addresses of either family, in order), then --iface-regex (matched against the addresses of
the families in use first, then names), then --iface-can-reach (the route to that address), then the interface
holding --public-ip (or --public-ipv6 on an IPv6-only network), then the interface of the default route (the
IPv6 one on an IPv6-only network). The interface's address of each family in use is the one named by --iface or
matched by --iface-regex, else its first global one (deprecated addresses skipped); the public addresses are
--public-ip and --public-ipv6 if given, else those. An IPv6 address must be global or unique-local: a
link-local one cannot be reached without knowing the link, so flannel's fallback to it is not kept.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from pyroute2 import IPRoute

from pyflannel.daemon.config import Address
from pyflannel.daemon.errors import FlannelError
from pyflannel.daemon.lease import BadRecord, check_public_ipv6

IFA_F_DEPRECATED = 0x20
Link = tuple[int, str, int, list[Address]]  # index, name, MTU, global addresses (the preferred ones first)


@dataclass(frozen=True)
class ExternalInterface:
    name: str
    index: int
    addr: ipaddress.IPv4Address | None  # the interface's own address (what the udp socket binds to)
    public_ip: ipaddress.IPv4Address | None  # what goes into the lease; None: no IPv4 on this network
    mtu: int
    addr6: ipaddress.IPv6Address | None = None
    public_ipv6: ipaddress.IPv6Address | None = None


def _links(ipr: IPRoute) -> list[Link]:
    """(index, name, mtu, global addresses) for every link."""
    addrs: dict[int, list[Address]] = {}
    for a in ipr.get_addr():
        flags = a.get("IFA_FLAGS", a["flags"])
        if a["scope"] == 0 and not flags & IFA_F_DEPRECATED:  # RT_SCOPE_UNIVERSE: no link-local, no host-scope
            addrs.setdefault(a["index"], []).append(ipaddress.ip_address(a.get("IFA_ADDRESS")))
    return [(link["index"], link.get("IFLA_IFNAME"), int(link.get("IFLA_MTU")), addrs.get(link["index"], []))
            for link in ipr.get_links()]


def select(*, iface: list[str], iface_regex: list[str], can_reach: str, public_ip: str, public_ipv6: str = "",
           ipv4: bool = True, ipv6: bool = False) -> ExternalInterface:
    families = {4} if ipv4 else set()
    families |= {6} if ipv6 else set()
    public_ip = public_ip if ipv4 else ""
    public_ipv6 = public_ipv6 if ipv6 else ""
    with IPRoute() as ipr:
        links = _links(ipr)
        chosen = _by_iface(links, iface) if iface else None
        if chosen is None and iface_regex:
            chosen = _by_regex(links, iface_regex, families)
        if chosen is None and can_reach:
            chosen = _by_route(ipr, links, can_reach)
        if (iface or iface_regex or can_reach) and chosen is None:
            raise FlannelError(f"no interface matches --iface {iface} / --iface-regex {iface_regex} / "
                               f"--iface-can-reach {can_reach!r}")
        for flag, wanted in (("--public-ip", public_ip), ("--public-ipv6", public_ipv6)):
            if chosen is None and wanted:
                chosen = next(((i, n, m, [a, *addrs]) for i, n, m, addrs in links for a in addrs
                               if str(a) == wanted), None)
                if chosen is None:
                    raise FlannelError(f"{flag} {wanted} is not an address of this host; set --iface as well")
        if chosen is None:
            chosen = _default_route(ipr, links, 2 if ipv4 else 10)
    index, name, mtu, addrs = chosen
    addr = _first(addrs, 4, name) if ipv4 else None
    addr6 = _first(addrs, 6, name) if ipv6 else None
    return ExternalInterface(name=name, index=index, addr=addr, mtu=mtu, addr6=addr6,  # type: ignore[arg-type]
                             public_ip=_public(public_ip, addr, 4),  # type: ignore[arg-type]
                             public_ipv6=_public(public_ipv6, addr6, 6))  # type: ignore[arg-type]


def _first(addrs: list[Address], version: int, name: str) -> Address:
    found = next((a for a in addrs if a.version == version), None)
    if found is None:
        raise FlannelError(f"interface {name} has no {'IPv4' if version == 4 else 'global IPv6'} address")
    return found


def _public(flag: str, default: Address | None, version: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not flag:
        return default
    return parse_public(flag, version, "--public-ip" if version == 4 else "--public-ipv6")


def parse_public(text: str, version: int, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A public address an operator gave (a flag, or a Node annotation: `what` names it): an IPv4 address, or a
    global or unique-local IPv6 one; else a one-line FlannelError naming it."""
    try:
        return check_public_ipv6(text) if version == 6 else ipaddress.IPv4Address(text)
    except (ValueError, BadRecord):
        kind = "an IPv4 address" if version == 4 else "a global or unique-local IPv6 address"
        raise FlannelError(f"{what} {text[:50]!r} is not {kind}", status=2) from None


def _by_iface(links: list[Link], wanted: list[str]) -> Link | None:
    for want in wanted:
        for index, name, mtu, addrs in links:
            if want == name:
                return index, name, mtu, addrs
            match = [a for a in addrs if str(a) == want]
            if match:
                return index, name, mtu, match + addrs
    return None


def check_flags(*, iface_regex: list[str], can_reach: str, public_ip: str, public_ipv6: str) -> None:
    """The interface flags' syntax, checked at startup: a typo is a flag error at once, not after the registry
    has answered (which select() would need first)."""
    _patterns(iface_regex)
    if can_reach:
        _reach_target(can_reach)
    _public(public_ip, None, 4)
    _public(public_ipv6, None, 6)


def _patterns(patterns: list[str]) -> list[re.Pattern[str]]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise FlannelError(f"invalid --iface-regex {pattern!r}: {exc}", status=2) from None
    return compiled


def _reach_target(target: str) -> Address:
    try:
        return ipaddress.ip_address(target)
    except ValueError:
        raise FlannelError(f"--iface-can-reach {target!r} is not an IP address", status=2) from None


def _by_regex(links: list[Link], patterns: list[str], families: set[int]) -> Link | None:
    for rx in _patterns(patterns):
        for index, name, mtu, addrs in links:
            match = [a for a in addrs if a.version in families and rx.search(str(a))]
            if match:
                return index, name, mtu, match + addrs
        for index, name, mtu, addrs in links:
            if rx.search(name):
                return index, name, mtu, addrs
    return None


def _by_route(ipr: IPRoute, links: list[Link], target: str) -> Link | None:
    """The interface the kernel would use to reach target (ip route get)."""
    dst = _reach_target(target)
    try:
        routes = ipr.route("get", dst=str(dst))
    except Exception:
        return None
    oif = routes[0].get("RTA_OIF") if routes else None
    return next((link for link in links if link[0] == oif), None)


def _default_route(ipr: IPRoute, links: list[Link], family: int) -> Link:
    for route in ipr.get_routes(family=family, table=254):
        if route["dst_len"] == 0 and route.get("RTA_OIF"):
            for link in links:
                if link[0] == route.get("RTA_OIF"):
                    return link
    raise FlannelError("failed to find the interface to use: no default route (use --iface or --public-ip)")
