"""KubeManager (--kube-subnet-mgr): leases from Kubernetes Nodes, as flannel's pkg/subnet/kube does it.

The lease is the Node's spec.podCIDRs (or spec.podCIDR), one subnet per family the network has, each inside its
family's network; what other nodes need goes into annotations under --kube-annotation-prefix (backend-type,
kube-subnet-manager; backend-data and public-ip for IPv4; backend-v6-data and public-ipv6 for IPv6, with
public-ip-overwrite and public-ipv6-overwrite taking precedence), patched through the nodes/status subresource
(the only node write flannel's RBAC grants); node-public-ip and node-public-ipv6, read once at startup, stand in
for --public-ip/--public-ipv6. On an IPv6-only network the IPv4 annotations are not written (flannel
writes public-ip "0.0.0.0" for host-gw there). Peers are the other Nodes annotated
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
from collections.abc import AsyncGenerator
from typing import Any

from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from pyflannel.daemon import config as netconf
from pyflannel.daemon import safejson
from pyflannel.daemon.config import Network, NetworkConfig
from pyflannel.daemon.errors import FlannelError
from pyflannel.daemon.interface import parse_public
from pyflannel.daemon.lease import (
    MAX_DEPTH,
    MAX_VALUE,
    SUBNET_TTL,
    BadRecord,
    Lease,
    LeaseAttrs,
    check_subnet,
)
from pyflannel.daemon.peers import Changes, Entry
from pyflannel.daemon.registry import Compacted, Unavailable
from pyflannel.daemon.subnets import Previous

log = logging.getLogger(__name__)
PODCIDR_WAIT = 30.0
WATCH_SECONDS = 290  # the API server ends each watch after this; the loop lists again, quietly
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
        self._expiration = 0.0
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
        return netconf.read(self.net_config_path)

    async def _node_name(self, api: client.CoreV1Api) -> str:
        """NODE_NAME, else the node this pod runs on (as flannel finds it)."""
        if not self.node:
            pod = await self._call("reading this pod", api.read_namespaced_pod(os.environ["POD_NAME"],
                                                                               os.environ["POD_NAMESPACE"]))
            self.node = pod.spec.node_name
        return self.node

    async def stored_public_ips(self) -> tuple[str, str]:
        """The node-public-ip and node-public-ipv6 annotations ("" when absent): an operator's pin for this node's
        public addresses that wins over --public-ip/--public-ipv6 (flannel's GetStoredPublicIP). flannel drops
        an unreadable Node silently and uses the flags; here the read is retried like every other API call, and
        a value that is no address of its family is a one-line error naming the annotation."""
        api = await self._core()
        name = await self._node_name(api)
        node = await self._call(f"reading node {name}", api.read_node(name))
        annotations = node.metadata.annotations or {}
        found = []
        for version, suffix in ((4, ""), (6, "v6")):
            key = f"{self.prefix}node-public-ip{suffix}"
            value = annotations.get(key, "")
            if value:
                parse_public(value, version, f"node {name}: annotation {key}")
            found.append(value)
        return found[0], found[1]

    async def acquire(self, cfg: NetworkConfig, attrs: LeaseAttrs, previous: Previous) -> Lease:
        api = await self._core()
        await self._node_name(api)
        node = await self._node_with_pod_cidr(api)
        try:
            cidrs = pod_cidrs(node)
        except ValueError as exc:
            raise FlannelError(f"node {self.node}: {exc}") from None
        subnets: dict[int, Network] = {}
        for pool in cfg.pools():
            subnet = cidrs.get(pool.network.version)
            if subnet is None:
                raise FlannelError(f"node {self.node} has no IPv{pool.network.version} podCIDR")
            if subnet.version != pool.network.version or not subnet.subnet_of(pool.network):  # type: ignore[arg-type]
                raise FlannelError(f"subnet {subnet} (the podCIDR of node {self.node}) is not inside the network "
                                   f"{pool.network}")
            subnets[subnet.version] = subnet
        annotations = node.metadata.annotations or {}
        wanted = {self.prefix + "backend-type": attrs.backend_type, self.prefix + "kube-subnet-manager": "true"}
        for version, data, public, suffix in ((4, attrs.backend_data, attrs.public_ip, ""),
                                              (6, attrs.backend_v6_data, attrs.public_ipv6, "v6")):
            if version in subnets:
                key = f"{self.prefix}public-ip{suffix}-overwrite"
                overwrite = annotations.get(key)
                if overwrite:   # announced to every node as this node's address: refused here, not by each of them
                    parse_public(overwrite, version, f"node {self.node}: annotation {key}")
                wanted[f"{self.prefix}backend{'-v6' if suffix else ''}-data"] = json.dumps(data, separators=(",", ":"))
                wanted[f"{self.prefix}public-ip{suffix}"] = overwrite or str(public)
        if any(annotations.get(k) != v for k, v in wanted.items()):
            await self._call("annotating the node", api.patch_node_status(
                self.node, {"metadata": {"annotations": wanted}}))
        self._expiration = time.time() + SUBNET_TTL
        lease = Lease(subnets.get(4), attrs, self._expiration, subnets.get(6))  # type: ignore[arg-type]
        log.info("lease %s from the podCIDRs of node %s", lease, self.node)
        return lease

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

    def source(self, cfg: NetworkConfig) -> KubeSource:
        return KubeSource(self, cfg)

    def expiration(self) -> float:
        """flannel's kube leases carry a nominal 24 h from acquisition; nothing renews them (the podCIDR is the
        Node's for as long as the Node exists)."""
        return self._expiration

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


class KubeSource:
    """The Nodes that flannel manages, by node name, as a daemon.peers Source: listed, then watched from the
    list's resourceVersion; 410 Gone is Compacted (list again), any other failure Unavailable."""

    def __init__(self, manager: KubeManager, cfg: NetworkConfig) -> None:
        self.manager = manager
        self.cfg = cfg
        self.own_key = manager.node

    async def snapshot(self) -> tuple[dict[str, Entry], Any]:
        api = await self.manager._core()
        nodes = await self.manager._call("listing nodes", api.list_node())
        entries = {n.metadata.name: entry for n in nodes.items if (entry := self._entry(n)) is not None}
        return entries, nodes.metadata.resource_version

    async def changes(self, cursor: Any) -> AsyncGenerator[Changes, None]:
        api = await self.manager._core()
        stream = watch.Watch().stream(api.list_node, resource_version=cursor, timeout_seconds=WATCH_SECONDS)
        try:
            async for change in stream:
                node = change["object"]
                yield [(node.metadata.name, None if change["type"] == "DELETED" else self._entry(node))]
        except ApiException as exc:
            if exc.status == 410:
                raise Compacted(cursor) from None
            raise Unavailable(f"node watch: {exc.status} {exc.reason}") from None
        except (OSError, TimeoutError, ValueError) as exc:
            raise Unavailable(f"node watch: {exc}") from None
        except Exception as exc:  # kubernetes_asyncio raises bare Exception for a malformed watch line
            if type(exc) is not Exception:
                raise
            raise Unavailable(f"node watch: {exc}") from None

    async def observe_own(self, entry: Entry | None) -> None:
        """Our own Node's lease is its podCIDR, which the controller manager owns: nothing to keep up here."""

    def _entry(self, node: Any) -> Entry | None:
        """The lease another Node advertises (checked), or None if it is not flannel-managed."""
        prefix = self.manager.prefix
        ann = node.metadata.annotations or {}
        if ann.get(prefix + "kube-subnet-manager") != "true" or not node.spec.pod_cidr:
            return None
        try:
            cidrs = pod_cidrs(node)
            subnets = {pool.network.version: cidrs[pool.network.version] for pool in self.cfg.pools()
                       if pool.network.version in cidrs}
            if not subnets:
                raise BadRecord("wrong_family", f"node {node.metadata.name} has no podCIDR of the network's families")
            for pool in self.cfg.pools():
                if pool.network.version in subnets:
                    check_subnet(subnets[pool.network.version], pool.network, None)
            data = [safejson.loads(ann.get(prefix + key) or "null", max_bytes=MAX_VALUE, max_depth=MAX_DEPTH)
                    for key in ("backend-data", "backend-v6-data")]
            attrs = LeaseAttrs.checked(ann.get(prefix + "public-ip"), ann.get(prefix + "backend-type"), data[0],
                                       ann.get(prefix + "public-ipv6"), data[1], ipv4=4 in subnets, ipv6=6 in subnets)
        except BadRecord as exc:
            return Entry(exc)
        except ValueError as exc:
            return Entry(BadRecord("bad_value", f"node {node.metadata.name}: {exc}"))
        return Entry(Lease(subnets.get(4), attrs, ipv6_subnet=subnets.get(6)))  # type: ignore[arg-type]


def pod_cidrs(node: Any) -> dict[int, Network]:
    """The Node's pod subnets by IP version: spec.podCIDRs (one per family, at most two), else spec.podCIDR;
    ValueError for anything else (flannel: "pod cidrs should be IPv4/IPv6 only or dualstack")."""
    texts = node.spec.pod_cidrs or [node.spec.pod_cidr]
    subnets = [ipaddress.ip_network(str(text), strict=False) for text in texts]
    by_version: dict[int, Network] = {subnet.version: subnet for subnet in subnets}
    if len(texts) > 2 or len(by_version) != len(subnets):
        raise ValueError(f"pod cidrs {texts} should be IPv4/IPv6 only or dualstack")
    return by_version
