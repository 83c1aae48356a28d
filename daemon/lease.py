"""Leases: a node's subnet and what others need to reach it, encoded byte for byte as flannel stores them.

flannel's LeaseAttrs (pkg/lease/lease.go) marshals, in Go field order, PublicIP, PublicIPv6 (no omitempty, so
null when unset), then BackendType, BackendData and BackendV6Data, each omitted when empty; Go's encoder writes
no spaces and compacts embedded raw JSON. The udp backend sets only PublicIP.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

SUBNET_TTL = 24 * 3600  # seconds; flannel's subnetTTL
# Anchored at the end only, as flannel's subnetRegex: "<a.b.c.d>-<len>" with an optional "&<ipv6>-<len>".
_KEY = re.compile(r"(\d+\.\d+\.\d+\.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?$")


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
    def from_json(cls, text: str | bytes) -> LeaseAttrs:
        """ValueError for anything flannel would skip as a "bad subnet node"."""
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("lease value is not a JSON object")
        return cls(public_ip=ipaddress.IPv4Address(raw.get("PublicIP", "0.0.0.0")),
                   backend_type=str(raw.get("BackendType") or ""), backend_data=raw.get("BackendData"))


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


def parse_subnet_key(key: str) -> ipaddress.IPv4Network | None:
    """The subnet in a registry key, or None for keys flannel would skip."""
    m = _KEY.search(key)
    if not m:
        return None
    try:
        return ipaddress.IPv4Network(f"{m.group(1)}/{m.group(2)}", strict=False)
    except ValueError:
        return None


def lease_from_record(key: str, value: str | bytes, expires: float = 0.0) -> Lease | None:
    """The lease a registry record holds, or None for a key or value flannel would skip."""
    subnet = parse_subnet_key(key)
    if subnet is None:
        return None
    try:
        return Lease(subnet, LeaseAttrs.from_json(value), expires)
    except (ValueError, UnicodeDecodeError):
        return None


def event_from_record(key: str, value: str | bytes | None) -> Event | None:
    """A registry change as an event: a value is Added, None (deleted or expired) is Removed. A Removed event
    carries only the subnet; watchers fill in the attributes they last saw (see diff)."""
    if value is None:
        subnet = parse_subnet_key(key)
        return None if subnet is None else Event(EventType.REMOVED, Lease(subnet, LeaseAttrs(ipaddress.IPv4Address(0))))
    lease = lease_from_record(key, value)
    return None if lease is None else Event(EventType.ADDED, lease)


def diff(known: dict[ipaddress.IPv4Network, Lease], snapshot: list[Lease]) -> list[Event]:
    """Events that turn `known` into `snapshot` (flannel's LeaseWatcher.Reset), updating `known` in place.

    Removed events carry the attributes last seen, so backends can still find the MAC and public IP to remove.
    """
    events = []
    current = {lease.subnet: lease for lease in snapshot}
    for subnet, lease in list(known.items()):
        if subnet not in current:
            events.append(Event(EventType.REMOVED, lease))
            del known[subnet]
    for subnet, lease in current.items():
        if known.get(subnet) is None or known[subnet].attrs != lease.attrs:
            events.append(Event(EventType.ADDED, lease))
        known[subnet] = lease
    return events
