"""Keeper: keeps the udp dataplane forwarding through the host's ordinary events, and its routes right.

An administrator (or a script) can `ip link del flannel0`, set it down (which makes the kernel drop the network
route), delete its address or route, and an engine thread can die. None of this stops the process that owns the
Pump, so something has to notice and put things back: the owner calls `check()` about once a second (from a
thread or an executor: it blocks on netlink, and on retries while it recreates the device).

Routes live in one place: the keeper's PrefixTable, which every pump it opens reads, so a recreated engine
routes as the old one did with nothing copied back. A change is applied to that table first and counts as made
only when it took: a route the table refuses (no free peer slot, a peer of a family with no underlay) is logged
once, counted, kept as unrouted and tried again at every check() until it takes (`unrouted`, for readiness). It
knows nothing about flags or registries: flannel-tunnel and flanneld's udp backend both drive it. All methods
are thread-safe.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pyflannel.dataplane._engine import PrefixTable
from pyflannel.dataplane.errors import DataplaneError
from pyflannel.dataplane.offload import Offloads
from pyflannel.dataplane.pump import DEFAULT_BATCH, DEFAULT_PORT, Pump, open_pump, underlay_problem
from pyflannel.dataplane.tun import ensure_configured, present

log = logging.getLogger(__name__)

Hop = tuple[str, int]
"""A peer's underlay address (IPv4 or IPv6) and UDP port."""
Routes = Mapping[str, Hop]
"""Overlay subnet (CIDR text, IPv4 or IPv6) -> its peer."""
Changes = Mapping[str, Hop | None]
"""Overlay subnet -> its new peer, or None: no route any more."""


@dataclass(frozen=True)
class PumpSpec:
    """The arguments of dataplane.pump.open_pump, kept so that the same pump can be opened again."""

    iface_ip: ipaddress.IPv4Address | None
    port: int
    tun_name: str
    subnet: ipaddress.IPv4Network | None
    network: ipaddress.IPv4Network | None
    mtu: int
    wanted: Offloads
    batch: int = DEFAULT_BATCH
    check_source: bool = True
    queues: int = 1
    iface_ip6: ipaddress.IPv6Address | None = None
    subnet6: ipaddress.IPv6Network | None = None
    network6: ipaddress.IPv6Network | None = None

    def open(self, table: PrefixTable | None = None) -> Pump:
        return open_pump(iface_ip=self.iface_ip, port=self.port, tun_name=self.tun_name, subnet=self.subnet,
                         network=self.network, mtu=self.mtu, wanted=self.wanted, batch=self.batch,
                         check_source=self.check_source, queues=self.queues, iface_ip6=self.iface_ip6,
                         subnet6=self.subnet6, network6=self.network6, table=table)


def _key(subnet: str) -> str:
    """One spelling per subnet (host bits masked, as the prefix table does), so diffs compare like with like."""
    return str(ipaddress.ip_network(subnet, strict=False))


def _engine_problem(pump: Pump) -> str | None:
    """What stops the engine forwarding: a thread that died on its own (Pump.failure) or one stopped."""
    return pump.failure() or (None if pump.alive() else "engine not running")


class Keeper:
    """Owns a Pump and the routes it carries; `check()` repairs or recreates the device and retries refused
    routes."""

    def __init__(self, spec: PumpSpec, *, attempts: int = 5, backoff: float = 0.2) -> None:
        """A failed recreate is retried `attempts` times, waiting backoff, 2*backoff, 4*backoff, ... between."""
        self.spec = spec
        self.attempts = attempts
        self.backoff = backoff
        self.table = PrefixTable()  # the routes in place, read by every pump this keeper opens
        self._unrouted: dict[str, tuple[Hop | None, str]] = {}  # changes refused so far: the wanted peer, why
        self._refusals = 0  # refused changes, each counted once (not once per retry)
        self._pump: Pump | None = None
        self._index = 0
        self._failure: str | None = None
        self._lock = threading.Lock()

    # ---- life --------------------------------------------------------------------------------------------

    def start(self, routes: Routes | None = None) -> Pump:
        """Make `routes` the route set, open the pump and start forwarding; DataplaneError (nothing left open) if
        the host refuses. The device's real name (flannel%d is named by the kernel) is kept for recreating it."""
        with self._lock:
            self._replace(routes or {})
            pump = self._open()
            self.spec = replace(self.spec, tun_name=pump.tun.name)
            self._failure = None
            return pump

    def close(self) -> None:
        """Stop the engine and remove the device; the keeper (and its routes) can be started again."""
        with self._lock:
            if self._pump is not None:
                self._pump.close()
                self._pump = None

    @property
    def pump(self) -> Pump:
        """The current pump (a new object after each recreate); DataplaneError if there is none."""
        if self._pump is None:
            raise DataplaneError(self._failure or "the dataplane is not started")
        return self._pump

    @property
    def failure(self) -> str | None:
        """Why the dataplane is not forwarding right now (for health reporting), or None."""
        pump = self._pump
        if self._failure is not None or pump is None:
            return self._failure or "the dataplane is not started"
        return _engine_problem(pump)

    def stats(self) -> dict[str, Any] | None:
        """The engine's counters, with the state of the routes under "routes"; None while there is no engine (a
        lost flannel0 not yet replaced). The engine's own counters start again from zero when the device is
        recreated; the per-peer ones belong to the routes and go on."""
        with self._lock:
            if self._pump is None:
                return None
            return self._pump.stats() | {"routes": {"routed": len(self.table), "unrouted": len(self._unrouted),
                                                    "refused": self._refusals}}

    # ---- routes ------------------------------------------------------------------------------------------

    @property
    def routes(self) -> dict[str, Hop]:
        """The routes wanted: those in place and those refused so far."""
        with self._lock:
            return {subnet: hop for subnet in self._subnets() if (hop := self._wanted(subnet)) is not None}

    @property
    def unrouted(self) -> dict[str, str]:
        """The subnets whose wanted route is not in place (refused so far, retried at every check), and why."""
        with self._lock:
            return {subnet: why for subnet, (_, why) in self._unrouted.items()}

    def set_route(self, subnet: str, peer: str, port: int = DEFAULT_PORT) -> None:
        """Send traffic for subnet to peer:port (add or replace), now and after any recreate."""
        self.update({subnet: (peer, port)})

    def del_route(self, subnet: str) -> None:
        """Forget the route for exactly this subnet; KeyError if there is none."""
        with self._lock:
            if self._wanted(_key(subnet)) is None:
                raise KeyError(subnet)
            self._change({_key(subnet): None})

    def update(self, changes: Changes) -> tuple[int, int]:
        """Apply one batch of changes ({subnet: peer, or None to remove its route}) as one table update.
        Returns (routes added or changed, routes removed); a refused route is not among them (see `unrouted`)."""
        wanted = {_key(subnet): hop for subnet, hop in changes.items()}
        with self._lock:
            return self._change(wanted)

    def replace_routes(self, routes: Routes) -> tuple[int, int]:
        """Make `routes` the whole route set, touching only what differs: a peer whose route is unchanged keeps
        forwarding without a gap. Returns (routes added or changed, routes removed)."""
        with self._lock:
            return self._replace(routes)

    def _replace(self, routes: Routes) -> tuple[int, int]:
        wanted = {_key(subnet): hop for subnet, hop in routes.items()}
        return self._change({subnet: wanted.get(subnet) for subnet in {*self._subnets(), *wanted}})

    def _subnets(self) -> set[str]:
        """Every subnet with a route in place or wanted; caller holds the lock."""
        return {subnet for subnet, _, _ in self.table} | set(self._unrouted)

    def _wanted(self, subnet: str) -> Hop | None:
        """The route wanted for subnet (a refused one, else the one in place); caller holds the lock."""
        if subnet in self._unrouted:
            return self._unrouted[subnet][0]
        return self.table.route(subnet)

    def _change(self, changes: dict[str, Hop | None]) -> tuple[int, int]:
        """Apply what differs from what is wanted already (a refused route is always tried again)."""
        return self._apply({subnet: hop for subnet, hop in changes.items()
                            if subnet in self._unrouted or self._wanted(subnet) != hop})

    def _apply(self, changes: dict[str, Hop | None]) -> tuple[int, int]:
        """Hand the changes to the table as one update, then record what it refused; caller holds the lock. A
        route that cannot be had leaves its subnet unrouted: the old peer may no longer hold it."""
        sets: dict[str, Hop] = {}
        refused: dict[str, str] = {}
        for subnet, hop in changes.items():
            problem = None if hop is None else self._underlay_problem(hop)
            if problem is not None:
                refused[subnet] = problem
            elif hop is not None:
                sets[subnet] = hop
        deletes = [subnet for subnet, hop in changes.items() if subnet not in sets and subnet in self.table]
        replaced = [subnet for subnet in sets if subnet in self.table]
        try:
            taken = self.table.update(set=[(subnet, peer, port) for subnet, (peer, port) in sets.items()],
                                      delete=deletes)
        except MemoryError:
            refused, deletes, taken = dict.fromkeys(changes, "out of memory"), [], {}
        refused |= taken
        deletes += [subnet for subnet in replaced if subnet in taken]   # the table dropped their old routes
        for subnet, hop in changes.items():
            if subnet in refused:
                self._refuse(subnet, hop, refused[subnet])
            elif (before := self._unrouted.pop(subnet, None)) is not None and hop is not None:
                log.info("route %s -> %s:%d in place (refused before: %s)", subnet, *hop, before[1])
        return len([subnet for subnet in sets if subnet not in refused]), len(deletes)

    def _underlay_problem(self, hop: Hop) -> str | None:
        if not 0 < hop[1] < 65536:
            return f"port {hop[1]} out of range 1-65535"
        return underlay_problem(hop[0], ipv4=self.spec.iface_ip is not None, ipv6=self.spec.iface_ip6 is not None)

    def _refuse(self, subnet: str, hop: Hop | None, why: str) -> None:
        """Keep a refused change for the next check; one log line and one count per refusal, not per retry."""
        if self._unrouted.get(subnet) != (hop, why):
            self._refusals += 1
            what = f"removing the route for {subnet}" if hop is None else f"route {subnet} -> {hop[0]}:{hop[1]}"
            log.warning("%s refused: %s; trying again every check", what, why)
        self._unrouted[subnet] = (hop, why)

    # ---- repair ------------------------------------------------------------------------------------------

    def check(self) -> None:
        """Try the refused routes again; find what is wrong with the device or the engine and put it right,
        logging one line per repair.

        A deleted device or a dead engine means a new pump (same name, address, MTU, network route and all
        routes); a device set down, or missing its address or route, is brought back as it is. Raises
        DataplaneError (also kept as `failure`) when it cannot put things right, for example when the recreate
        failed after every retry or another device took the network's route; the next check() tries again."""
        with self._lock:
            if self._unrouted:
                self._apply({subnet: hop for subnet, (hop, _) in self._unrouted.items()})
            try:
                self._check(self.spec.tun_name)
            except DataplaneError as exc:
                self._failure = str(exc)
                raise
            self._failure = None

    def _check(self, name: str) -> None:
        """The device first: a deleted one also stops an engine that notices, and the log should say why."""
        if self._pump is None:
            self._recreate(f"{name} is still missing")
            return
        try:
            with IPRoute() as ipr:
                if ipr.link_lookup(ifname=name) != [self._index]:
                    reason = f"{name} was deleted"
                elif (problem := _engine_problem(self._pump)) is not None:
                    reason = f"{name}'s engine stopped ({problem})"
                else:
                    self._repair(ipr, name)
                    return
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:  # anything but a device deleted while we looked at it
                raise DataplaneError(f"{name}: cannot check it: {exc}") from None
            reason = f"{name} was deleted"
        self._recreate(reason)

    def _repair(self, ipr: IPRoute, name: str) -> None:
        spec = self.spec
        fixed = ensure_configured(ipr, self._index, subnets=present(spec.subnet, spec.subnet6),
                                  networks=present(spec.network, spec.network6))
        if fixed:
            log.warning("%s: %s", name, ", ".join(fixed))

    def _recreate(self, reason: str) -> None:
        """Replace the pump, retrying with exponential backoff; caller holds the lock."""
        if self._pump is not None:
            try:
                self._pump.close()
            except DataplaneError as exc:  # a thread that would not stop may still read the table: no new pump
                raise DataplaneError(f"{reason}; {exc}") from None
            except Exception as exc:  # the dead engine's error: already part of `reason`
                log.debug("closing the old pump: %s", exc)
            self._pump = None
        error = DataplaneError("no attempt made")
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                self._open()
            except DataplaneError as exc:
                error = exc
                continue
            log.warning("%s; recreated it with %d routes", reason, len(self.table))
            return
        raise DataplaneError(f"{reason}; could not recreate it ({self.attempts} attempts): {error}")

    def _open(self) -> Pump:
        """A started pump reading the keeper's routes; caller holds the lock."""
        pump = self.spec.open(self.table)
        try:
            with IPRoute() as ipr:
                self._index = ipr.link_lookup(ifname=pump.tun.name)[0]
            pump.start()
        except BaseException:
            pump.close()
            raise
        self._pump = pump
        return pump
