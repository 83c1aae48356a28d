"""The measurements of one mode on one rig: TCP single and parallel streams, 64-byte UDP, RTT, CPU per GB."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from pyflannel.bench.modes import Endpoints, Tunnel

PORT = 5201
CLK_TCK = os.sysconf("SC_CLK_TCK")


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


class MeasurementError(Exception):
    """A measurement could not be taken (the message says which and why)."""


def measure(path: Endpoints, *, seconds: int, parallel: int, pings: int) -> Result:
    """All figures for one mode; the iperf3 server runs in the server host for the duration."""
    path.server.popen("iperf3", "-s", "-p", str(PORT), "-B", path.server_addr, stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
    _wait_for_server(path)
    before = _engine_counters(path.tunnels)
    busy = _busy_seconds()
    tcp = _iperf(path, "tcp", 1, seconds)
    cpu = _busy_seconds() - busy
    moved_gb = tcp["end"]["sum_received"]["bytes"] / 1e9
    syscalls = _syscall_figures(before, _engine_counters(path.tunnels), moved_gb)
    tcp_parallel = _iperf(path, "tcp", parallel, seconds)
    udp = _iperf(path, "udp", 1, seconds)["end"]["sum"]
    rtts = _ping(path, pings)
    return Result(
        tcp_gbps=tcp["end"]["sum_received"]["bits_per_second"] / 1e9,
        tcp_parallel_gbps=tcp_parallel["end"]["sum_received"]["bits_per_second"] / 1e9,
        udp64_kpps=(udp["packets"] - udp["lost_packets"]) / udp["seconds"] / 1e3,
        rtt_ms_p50=statistics.median(rtts),
        rtt_ms_p99=statistics.quantiles(rtts, n=100, method="inclusive")[98],
        cpu_s_per_gb=cpu / moved_gb if moved_gb else float("inf"),
        retransmits=int(tcp["end"]["sum_sent"].get("retransmits", 0)),
        **syscalls,
    )


def _engine_counters(tunnels: tuple[Tunnel, Tunnel] | None) -> tuple[int, int, int, int] | None:
    """(client TX syscalls, client TX packets, server RX syscalls, server RX packets) so far."""
    if tunnels is None:
        return None
    tx, rx = (t.stats() for t in tunnels)
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


def _wait_for_server(path: Endpoints, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while f"{path.server_addr}:{PORT}" not in path.server.run("ss", "-ltn").stdout:
        if time.monotonic() > deadline:
            raise MeasurementError("iperf3 server did not start")
        time.sleep(0.05)


def _iperf(path: Endpoints, proto: str, streams: int, seconds: int) -> dict:  # type: ignore[type-arg]
    r = path.client.run(sys.executable, "-m", "pyflannel.bench.iperf_client", path.server_addr, str(PORT), proto, str(streams),
                        str(seconds), path.client_addr, check=False, timeout=seconds + 60)
    try:
        result = json.loads(r.stdout)
    except json.JSONDecodeError:
        raise MeasurementError(f"iperf3 {proto} x{streams} gave no result: {r.stderr.strip()[-200:]}") from None
    if "error" in result:
        raise MeasurementError(f"iperf3 {proto} x{streams}: {result['error']}")
    return dict(result)


def _ping(path: Endpoints, count: int) -> list[float]:
    out = path.client.run("ping", "-c", str(count), "-i", "0.01", "-I", path.client_addr, path.server_addr,
                          check=False, timeout=count + 30).stdout
    rtts = [float(m) for m in re.findall(r"time=([\d.]+) ms", out)]
    if len(rtts) < count // 2:
        raise MeasurementError(f"ping: {len(rtts)} of {count} replies")
    return rtts


def _busy_seconds() -> float:
    """CPU time spent not idle, all CPUs, whole machine (the namespaces share the kernel and the cores)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / CLK_TCK
