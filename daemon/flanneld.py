"""flanneld: acquire a lease, set up the backend, write subnet.env, then follow the other nodes' leases.

Startup follows flannel's main.go: flags, registry, signals and healthz, local files checked (subnet.env), network
config, interface, backend (which acquires the lease), masquerade and forward rules, subnet.env (ready), then the
supervised loops: lease watch -> backend, lease renewal, backend upkeep, rule resync. A loop that fails is logged
with where it failed and restarted with backoff (kopf-style); only a FlannelError (another node took our subnet,
--exit-on-lease-loss) ends the daemon. Registry and iptables trouble is retried and logged once per change of
state (daemon.outage). /healthz fails only when the dataplane is broken; /readyz also while the registry is
unreachable or another node's subnet cannot be routed. SIGTERM/SIGINT: stop, close the engine and flannel0,
keep the lease, rules and routes for the restart, exit 0.

Netlink on uvloop: pyroute2's asyncio API cannot run on uvloop (uvloop's datagram transport refuses AF_NETLINK
sockets: "cannot open a UDP handle, invalid family 16"), and its synchronous IPRoute refuses to start inside a
running loop. So every pyroute2 call (interface selection, backend setup, lease events) runs in a worker thread
through asyncio.to_thread, where the synchronous IPRoute has a loop of its own.

Exit status: 0 clean stop, or lease deleted with --exit-on-lease-loss; 1 setup failed (bad network config, bad
local files, no interface, out of subnets, port in use, not root) or our subnet taken by another node; 2 bad
flags.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable
from functools import partial
from http.server import ThreadingHTTPServer
from typing import Any, TypeVar

import uvloop

from pyflannel.daemon import config, flags, iptables, subnet_env, subnets, traffic
from pyflannel.daemon.backend import hostgw, routes, udp, vxlan
from pyflannel.daemon.backend.base import Context, Network
from pyflannel.daemon.errors import ConfigError, FlannelError
from pyflannel.daemon.health import DaemonCollector, Status
from pyflannel.daemon.interface import check_flags, select
from pyflannel.daemon.kube import KubeManager
from pyflannel.daemon.lease import Lease, LeaseAttrs
from pyflannel.daemon.outage import Outage
from pyflannel.daemon.peers import PeerTable, follow
from pyflannel.daemon.registry import Registry, Unavailable
from pyflannel.daemon.registry.etcd import EtcdRegistry
from pyflannel.daemon.registry.local import LocalRegistry
from pyflannel.dataplane import klog, metrics
from pyflannel.dataplane.errors import DataplaneError

VERSION = "v0.1.0-pyflannel"
BACKENDS: dict[str, Callable[[Context], Awaitable[Network]]] = {
    "udp": udp.register, "host-gw": hostgw.register, "vxlan": vxlan.register,
}
log = logging.getLogger("flanneld")
T = TypeVar("T")
RESTART_MIN, RESTART_MAX = 1.0, 30.0
# Signals whose default would end flanneld without a word (an operator's stray kill -HUP, a timer): logged and
# ignored, from the first line of main() on. INT and TERM stop it cleanly; QUIT and the faults keep their core dump.
IGNORED = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF,
           signal.SIGIO, signal.SIGPWR)
IPTABLES_ATTEMPTS = 5


class Daemon:
    def __init__(self, opts: flags.Options) -> None:
        self.opts = opts
        self.registry = Outage("registry")
        self.rules_state = Outage("iptables")
        self.manager = _manager(opts, self.registry)
        self.ready = False
        self.stopping = asyncio.Event()
        self.network: Network | None = None
        self.peers: PeerTable | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        for sig in IGNORED:
            loop.add_signal_handler(sig, log.info, "ignored %s", sig.name)
        server = self._serve_health() if self.opts.healthz_port else None
        try:
            return await self._run()
        finally:
            if server is not None:
                server.shutdown()
            if self.network is not None:
                self.network.close()
            await self.manager.close()

    def _serve_health(self) -> ThreadingHTTPServer:
        reg = metrics.registry(DaemonCollector(self.status), metrics.EngineCollector(self._engine_stats))
        checks = {"/healthz": (self._unhealthy, 500, "flanneld is running"),
                  "/readyz": (self._unready, 503, "flanneld is ready")}
        try:
            return metrics.serve(self.opts.healthz_ip, self.opts.healthz_port, reg, checks, what="healthz")
        except DataplaneError as exc:
            raise FlannelError(str(exc)) from None

    async def _run(self) -> int:
        subnet_env.check_target(self.opts.subnet_file)
        previous = subnet_env.previous_subnets(self.opts.subnet_file)
        cfg = config.parse(await self._retry(self.manager.get_config, "reading the network config", self.registry))
        public_ip, public_ipv6 = await self._public_ips()
        ext = await asyncio.to_thread(select, iface=self.opts.iface, iface_regex=self.opts.iface_regex,
                                      can_reach=self.opts.iface_can_reach, public_ip=public_ip,
                                      public_ipv6=public_ipv6, ipv4=cfg.ipv4 is not None, ipv6=cfg.ipv6 is not None)
        log.info("using interface %s (%s), public addresses %s, backend %s", ext.name,
                 ", ".join(str(a) for a in (ext.addr, ext.addr6) if a),
                 ", ".join(str(a) for a in (ext.public_ip, ext.public_ipv6) if a), cfg.backend_type)

        async def acquire(attrs: LeaseAttrs) -> Lease:
            return await self._retry(lambda: self.manager.acquire(cfg, attrs, previous), "acquiring a lease",
                                     self.registry)

        self.network = network = await BACKENDS[cfg.backend_type](Context(ext, cfg, acquire))
        self.peers = PeerTable(network.lease)
        rules = await self._retry(partial(asyncio.to_thread, traffic.plan, cfg, network.lease, masq=self.opts.ip_masq,
                                          forward=self.opts.iptables_forward_rules,
                                          fully_random=not self.opts.ip_masq_fully_random_disable),
                                  "preparing the traffic rules", self.rules_state, attempts=IPTABLES_ATTEMPTS)
        for rs in rules:
            await self._retry(partial(asyncio.to_thread, rs.apply), f"installing {rs.name}", self.rules_state,
                              attempts=IPTABLES_ATTEMPTS)
        if self.opts.ip_blackhole_route:
            for subnet in network.lease.subnets():
                await asyncio.to_thread(routes.add_blackhole, subnet)
        subnet_env.write(self.opts.subnet_file, subnet_env.render(cfg, network.lease, mtu=network.mtu,
                                                                  ip_masq=self.opts.ip_masq))
        self.ready = True
        log.info("lease %s ready; subnet.env written to %s", network.lease, self.opts.subnet_file)
        return await self._supervise(cfg, network, self.peers, rules)

    async def _public_ips(self) -> tuple[str, str]:
        """--public-ip/--public-ipv6, each replaced by the address the lease store pins for this node, if any."""
        stored = await self._retry(self.manager.stored_public_ips, "reading this node's pinned public addresses",
                                   self.registry)
        flags = (self.opts.public_ip, self.opts.public_ipv6)
        for name, pinned, flag in zip(("--public-ip", "--public-ipv6"), stored, flags, strict=True):
            if pinned:
                log.info("using %s %s, pinned for this node (flag: %r)", name, pinned, flag)
        return stored[0] or flags[0], stored[1] or flags[1]

    async def _supervise(self, cfg: config.NetworkConfig, network: Network, peers: PeerTable,
                         rules: list[traffic.Rules]) -> int:
        """Run the loops until a signal or a fatal error. A loop that fails for any other reason is logged with
        where it failed and started again after a backoff (kopf's way), never turned into a traceback exit."""
        loops: dict[str, Callable[[], Awaitable[None]]] = {
            "lease watch": lambda: self._follow_leases(cfg, network, peers),
            "lease upkeep": lambda: self.manager.complete(network.lease),
            "backend upkeep": network.run,
            "rule resync": lambda: self._resync_rules(rules),
        }
        tasks: set[asyncio.Task[object]] = {asyncio.create_task(self._keep(name, fn), name=name)
                                             for name, fn in loops.items()}
        tasks.add(asyncio.create_task(self.stopping.wait(), name="signals"))
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            if (exc := task.exception()) is not None:
                raise exc
        log.info("stopping; lease %s, routes and rules stay for the restart", network.lease)
        return 0

    async def _keep(self, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        delay = RESTART_MIN
        while True:
            try:
                await fn()
                log.error("%s ended by itself; starting it again in %.0f s", name, delay)
            except FlannelError:
                raise
            except Exception as exc:
                log.error("%s failed: %s; starting it again in %.0f s", name, _where(exc), delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX)

    async def _follow_leases(self, cfg: config.NetworkConfig, network: Network, peers: PeerTable) -> None:
        async for events in follow(self.manager.source(cfg), peers, self.registry):
            await asyncio.to_thread(network.handle, events)

    async def _resync_rules(self, rules: list[traffic.Rules]) -> None:
        while True:
            await asyncio.sleep(self.opts.iptables_resync)
            for rs in rules:
                try:
                    if await asyncio.to_thread(rs.ensure):
                        log.warning("%s: missing rules restored", rs.name)
                    self.rules_state.ok()
                except iptables.IptablesError as exc:
                    self.rules_state.failed(str(exc))

    async def _retry(self, fn: Callable[[], Awaitable[T]], what: str, outage: Outage, attempts: int = 0) -> T:
        """Keep trying while the registry is unreachable or iptables is busy (flannel blocks the same way),
        until stopped, or until `attempts` (0: no limit) have failed."""
        delay, tries = 1.0, 0
        while True:
            try:
                result = await fn()
                outage.ok()
                return result
            except (Unavailable, iptables.IptablesError) as exc:
                tries += 1
                if attempts and tries >= attempts:
                    raise FlannelError(f"{what}: {exc}") from None
                outage.failed(f"{what}: {exc}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            if self.stopping.is_set():
                raise FlannelError(f"stopped while {what}", status=0)
            delay = min(delay * 2, 10.0)

    def _unhealthy(self) -> str | None:
        """/healthz: only what a restart of flanneld could mend (the dataplane), never a registry outage."""
        return self.network.failure() if self.network is not None else None

    def _unready(self) -> str | None:
        if not self.ready:
            return "flanneld is not ready yet"
        if self.registry.since is not None:
            return f"registry unreachable: {self.registry.reason}"
        return self._unhealthy() or (self.network.unrouted() if self.network is not None else None)

    def status(self) -> Status:
        peers, network = self.peers, self.network
        return Status(ready=self.ready, registry_up=self.registry.since is None, registry_errors=self.registry.errors,
                      iptables_errors=self.rules_state.errors, peers=len(peers.routed) if peers else 0,
                      rejected=dict(peers.rejected) if peers else {},
                      subnet=str(network.lease) if network else None,
                      expiration=self.manager.expiration() if network else None)

    def _engine_stats(self) -> dict[str, Any] | None:
        return self.network.engine_stats() if self.network is not None else None


def _where(exc: BaseException) -> str:
    """The exception and the innermost line outside the installed libraries that it passed through, for a
    one-line log."""
    place = ""
    libraries = (sys.prefix, sys.base_prefix)
    for frame in traceback.extract_tb(exc.__traceback__):
        if not frame.filename.startswith(libraries):
            place = f" at {os.path.basename(frame.filename)}:{frame.lineno}"
    return f"{type(exc).__name__}: {exc}{place}"


def _manager(opts: flags.Options, outage: Outage) -> subnets.Manager:
    if opts.kube_subnet_mgr:
        return KubeManager(net_config_path=opts.net_config_path, kubeconfig=opts.kubeconfig_file,
                           api_url=opts.kube_api_url, annotation_prefix=opts.kube_annotation_prefix,
                           set_network_unavailable=opts.set_node_network_unavailable)
    registry: Registry
    if opts.local_registry:
        registry = LocalRegistry(opts.local_registry, opts.net_config_path)
    else:
        registry = EtcdRegistry(opts.etcd_endpoints, opts.etcd_prefix, username=opts.etcd_username,
                                password=opts.etcd_password, keyfile=opts.etcd_keyfile, certfile=opts.etcd_certfile,
                                cafile=opts.etcd_cafile)
    return subnets.RegistryManager(registry, opts.subnet_lease_renew_margin, outage,
                                   exit_on_loss=opts.exit_on_lease_loss)


def main(argv: list[str] | None = None) -> int:
    for sig in IGNORED:
        signal.signal(sig, signal.SIG_IGN)  # until the event loop logs them
    try:
        opts = flags.parse(argv)
        if not opts.version:
            check_flags(iface_regex=opts.iface_regex, can_reach=opts.iface_can_reach, public_ip=opts.public_ip,
                        public_ipv6=opts.public_ipv6)
    except FlannelError as exc:
        print(f"flanneld: error: {exc}", file=sys.stderr)
        return exc.status
    if opts.version:
        print(VERSION, file=sys.stderr)
        return 0
    klog.setup(opts.v)
    if os.geteuid() != 0:
        print("flanneld: error: must run as root (it creates network devices, routes and rules)", file=sys.stderr)
        return 1
    try:
        return uvloop.run(Daemon(opts).run())
    except ConfigError as exc:
        print(f"flanneld: error: {exc}", file=sys.stderr)
        return 1
    except FlannelError as exc:
        if exc.status:
            print(f"flanneld: error: {exc}", file=sys.stderr)
        else:
            log.warning("%s", exc)  # a clean end that says why (lease revoked, stopped during startup)
        return exc.status


if __name__ == "__main__":
    sys.exit(main())
