"""Keeper: keeps the udp dataplane forwarding through the host's ordinary events.

An administrator (or a script) can `ip link del flannel0`, set it down (which makes the kernel drop the network
route), delete its address or route, and an engine thread can die. None of this stops the process that owns the
Pump, so something has to notice and put things back: the owner calls `check()` about once a second (from a
thread or an executor: it blocks on netlink, and on retries while it recreates the device).

The keeper holds the desired routes itself, so a recreated device gets all of them back, and route changes made
while the device is being recreated are not lost. It knows nothing about flags or registries: flannel-tunnel and
flanneld's udp backend both drive it. All methods are thread-safe.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pyflannel.dataplane.errors import DataplaneError
from pyflannel.dataplane.offload import Offloads
from pyflannel.dataplane.pump import DEFAULT_BATCH, DEFAULT_PORT, Pump, open_pump
from pyflannel.dataplane.tun import ensure_configured, present

log = logging.getLogger(__name__)

Routes = Mapping[str, tuple[str, int]]
"""Overlay subnet (CIDR text, IPv4 or IPv6) -> (peer underlay address, IPv4 or IPv6, UDP port)."""


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

    def open(self) -> Pump:
        return open_pump(iface_ip=self.iface_ip, port=self.port, tun_name=self.tun_name, subnet=self.subnet,
                         network=self.network, mtu=self.mtu, wanted=self.wanted, batch=self.batch,
                         check_source=self.check_source, queues=self.queues, iface_ip6=self.iface_ip6,
                         subnet6=self.subnet6, network6=self.network6)


def _key(subnet: str) -> str:
    """One spelling per subnet (host bits masked, as the prefix table does), so diffs compare like with like."""
    return str(ipaddress.ip_network(subnet, strict=False))


def _engine_problem(pump: Pump) -> str | None:
    """What stops the engine forwarding: a thread that died on its own (Pump.failure) or one stopped."""
    return pump.failure() or (None if pump.alive() else "engine not running")


class Keeper:
    """Owns a Pump and the routes it should carry; `check()` repairs or recreates the device."""

    def __init__(self, spec: PumpSpec, *, attempts: int = 5, backoff: float = 0.2) -> None:
        """A failed recreate is retried `attempts` times, waiting backoff, 2*backoff, 4*backoff, ... between."""
        self.spec = spec
        self.attempts = attempts
        self.backoff = backoff
        self._routes: dict[str, tuple[str, int]] = {}
        self._pump: Pump | None = None
        self._index = 0
        self._failure: str | None = None
        self._lock = threading.Lock()

    # ---- life --------------------------------------------------------------------------------------------

    def start(self, routes: Routes | None = None) -> Pump:
        """Open the pump with `routes` and start forwarding; DataplaneError (nothing left open) if the host
        refuses. The device's real name (flannel%d is named by the kernel) is kept for recreating it."""
        with self._lock:
            self._routes = {_key(subnet): hop for subnet, hop in (routes or {}).items()}
            pump = self._open()
            self.spec = replace(self.spec, tun_name=pump.tun.name)
            self._failure = None
            return pump

    def close(self) -> None:
        """Stop the engine and remove the device; the keeper can be started again."""
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
        """The engine's counters, or None while there is no engine (a lost flannel0 not yet replaced); they
        start again from zero when the device is recreated."""
        with self._lock:
            return None if self._pump is None else self._pump.stats()

    # ---- routes ------------------------------------------------------------------------------------------

    @property
    def routes(self) -> dict[str, tuple[str, int]]:
        with self._lock:
            return dict(self._routes)

    def set_route(self, subnet: str, peer: str, port: int = DEFAULT_PORT) -> None:
        """Send traffic for subnet to peer:port (add or replace), now and after any recreate."""
        self.update(set={subnet: (peer, port)})

    def del_route(self, subnet: str) -> None:
        """Forget the route for exactly this subnet; KeyError if there is none."""
        with self._lock:
            if _key(subnet) not in self._routes:
                raise KeyError(subnet)
            self._apply({}, [_key(subnet)])

    def update(self, set: Routes | None = None, delete: Iterable[str] = ()) -> tuple[int, int]:
        """Add or replace the `set` routes and forget the `delete` subnets (those present), all in one table
        update (one batch of lease events). Returns (routes added or changed, routes removed)."""
        wanted = {_key(subnet): hop for subnet, hop in (set or {}).items()}
        with self._lock:
            gone = [key for key in dict.fromkeys(map(_key, delete)) if key in self._routes and key not in wanted]
            return self._apply({k: hop for k, hop in wanted.items() if self._routes.get(k) != hop}, gone)

    def replace_routes(self, routes: Routes) -> tuple[int, int]:
        """Make `routes` the whole route set, touching only what differs: a peer whose route is unchanged keeps
        forwarding without a gap. Returns (routes added or changed, routes removed)."""
        wanted = {_key(subnet): hop for subnet, hop in routes.items()}
        with self._lock:
            changed = {subnet: hop for subnet, hop in wanted.items() if self._routes.get(subnet) != hop}
            return self._apply(changed, [subnet for subnet in self._routes if subnet not in wanted])

    def _apply(self, changed: dict[str, tuple[str, int]], gone: list[str]) -> tuple[int, int]:
        """Record the changes and hand them to the pump as one table update; caller holds the lock."""
        for subnet in gone:
            del self._routes[subnet]
        self._routes.update(changed)
        if self._pump is not None and (changed or gone):
            self._pump.update_routes(set=[(subnet, peer, port) for subnet, (peer, port) in changed.items()],
                                     delete=gone)
        return len(changed), len(gone)

    # ---- repair ------------------------------------------------------------------------------------------

    def check(self) -> None:
        """Find what is wrong with the device or the engine and put it right, logging one line per repair.

        A deleted device or a dead engine means a new pump (same name, address, MTU, network route and all
        routes); a device set down, or missing its address or route, is brought back as it is. Raises
        DataplaneError (also kept as `failure`) when it cannot put things right, for example when the recreate
        failed after every retry or another device took the network's route; the next check() tries again."""
        with self._lock:
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
            log.warning("%s; recreated it with %d routes", reason, len(self._routes))
            return
        raise DataplaneError(f"{reason}; could not recreate it ({self.attempts} attempts): {error}")

    def _open(self) -> Pump:
        """A started pump carrying every desired route; caller holds the lock."""
        pump = self.spec.open()
        try:
            pump.routes.update((subnet, peer, port) for subnet, (peer, port) in self._routes.items())
            with IPRoute() as ipr:
                self._index = ipr.link_lookup(ifname=pump.tun.name)[0]
            pump.start()
        except BaseException:
            pump.close()
            raise
        self._pump = pump
        return pump
