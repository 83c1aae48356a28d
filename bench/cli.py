"""flannel-bench: measure what each flannel backend costs against the plain underlay, on this kernel.

Every mode runs on a fresh pair of namespaces joined by a veth; repeats interleave the modes (each repeat
starts one mode later) so that drift on a shared machine hits every mode alike; each figure is the median.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType
from typing import NoReturn

from pyflannel.bench import report
from pyflannel.bench.measure import MeasurementError, Result, measure
from pyflannel.bench.modes import MODES, ModeUnavailable, setup
from pyflannel.bench.rig import Rig

PROG = "flannel-bench"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message}\n")


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"unknown mode {unknown[0] if unknown else '(none)'!r}; "
                                         f"choose from {','.join(MODES)}")
    return modes


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--modes", type=_modes, default=list(MODES), help=f"comma list ({','.join(MODES)})")
    p.add_argument("--seconds", type=_positive, default=5, help="length of each iperf3 run (5)")
    p.add_argument("--repeats", type=_positive, default=3, help="runs per mode; figures are medians (3)")
    p.add_argument("--parallel", type=_positive, default=4, help="streams in the parallel TCP test (4)")
    p.add_argument("--pings", type=_positive, default=200, help="pings for the RTT percentiles (200)")
    p.add_argument("--json", type=Path, default=Path("bench-out/flannel-bench.json"), help="JSON report path")
    p.add_argument("--plot", type=Path, default=Path("bench-out/flannel-bench.png"), help="PNG chart path")
    p.add_argument("--netem", help='netem options on both underlay ends, e.g. "delay 1ms loss 0.1%%"')
    p.add_argument("--mtu", type=_positive, default=1500, help="underlay MTU (1500)")
    p.add_argument("--quick", action="store_true", help="short run: 2 s per test, 1 repeat, 50 pings")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.repeats, args.pings = 2, 1, 50
    if not 576 <= args.mtu <= 65535:
        p.error(f"--mtu {args.mtu} is out of range 576-65535")
    return args


def run(args: argparse.Namespace) -> dict[str, object]:
    runs: dict[str, list[Result]] = {m: [] for m in args.modes}
    skipped: dict[str, str] = {}
    total = args.repeats * len(args.modes)
    step = 0
    for rep in range(args.repeats):
        order = args.modes[rep % len(args.modes):] + args.modes[:rep % len(args.modes)]
        for mode in order:
            step += 1
            if mode in skipped:
                continue
            print(f"[{step}/{total}] {mode} (repeat {rep + 1}/{args.repeats}) ...", end=" ", file=sys.stderr,
                  flush=True)
            try:
                with Rig(mtu=args.mtu, netem=args.netem, tag="pfbench") as rig:
                    result = measure(setup(mode, rig), seconds=args.seconds, parallel=args.parallel,
                                     pings=args.pings)
            except (ModeUnavailable, MeasurementError, subprocess.SubprocessError, OSError) as exc:
                skipped[mode] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                print(f"skipped: {skipped[mode]}", file=sys.stderr)
                continue
            runs[mode].append(result)
            print(f"{result.tcp_gbps:.2f} Gbit/s, {result.retransmits} retransmits", file=sys.stderr)
    config = {"modes": args.modes, "seconds": args.seconds, "repeats": args.repeats, "parallel": args.parallel,
              "pings": args.pings, "netem": args.netem, "mtu": args.mtu, "quick": args.quick}
    return report.build({m: r for m, r in runs.items() if m not in skipped}, config, skipped)


_MAIN_PID = os.getpid()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM cleans up like Ctrl-C, in this process only: pyroute2 forks helpers that inherit the handler."""
    if os.getpid() != _MAIN_PID:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if os.geteuid() != 0:
        print(f"{PROG}: error: must run as root (it builds network namespaces)", file=sys.stderr)
        return 1
    missing = [tool for tool in ("iperf3", "ping", "ip", "ss") if shutil.which(tool) is None]
    if missing:
        print(f"{PROG}: error: {', '.join(missing)} not found (apt-get install iperf3 iputils-ping iproute2)",
              file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = run(args)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; the test namespaces are removed", file=sys.stderr)
        return 130
    print(report.table(result))
    report.write_json(result, args.json)
    if result["modes"]:
        report.write_plot(result, args.plot)
    print(f"wrote {args.json} and {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
