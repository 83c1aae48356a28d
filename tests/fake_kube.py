"""A stand-in for the Kubernetes API server, serving only the calls flanneld makes.

No Kubernetes API server can run on these machines, so this is the one fake in the test suite: an aiohttp app
on a socket inside a test host's namespace, with Nodes (and Pods) held in memory. It answers GET node, GET pod,
LIST nodes, WATCH nodes (a JSON line per change from a resourceVersion on) and PATCH nodes/{name}/status with
strategic-merge semantics for annotations and conditions (merged by type).
"""

from __future__ import annotations

import asyncio
import copy
import json
import socket
import threading
from collections import Counter
from typing import Any

from aiohttp import web


class FakeKube:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.nodes: dict[str, dict[str, Any]] = {}
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: list[tuple[int, str, dict[str, Any]]] = []
        self.rv = 1
        self.patches: list[tuple[str, Any]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._closing = False
        self.compacted = 0  # watches from before this resourceVersion get 410 Gone, as after etcd compaction
        self.watch_410s = 0
        self.node_gets: Counter[str] = Counter()  # GETs of each Node, so a test can wait for a daemon's next look

    # ---- state, from the test's side ------------------------------------------------------------------------

    def _record(self, kind: str, node: dict[str, Any]) -> None:
        self.rv += 1
        node["metadata"]["resourceVersion"] = str(self.rv)
        self.events.append((self.rv, kind, copy.deepcopy(node)))

    def add_node(self, name: str, pod_cidr: str | None = None, annotations: dict[str, str] | None = None,
                 pod_cidrs: list[str] | None = None) -> None:
        """A Node with spec.podCIDR, or with spec.podCIDRs (one per family) and its first as podCIDR."""
        spec: dict[str, Any] = {"podCIDR": pod_cidr} if pod_cidr else {}
        if pod_cidrs:
            spec = {"podCIDR": pod_cidrs[0], "podCIDRs": pod_cidrs}
        with self._lock:
            node = {"apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": name, "annotations": dict(annotations or {})},
                    "spec": spec, "status": {"conditions": []}}
            self.nodes[name] = node
            self._record("ADDED", node)

    def set_pod_cidr(self, name: str, pod_cidr: str) -> None:
        with self._lock:
            self.nodes[name]["spec"]["podCIDR"] = pod_cidr
            self._record("MODIFIED", self.nodes[name])

    def delete_node(self, name: str) -> None:
        with self._lock:
            self._record("DELETED", self.nodes.pop(name))

    def compact(self) -> None:
        """Forget the event history: every open watch is told 410 Gone and must list again (what an API server
        does when a watch's resourceVersion is older than what etcd still has)."""
        with self._lock:
            self.compacted = self.rv + 1
            self.events.clear()

    def node(self, name: str) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self.nodes[name])

    # ---- HTTP -----------------------------------------------------------------------------------------------

    async def _get_node(self, request: web.Request) -> web.Response:
        with self._lock:
            self.node_gets[request.match_info["name"]] += 1
            node = self.nodes.get(request.match_info["name"])
            if node is None:
                return web.json_response({"kind": "Status", "code": 404, "reason": "NotFound"}, status=404)
            return web.json_response(node)

    async def _get_pod(self, request: web.Request) -> web.Response:
        pod = self.pods.get((request.match_info["ns"], request.match_info["name"]))
        if pod is None:
            return web.json_response({"kind": "Status", "code": 404, "reason": "NotFound"}, status=404)
        return web.json_response(pod)

    async def _nodes(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("watch", "").lower() in ("true", "1"):
            return await self._watch(request, int(request.query.get("resourceVersion") or 0))
        with self._lock:
            return web.json_response({"kind": "NodeList", "apiVersion": "v1",
                                      "metadata": {"resourceVersion": str(self.rv)},
                                      "items": list(self.nodes.values())})

    async def _watch(self, request: web.Request, since: int) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_type = "application/json"
        await response.prepare(request)
        while not self._closing:
            if since < self.compacted:
                self.watch_410s += 1
                gone = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired", "code": 410,
                        "message": f"too old resource version: {since} ({self.compacted})"}
                await response.write((json.dumps({"type": "ERROR", "object": gone}) + "\n").encode())
                break
            with self._lock:
                fresh = [(rv, kind, obj) for rv, kind, obj in self.events if rv > since]
            for rv, kind, obj in fresh:
                await response.write((json.dumps({"type": kind, "object": obj}) + "\n").encode())
                since = rv
            await asyncio.sleep(0.05)
        return response

    async def _patch_status(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        patch = await request.json()
        with self._lock:
            self.patches.append((request.headers.get("Content-Type", ""), patch))
            node = self.nodes.get(name)
            if node is None:
                return web.json_response({"kind": "Status", "code": 404, "reason": "NotFound"}, status=404)
            node["metadata"]["annotations"].update(patch.get("metadata", {}).get("annotations", {}))
            conditions = {c["type"]: c for c in node["status"]["conditions"]}
            for c in patch.get("status", {}).get("conditions", []):
                conditions[c["type"]] = c
            node["status"]["conditions"] = list(conditions.values())
            self._record("MODIFIED", node)
            return web.json_response(node)

    def start(self, sock: socket.socket) -> None:
        app = web.Application()
        app.router.add_get("/api/v1/nodes/{name}", self._get_node)
        app.router.add_get("/api/v1/nodes", self._nodes)
        app.router.add_patch("/api/v1/nodes/{name}/status", self._patch_status)
        app.router.add_get("/api/v1/namespaces/{ns}/pods/{name}", self._get_pod)
        self._thread.start()
        self._runner = web.AppRunner(app)

        async def serve() -> None:
            assert self._runner is not None
            await self._runner.setup()
            await web.SockSite(self._runner, sock).start()

        asyncio.run_coroutine_threadsafe(serve(), self._loop).result(10)

    def stop(self) -> None:
        self._closing = True  # ends the watch streams, so that cleanup does not wait for them
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
