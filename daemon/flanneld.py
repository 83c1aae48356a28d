"""flanneld: acquire a lease, set up the backend, write subnet.env, then follow the other nodes' leases.

Startup follows flannel's main.go: flags, registry, signals and healthz, network config, interface, backend
(which acquires the lease), masquerade and forward rules, subnet.env (ready), then the supervised loops: lease
watch -> backend, lease renewal, backend upkeep, rule resync. Any loop ending stops the others (kopf-style).
SIGTERM/SIGINT: stop, close the engine and flannel0, keep the lease, rules and routes for the restart, exit 0.
Our own lease revoked: exit 0, as flannel does, for the supervisor to restart us.

Netlink on uvloop: pyroute2's asyncio API cannot run on uvloop (uvloop's datagram transport refuses AF_NETLINK
sockets: "cannot open a UDP handle, invalid family 16"), and its synchronous IPRoute refuses to start inside a
running loop. So every pyroute2 call (interface selection, backend setup, lease events) runs in a worker thread
through asyncio.to_thread, where the synchronous IPRoute has a loop of its own.

Exit status: 0 clean stop or lease revoked; 1 setup failed (bad network config, no interface, out of subnets,
port in use, not root); 2 bad flags.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

import uvloop

from daemon import config, flags, iptables, subnet_env, subnets
from daemon.backend import hostgw, routes, udp, vxlan
from daemon.backend.base import Context, Network
from daemon.errors import ConfigError, FlannelError
from daemon.health import Health
from daemon.interface import select
from daemon.lease import EventType, Lease, LeaseAttrs
from daemon.registry import Registry, Unavailable
from daemon.registry.etcd import EtcdRegistry
from daemon.registry.kube import KubeManager
from daemon.registry.local import LocalRegistry

VERSION = "v0.1.0-pyflannel"
BACKENDS: dict[str, Callable[[Context], Awaitable[Network]]] = {
    "udp": udp.register, "host-gw": hostgw.register, "vxlan": vxlan.register,
}
log = logging.getLogger("flanneld")
T = TypeVar("T")


class Daemon:
    def __init__(self, opts: flags.Options) -> None:
        self.opts = opts
        self.manager = _manager(opts)
        self.health = Health(self._metrics)
        self.stopping = asyncio.Event()
        self.network: Network | None = None
        self.peers = 0
        self.registry_errors = 0

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        if self.opts.healthz_port:
            await self.health.serve(self.opts.healthz_ip, self.opts.healthz_port)
        try:
            return await self._run()
        finally:
            if self.network is not None:
                self.network.close()
            await self.manager.close()

    async def _run(self) -> int:
        cfg = config.parse(await self._retry(self.manager.get_config, "reading the network config"))
        ext = await asyncio.to_thread(select, iface=self.opts.iface, iface_regex=self.opts.iface_regex,
                                      can_reach=self.opts.iface_can_reach, public_ip=self.opts.public_ip)
        log.info("using interface %s (%s), public IP %s, backend %s", ext.name, ext.addr, ext.public_ip,
                 cfg.backend_type)
        previous = subnet_env.previous_subnet(self.opts.subnet_file)

        async def acquire(attrs: LeaseAttrs) -> Lease:
            return await self._retry(lambda: self.manager.acquire(cfg, attrs, previous), "acquiring a lease")

        self.network = network = await BACKENDS[cfg.backend_type](Context(ext, cfg, acquire))
        rules = self._rules(cfg, network.lease)
        for rs in rules:
            iptables.apply(rs)
        if self.opts.ip_blackhole_route:
            await asyncio.to_thread(routes.add_blackhole, network.lease.subnet)
        subnet_env.write(self.opts.subnet_file, subnet_env.render(network=cfg.network, subnet=network.lease.subnet,
                                                                  mtu=network.mtu, ip_masq=self.opts.ip_masq))
        self.health.ready = True
        log.info("lease %s ready; subnet.env written to %s", network.lease.subnet, self.opts.subnet_file)
        return await self._supervise(network, rules)

    async def _supervise(self, network: Network, rules: list[iptables.RuleSet]) -> int:
        tasks = {
            asyncio.create_task(self._follow_leases(network), name="lease watch"),
            asyncio.create_task(self.manager.complete(network.lease), name="lease upkeep"),
            asyncio.create_task(network.run(), name="backend upkeep"),
            asyncio.create_task(self._resync_rules(rules), name="rule resync"),
            asyncio.create_task(self.stopping.wait(), name="signals"),
        }
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            exc = task.exception()
            if isinstance(exc, subnets.LeaseRevoked):
                log.error("%s", exc)
                return 0
            if exc is not None:
                raise exc
        log.info("stopping; lease %s, routes and rules stay for the restart", network.lease.subnet)
        return 0

    async def _follow_leases(self, network: Network) -> None:
        known: set[ipaddress.IPv4Network] = set()
        async for events in self.manager.watch(network.lease.subnet):
            await asyncio.to_thread(network.handle, events)
            for event in events:
                (known.add if event.type is EventType.ADDED else known.discard)(event.lease.subnet)
            self.peers = len(known)

    async def _resync_rules(self, rules: list[iptables.RuleSet]) -> None:
        while True:
            await asyncio.sleep(self.opts.iptables_resync)
            for rs in rules:
                if await asyncio.to_thread(iptables.ensure, rs):
                    log.warning("%s rules were missing and have been restored", rs.chain)

    def _rules(self, cfg: config.NetworkConfig, lease: Lease) -> list[iptables.RuleSet]:
        rules = []
        if self.opts.ip_masq:
            fully_random = not self.opts.ip_masq_fully_random_disable and iptables.supports_random_fully()
            rules.append(iptables.masq_rules(cfg.network, lease.subnet, fully_random))
        if self.opts.iptables_forward_rules:
            rules.append(iptables.forward_rules(cfg.network))
        return rules

    async def _retry(self, fn: Callable[[], Awaitable[T]], what: str) -> T:
        """Keep trying while the registry is unreachable (flannel blocks the same way), until stopped."""
        delay = 1.0
        while True:
            try:
                return await fn()
            except Unavailable as exc:
                self.registry_errors += 1
                log.warning("%s: %s; retrying in %.0f s", what, exc, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            if self.stopping.is_set():
                raise FlannelError(f"stopped while {what}", status=0)
            delay = min(delay * 2, 10.0)

    def _metrics(self) -> dict[str, float]:
        out: dict[str, float] = {"flannel_ready": float(self.health.ready), "flannel_peers": float(self.peers),
                                 "flannel_registry_errors_total": float(self.registry_errors)}
        if self.network is not None:
            out[f'flannel_lease_info{{subnet="{self.network.lease.subnet}"}}'] = 1.0
            out["flannel_lease_expiration_seconds"] = self.network.lease.expiration
            pump = getattr(self.network, "pump", None)
            if pump is not None:
                stats = pump.stats()
                for direction in ("tx", "rx"):
                    out[f'pyflannel_packets_total{{direction="{direction}"}}'] = stats[f"{direction}_packets"]
                    out[f'pyflannel_bytes_total{{direction="{direction}"}}'] = stats[f"{direction}_bytes"]
                for reason, n in stats["drops"].items():
                    out[f'pyflannel_drops_total{{reason="{reason}"}}'] = n
                for peer, counts in stats["peers"].items():
                    for direction in ("tx", "rx"):
                        labels = f'peer="{peer}",direction="{direction}"'
                        out[f"pyflannel_peer_packets_total{{{labels}}}"] = counts[f"{direction}_packets"]
                        out[f"pyflannel_peer_bytes_total{{{labels}}}"] = counts[f"{direction}_bytes"]
        return out


def _manager(opts: flags.Options) -> subnets.Manager:
    if opts.public_ipv6:
        raise FlannelError("--public-ipv6: IPv6 is not supported by pyflannel yet")
    if opts.kube_subnet_mgr:
        return KubeManager(net_config_path=opts.net_config_path, kubeconfig=opts.kubeconfig_file,
                           api_url=opts.kube_api_url, annotation_prefix=opts.kube_annotation_prefix,
                           set_network_unavailable=opts.set_node_network_unavailable)
    registry: Registry
    if opts.local_registry:
        registry = LocalRegistry(opts.local_registry, opts.net_config_path)
    else:
        registry = EtcdRegistry(opts.etcd_endpoints, opts.etcd_prefix, username=opts.etcd_username,
                                password=opts.etcd_password, keyfile=opts.etcd_keyfile, certfile=opts.etcd_certfile)
    return subnets.RegistryManager(registry, opts.subnet_lease_renew_margin)


def main(argv: list[str] | None = None) -> int:
    try:
        opts = flags.parse(argv)
    except FlannelError as exc:
        print(f"flanneld: error: {exc}", file=sys.stderr)
        return exc.status
    if opts.version:
        print(VERSION, file=sys.stderr)
        return 0
    logging.basicConfig(level=logging.DEBUG if opts.v > 0 else logging.INFO,
                        format="flanneld: %(levelname)s %(message)s")
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
        return exc.status


if __name__ == "__main__":
    sys.exit(main())
