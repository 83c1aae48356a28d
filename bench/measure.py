"""The measurements of one mode on one rig: TCP single and parallel streams, 64-byte UDP, RTT, CPU per GB."""

from __future__ import annotations

import json
import re
import statistics
import sys
from dataclasses import dataclass
from typing import Any

from pyflannel.bench.end import Endpoints

PORT = 5201


@dataclass(frozen=True)
class Result:
    tcp_gbps: float
    tcp_parallel_gbps: float
    udp64_kpps: float
    rtt_ms_p50: float
    rtt_ms_p99: float
    cpu_s_per_gb: float
    retransmits: int
    # udp modes, from the engines' counters over the single-stream run: syscalls per GB received and inner
    # packets per syscall, TX on the client (TUN reads + sends), RX on the server (receives + TUN writes)
    tx_syscalls_per_gb: float | None = None
    rx_syscalls_per_gb: float | None = None
    tx_packets_per_syscall: float | None = None
    rx_packets_per_syscall: float | None = None
    # across real hosts, cpu_s_per_gb is the sum of the two ends' CPU, and each end's share is given too
    client_cpu_s_per_gb: float | None = None
    server_cpu_s_per_gb: float | None = None


class MeasurementError(Exception):
    """A measurement could not be taken (the message says which and why)."""


def measure(path: Endpoints, *, seconds: int, parallel: int, pings: int) -> Result:
    """All figures for one mode; the iperf3 server runs on the server end for the duration."""
    path.server.serve(path.server_addr, PORT)
    before = _engine_counters(path)
    busy = _busy_seconds(path)
    tcp = _iperf(path, "tcp", 1, seconds)
    cpu = [after - start for start, after in zip(busy, _busy_seconds(path), strict=True)]
    moved_gb = tcp["end"]["sum_received"]["bytes"] / 1e9
    syscalls = _syscall_figures(before, _engine_counters(path), moved_gb)
    tcp_parallel = _iperf(path, "tcp", parallel, seconds)
    udp = _iperf(path, "udp", 1, seconds)["end"]["sum"]
    rtts = _ping(path, pings)
    return Result(
        tcp_gbps=tcp["end"]["sum_received"]["bits_per_second"] / 1e9,
        tcp_parallel_gbps=tcp_parallel["end"]["sum_received"]["bits_per_second"] / 1e9,
        udp64_kpps=(udp["packets"] - udp["lost_packets"]) / udp["seconds"] / 1e3,
        rtt_ms_p50=statistics.median(rtts),
        rtt_ms_p99=statistics.quantiles(rtts, n=100, method="inclusive")[98],
        cpu_s_per_gb=sum(cpu) / moved_gb if moved_gb else float("inf"),
        retransmits=int(tcp["end"]["sum_sent"].get("retransmits", 0)),
        **syscalls,
        **_per_end_cpu(path, cpu, moved_gb),
    )


def _busy_seconds(path: Endpoints) -> list[float]:
    """Busy CPU seconds of each machine involved: both ends across real hosts, the one machine on a rig."""
    ends = [path.client, path.server] if path.separate_machines else [path.client]
    return [end.busy_seconds() for end in ends]


def _per_end_cpu(path: Endpoints, cpu: list[float], moved_gb: float) -> dict[str, float]:
    if not path.separate_machines or not moved_gb:
        return {}
    return {"client_cpu_s_per_gb": cpu[0] / moved_gb, "server_cpu_s_per_gb": cpu[1] / moved_gb}


def _engine_counters(path: Endpoints) -> tuple[int, int, int, int] | None:
    """(client TX syscalls, client TX packets, server RX syscalls, server RX packets) so far."""
    tx, rx = path.client.engine_stats(), path.server.engine_stats()
    if tx is None or rx is None:
        return None
    return (tx["tun_reads"] + tx["tx_send_calls"], tx["tx_packets"],
            rx["rx_recv_calls"] + rx["tun_writes"], rx["rx_packets"])


def _syscall_figures(before: tuple[int, int, int, int] | None, after: tuple[int, int, int, int] | None,
                     moved_gb: float) -> dict[str, float]:
    """The Result's engine figures over the run between the two readings; none outside the udp modes."""
    if before is None or after is None or not moved_gb:
        return {}
    tx_calls, tx_packets, rx_calls, rx_packets = (b - a for a, b in zip(before, after, strict=True))
    return {"tx_syscalls_per_gb": tx_calls / moved_gb, "rx_syscalls_per_gb": rx_calls / moved_gb,
            "tx_packets_per_syscall": tx_packets / max(tx_calls, 1),
            "rx_packets_per_syscall": rx_packets / max(rx_calls, 1)}


def _iperf(path: Endpoints, proto: str, streams: int, seconds: int) -> dict[str, Any]:
    r = path.client.host.run(sys.executable, "-m", "pyflannel.bench.iperf_client", str(path.server_addr), str(PORT),
                             proto, str(streams), str(seconds), str(path.client_addr), check=False,
                             timeout=seconds + 60)
    try:
        result = json.loads(r.stdout)
    except json.JSONDecodeError:
        raise MeasurementError(f"iperf3 {proto} x{streams} gave no result: {r.stderr.strip()[-200:]}") from None
    if "error" in result:
        raise MeasurementError(f"iperf3 {proto} x{streams}: {result['error']}")
    return dict(result)


def _ping(path: Endpoints, count: int) -> list[float]:
    out = path.client.host.run("ping", "-c", str(count), "-i", "0.01", "-I", str(path.client_addr),
                               str(path.server_addr), check=False, timeout=count + 30).stdout
    rtts = [float(m) for m in re.findall(r"time=([\d.]+) ms", out)]
    if len(rtts) < count // 2:
        raise MeasurementError(f"ping: {len(rtts)} of {count} replies")
    return rtts
