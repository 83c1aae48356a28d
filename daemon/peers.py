"""Other nodes' leases, from any source (registry records or Kubernetes Nodes), turned into backend events.

One loop serves every source: list, diff against what is routed, watch; after any failure (source unreachable,
watch compacted) back off, list again and diff, so no change is missed; and list again every RESYNC seconds in
any case, so that a watch that went quiet without failing costs at most that long.

PeerTable is what is routed. Only validated leases get there: a record that fails to decode (daemon.lease
BadRecord) is logged once per key and reason, counted by reason, and changes nothing (a garbled value for a
routed key keeps the route it had). A lease that overlaps a subnet already routed, this node's own included, is
refused while the first holder has it, and routed once that holder is gone.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from pyflannel.daemon.lease import BadRecord, Event, EventType, Lease
from pyflannel.daemon.outage import Outage
from pyflannel.daemon.registry import Compacted, Unavailable

log = logging.getLogger(__name__)
BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0
RESYNC = 300.0


@dataclass(frozen=True)
class Entry:
    """One source record, decoded: the lease, or why it cannot be one; and the revision that wrote it."""

    lease: Lease | BadRecord
    revision: int = 0


Changes = list[tuple[str, Entry | None]]  # by key; None: the record is gone


class Source(Protocol):
    own_key: str  # this node's own record, which the table never routes

    async def snapshot(self) -> tuple[dict[str, Entry], Any]:
        """Every record by key, and a cursor to watch from; Unavailable when the source cannot be read."""

    def changes(self, cursor: Any) -> AsyncGenerator[Changes, None]:
        """Later changes; raises Unavailable or Compacted when the watch must be listed again."""

    async def observe_own(self, entry: Entry | None) -> None:
        """This node's own record as the source shows it (None: gone); may repair it or end the daemon."""


class PeerTable:
    def __init__(self, own: Lease) -> None:
        self.own = own.subnet
        self.wanted: dict[str, Lease] = {}  # every valid lease by key, in arrival order
        self.routed: dict[str, Lease] = {}  # the ones installed in the backend
        self.rejected: Counter[str] = Counter()  # by BadRecord reason, and "overlap"
        self._warned: dict[str, str] = {}
        self._by_subnet: dict[ipaddress.IPv4Network, str] = {}  # routed subnet -> key, for the overlap check
        self._lengths: Counter[int] = Counter()  # prefix lengths among the routed subnets

    def reset(self, snapshot: dict[str, Entry]) -> list[Event]:
        """Events that bring the table to exactly this snapshot."""
        gone: Changes = [(key, None) for key in self.wanted if key not in snapshot]
        return self.apply(gone + list(snapshot.items()))

    def apply(self, changes: Changes) -> list[Event]:
        events: list[Event] = []
        for key, entry in changes:
            if entry is None:
                self._warned.pop(key, None)
                events += self._drop(key)
            elif isinstance(entry.lease, BadRecord):
                self._reject(key, entry.lease.reason, str(entry.lease))
            else:
                events += self._set(key, entry.lease)
        return events

    def _set(self, key: str, lease: Lease) -> list[Event]:
        self._warned.pop(key, None)
        if self.wanted.get(key) == lease:
            return []
        events = self._drop(key) if key in self.routed and self.routed[key].subnet != lease.subnet else []
        self.wanted[key] = lease
        return events + self._route(key, lease)

    def _route(self, key: str, lease: Lease) -> list[Event]:
        holder = self._holder(lease.subnet, key)
        if holder is not None:
            self._reject(key, "overlap", f"{lease.subnet} overlaps {holder}, which holds it first")
            return []
        self.routed[key] = lease
        self._by_subnet[lease.subnet] = key
        self._lengths[lease.subnet.prefixlen] += 1
        return [Event(EventType.ADDED, lease)]

    def _drop(self, key: str) -> list[Event]:
        self.wanted.pop(key, None)
        lease = self.routed.pop(key, None)
        if lease is None:
            return []
        del self._by_subnet[lease.subnet]
        self._lengths[lease.subnet.prefixlen] -= 1
        events = [Event(EventType.REMOVED, lease)]
        for other, waiting in list(self.wanted.items()):  # refused for overlapping this one: their turn now
            if other not in self.routed and waiting.subnet.overlaps(lease.subnet):
                events += self._route(other, waiting)
        return events

    def _holder(self, subnet: ipaddress.IPv4Network, key: str) -> str | None:
        if subnet.overlaps(self.own):
            return f"this node's own subnet {self.own}"
        for length in +self._lengths:
            if length <= subnet.prefixlen:  # a routed subnet that contains this one: one lookup
                other = self._by_subnet.get(subnet.supernet(new_prefix=length))
                if other is not None and other != key:
                    return f"{self.routed[other].subnet} (record {other!r})"
            else:  # routed subnets inside this larger one (only with mixed lengths, as podCIDRs may have)
                for other, lease in self.routed.items():
                    if other != key and lease.subnet.prefixlen == length and lease.subnet.subnet_of(subnet):
                        return f"{lease.subnet} (record {other!r})"
        return None

    def _reject(self, key: str, reason: str, why: str) -> None:
        if self._warned.get(key) != why:
            self._warned[key] = why
            self.rejected[reason] += 1
            log.warning("ignoring lease record %r: %s", key[:100], why)


async def follow(source: Source, table: PeerTable, outage: Outage) -> AsyncGenerator[list[Event], None]:
    """Backend events for the other nodes' leases, forever."""
    backoff = BACKOFF_MIN
    while True:
        try:
            snapshot, cursor = await source.snapshot()
            outage.ok()
            await source.observe_own(snapshot.pop(source.own_key, None))
            if events := table.reset(snapshot):
                yield events
            backoff = BACKOFF_MIN
            async for changes in _until_resync(source.changes(cursor)):
                for key, entry in changes:
                    if key == source.own_key:
                        await source.observe_own(entry)
                if events := table.apply([(key, entry) for key, entry in changes if key != source.own_key]):
                    yield events
        except (Unavailable, Compacted) as exc:
            outage.failed(str(exc) or type(exc).__name__)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)


async def _until_resync(changes: AsyncGenerator[Changes, None]) -> AsyncIterator[Changes]:
    """The changes until RESYNC seconds have passed (the timeout covers only the wait for the source, never
    the consumer's work on what was yielded)."""
    deadline = asyncio.get_running_loop().time() + RESYNC
    try:
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    batch = await anext(changes)
            except (TimeoutError, StopAsyncIteration):
                return
            yield batch
    finally:
        await changes.aclose()
