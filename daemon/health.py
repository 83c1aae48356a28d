"""flanneld's health checks and its own metrics, served with the engine's (dataplane.metrics) on
--healthz-ip:--healthz-port, as flannel's mustRunHealthz does.

/healthz fails (500) only for what a restart of flanneld could mend: the dataplane broken beyond the keeper's
repair. A registry outage is not one, so a liveness probe does not restart every node while etcd is down; /readyz
(503) reports it, and a daemon not set up yet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


@dataclass(frozen=True)
class Status:
    """What flanneld reports about itself at one moment."""

    ready: bool
    registry_up: bool
    registry_errors: int
    iptables_errors: int
    peers: int = 0
    rejected: Mapping[str, int] = field(default_factory=dict)  # lease records refused, by reason
    subnet: str | None = None
    expiration: float | None = None  # unix time the lease expires


class DaemonCollector(Collector):
    def __init__(self, status: Callable[[], Status]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        s = self.status()
        yield GaugeMetricFamily("flannel_ready", "1 once the lease, subnet.env and rules are in place.", s.ready)
        yield GaugeMetricFamily("flannel_registry_up", "1 while the registry answers.", s.registry_up)
        yield CounterMetricFamily("flannel_registry_errors_total", "Failed registry calls (each is retried).",
                                  s.registry_errors)
        yield CounterMetricFamily("flannel_iptables_errors_total", "Failed iptables calls (each is retried).",
                                  s.iptables_errors)
        yield GaugeMetricFamily("flannel_peers", "Other nodes' leases routed.", s.peers)
        rejected = CounterMetricFamily("flannel_lease_records_rejected_total", "Lease records refused (never "
                                       "routed), by reason; each record counted once per bad state.",
                                       labels=["reason"])
        for reason, count in sorted(s.rejected.items()):
            rejected.add_metric([reason], count)
        yield rejected
        if s.subnet is not None and s.expiration is not None:
            info = GaugeMetricFamily("flannel_lease_info", "This node's lease.", labels=["subnet"])
            info.add_metric([s.subnet], 1)
            yield info
            yield GaugeMetricFamily("flannel_lease_expiration_timestamp_seconds",
                                    "When this node's lease expires unless renewed (unix time).", s.expiration)
