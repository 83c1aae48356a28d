"""Leases: a node's subnet and what others need to reach it, encoded byte for byte as flannel stores them.

flannel's LeaseAttrs (pkg/lease/lease.go) marshals, in Go field order, PublicIP, PublicIPv6 (no omitempty, so
null when unset), then BackendType, BackendData and BackendV6Data, each omitted when empty; Go's encoder writes
no spaces and compacts embedded raw JSON. The udp backend sets only PublicIP.

Whatever a registry holds was written by anyone with access to it, so decode() checks every part before a record
can become a route: the whole key in flannel's form naming a network address with no host bits, inside the
Network with the configured SubnetLen, a bounded JSON object, a unicast IPv4 PublicIP.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pyflannel.daemon import safejson

SUBNET_TTL = 24 * 3600  # seconds; flannel's subnetTTL
MAX_VALUE = 16 * 1024  # bytes; flannel's own lease values are under 300
MAX_DEPTH = 8
# flannel's subnetRegex, but for the whole key: "<a.b.c.d>-<len>" with an optional "&<ipv6>-<len>".
_KEY = re.compile(r"(\d{1,3}(?:\.\d{1,3}){3})-(\d{1,2})(?:&([0-9a-f:]{2,39})-(\d{1,3}))?")


class BadRecord(ValueError):
    """A registry record that must not become a route. `reason` is a short label for the metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class LeaseAttrs:
    public_ip: ipaddress.IPv4Address
    backend_type: str = ""
    backend_data: Any = None  # decoded JSON, or None

    def to_json(self) -> str:
        out: dict[str, Any] = {"PublicIP": str(self.public_ip), "PublicIPv6": None}
        if self.backend_type:
            out["BackendType"] = self.backend_type
        if self.backend_data is not None:
            out["BackendData"] = self.backend_data
        return json.dumps(out, separators=(",", ":"))

    @classmethod
    def from_json(cls, value: str | bytes) -> LeaseAttrs:
        """BadRecord unless the value is a bounded JSON object with a unicast IPv4 PublicIP."""
        try:
            raw = safejson.loads(value, max_bytes=MAX_VALUE, max_depth=MAX_DEPTH)
        except ValueError as exc:
            reason = "oversize" if len(value) > MAX_VALUE else "bad_value"
            raise BadRecord(reason, f"value is {exc}") from None
        if not isinstance(raw, dict):
            raise BadRecord("bad_value", "value is not a JSON object")
        return cls.checked(raw.get("PublicIP"), raw.get("BackendType"), raw.get("BackendData"))

    @classmethod
    def checked(cls, public_ip: Any, backend_type: Any, backend_data: Any) -> LeaseAttrs:
        """BadRecord unless public_ip is a unicast IPv4 address and backend_type a string (or absent)."""
        try:
            ip = ipaddress.IPv4Address(public_ip) if isinstance(public_ip, str) else None
        except ValueError:
            ip = None
        if ip is None or ip in _NOT_UNICAST or ip.is_multicast or ip.is_loopback or ip.is_reserved:
            raise BadRecord("bad_public_ip", f"PublicIP {str(public_ip)[:50]!r} is not a unicast IPv4 address")
        if not isinstance(backend_type or "", str):
            raise BadRecord("bad_value", "BackendType is not a string")
        return cls(public_ip=ip, backend_type=backend_type or "", backend_data=backend_data)


_NOT_UNICAST = ipaddress.IPv4Network("0.0.0.0/8")


@dataclass(frozen=True)
class Lease:
    subnet: ipaddress.IPv4Network
    attrs: LeaseAttrs
    expiration: float = 0.0  # unix time; 0 for unknown


class EventType(Enum):
    ADDED = "added"
    REMOVED = "removed"


@dataclass(frozen=True)
class Event:
    type: EventType
    lease: Lease


def subnet_key(subnet: ipaddress.IPv4Network) -> str:
    """10.5.52.0/24 -> "10.5.52.0-24" (flannel's MakeSubnetKey)."""
    return f"{subnet.network_address}-{subnet.prefixlen}"


def parse_subnet_key(key: str) -> ipaddress.IPv4Network:
    """The subnet a key names ("10.5.52.0-24", relative to the subnets prefix); BadRecord unless the whole key is
    in flannel's form with the subnet's own network address (no host bits, no leading zeros)."""
    m = _KEY.fullmatch(key)
    try:
        subnet = ipaddress.IPv4Network(f"{m.group(1)}/{m.group(2)}") if m else None
    except ValueError:
        subnet = None
    if subnet is None or subnet_key(subnet) != key.split("&")[0]:
        raise BadRecord("bad_key", "key is not a subnet in flannel's form (a.b.c.d-len)")
    return subnet


def check_subnet(subnet: ipaddress.IPv4Network, network: ipaddress.IPv4Network, subnet_len: int | None) -> None:
    """BadRecord unless subnet lies inside the network with the configured length (None: any length)."""
    if not subnet.subnet_of(network):
        raise BadRecord("outside_network", f"{subnet} is not inside the network {network}")
    if subnet_len is not None and subnet.prefixlen != subnet_len:
        raise BadRecord("wrong_length", f"{subnet} is not a /{subnet_len} (the network's SubnetLen)")


def decode(key: str, value: str | bytes, network: ipaddress.IPv4Network, subnet_len: int) -> Lease:
    """The lease a registry record holds, every part checked; BadRecord says what is wrong."""
    subnet = parse_subnet_key(key)
    check_subnet(subnet, network, subnet_len)
    return Lease(subnet, LeaseAttrs.from_json(value))
