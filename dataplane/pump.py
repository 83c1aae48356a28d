"""Pump: owns the packet engines and their threads, and is the control side's handle on the routes.

One engine per queue, one thread per engine: the thread serves both directions of the engine's buckets, each
bucket one of flannel0's TUN queues and its UDP sockets (one per underlay family). The kernel keeps each flow in
one bucket both ways (dataplane.tun, dataplane.udp), so the engines never share a flow, and within an engine a
flow's bulk data never queues ahead of another flow's packets. The engines need nothing from each other but the
prefix table (each reading it through its own reader slots) and the ICMP rate limit.

Dual stack: the overlay may have an IPv4 subnet, an IPv6 one (subnet6/network6), or both, and the underlay an
IPv4 socket, an IPv6 one, or both, per bucket; routes of either family may lead to peers of either family (the
wire format stays flannel's: the raw inner packet is the UDP payload, whatever the families).

The engine threads are started as Python threads only to have something to join; each one immediately enters
the C loop with the GIL released and stays there until stop(), or until a TUN queue or socket is gone: then it
returns on its own and failure() says why (a dead fd never makes a thread spin).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import threading
from collections.abc import Iterable
from typing import Any

from pyroute2 import IPRoute

from pyflannel.dataplane._engine import COUNTERS, MAX_QUEUES, Engine, PrefixTable
from pyflannel.dataplane.errors import DataplaneError
from pyflannel.dataplane.offload import Offloads
from pyflannel.dataplane.tun import Network, TunDevice, configure_tun, ensure_configured, open_tun, present
from pyflannel.dataplane.udp import enable_offloads, open_udp_sockets

DEFAULT_PORT = 8285
DEFAULT_BATCH = 64
QUEUES_CAP = 4  # the default number of queues is one per two online CPUs, up to this many
BUCKETS = 8  # TUN queues (flow buckets) per engine: a request shares one with a bulk flow 1 time in 8
STOP_TIMEOUT = 2.0  # seconds Pump.stop() waits for a thread (it sees stop() within one pass, under any flood)
IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address


def default_queues() -> int:
    """One queue (engine thread) per two online CPUs, at least one and at most QUEUES_CAP: the rest of the CPU is
    for the traffic's own senders and receivers and the kernel's half of every packet (bench/RESULTS.md)."""
    return max(1, min(int(os.sysconf("SC_NPROCESSORS_ONLN")) // 2, QUEUES_CAP, MAX_QUEUES))


def _slice_xxx(us: int) -> None:  # XXX experiment
    import ctypes
    import struct
    libc = ctypes.CDLL(None, use_errno=True)
    attr = struct.pack("=IIQiIQQQ", 48, 0, 0, 0, 0, us * 1000, 0, 0)
    buf = ctypes.create_string_buffer(attr)
    r = libc.syscall(314, 0, buf, 0)
    if r != 0:
        raise OSError(ctypes.get_errno(), "sched_setattr")


def _run_xxx(loop: Any) -> None:  # XXX experiment
    if "PF_SLICE_US" in os.environ:
        _slice_xxx(int(os.environ["PF_SLICE_US"]))
    if "PF_NICE" in os.environ:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), int(os.environ["PF_NICE"]))
    if "PF_FIFO" in os.environ:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(int(os.environ["PF_FIFO"])))
    loop()


def buckets_for(batch: int) -> int:
    """TUN queues per engine: BUCKETS, or one with batch 1 (flannel's design: one queue, one packet a syscall)."""
    return 1 if batch == 1 else int(os.environ.get("PF_BUCKETS", BUCKETS))  # XXX experiment


class Pump:
    """Moves packets between a TUN device and UDP sockets (per TUN queue, one per underlay family); routes map
    overlay subnets to peers.

    It owns them: close() stops the engines and closes them, which removes the TUN device."""

    def __init__(
        self,
        tun: TunDevice,
        socks: list[socket.socket],
        *,
        subnet: ipaddress.IPv4Network | None,
        network: ipaddress.IPv4Network | None,
        offloads: Offloads,
        batch: int = DEFAULT_BATCH,
        check_source: bool = True,
        socks6: list[socket.socket] | None = None,
        subnet6: ipaddress.IPv6Network | None = None,
        network6: ipaddress.IPv6Network | None = None,
        table: PrefixTable | None = None,
        handover: tuple[int, int] | None = None,
    ) -> None:
        """`offloads` must be what the TUN and sockets were actually set up with (dataplane.tun, dataplane.udp);
        `socks` are the IPv4 underlay sockets and `socks6` the IPv6 ones, one per TUN queue or none (one family at
        least); the TUN queues go to the engines buckets_for(batch) at a time. With check_source, packets that local
        processes write into flannel0 with an inner source outside this node's `subnet` or `subnet6` (which hold
        flannel0's addresses) are dropped (tx_spoofed_source), as the far end would. `table`: the routes, if they
        should outlive this pump (dataplane.keeper); a new, empty table if not given. Only one pump's engines may
        read a table at a time. `handover`: when an engine's second thread takes the receiving side (Engine's; the
        default is measured, (0, 1000) is for tests)."""
        socks6 = socks6 or []
        if not socks and not socks6:
            raise ValueError("no underlay socket")
        for family in (socks, socks6):
            if family and len(family) != len(tun.queues):
                raise ValueError(f"{len(tun.queues)} TUN queues but {len(family)} sockets of a family")
        buckets = buckets_for(batch)
        self._helpers = batch > 1 and "PF_NOHELPER" not in os.environ  # XXX experiment
        if len(tun.queues) % buckets:
            raise ValueError(f"{len(tun.queues)} TUN queues do not make engines of {buckets}")
        self.tun = tun
        self.socks = socks
        self.socks6 = socks6
        self.subnet = subnet
        self.network = network
        self.subnet6 = subnet6
        self.network6 = network6
        self.routes = PrefixTable() if table is None else table
        self.offloads = offloads
        self._engines: list[Engine] = []
        for queue in range(len(tun.queues) // buckets):
            share = slice(queue * buckets, (queue + 1) * buckets)
            self._engines.append(Engine(
                tun.fds[share], [s.fileno() for s in socks[share]], self.routes,
                socks6=[s.fileno() for s in socks6[share]], batch=batch, check_source=check_source,
                local_subnet=None if subnet is None else str(subnet), vnet_hdr=offloads.vnet_hdr, gso=offloads.gso,
                gro=offloads.gro, coalesce=offloads.coalesce, uso=offloads.uso,
                local_subnet6=None if subnet6 is None else str(subnet6),
                queue=queue, icmp_shared_with=self._engines[0] if self._engines else None,
                spin_us=float(os.environ["PF_SPIN_US"]) if "PF_SPIN_US" in os.environ else None,  # XXX experiment
                helper=self._helpers, handover=handover,
            ))
        self._threads: list[threading.Thread] = []

    @property
    def queues(self) -> int:
        return len(self._engines)

    def start(self) -> None:
        """Start every engine thread, then route the network into the TUN: only now is someone reading it, and
        the routes set so far are already in the table (blocking netlink: call it from a worker thread)."""
        for queue, engine in enumerate(self._engines):
            suffix = f"-{queue}" if self.queues > 1 else ""
            loops = [(f"pump{suffix}", engine.run), (f"pump-helper{suffix}", engine.run_helper)]
            for name, loop in loops[:1 + self._helpers]:
                thread = threading.Thread(target=_run_xxx, args=(loop,), name=name, daemon=True)
                thread.start()
                self._threads.append(thread)
        with IPRoute() as ipr:
            ensure_configured(ipr, ipr.link_lookup(ifname=self.tun.name)[0], subnets=self.subnets,
                              networks=self.networks)

    @property
    def subnets(self) -> list[Network]:
        """This node's overlay subnets (flannel0's addresses), IPv4 first."""
        return present(self.subnet, self.subnet6)

    @property
    def networks(self) -> list[Network]:
        """The overlay networks routed into flannel0, IPv4 first."""
        return present(self.network, self.network6)

    def alive(self) -> bool:
        """Every engine thread is running."""
        return (len(self._threads) == self.queues * (1 + self._helpers)
                and all(thread.is_alive() for thread in self._threads))

    def failure(self) -> str | None:
        """None while healthy; once an engine thread has stopped on its own, one line saying which and why,
        e.g. "flannel0: TX stopped: File descriptor in bad state (EBADFD)" after `ip link del flannel0` (with
        several queues, "flannel0: TX of queue 1 stopped: ..."), the first queue's that failed."""
        for queue, engine in enumerate(self._engines):
            failed = engine.failure()
            if failed is not None:
                side, err = failed
                which = f"{side} of queue {queue}" if self.queues > 1 else side
                return f"{self.tun.name}: {which} stopped: {os.strerror(err)} ({errno.errorcode.get(err, err)})"
        return None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop every thread and wait for each up to `timeout` seconds; also fine after a thread stopped on its own
        (see failure()). DataplaneError naming the threads that would not stop (they are left running: their
        fds stay open, and the caller must not close them)."""
        for engine in self._engines:
            engine.stop()
        for thread in self._threads:
            thread.join(timeout)
        stuck = [thread.name for thread in self._threads if thread.is_alive()]
        if stuck:
            raise DataplaneError(f"{self.tun.name}: {', '.join(stuck)} did not stop within {timeout:g} s")
        self._threads.clear()

    def close(self) -> None:
        """Stop (if running) and release the TUN device and the sockets (not while a thread may still use them:
        then stop()'s error stands and they stay open)."""
        self.stop()
        self.tun.close()
        for sock in self.socks + self.socks6:
            sock.close()

    def set_route(self, subnet: str, peer: str, port: int = DEFAULT_PORT) -> dict[str, str]:
        """Send traffic for subnet (IPv4 or IPv6) to peer:port (add or replace; the peer IPv4 or IPv6); as
        update_routes."""
        return self.update_routes(set=[(subnet, peer, port)])

    def del_route(self, subnet: str) -> None:
        """Forget the route for exactly this subnet; KeyError if there is none."""
        self.routes.delete(subnet)

    def update_routes(self, set: Iterable[tuple[str, str, int]] = (), delete: Iterable[str] = ()) -> dict[str, str]:
        """Forget the `delete` subnets, then add or replace the `set` (subnet, peer, port) routes, all published
        to the engine at once (one batch of lease events, or every peer at startup). Returns the routes refused
        for want of a peer slot (PrefixTable.update); changes nothing on an error (ValueError also for a peer of
        a family this pump has no underlay socket for)."""
        routes = list(set)
        for _, peer, _ in routes:
            problem = underlay_problem(peer, ipv4=bool(self.socks), ipv6=bool(self.socks6))
            if problem is not None:
                raise ValueError(problem)
        return self.routes.update(set=routes, delete=delete)

    def stats(self) -> dict[str, Any]:
        """Engine counters (dataplane._engine.COUNTERS, DROPS) summed over the queues (engines), and per queue under
        "queues" (a list, in queue order); every offload in use: tso, tso6 and uso as the TUN accepted them, the
        others as still on in every queue (GSO and coalescing switch themselves off in a queue whose send or
        write the kernel refuses at run time); per peer under "peers" (one table, counted by all queues); what the
        engines allocated, by buffer, under "memory" (bytes, all queues)."""
        queues = [engine.stats() for engine in self._engines]
        out: dict[str, Any] = {name: sum(q[name] for q in queues) for name in COUNTERS}
        out["drops"] = {reason: sum(q["drops"][reason] for q in queues) for reason in queues[0]["drops"]}
        out["offloads"] = {"tso": self.offloads.tso, "tso6": self.offloads.tso6, "uso": self.offloads.uso,
                           **{name: all(q["offloads"][name] for q in queues) for name in queues[0]["offloads"]}}
        out["peers"] = queues[0]["peers"]
        out["queues"] = [{name: q[name] for name in COUNTERS} | {"drops": q["drops"]} for q in queues]
        out["memory"] = self.memory()
        return out

    def memory(self) -> dict[str, int]:
        """What the engines allocated, by buffer, in bytes (Engine.memory(); the kernel's queues come on top)."""
        per_engine = [engine.memory() for engine in self._engines]
        return {name: sum(m[name] for m in per_engine) for name in per_engine[0]}


def underlay_problem(peer: str, *, ipv4: bool, ipv6: bool) -> str | None:
    """Why a route cannot lead to this peer address over underlays of these families, or None if it can."""
    try:
        version = ipaddress.ip_address(peer).version
    except ValueError:
        return f"peer {peer!r} is not an IPv4 or IPv6 address"
    if not (ipv6 if version == 6 else ipv4):
        suffix = "6" if version == 6 else ""
        return f"peer {peer}: no IPv{version} underlay socket (open_pump's iface_ip{suffix})"
    return None


def open_pump(*, iface_ip: IPv4 | None, port: int, tun_name: str, subnet: ipaddress.IPv4Network | None,
              network: ipaddress.IPv4Network | None, mtu: int, wanted: Offloads, batch: int = DEFAULT_BATCH,
              check_source: bool = True, iface_ip6: IPv6 | None = None, subnet6: ipaddress.IPv6Network | None = None,
              network6: ipaddress.IPv6Network | None = None, queues: int = 1, table: PrefixTable | None = None,
              handover: tuple[int, int] | None = None) -> Pump:
    """The udp dataplane as flannel's udp backend sets it up: a socket bound to iface_ip:port and/or one bound to
    iface_ip6:port (the underlay families), the TUN device configured for subnet/network and/or subnet6/network6
    (the overlay families) and mtu, and the offloads all accept out of `wanted`; `queues` engines, each serving
    buckets_for(batch) TUN queues with a socket of each family; routed by `table` (Pump). Not started yet;
    DataplaneError (nothing left open) if the host refuses any step or nothing is given of either pair."""
    if iface_ip is None and iface_ip6 is None:
        raise DataplaneError("no underlay address: give an IPv4 or an IPv6 one")
    if (subnet is None) != (network is None) or (subnet6 is None) != (network6 is None) or not (subnet or subnet6):
        raise DataplaneError("each overlay family needs both its subnet and its network, and one family is needed")
    tun_queues = queues * buckets_for(batch)
    opened: list[socket.socket] = []
    try:
        socks = [] if iface_ip is None else _keep(opened, open_udp_sockets(iface_ip, port, tun_queues))
        socks6 = [] if iface_ip6 is None else _keep(opened, open_udp_sockets(iface_ip6, port, tun_queues))
        tun = open_tun(tun_name, wanted, tun_queues)
        try:
            configure_tun(tun, subnets=present(subnet, subnet6), networks=present(network, network6), mtu=mtu)
            offloads = tun.offloads
            for s in opened:
                offloads = enable_offloads(s, offloads)
            return Pump(tun, socks, subnet=subnet, network=network, offloads=offloads, batch=batch,
                        check_source=check_source, socks6=socks6, subnet6=subnet6, network6=network6, table=table,
                        handover=handover)
        except BaseException:
            tun.close()
            raise
    except BaseException:
        for s in opened:
            s.close()
        raise


def _keep(opened: list[socket.socket], socks: list[socket.socket]) -> list[socket.socket]:
    opened.extend(socks)
    return socks
