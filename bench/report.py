"""Turning repeated measurements into the report: medians, penalties against `none`, table, JSON and chart."""

from __future__ import annotations

import json
import os
import platform
import statistics
from dataclasses import fields
from pathlib import Path
from typing import Any

from pyflannel.bench.measure import Result

FIELDS = [f.name for f in fields(Result)]


def medians(runs: list[Result]) -> dict[str, float]:
    """Each figure's median over the repeats (N repeats, N odd by default, so a real measured value); figures
    a mode does not have (the engine's, outside the udp modes) are left out."""
    return {name: statistics.median(getattr(r, name) for r in runs) for name in FIELDS
            if all(getattr(r, name) is not None for r in runs)}


def penalties(modes: dict[str, dict[str, float]]) -> dict[str, float]:
    """Single-stream TCP throughput lost against the plain underlay, in percent (negative: faster)."""
    if "none" not in modes or not modes["none"]["tcp_gbps"]:
        return {}
    base = modes["none"]["tcp_gbps"]
    return {mode: round(100 * (base - m["tcp_gbps"]) / base, 1) for mode, m in modes.items() if mode != "none"}


def machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "cpu_model": model,
            "python": platform.python_version()}


def build(runs: dict[str, list[Result]], config: dict[str, Any], skipped: dict[str, str]) -> dict[str, Any]:
    modes = {mode: {k: round(v, 3) for k, v in medians(rs).items()} for mode, rs in runs.items() if rs}
    for m in modes.values():
        m["retransmits"] = int(m["retransmits"])
    report: dict[str, Any] = {"machine": machine(), "config": config, "modes": modes, "penalty_pct": penalties(modes)}
    if skipped:
        report["skipped"] = skipped
    return report


def table(report: dict[str, Any]) -> str:
    header = ["mode", "TCP Gbit/s", "penalty", f"TCP x{report['config']['parallel']}", "UDP64 kpps",
              "RTT p50/p99 ms", "CPU s/GB", "retrans", "syscalls/GB tx/rx", "pkts/syscall tx/rx"]
    rows = [header]
    for mode, m in report["modes"].items():
        pen = report["penalty_pct"].get(mode)
        rows.append([mode, f"{m['tcp_gbps']:.2f}", "-" if pen is None else f"{pen:.1f}%",
                     f"{m['tcp_parallel_gbps']:.2f}", f"{m['udp64_kpps']:.0f}",
                     f"{m['rtt_ms_p50']:.3f}/{m['rtt_ms_p99']:.3f}", f"{m['cpu_s_per_gb']:.2f}",
                     str(m["retransmits"]), *_syscall_cells(m)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines += [f"{mode:<{widths[0]}}  skipped: {reason}" for mode, reason in report.get("skipped", {}).items()]
    return "\n".join(lines)


def _syscall_cells(m: dict[str, float]) -> list[str]:
    if "tx_syscalls_per_gb" not in m:
        return ["-", "-"]
    return [f"{m['tx_syscalls_per_gb']:.0f}/{m['rx_syscalls_per_gb']:.0f}",
            f"{m['tx_packets_per_syscall']:.1f}/{m['rx_packets_per_syscall']:.1f}"]


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def write_plot(report: dict[str, Any], path: Path) -> None:
    """Throughput per mode (single and parallel streams) and the single-stream penalty against `none`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(report["modes"])
    single = [report["modes"][m]["tcp_gbps"] for m in modes]
    multi = [report["modes"][m]["tcp_parallel_gbps"] for m in modes]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = range(len(modes))
    left.bar([x - 0.2 for x in xs], single, 0.4, label="1 stream")
    left.bar([x + 0.2 for x in xs], multi, 0.4, label=f"{report['config']['parallel']} streams")
    left.set_xticks(list(xs), modes)
    left.set_ylabel("TCP Gbit/s")
    left.set_title("Throughput")
    left.legend()
    pen_modes = [m for m in modes if m in report["penalty_pct"]]
    pens = [report["penalty_pct"][m] for m in pen_modes]
    right.bar(pen_modes, pens, color=["tab:red" if p > 0 else "tab:green" for p in pens])
    right.set_ylabel("% slower than none (1 stream)")
    right.set_title("Penalty against the plain underlay")
    for x, p in enumerate(pens):
        right.annotate(f"{p:.0f}%", (x, p), ha="center", va="bottom" if p >= 0 else "top")
    fig.suptitle(f"flannel-bench on {report['machine']['kernel']}, {report['machine']['cpus']} CPUs")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
