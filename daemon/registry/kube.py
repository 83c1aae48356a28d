"""KubeManager (--kube-subnet-mgr): leases from Kubernetes Nodes, as flannel's pkg/subnet/kube does it.

The lease is the Node's spec.podCIDR (it must lie inside Network); what other nodes need goes into annotations
under --kube-annotation-prefix (backend-type, backend-data, public-ip, kube-subnet-manager), patched through the
nodes/status subresource (the only node write flannel's RBAC grants). Peers are the other Nodes annotated
kube-subnet-manager=true, listed then watched. When set up, the NetworkUnavailable condition is set to False.
The config comes from --net-config-path (flannel reads net-conf.json once). Client: kubernetes_asyncio.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from daemon.config import NetworkConfig
from daemon.errors import ConfigError, FlannelError
from daemon.lease import SUBNET_TTL, Event, EventType, Lease, LeaseAttrs, diff
from daemon.registry import Unavailable

log = logging.getLogger(__name__)
PODCIDR_WAIT = 30.0
BACKOFF_MAX = 5.0
_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*(/[-a-z0-9.]*)?$")


def make_annotation_prefix(prefix: str) -> str:
    """flannel's rule: append "/" if there is none, then "-" unless it ends in "/" or "-"."""
    if prefix.count("/") > 1 or not _PREFIX.match(prefix):
        raise FlannelError(f"invalid --kube-annotation-prefix {prefix!r}", status=2)
    if "/" not in prefix:
        prefix += "/"
    if not prefix.endswith(("/", "-")):
        prefix += "-"
    return prefix


def node_name() -> str:
    name = os.environ.get("NODE_NAME", "")
    if not name and not (os.environ.get("POD_NAME") and os.environ.get("POD_NAMESPACE")):
        raise FlannelError("env variables POD_NAME and POD_NAMESPACE must be set (or NODE_NAME)")
    return name


class KubeManager:
    def __init__(self, *, net_config_path: str, kubeconfig: str, api_url: str, annotation_prefix: str,
                 set_network_unavailable: bool) -> None:
        self.net_config_path = net_config_path
        self.kubeconfig = kubeconfig
        self.api_url = api_url
        self.prefix = make_annotation_prefix(annotation_prefix)
        self.set_network_unavailable = set_network_unavailable
        self.node = node_name()
        self._api: client.CoreV1Api | None = None
        self._client: client.ApiClient | None = None

    async def _core(self) -> client.CoreV1Api:
        if self._api is None:
            try:
                if self.kubeconfig:
                    await config.load_kube_config(config_file=self.kubeconfig)
                else:
                    config.load_incluster_config()  # type: ignore[no-untyped-call]
            except Exception as exc:
                raise FlannelError(f"cannot load the Kubernetes client config: {exc}") from None
            cfg = client.Configuration.get_default_copy()
            if self.api_url:
                cfg.host = self.api_url
            self._client = client.ApiClient(cfg)
            self._api = client.CoreV1Api(self._client)
        return self._api

    async def _call(self, what: str, coro: Any) -> Any:
        try:
            return await coro
        except ApiException as exc:
            if exc.status in (401, 403, 404, 422):
                raise FlannelError(f"{what}: {exc.status} {exc.reason}") from None
            raise Unavailable(f"{what}: {exc.status} {exc.reason}") from None
        except (TimeoutError, OSError) as exc:
            raise Unavailable(f"{what}: {exc}") from None

    async def get_config(self) -> str:
        try:
            return Path(self.net_config_path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read network config {self.net_config_path}: {exc.strerror}") from None

    async def acquire(self, cfg: NetworkConfig, attrs: LeaseAttrs, previous: ipaddress.IPv4Network | None) -> Lease:
        api = await self._core()
        if not self.node:
            pod = await self._call("reading this pod", api.read_namespaced_pod(os.environ["POD_NAME"],
                                                                               os.environ["POD_NAMESPACE"]))
            self.node = pod.spec.node_name
        node = await self._node_with_pod_cidr(api)
        subnet = ipaddress.IPv4Network(node.spec.pod_cidr, strict=False)
        if not subnet.subnet_of(cfg.network):
            raise FlannelError(f"subnet {subnet} (the podCIDR of node {self.node}) is not inside the network "
                               f"{cfg.network}")
        annotations = node.metadata.annotations or {}
        public_ip = annotations.get(self.prefix + "public-ip-overwrite") or str(attrs.public_ip)
        wanted = {
            self.prefix + "backend-data": json.dumps(attrs.backend_data, separators=(",", ":")),
            self.prefix + "backend-type": attrs.backend_type,
            self.prefix + "kube-subnet-manager": "true",
            self.prefix + "public-ip": public_ip,
        }
        if any(annotations.get(k) != v for k, v in wanted.items()):
            await self._call("annotating the node", api.patch_node_status(
                self.node, {"metadata": {"annotations": wanted}}))
        log.info("lease %s from the podCIDR of node %s", subnet, self.node)
        return Lease(subnet, attrs, time.time() + SUBNET_TTL)

    async def _node_with_pod_cidr(self, api: client.CoreV1Api) -> Any:
        deadline = time.monotonic() + PODCIDR_WAIT
        while True:
            node = await self._call(f"reading node {self.node}", api.read_node(self.node))
            if node.spec.pod_cidr:
                return node
            if time.monotonic() > deadline:
                raise FlannelError(f"node {self.node} pod cidr not assigned")
            await asyncio.sleep(3)

    async def complete(self, lease: Lease) -> None:
        """Set NetworkUnavailable=False (a failure is only logged, as in flannel), then nothing to renew."""
        if self.set_network_unavailable:
            now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            condition = {"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp",
                         "message": "Flannel is running on this node", "lastTransitionTime": now,
                         "lastHeartbeatTime": now}
            try:
                await self._call("setting NetworkUnavailable", (await self._core()).patch_node_status(
                    self.node, {"status": {"conditions": [condition]}}))
            except (Unavailable, FlannelError) as exc:
                log.error("%s", exc)
        await asyncio.Event().wait()

    def _lease(self, node: Any) -> Lease | None:
        """The lease another Node advertises, or None if it is not flannel-managed or incomplete."""
        ann = node.metadata.annotations or {}
        if ann.get(self.prefix + "kube-subnet-manager") != "true" or not node.spec.pod_cidr:
            return None
        try:
            data = json.loads(ann.get(self.prefix + "backend-data") or "null")
            attrs = LeaseAttrs(ipaddress.IPv4Address(ann.get(self.prefix + "public-ip", "")),
                               ann.get(self.prefix + "backend-type", ""), data)
            return Lease(ipaddress.IPv4Network(node.spec.pod_cidr, strict=False), attrs)
        except ValueError:
            return None

    async def watch(self, own: ipaddress.IPv4Network) -> AsyncIterator[list[Event]]:
        """List the Nodes, diff, watch from the list's resourceVersion; after a failure or 410 Gone, list again."""
        api = await self._core()
        known: dict[ipaddress.IPv4Network, Lease] = {}
        names: dict[str, ipaddress.IPv4Network] = {}  # node name -> the subnet it advertised
        backoff = 0.1
        while True:
            try:
                nodes = await self._call("listing nodes", api.list_node())
                leases = {n.metadata.name: lease for n in nodes.items if (lease := self._lease(n)) is not None}
                names.clear()
                names.update({name: lease.subnet for name, lease in leases.items()})
                events = diff(known, [lease for lease in leases.values() if lease.subnet != own])
                if events:
                    yield events
                backoff = 0.1
                stream = watch.Watch().stream(api.list_node, resource_version=nodes.metadata.resource_version)
                async for change in stream:
                    batch = self._change(change, own, known, names)
                    if batch:
                        yield batch
            except Exception as exc:  # kubernetes_asyncio raises bare Exception for malformed watch lines
                if isinstance(exc, FlannelError):
                    raise
                log.warning("node watch interrupted (%s); listing again in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    def _change(self, change: dict[str, Any], own: ipaddress.IPv4Network, known: dict[ipaddress.IPv4Network, Lease],
                names: dict[str, ipaddress.IPv4Network]) -> list[Event]:
        node = change["object"]
        name = node.metadata.name
        lease = None if change["type"] == "DELETED" else self._lease(node)
        old_subnet = names.pop(name, None)
        if lease is not None:
            names[name] = lease.subnet
        out = []
        if old_subnet is not None and old_subnet in known and (lease is None or lease.subnet != old_subnet):
            out.append(Event(EventType.REMOVED, known.pop(old_subnet)))
        if lease is not None and lease.subnet != own:
            previous = known.get(lease.subnet)
            if previous is None or previous.attrs != lease.attrs:  # a podCIDR-only change is not an event
                known[lease.subnet] = lease
                out.append(Event(EventType.ADDED, lease))
        return out

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
