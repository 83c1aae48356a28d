"""Leases: a node's subnets and what others need to reach it, encoded byte for byte as flannel stores them.

flannel's LeaseAttrs (pkg/lease/lease.go) marshals, in Go field order, PublicIP, PublicIPv6 (no omitempty, so
null when unset), then BackendType, BackendData and BackendV6Data, each omitted when empty; Go's encoder writes
no spaces and compacts embedded raw JSON. The udp backend sets only PublicIP; a node without IPv4 writes
PublicIP "0.0.0.0" (Go's zero IP4). The key is `a.b.c.d-len`, with `&<ipv6>-<len>` appended for a dual-stack
lease (flannel's MakeSubnetKey); a lease with no IPv4 subnet has "0.0.0.0-0" as its IPv4 part.

Whatever a registry holds was written by anyone with access to it, so decode() checks every part before a record
can become a route: the whole key in flannel's form naming network addresses with no host bits (the IPv6 one in
its one compressed spelling), each subnet inside its family's network with the configured length, a bounded JSON
object, a unicast IPv4 PublicIP and a global or unique-local unicast IPv6 PublicIPv6 for the families used. A
family the network does not have is ignored (a dual-stack node's lease in an IPv4-only network routes IPv4).
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from pyflannel.daemon import safejson
from pyflannel.daemon.config import Address, Network

if TYPE_CHECKING:
    from pyflannel.daemon.config import NetworkConfig

SUBNET_TTL = 24 * 3600  # seconds; flannel's subnetTTL
MAX_VALUE = 16 * 1024  # bytes; flannel's own lease values are under 300
MAX_DEPTH = 8
# flannel's subnetRegex, but for the whole key: "<a.b.c.d>-<len>" with an optional "&<ipv6>-<len>".
_KEY = re.compile(r"(\d{1,3}(?:\.\d{1,3}){3})-(\d{1,2})(?:&([0-9a-f:]{2,39})-(\d{1,3}))?")
_NO_IPV4 = ipaddress.IPv4Network("0.0.0.0/0")  # the IPv4 part of an IPv6-only lease's key
_NOT_UNICAST = ipaddress.IPv4Network("0.0.0.0/8")
_UNICAST6 = (ipaddress.IPv6Network("2000::/3"), ipaddress.IPv6Network("fc00::/7"))  # global, unique local


class BadRecord(ValueError):
    """A registry record that must not become a route. `reason` is a short label for the metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class LeaseAttrs:
    public_ip: ipaddress.IPv4Address | None  # None: no IPv4 (written as flannel's "0.0.0.0")
    backend_type: str = ""
    backend_data: Any = None  # decoded JSON, or None
    public_ipv6: ipaddress.IPv6Address | None = None
    backend_v6_data: Any = None

    def to_json(self) -> str:
        out: dict[str, Any] = {"PublicIP": str(self.public_ip or "0.0.0.0"),
                               "PublicIPv6": str(self.public_ipv6) if self.public_ipv6 else None}
        if self.backend_type:
            out["BackendType"] = self.backend_type
        if self.backend_data is not None:
            out["BackendData"] = self.backend_data
        if self.backend_v6_data is not None:
            out["BackendV6Data"] = self.backend_v6_data
        return json.dumps(out, separators=(",", ":"))

    def public(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The address that names this node: its IPv4 one, or its IPv6 one on an IPv6-only network."""
        return self.public_ip or self.public_ipv6

    @classmethod
    def from_json(cls, value: str | bytes, *, ipv4: bool = True, ipv6: bool = False) -> LeaseAttrs:
        """BadRecord unless the value is a bounded JSON object with sound public addresses for the families
        asked for (see checked)."""
        try:
            raw = safejson.loads(value, max_bytes=MAX_VALUE, max_depth=MAX_DEPTH)
        except ValueError as exc:
            reason = "oversize" if len(value) > MAX_VALUE else "bad_value"
            raise BadRecord(reason, f"value is {exc}") from None
        if not isinstance(raw, dict):
            raise BadRecord("bad_value", "value is not a JSON object")
        return cls.checked(raw.get("PublicIP"), raw.get("BackendType"), raw.get("BackendData"),
                           raw.get("PublicIPv6"), raw.get("BackendV6Data"), ipv4=ipv4, ipv6=ipv6)

    @classmethod
    def checked(cls, public_ip: Any, backend_type: Any, backend_data: Any, public_ipv6: Any = None,
                backend_v6_data: Any = None, *, ipv4: bool = True, ipv6: bool = False) -> LeaseAttrs:
        """BadRecord unless public_ip (if ipv4) is a unicast IPv4 address, public_ipv6 (if ipv6) a global or
        unique-local unicast IPv6 address, and backend_type a string (or absent). A family not asked for is left
        out, whatever its fields hold."""
        if not isinstance(backend_type or "", str):
            raise BadRecord("bad_value", "BackendType is not a string")
        return cls(public_ip=_public_ip(public_ip) if ipv4 else None, backend_type=backend_type or "",
                   backend_data=backend_data if ipv4 else None,
                   public_ipv6=check_public_ipv6(public_ipv6) if ipv6 else None,
                   backend_v6_data=backend_v6_data if ipv6 else None)


def _public_ip(value: Any) -> ipaddress.IPv4Address:
    try:
        ip = ipaddress.IPv4Address(value) if isinstance(value, str) else None
    except ValueError:
        ip = None
    if ip is None or ip in _NOT_UNICAST or ip.is_multicast or ip.is_loopback or ip.is_reserved:
        raise BadRecord("bad_public_ip", f"PublicIP {str(value)[:50]!r} is not a unicast IPv4 address")
    return ip


def check_public_ipv6(value: Any) -> ipaddress.IPv6Address:
    """Only global (2000::/3) and unique-local (fc00::/7) unicast: never ::, loopback, multicast, link-local (no
    zone to reach it by), an IPv4-mapped or -compatible address, or one with a zone (%eth0)."""
    try:
        ip = ipaddress.IPv6Address(value) if isinstance(value, str) else None
    except ValueError:
        ip = None
    if ip is None or ip.scope_id is not None or not any(ip in net for net in _UNICAST6):
        raise BadRecord("bad_public_ipv6", f"PublicIPv6 {str(value)[:50]!r} is not a global or unique-local "
                        "unicast IPv6 address")
    return ip


@dataclass(frozen=True)
class Lease:
    subnet: ipaddress.IPv4Network | None  # None on an IPv6-only network
    attrs: LeaseAttrs
    expiration: float = 0.0  # unix time; 0 for unknown
    ipv6_subnet: ipaddress.IPv6Network | None = None

    def __str__(self) -> str:
        return ",".join(str(s) for s in self.subnets())

    def subnets(self) -> list[Network]:
        return [s for s in (self.subnet, self.ipv6_subnet) if s is not None]

    def routes(self) -> list[tuple[Network, Address]]:
        """(subnet, the public address that reaches it) for each family the lease has."""
        pairs: list[tuple[Network | None, Address | None]] = [(self.subnet, self.attrs.public_ip),
                                                              (self.ipv6_subnet, self.attrs.public_ipv6)]
        return [(s, a) for s, a in pairs if s is not None and a is not None]

    def key(self) -> str:
        return subnet_key(self.subnet, self.ipv6_subnet)


class EventType(Enum):
    ADDED = "added"
    REMOVED = "removed"


@dataclass(frozen=True)
class Event:
    type: EventType
    lease: Lease


def subnet_key(subnet: ipaddress.IPv4Network | None, ipv6_subnet: ipaddress.IPv6Network | None = None) -> str:
    """10.5.52.0/24 -> "10.5.52.0-24"; with fd00:12:13::/56 -> "10.5.52.0-24&fd00:12:13::-56" (flannel's
    MakeSubnetKey, which writes the IPv4 part of an IPv6-only lease as "0.0.0.0-0")."""
    v4 = subnet or _NO_IPV4
    key = f"{v4.network_address}-{v4.prefixlen}"
    return f"{key}&{ipv6_subnet.network_address}-{ipv6_subnet.prefixlen}" if ipv6_subnet else key


def parse_subnet_key(key: str) -> tuple[ipaddress.IPv4Network | None, ipaddress.IPv6Network | None]:
    """The subnets a key names ("10.5.52.0-24" or "10.5.52.0-24&fc00::-64", relative to the subnets prefix; None
    for the IPv4 part "0.0.0.0-0" of an IPv6-only lease);
    BadRecord unless the whole key is in flannel's form with each subnet's own network address (no host bits, no
    leading zeros, the IPv6 address compressed as flannel writes it)."""
    m = _KEY.fullmatch(key)
    try:
        subnet = ipaddress.IPv4Network(f"{m.group(1)}/{m.group(2)}") if m else None
        subnet6 = ipaddress.IPv6Network(f"{m.group(3)}/{m.group(4)}") if m and m.group(3) else None
    except ValueError:
        subnet = subnet6 = None
    if subnet is None or subnet_key(subnet, subnet6) != key or (subnet == _NO_IPV4 and subnet6 is None):
        raise BadRecord("bad_key", "key is not a subnet in flannel's form (a.b.c.d-len, or a.b.c.d-len&ipv6-len)")
    return (None if subnet == _NO_IPV4 else subnet), subnet6


def check_subnet(subnet: Network, network: Network, subnet_len: int | None) -> None:
    """BadRecord unless subnet lies inside the network with the configured length (None: any length)."""
    if subnet.version != network.version or not subnet.subnet_of(network):  # type: ignore[arg-type]
        raise BadRecord("outside_network", f"{subnet} is not inside the network {network}")
    if subnet_len is not None and subnet.prefixlen != subnet_len:
        raise BadRecord("wrong_length", f"{subnet} is not a /{subnet_len} (the network's SubnetLen)")


def decode(key: str, value: str | bytes, cfg: NetworkConfig) -> Lease:
    """The lease a registry record holds, every part checked; BadRecord says what is wrong. Only the families the
    network has are kept: a dual-stack network takes leases of either family or both."""
    subnet, subnet6 = parse_subnet_key(key)
    subnet = subnet if cfg.ipv4 is not None else None
    subnet6 = subnet6 if cfg.ipv6 is not None else None
    if subnet is None and subnet6 is None:
        raise BadRecord("wrong_family", "the key names no subnet of the network's address families")
    for part, pool in ((subnet, cfg.ipv4), (subnet6, cfg.ipv6)):
        if part is not None and pool is not None:
            check_subnet(part, pool.network, pool.subnet_len)
    attrs = LeaseAttrs.from_json(value, ipv4=subnet is not None, ipv6=subnet6 is not None)
    return Lease(subnet, attrs, ipv6_subnet=subnet6)
