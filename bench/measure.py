"""The measurements of one mode on one path: TCP single and parallel streams, 64-byte UDP, RTT at idle and while
one TCP stream saturates the path, request/response transactions, CPU per GB."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from pyflannel.bench.end import RR_PORT, Endpoints

PORT = 5201
PING_INTERVAL = 0.005  # seconds between pings: a request every 5 ms, each alone on an otherwise idle path
LOADED_WARMUP = 0.5  # seconds the TCP stream runs before the pings under load start (past slow start)


@dataclass(frozen=True)
class Result:
    tcp_gbps: float
    tcp_parallel_gbps: float
    udp64_kpps: float
    rtt_ms_p50: float
    rtt_ms_p99: float
    rtt_loaded_ms_p50: float
    rtt_loaded_ms_p99: float
    tcp_loaded_gbps: float
    rr_per_s: float
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
    loaded, loaded_rtts = _loaded(path, seconds, pings)
    rr = _request_response(path, seconds)
    return Result(
        tcp_gbps=tcp["end"]["sum_received"]["bits_per_second"] / 1e9,
        tcp_parallel_gbps=tcp_parallel["end"]["sum_received"]["bits_per_second"] / 1e9,
        udp64_kpps=(udp["packets"] - udp["lost_packets"]) / udp["seconds"] / 1e3,
        rtt_ms_p50=statistics.median(rtts),
        rtt_ms_p99=_p99(rtts),
        rtt_loaded_ms_p50=statistics.median(loaded_rtts),
        rtt_loaded_ms_p99=_p99(loaded_rtts),
        tcp_loaded_gbps=loaded["end"]["sum_received"]["bits_per_second"] / 1e9,
        rr_per_s=rr,
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


def _iperf_argv(path: Endpoints, proto: str, streams: int, seconds: int) -> list[str]:
    return [sys.executable, "-m", "pyflannel.bench.iperf_client", str(path.server_addr), str(PORT), proto,
            str(streams), str(seconds), str(path.client_addr)]


def _iperf(path: Endpoints, proto: str, streams: int, seconds: int) -> dict[str, Any]:
    r = path.client.host.run(*_iperf_argv(path, proto, streams, seconds), check=False, timeout=seconds + 60)
    return _iperf_result(f"{proto} x{streams}", r.stdout, r.stderr)


def _iperf_result(what: str, stdout: str, stderr: str) -> dict[str, Any]:
    try:
        result = json.loads(stdout)
    except json.JSONDecodeError:
        raise MeasurementError(f"iperf3 {what} gave no result: {stderr.strip()[-200:]}") from None
    if "error" in result:
        raise MeasurementError(f"iperf3 {what}: {result['error']}")
    return dict(result)


def _loaded(path: Endpoints, seconds: int, pings: int) -> tuple[dict[str, Any], list[float]]:
    """One TCP stream's iperf3 result, and the RTTs of pings sent along the same path while it ran."""
    stream = path.client.host.popen(*_iperf_argv(path, "tcp", 1, seconds), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(LOADED_WARMUP)
        rtts = _ping(path, max(10, min(pings, int((seconds - LOADED_WARMUP - 0.5) / PING_INTERVAL))))
        stdout, stderr = stream.communicate(timeout=seconds + 60)
    finally:
        if stream.poll() is None:
            stream.kill()
            stream.wait()
    return _iperf_result("tcp x1 under pings", stdout, stderr), rtts


def _ping(path: Endpoints, count: int) -> list[float]:
    out = path.client.host.run("ping", "-c", str(count), "-i", str(PING_INTERVAL), "-I", str(path.client_addr),
                               str(path.server_addr), check=False, timeout=count + 30).stdout
    rtts = [float(m) for m in re.findall(r"time=([\d.]+) ms", out)]
    if len(rtts) < count // 2:
        raise MeasurementError(f"ping: {len(rtts)} of {count} replies")
    return rtts


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def _request_response(path: Endpoints, seconds: int) -> float:
    """Transactions per second of one TCP connection carrying one byte and its one-byte answer at a time
    (bench.rr, against the server end's probe)."""
    r = path.client.host.run(sys.executable, "-m", "pyflannel.bench.rr", "ping-pong", str(path.server_addr),
                             str(RR_PORT), str(seconds), str(path.client_addr), check=False, timeout=seconds + 30)
    try:
        result = json.loads(r.stdout)
    except json.JSONDecodeError:
        said = r.stderr.strip().splitlines()
        raise MeasurementError(f"request/response gave no result{': ' + said[-1] if said else ''}") from None
    if not result["transactions"]:
        raise MeasurementError("request/response: no answer")
    return float(result["transactions"] / result["seconds"])
