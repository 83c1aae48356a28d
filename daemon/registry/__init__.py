"""Registries: where the network config and the leases live (flannel's pkg/subnet Registry, storage only).

A registry stores and watches; it makes no allocation decisions (daemon.subnets does, over any registry).
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from typing import Protocol

from daemon.lease import Event, Lease, LeaseAttrs


class LeaseExists(Exception):
    """Another node holds the subnet (a lost allocation race)."""


class Compacted(Exception):
    """The watch fell behind what the registry still remembers: list again."""


class Unavailable(Exception):
    """The registry cannot be reached right now."""


class ConfigMissing(Unavailable):
    """No network config stored yet: like flannel, wait for an operator to write it rather than exit."""


class Registry(Protocol):
    async def get_config(self) -> str:
        """The network config JSON text."""

    async def list_leases(self) -> tuple[list[Lease], int]:
        """Every lease, and the revision they were read at (watch from revision + 1)."""

    async def create_lease(self, subnet: ipaddress.IPv4Network, attrs: LeaseAttrs, ttl: int) -> float:
        """Create only if absent; the expiration; LeaseExists if another node has it."""

    async def update_lease(self, subnet: ipaddress.IPv4Network, attrs: LeaseAttrs, ttl: int) -> float:
        """Create or overwrite with a fresh TTL; the expiration."""

    async def delete_lease(self, subnet: ipaddress.IPv4Network) -> None: ...

    def watch(self, revision: int) -> AsyncIterator[list[Event]]:
        """Changes after `revision`, in batches; raises Compacted or Unavailable."""

    async def close(self) -> None: ...
