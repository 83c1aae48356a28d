"""Prometheus metrics for the engine, and the small HTTP server that flanneld and flannel-tunnel both serve them on.

Metrics go through prometheus_client, so counters are exact integers (a hand-formatted "%g" stops a byte counter
moving at 1.96e9), every family has HELP and TYPE, and the names follow Prometheus' conventions: one prefix
(`flannel_`), base units, `_total` for counters. Engine counters are read from the engine when scraped (a
collector, not a second set of counters to keep in step), and the per-peer series are those of the peers a route
leads to now: a peer that leaves takes its series with it. With several queues each engine counter is also
exported per queue, in a family of its own (`flannel_queue_packets_total{direction="tx",queue="0"}`), so that
summing a family never counts a packet twice. The server answers /metrics and a set of check paths (/healthz,
/readyz) from a daemon thread, so a blocked event loop or signal loop does not silence it.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from pyflannel.dataplane._engine import COUNTERS, EXPORTED
from pyflannel.dataplane.errors import DataplaneError

Stats = Callable[[], "dict[str, Any] | None"]  # the engine's stats(), or None while there is no engine
Check = Callable[[], "str | None"]  # what is wrong, or None

_HELP = {
    "packets": "Inner packets forwarded: tx from flannel0 to the wire, rx from the wire into flannel0.",
    "bytes": "Bytes of the inner packets forwarded, by direction.",
    "syscalls": "System calls the engine made to move packets, by call.",
    "offload_events": "Kernel offload use: GSO sends, TSO super-packets read, GRO trains, coalesced writes, and "
                      "fallbacks when the kernel refused one.",
    "icmp_unreachable": "ICMP net-unreachable replies for destinations with no lease, sent or suppressed by the "
                        "rate limit (which ICMPv6 errors share).",
    "icmp6_errors": "ICMPv6 errors sent into flannel0, by type: unreachable (no lease for the destination), "
                    "time_exceeded (hop limit).",
    "drops": "Packets the engine dropped, by reason (rx_socket_overflow: dropped by the kernel in the socket "
             "buffer).",
    "worker_events": "How the engine threads found their work: wakeup (after sleeping in poll), spin_catch (while "
                     "still looking, without a wake-up); and when a second thread took over the receiving side "
                     "(helper_on) and gave it back (helper_off).",
}
# Every family the engine's counters are exported under (src_ext/counters.h says which) has its help text.
assert {family for family, _, _ in EXPORTED.values()} <= set(_HELP), "a counter family without help"


class EngineCollector(Collector):
    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        if stats is None:
            return
        yield from _counters("flannel_", [], [([], stats)])
        yield from _counters("flannel_queue_", ["queue"],
                             [([str(queue)], counts) for queue, counts in enumerate(stats["queues"])])
        yield from _peers(stats["peers"])
        yield from _routes(stats.get("routes"))
        offloads = GaugeMetricFamily("flannel_offload_enabled", "Kernel offloads in use (1) or not (0).",
                                     labels=["offload"])
        for name, on in stats["offloads"].items():
            offloads.add_metric([name], float(on))
        yield offloads
        memory = GaugeMetricFamily("flannel_engine_memory_bytes", "What the packet engines allocated, by buffer "
                                   "(src_ext/engine.pyx _allocate says why each is that size).", labels=["buffer"])
        for name, size in stats["memory"].items():
            memory.add_metric([name], float(size))
        yield memory


def _counters(prefix: str, extra: list[str], rows: list[tuple[list[str], Mapping[str, Any]]]) -> Iterator[Metric]:
    """The engine counters of each row's stats, by family, with the row's values for the `extra` labels."""
    families: dict[str, CounterMetricFamily] = {}

    def add(family: str, label: str, values: list[str], count: int) -> None:
        if family not in families:
            families[family] = CounterMetricFamily(f"{prefix}{family}", _HELP[family], labels=[label, *extra])
        families[family].add_metric(values, count)

    for labels, stats in rows:
        for name in COUNTERS:
            family, label, value = EXPORTED[name]
            add(family, label, [value, *labels], stats[name])
        for reason, count in stats["drops"].items():
            family, label, value = EXPORTED[reason]
            add(family, label, [value, *labels], count)
    yield from families.values()


def _peers(peers: Mapping[str, Mapping[str, int]]) -> Iterator[Metric]:
    for unit in ("packets", "bytes"):
        family = CounterMetricFamily(f"flannel_peer_{unit}_total", f"Inner {unit} to (tx) and from (rx) each "
                                     "configured peer, counted once accepted.", labels=["peer", "direction"])
        for peer, counts in peers.items():
            for direction in ("tx", "rx"):
                family.add_metric([peer, direction], counts[f"{direction}_{unit}"])
        yield family


def _routes(routes: Mapping[str, int] | None) -> Iterator[Metric]:
    """The state of the routes, where a keeper holds them (dataplane.keeper)."""
    if routes is None:
        return
    state = GaugeMetricFamily("flannel_routes", "Routes to other nodes' subnets: in place (routed), or wanted "
                              "but refused for now and retried every second (unrouted).", labels=["state"])
    for name in ("routed", "unrouted"):
        state.add_metric([name], routes[name])
    yield state
    yield CounterMetricFamily("flannel_route_refusals_total", "Route changes the dataplane refused (a full peer "
                              "table, a peer of a family without an underlay), each counted once however often "
                              "it is retried.", routes["refused"])


def registry(*collectors: Collector) -> CollectorRegistry:
    """A registry with the process metrics (CPU, memory, file descriptors) and the given collectors."""
    reg = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=reg)
    for collector in collectors:
        reg.register(collector)
    return reg


def serve(host: str, port: int, reg: CollectorRegistry, checks: Mapping[str, tuple[Check, int, str]],
          what: str = "metrics") -> ThreadingHTTPServer:
    """Serve /metrics and the `checks` ({path: (check, status when failing, text when fine)}) from a daemon
    thread; DataplaneError with one line if the address cannot be had."""
    class Handler(BaseHTTPRequestHandler):
        timeout = 5  # a client that sends nothing holds a thread only this long

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path == "/metrics":
                self._reply(200, generate_latest(reg), CONTENT_TYPE_LATEST)
            elif path in checks:
                check, failing, fine = checks[path]
                problem = check()
                self._reply(failing if problem else 200, f"{problem or fine}\n".encode(), "text/plain")
            else:
                self._reply(404, b"not found\n", "text/plain")

        def _reply(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Scrapes and probes every few seconds are not worth a log line each."""

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise DataplaneError(f"{what} port {host}:{port} is already in use") from None
        raise DataplaneError(f"cannot serve {what} on {host}:{port}: {exc.strerror}") from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=f"{what}-http", daemon=True).start()
    return server
