"""flannel-bench compare: several reports side by side (before/after a change, two clusters), as text and a chart.

Each later report's figure is also given as a change against the first one's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pyflannel.bench import report
from pyflannel.bench.args import Parser

LABELS = {
    "tcp_gbps": "TCP Gbit/s", "tcp_parallel_gbps": "TCP parallel Gbit/s", "udp64_kpps": "UDP64 kpps",
    "rtt_ms_p50": "RTT p50 ms", "rtt_ms_p99": "RTT p99 ms", "rtt_loaded_ms_p50": "loaded RTT p50 ms",
    "rtt_loaded_ms_p99": "loaded RTT p99 ms", "tcp_loaded_gbps": "loaded TCP Gbit/s", "rr_per_s": "RR/s",
    "cpu_s_per_gb": "CPU s/GB",
    "client_cpu_s_per_gb": "CPU s/GB local", "server_cpu_s_per_gb": "CPU s/GB remote", "retransmits": "retransmits",
    "tx_syscalls_per_gb": "TX syscalls/GB", "rx_syscalls_per_gb": "RX syscalls/GB",
    "tx_packets_per_syscall": "TX packets/syscall", "rx_packets_per_syscall": "RX packets/syscall",
}
PLOTTED = ("tcp_gbps", "tcp_parallel_gbps", "udp64_kpps", "rtt_ms_p50", "rtt_loaded_ms_p50", "rr_per_s",
           "cpu_s_per_gb")
LOG_SCALE = {"rtt_ms_p50", "rtt_loaded_ms_p50"}  # microseconds and milliseconds on one axis


class BadReport(Exception):
    """A file given is not a flannel-bench report."""


def load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise BadReport(f"{path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadReport(f"{path}: not JSON") from None
    if not isinstance(data, dict) or not {"machine", "config", "modes", "penalty_pct"} <= set(data):
        raise BadReport(f"{path}: not a flannel-bench report (no machine, config, modes and penalty_pct)")
    return data


def names(paths: list[Path]) -> list[str]:
    """Column names: the file names, or the whole paths when two file names are the same."""
    short = [p.name for p in paths]
    return short if len(set(short)) == len(short) else [str(p) for p in paths]


def rows(reports: list[dict[str, Any]]) -> list[tuple[str, str, list[float | None]]]:
    """(mode, figure, one value per report) for every figure any report has, the penalty first."""
    modes = list(dict.fromkeys(m for r in reports for m in r["modes"]))
    out = []
    for mode in modes:
        if any(mode in r["penalty_pct"] for r in reports):
            out.append((mode, "penalty %", [r["penalty_pct"].get(mode) for r in reports]))
        for figure, label in LABELS.items():
            values = [r["modes"].get(mode, {}).get(figure) for r in reports]
            if any(v is not None for v in values):
                out.append((mode, label, values))
    return out


def table(names: list[str], reports: list[dict[str, Any]]) -> str:
    """A row per mode and figure, a column per report, then each later report's change against the first."""
    lines = [["mode", "figure", *names, *[f"{n} vs {names[0]}" for n in names[1:]]]]
    for mode, label, values in rows(reports):
        first = values[0]
        changes = ["-" if v is None or not first or label == "penalty %" else f"{100 * (v - first) / first:+.1f}%"
                   for v in values[1:]]
        lines.append([mode, label, *["-" if v is None else f"{v:g}" for v in values], *changes])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    body = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
            for line in lines]
    return "\n".join(body + [f"{n}: {report.where(r)}" for n, r in zip(names, reports, strict=True)])


def plot(names: list[str], reports: list[dict[str, Any]], path: Path) -> None:
    """One panel per main figure, modes along x, one bar per report."""
    plt = report.pyplot()
    modes = list(dict.fromkeys(m for r in reports for m in r["modes"]))
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(4 * len(PLOTTED), 4))
    width = 0.8 / len(reports)
    for ax, figure in zip(axes, PLOTTED, strict=True):
        for i, (name, r) in enumerate(zip(names, reports, strict=True)):
            ax.bar([x + (i - (len(reports) - 1) / 2) * width for x in range(len(modes))],
                   [r["modes"].get(m, {}).get(figure, 0) for m in modes], width, label=name)
        ax.set_xticks(list(range(len(modes))), modes, rotation=30)
        ax.set_title(LABELS[figure])
        if figure in LOG_SCALE:
            ax.set_yscale("log")
    axes[0].legend()
    fig.suptitle("flannel-bench compare")
    report.save(fig, path)


def main(argv: list[str]) -> int:
    p = Parser(prog="flannel-bench compare", description="flannel-bench reports side by side")
    p.add_argument("reports", nargs="+", type=Path, metavar="REPORT.json")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="also draw the main figures as a chart")
    args = p.parse_args(argv)
    try:
        reports = [load(path) for path in args.reports]
    except BadReport as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 1
    columns = names(args.reports)
    print(table(columns, reports))
    if args.plot:
        plot(columns, reports, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
