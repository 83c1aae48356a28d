"""Turning repeated measurements into the report: medians, penalties against `none` (`none6` for the IPv6 modes),
table, JSON and chart."""

from __future__ import annotations

import json
import statistics
from dataclasses import fields
from pathlib import Path
from typing import Any

from pyflannel.bench import nic
from pyflannel.bench.measure import Result
from pyflannel.bench.modes import reference

FIELDS = [f.name for f in fields(Result)]
REFERENCE = "flannel-c"  # the mode every idle RTT is set against


def medians(runs: list[Result]) -> dict[str, float]:
    """Each figure's median over the repeats (N repeats, N odd by default, so a real measured value); figures
    a mode does not have (the engine's, outside the udp modes) are left out."""
    return {name: statistics.median(getattr(r, name) for r in runs) for name in FIELDS
            if all(getattr(r, name) is not None for r in runs)}


def penalties(modes: dict[str, dict[str, float]]) -> dict[str, float]:
    """Single-stream TCP throughput lost against the plain underlay of the mode's own family (an IPv6 overlay
    against IPv6 underlay, so that the figure is the encapsulation's cost alone), in percent (negative: faster).
    A mode whose reference was not measured has none."""
    out = {}
    for mode, m in modes.items():
        base = modes.get(reference(mode), {}).get("tcp_gbps")
        if mode != reference(mode) and base:
            out[mode] = round(100 * (base - m["tcp_gbps"]) / base, 1)
    return out


def against_flannel_c(modes: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Each mode's idle RTT (p50 and p99) as a multiple of flannel-c's, flannel's own udp design measured in the
    same run: the reference for what a userspace dataplane's round trip costs on this machine. None without it."""
    ref = modes.get(REFERENCE)
    if not ref:
        return {}
    return {mode: {q: round(m[f"rtt_ms_{q}"] / ref[f"rtt_ms_{q}"], 2) for q in ("p50", "p99")}
            for mode, m in modes.items() if mode != REFERENCE}


def build(runs: dict[str, list[Result]], config: dict[str, Any], skipped: dict[str, str],
          machine: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report; machine is this machine's by default, {"local": ..., "remote": ...} across real hosts."""
    modes = {mode: {k: round(v, 3) for k, v in medians(rs).items()} for mode, rs in runs.items() if rs}
    for m in modes.values():
        m["retransmits"] = int(m["retransmits"])
    report: dict[str, Any] = {"machine": machine or nic.machine(), "config": config, "modes": modes,
                              "penalty_pct": penalties(modes), "rtt_vs_flannel_c": against_flannel_c(modes)}
    if skipped:
        report["skipped"] = skipped
    return report


def table(report: dict[str, Any]) -> str:
    """The modes as rows; across real hosts CPU is given per end too, and each end's NIC follows the rows."""
    two_hosts = "remote" in report["machine"]
    header = ["mode", "TCP Gbit/s", "penalty", f"TCP x{report['config']['parallel']}", "UDP64 kpps",
              "RTT p50/p99 ms", f"x {REFERENCE}", "loaded RTT p50/p99 ms", "loaded Gbit/s", "RR/s",
              "CPU s/GB local+remote" if two_hosts else "CPU s/GB", "retrans", "syscalls/GB tx/rx",
              "pkts/syscall tx/rx"]
    rows = [header]
    ratios = report.get("rtt_vs_flannel_c", {})
    for mode, m in report["modes"].items():
        pen = report["penalty_pct"].get(mode)
        ratio = ratios.get(mode)
        rows.append([mode, f"{m['tcp_gbps']:.2f}", "-" if pen is None else f"{pen:.1f}%",
                     f"{m['tcp_parallel_gbps']:.2f}", f"{m['udp64_kpps']:.0f}",
                     f"{m['rtt_ms_p50']:.3f}/{m['rtt_ms_p99']:.3f}",
                     "-" if ratio is None else f"{ratio['p50']:.2f}/{ratio['p99']:.2f}",
                     f"{m['rtt_loaded_ms_p50']:.3f}/{m['rtt_loaded_ms_p99']:.3f}", f"{m['tcp_loaded_gbps']:.2f}",
                     f"{m['rr_per_s']:.0f}", _cpu_cell(m), str(m["retransmits"]), *_syscall_cells(m)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines += [f"{mode:<{widths[0]}}  skipped: {reason}" for mode, reason in report.get("skipped", {}).items()]
    if two_hosts:
        lines += [nic.summary(end, report["machine"][end]) for end in ("local", "remote")]
    return "\n".join(lines)


def _cpu_cell(m: dict[str, float]) -> str:
    if "client_cpu_s_per_gb" not in m:
        return f"{m['cpu_s_per_gb']:.2f}"
    return f"{m['client_cpu_s_per_gb']:.2f}+{m['server_cpu_s_per_gb']:.2f}"


def _syscall_cells(m: dict[str, float]) -> list[str]:
    if "tx_syscalls_per_gb" not in m:
        return ["-", "-"]
    return [f"{m['tx_syscalls_per_gb']:.0f}/{m['rx_syscalls_per_gb']:.0f}",
            f"{m['tx_packets_per_syscall']:.1f}/{m['rx_packets_per_syscall']:.1f}"]


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def write_plot(report: dict[str, Any], path: Path) -> None:
    """Throughput per mode (single and parallel streams), the single-stream penalty against `none` (`none6`), and
    the round trip at idle and under load on a log scale (microseconds and milliseconds both readable)."""
    plt = pyplot()
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.4))
    _throughput_panel(left, report)
    _penalty_panel(middle, report)
    _latency_panel(right, report)
    fig.suptitle(f"flannel-bench: {where(report)}")
    save(fig, path)


def _throughput_panel(ax: Any, report: dict[str, Any]) -> None:
    modes = list(report["modes"])
    xs = range(len(modes))
    ax.bar([x - 0.2 for x in xs], [report["modes"][m]["tcp_gbps"] for m in modes], 0.4, label="1 stream")
    ax.bar([x + 0.2 for x in xs], [report["modes"][m]["tcp_parallel_gbps"] for m in modes], 0.4,
           label=f"{report['config']['parallel']} streams")
    ax.set_xticks(list(xs), modes, rotation=30)
    ax.set_ylabel("TCP Gbit/s")
    ax.set_title("Throughput")
    ax.legend()


def _penalty_panel(ax: Any, report: dict[str, Any]) -> None:
    modes = [m for m in report["modes"] if m in report["penalty_pct"]]
    ax.set_title("Penalty against the plain underlay")
    if not modes:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no penalty to show:\nthe run measured no plain underlay\n(add mode none, or none6)",
                ha="center", va="center", transform=ax.transAxes)
        return
    pens = [report["penalty_pct"][m] for m in modes]
    ax.bar(modes, pens, color=["tab:red" if p > 0 else "tab:green" for p in pens])
    ax.set_ylabel("% slower than none / none6 (1 stream)")
    ax.tick_params(axis="x", rotation=30)
    for x, p in enumerate(pens):
        ax.annotate(f"{p:.0f}%", (x, p), ha="center", va="bottom" if p >= 0 else "top")


def _latency_panel(ax: Any, report: dict[str, Any]) -> None:
    """p50 as bars, p99 as a black tick above each, idle and under one TCP stream."""
    modes = list(report["modes"])
    xs = range(len(modes))
    for offset, key, label in ((-0.2, "rtt", "idle"), (0.2, "rtt_loaded", "under one TCP stream")):
        at = [x + offset for x in xs]
        ax.bar(at, [report["modes"][m][f"{key}_ms_p50"] for m in modes], 0.4, label=f"p50 {label}")
        ax.scatter(at, [report["modes"][m][f"{key}_ms_p99"] for m in modes], marker="_", s=200, color="black",
                   label="p99" if offset < 0 else None)
    ax.set_yscale("log")
    ax.set_xticks(list(xs), modes, rotation=30)
    ax.set_ylabel("round trip, ms (log scale)")
    ax.set_title("Latency")
    ax.legend(fontsize="small")


def where(report: dict[str, Any]) -> str:
    """Where a report was measured, in a few words: one machine's kernel and CPUs, or both ends'."""
    machine = report["machine"]
    ends = [machine[end] for end in ("local", "remote")] if "remote" in machine else [machine]
    return " to ".join(f"{m['kernel']}, {m['cpus']} CPUs" for m in ends)


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend, imported late: only a run that plots needs the [bench] extra."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
