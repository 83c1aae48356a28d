"""flannel-bench: measure what each flannel backend costs against the plain underlay, on this kernel.

Every mode runs on a fresh pair of namespaces joined by a veth, or with --remote between this host and another
over the real link; repeats interleave the modes (each repeat starts one mode later) so that drift on a shared
machine hits every mode alike; each figure is the median.
"""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from pyflannel.bench import agent, compare, remote, report
from pyflannel.bench.args import Parser, positive
from pyflannel.bench.end import Endpoints, HostUnfit, LocalEnd, join
from pyflannel.bench.interrupt import like_ctrl_c
from pyflannel.bench.measure import MeasurementError, Result, measure
from pyflannel.bench.modes import MODES, MODES6, ModeUnavailable, version
from pyflannel.bench.rig import Rig, RigError

PROG = "flannel-bench"
SUBCOMMANDS = {"agent": agent.main, "compare": compare.main}
GROUPS = {"all4": MODES, "all6": MODES6, "all": MODES + MODES6}
"""Names for several modes at once in --modes; the default stays all4, so that `make demo` stays short."""


def _modes(text: str) -> list[str]:
    """Mode and group names, comma separated, in the order given; each mode once."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODES + MODES6 and m not in GROUPS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown mode {unknown[0] if unknown else '(none)'!r}; choose from "
                                         f"{','.join(MODES + MODES6)} or {','.join(GROUPS)}")
    return list(dict.fromkeys(m for name in names for m in GROUPS.get(name, (name,))))


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0] if __doc__ else None,
               epilog="also: flannel-bench compare A.json B.json ... [--plot FILE.png]; flannel-bench agent (the "
                      "far end of --remote, started through ssh)")
    p.add_argument("--modes", type=_modes, default=list(MODES),
                   help=f"comma list of modes ({','.join(MODES)}; IPv6: {','.join(MODES6)}) or groups (all4: the "
                        "IPv4 ones, the default; all6: the IPv6 ones; all: both)")
    p.add_argument("--seconds", type=positive, default=5, help="length of each iperf3 run (5)")
    p.add_argument("--repeats", type=positive, default=3, help="runs per mode; figures are medians (3)")
    p.add_argument("--parallel", type=positive, default=4, help="streams in the parallel TCP test (4)")
    p.add_argument("--pings", type=positive, default=200, help="pings for the RTT percentiles (200)")
    p.add_argument("--json", type=Path, default=Path("bench-out/flannel-bench.json"), help="JSON report path")
    p.add_argument("--plot", type=Path, default=Path("bench-out/flannel-bench.png"), help="PNG chart path")
    p.add_argument("--netem", help='netem options on both underlay ends, e.g. "delay 1ms loss 0.1%%"')
    p.add_argument("--mtu", type=positive, help="underlay MTU (1500)")
    p.add_argument("--quick", action="store_true", help="short run: 2 s per test, 1 repeat, 50 pings")
    two = p.add_argument_group("across two hosts (this one is the client, the iperf3 server runs on the other)")
    two.add_argument("--remote", metavar="[USER@]HOST", help="run every mode between this host and HOST over ssh")
    two.add_argument("--remote-bin", default="flannel-bench", metavar="COMMAND",
                     help="flannel-bench on HOST, given to its shell as it is (flannel-bench on its PATH)")
    two.add_argument("--local-ip", help="this host's underlay address (default: where the ssh session comes from)")
    two.add_argument("--remote-ip", help="HOST's underlay address (default: where the ssh session goes to)")
    two.add_argument("--local-ip6", type=ipaddress.IPv6Address, metavar="IP6",
                     help="this host's IPv6 underlay address, for the IPv6 modes (skipped without it)")
    two.add_argument("--remote-ip6", type=ipaddress.IPv6Address, metavar="IP6", help="HOST's IPv6 underlay address")
    two.add_argument("--ssh-config", metavar="FILE", help="ssh config file instead of ~/.ssh/config (ssh -F)")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.repeats, args.pings = 2, 1, 50
    if args.remote and (args.netem or args.mtu):
        p.error("--netem and --mtu shape the namespace rig's link; --remote measures the real link as it is")
    if not args.remote and (args.local_ip or args.remote_ip or args.local_ip6 or args.remote_ip6 or args.ssh_config):
        p.error("--local-ip, --remote-ip, --local-ip6, --remote-ip6 and --ssh-config go with --remote")
    if bool(args.local_ip6) != bool(args.remote_ip6):
        p.error("--local-ip6 and --remote-ip6 go together (the IPv6 underlay addresses of the two hosts)")
    if not args.remote:
        args.mtu = args.mtu or 1500
    if args.mtu and not 576 <= args.mtu <= 65535:
        p.error(f"--mtu {args.mtu} is out of range 576-65535")
    return args


def run(args: argparse.Namespace) -> dict[str, object]:
    config: dict[str, Any] = {"modes": args.modes, "seconds": args.seconds, "repeats": args.repeats,
                              "parallel": args.parallel, "pings": args.pings, "netem": args.netem, "mtu": args.mtu,
                              "quick": args.quick}
    if not args.remote:
        runs, skipped = measure_modes(args, lambda mode: _on_rig(args, mode))
        return report.build(runs, config, skipped)
    with tempfile.TemporaryDirectory(prefix="flannel-bench-") as files, \
            remote.ends(args, Path(files)) as (pair, machine):
        runs, skipped = measure_modes(args, lambda mode: remote.path(mode, pair))
        return report.build(runs, config | {"remote": args.remote}, skipped, machine)


@contextmanager
def _on_rig(args: argparse.Namespace, mode: str) -> Iterator[Endpoints]:
    with Rig(mtu=args.mtu, netem=args.netem, tag="pfbench", version=version(mode)) as rig:
        client, server = (LocalEnd(host, rig.files) for host in rig.hosts)
        yield join(mode, client, server)


def measure_modes(args: argparse.Namespace, path: Callable[[str], AbstractContextManager[Endpoints]],
                  ) -> tuple[dict[str, list[Result]], dict[str, str]]:
    """Every mode, args.repeats times, interleaved; the runs of the modes that worked and why the others did not."""
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
                with path(mode) as endpoints:
                    result = measure(endpoints, seconds=args.seconds, parallel=args.parallel, pings=args.pings)
            except (ModeUnavailable, MeasurementError, subprocess.SubprocessError, OSError) as exc:
                skipped[mode] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                print(f"skipped: {skipped[mode]}", file=sys.stderr)
                continue
            except BaseException:
                print(file=sys.stderr)   # end the progress line; the caller says what stopped the run
                raise
            runs[mode].append(result)
            print(f"{result.tcp_gbps:.2f} Gbit/s, {result.retransmits} retransmits", file=sys.stderr)
    return {m: r for m, r in runs.items() if m not in skipped}, skipped


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except BrokenPipeError:
        # The reader went away (`flannel-bench compare ... | head`): stop quietly, as shell tools do. stdout is
        # pointed at /dev/null so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _missing_extras() -> list[str]:
    """The bench extra's modules that do not import here (a plain `pip install pyflannel` lacks them)."""
    missing = []
    for module in ("iperf3", "matplotlib"):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    return missing


def _main(argv: list[str]) -> int:
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    args = parse(argv)
    if os.geteuid() != 0:
        print(f"{PROG}: error: must run as root (it sets up network devices and routes)", file=sys.stderr)
        return 1
    missing = [tool for tool in ("iperf3", "ping", "ip", "ss") if shutil.which(tool) is None]
    if missing:
        print(f"{PROG}: error: {', '.join(missing)} not found (apt-get install iperf3 iputils-ping iproute2)",
              file=sys.stderr)
        return 1
    extras = _missing_extras()
    if extras:
        print(f"{PROG}: error: {', '.join(extras)} not installed: the benchmark needs pyflannel's bench extra "
              "(pip install 'pyflannel[bench]')", file=sys.stderr)
        return 1
    like_ctrl_c(signal.SIGTERM, signal.SIGHUP)
    try:
        result = run(args)
    except KeyboardInterrupt:
        where = "on both hosts" if args.remote else "in the test namespaces"
        print(f"{PROG}: interrupted; what it set up {where} is removed", file=sys.stderr)
        return 130
    except (remote.SessionError, HostUnfit, RigError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    report.write_json(result, args.json)
    if result["modes"]:
        report.write_plot(result, args.plot)
    print(report.table(result))
    print(f"wrote {args.json} and {args.plot}", file=sys.stderr)
    if not result["modes"]:
        print(f"{PROG}: error: no mode could be measured (the reasons are above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
