"""Registries: where the network config and the leases live (flannel's pkg/subnet Registry, storage only).

A registry stores and watches raw records; it makes no allocation decisions and trusts no value (daemon.subnets
decodes and checks every record, over any registry). Writes are conditional on the revision the writer last saw,
so a node never overwrites a lease it does not hold.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Record:
    """One stored lease as the registry holds it: key relative to the subnets prefix ("10.244.3.0-24"), the raw
    value (None once deleted or expired), and the revision that last changed it."""

    key: str
    value: bytes | None
    revision: int = 0
    expires: float = 0.0  # unix time; 0 for unknown
    oversize: int = 0  # the value's size when it was left out (value None) for exceeding daemon.lease.MAX_VALUE


class LeaseExists(Exception):
    """Another node holds the subnet (a lost allocation race)."""


class LeaseChanged(Exception):
    """A conditional write found the record changed since `revision`: `current` is what is there now (None if
    it is gone)."""

    def __init__(self, current: Record | None) -> None:
        super().__init__("the lease changed under us")
        self.current = current


class Compacted(Exception):
    """The watch fell behind what the registry still remembers: list again."""


class Unavailable(Exception):
    """The registry cannot be reached right now (or is damaged); retried with backoff."""


class ConfigMissing(Unavailable):
    """No network config stored (not written yet, or lost with the data): wait for an operator to write it."""


class Registry(Protocol):
    async def get_config(self) -> str:
        """The network config JSON text."""

    async def list_records(self) -> tuple[list[Record], int]:
        """Every lease record and the revision they were read at (watch from revision + 1). Values larger than
        daemon.lease.MAX_VALUE are not fetched whole (see Record.oversize)."""

    async def create(self, key: str, value: bytes, ttl: int) -> Record:
        """Store only if absent; LeaseExists if another node has the key."""

    async def replace(self, key: str, value: bytes, ttl: int, revision: int) -> Record:
        """Store with a fresh TTL only if the record is still at `revision`; LeaseChanged otherwise."""

    async def delete(self, key: str, revision: int) -> None:
        """Delete only if still at `revision`; LeaseChanged otherwise."""

    def watch(self, revision: int) -> AsyncIterator[list[Record]]:
        """Changes after `revision`, in batches; raises Compacted or Unavailable."""

    async def close(self) -> None: ...
