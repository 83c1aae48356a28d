"""flannel-tunnel: a standalone flannel udp tunnel with static peers and no registry.

    flannel-tunnel --iface-ip IP --subnet CIDR --network CIDR --peer CIDR=IP [--peer ...] [--peers-file PATH]
                   [--port 8285] [--tun flannel0] [--offload auto|off] [--batch N] [--queues N]
                   [--no-source-check] [--stats-file PATH] [--metrics-addr HOST:PORT]

Dual stack: --iface-ip, --subnet and --network each take IPv4 or IPv6 and may be given once per family (an IPv6
--iface-ip opens a second socket, an IPv6 --subnet/--network gives flannel0 an IPv6 address and route); a --peer's
subnet needs the --network of its family, its address the --iface-ip of its family. flannel0's MTU is the
smallest the underlays allow (IPv4: MTU - 28, IPv6: MTU - 48).

It sets up flannel0 as flanneld's udp backend would, forwards until SIGINT/SIGTERM, and removes what it created.
Every second a Keeper (dataplane.keeper) checks flannel0: deleted, it is recreated with every route; set down or
stripped of its address or network route, these are put back; one log line each.

Signals. main() blocks every signal below before it does anything else, and one loop takes them with
sigtimedwait, so a signal during setup waits for setup to finish instead of killing it:
    SIGINT, SIGTERM   stop: final stats written, flannel0 removed, exit 0
    SIGHUP            re-read --peers-file and apply the difference (unchanged peers see no gap); a file that
                      does not parse is logged in one line and the routes in use stay
    SIGUSR1           write the counters as JSON to --stats-file (a new file renamed over it; errors logged)
    SIGUSR2, SIGALRM, SIGVTALRM, SIGPROF, SIGIO, SIGPWR, SIGSTKFLT, SIGRTMIN..SIGRTMAX
                      logged ("ignored SIGUSR2 from pid N") and otherwise ignored: their default would kill it
Deliberately left at their defaults: SIGQUIT, SIGABRT, SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGSYS, SIGTRAP, SIGXCPU,
SIGXFSZ (dump core: a request for one, or a bug; faulthandler prints the Python stacks first for the faults),
SIGTSTP/SIGTTIN/SIGTTOU/SIGCONT (job control), SIGCHLD/SIGURG/SIGWINCH (ignored by default), SIGPIPE (ignored
by Python: a write to a closed pipe is an error, not a death), and SIGKILL/SIGSTOP, which cannot be caught.

Exit status: 0 after a clean stop; 2 for flags (or a --peers-file at start) that do not make sense; 1 when the
host refuses the setup or flannel0 cannot be recreated; one line on stderr for both.
"""

from __future__ import annotations

import argparse
import faulthandler
import ipaddress
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NoReturn, TypeVar

from pyflannel.dataplane import klog, metrics, offload
from pyflannel.dataplane._engine import MAX_QUEUES
from pyflannel.dataplane.errors import DataplaneError
from pyflannel.dataplane.keeper import Keeper, PumpSpec
from pyflannel.dataplane.pump import DEFAULT_BATCH, DEFAULT_PORT, QUEUES_CAP, default_queues
from pyflannel.dataplane.tun import ENCAP_OVERHEAD, ENCAP_OVERHEAD6, underlay_mtu

log = logging.getLogger("flannel-tunnel")

PROG = "flannel-tunnel"
# The signals this process takes (see the module docstring); all others keep their default action.
STOP = {signal.SIGINT, signal.SIGTERM}
IGNORED = {signal.SIGUSR2, signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF, signal.SIGIO, signal.SIGPWR,
           signal.SIGSTKFLT, *range(signal.SIGRTMIN, signal.SIGRTMAX + 1)}
WATCHED = STOP | {signal.SIGHUP, signal.SIGUSR1} | IGNORED
CHECK_INTERVAL = 1.0  # seconds between dataplane checks (a deleted flannel0 is back within about this)
PEERS_FILE_MAX = 16 << 20  # bytes: some 400,000 peer lines


Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Peer:
    subnet: Network
    addr: Address


@dataclass(frozen=True)
class TunnelConfig:
    iface_ip: ipaddress.IPv4Address | None
    subnet: ipaddress.IPv4Network | None
    network: ipaddress.IPv4Network | None
    iface_ip6: ipaddress.IPv6Address | None
    subnet6: ipaddress.IPv6Network | None
    network6: ipaddress.IPv6Network | None
    peers: tuple[Peer, ...]
    """From --peer flags only; all_peers() adds the --peers-file."""
    peers_file: str | None
    port: int
    tun: str
    offloads: offload.Offloads
    batch: int
    queues: int
    check_source: bool
    stats_file: str | None
    metrics_addr: tuple[str, int] | None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line on stderr and exit 2, instead of argparse's usage dump."""
        self.exit(2, f"{PROG}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Standalone flannel udp tunnel between hosts with static peers.")
    p.add_argument("--iface-ip", required=True, action="append",
                   help="underlay address to bind the UDP socket to (once per family)")
    p.add_argument("--subnet", required=True, action="append",
                   help="this host's overlay subnet, e.g. 10.244.1.0/24 (once per family)")
    p.add_argument("--network", required=True, action="append",
                   help="the whole overlay network, e.g. 10.244.0.0/16 (once per family)")
    p.add_argument("--peer", action="append", default=[], metavar="CIDR=IP", help="a peer's subnet and address")
    p.add_argument("--peers-file", metavar="PATH", help="more peers, one CIDR=IP a line; SIGHUP re-reads it")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="UDP port, the same on every host (8285)")
    p.add_argument("--tun", default="flannel0", help="TUN device name (flannel0)")
    p.add_argument("--offload", choices=("auto", "off"), default="auto",
                   help=f"kernel offloads (auto); {offload.ENV_DISABLE}=gso,gro,... turns single ones off")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, help=f"packets per syscall, 1-128 ({DEFAULT_BATCH})")
    p.add_argument("--queues", type=int, default=None,
                   help=f"engines, each one or two threads serving its own TUN queues, 1-{MAX_QUEUES} (one per two "
                        f"CPUs, up to {QUEUES_CAP})")
    p.add_argument("--no-source-check", action="store_true", help="accept packets whose sender is not their peer")
    p.add_argument("--stats-file", help="where SIGUSR1 writes the counters as JSON")
    p.add_argument("--metrics-addr", metavar="HOST:PORT", help="serve Prometheus /metrics and /healthz there")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    return p


def _ip(text: str, what: str) -> Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise DataplaneError(f"{what} {text!r} is not an IPv4 or IPv6 address") from None


def _cidr(text: str, what: str) -> Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise DataplaneError(f"{what} {text!r} is not an IPv4 or IPv6 CIDR") from None


V4 = TypeVar("V4")
V6 = TypeVar("V6")


def _by_family(values: Sequence[object], kinds: tuple[type[V4], type[V6]], flag: str) -> tuple[V4 | None, V6 | None]:
    """A flag's IPv4 value and its IPv6 value (`kinds`: their types), each given at most once."""
    v4 = [v for v in values if isinstance(v, kinds[0])]
    v6 = [v for v in values if isinstance(v, kinds[1])]
    for version, found in ((4, v4), (6, v6)):
        if len(found) > 1:
            raise DataplaneError(f"{flag} given twice for IPv{version}: {found[0]} and {found[1]}")
    return next(iter(v4), None), next(iter(v6), None)


def _peer(text: str, cfg: TunnelConfig, where: str = "--peer") -> Peer:
    cidr, sep, addr = text.partition("=")
    if not sep:
        raise DataplaneError(f"{where} {text!r} must look like CIDR=IP")
    peer = Peer(_cidr(cidr.strip(), f"{where} subnet"), _ip(addr.strip(), f"{where} address"))
    network = cfg.network if peer.subnet.version == 4 else cfg.network6
    if network is None:
        raise DataplaneError(f"{where} subnet {peer.subnet}: no IPv{peer.subnet.version} --network")
    if not _inside(peer.subnet, network):
        raise DataplaneError(f"{where} subnet {peer.subnet} is outside --network {network}")
    if (cfg.iface_ip if peer.addr.version == 4 else cfg.iface_ip6) is None:
        raise DataplaneError(f"{where} address {peer.addr}: no IPv{peer.addr.version} --iface-ip to reach it from")
    return peer


def _inside(subnet: Network, network: Network) -> bool:
    return subnet.version == network.version and subnet.subnet_of(network)  # type: ignore[arg-type]


def _file_peers(path: str, cfg: TunnelConfig) -> list[tuple[str, Peer]]:
    """The peers in a --peers-file, each with where it came from: one CIDR=IP a line; blank lines and # comments
    are skipped."""
    try:
        with open(path, "rb") as f:
            data = f.read(PEERS_FILE_MAX + 1)   # bounded: a device or an endless file is refused, not read into memory
        lines = data.decode().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataplaneError(f"cannot read --peers-file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if len(data) > PEERS_FILE_MAX:
        raise DataplaneError(f"--peers-file {path} is larger than {PEERS_FILE_MAX >> 20} MiB")
    return [(f"{path}:{n}:", _peer(text, cfg, f"{path}:{n}:"))
            for n, line in enumerate(lines, 1) if (text := line.partition("#")[0].strip())]


def all_peers(cfg: TunnelConfig) -> tuple[Peer, ...]:
    """--peer flags plus the --peers-file as it is now, checked for overlaps; DataplaneError if they do not fit."""
    sourced = [("--peer", peer) for peer in cfg.peers]
    if cfg.peers_file is not None:
        sourced += _file_peers(cfg.peers_file, cfg)
    for version, own in ((4, cfg.subnet), (6, cfg.subnet6)):
        mine: list[tuple[str, Network]] = [] if own is None else [("--subnet", own)]
        _refuse_overlaps(mine + [(where, peer.subnet) for where, peer in sourced if peer.subnet.version == version])
    return tuple(peer for _, peer in sourced)


def _refuse_overlaps(subnets: list[tuple[str, Network]]) -> None:
    """DataplaneError naming the first pair (of one family) that overlaps, the later one first. Sorted by
    start, a subnet overlaps an earlier one only if it starts before the furthest end seen so far: n log n, for
    thousands of peers at startup."""
    ordered = sorted(range(len(subnets)), key=lambda i: (int(subnets[i][1].network_address), -subnets[i][1].prefixlen))
    widest: int | None = None
    for i in ordered:
        subnet = subnets[i][1]
        if widest is not None and int(subnet.network_address) <= int(subnets[widest][1].broadcast_address):
            (where, later), (other_where, other) = subnets[max(i, widest)], subnets[min(i, widest)]
            raise DataplaneError(f"{where} subnet {later} overlaps {other_where} {other}")
        if widest is None or int(subnet.broadcast_address) > int(subnets[widest][1].broadcast_address):
            widest = i


def parse_config(argv: list[str] | None) -> TunnelConfig:
    """Parse and cross-check the flags; DataplaneError for values that parse but do not fit together."""
    args = _parser().parse_args(argv)
    klog.setup(1 if args.verbose else 0)
    addresses = (ipaddress.IPv4Address, ipaddress.IPv6Address)
    networks = (ipaddress.IPv4Network, ipaddress.IPv6Network)
    iface_ip, iface_ip6 = _by_family([_ip(text, "--iface-ip") for text in args.iface_ip], addresses, "--iface-ip")
    network, network6 = _by_family([_cidr(text, "--network") for text in args.network], networks, "--network")
    subnet, subnet6 = _by_family([_cidr(text, "--subnet") for text in args.subnet], networks, "--subnet")
    for version, sub, net in ((4, subnet, network), (6, subnet6, network6)):
        if sub is None and net is not None:
            raise DataplaneError(f"--network {net} has no IPv{version} --subnet")
        if sub is not None and net is None:
            raise DataplaneError(f"--subnet {sub} has no IPv{version} --network")
        if sub is not None and net is not None and not _inside(sub, net):
            raise DataplaneError(f"--subnet {sub} is outside --network {net}")
    if not 0 < args.port < 65536:
        raise DataplaneError(f"--port {args.port} is out of range 1-65535")
    if not 1 <= args.batch <= 128:
        raise DataplaneError(f"--batch {args.batch} is out of range 1-128")
    queues = default_queues() if args.queues is None else args.queues
    if not 1 <= queues <= MAX_QUEUES:
        raise DataplaneError(f"--queues {queues} is out of range 1-{MAX_QUEUES}")
    cfg = TunnelConfig(
        iface_ip=iface_ip,
        subnet=subnet,
        network=network,
        iface_ip6=iface_ip6,
        subnet6=subnet6,
        network6=network6,
        peers=(),
        peers_file=args.peers_file,
        port=args.port,
        tun=args.tun,
        offloads=offload.wanted(args.offload),
        batch=args.batch,
        queues=queues,
        check_source=not args.no_source_check,
        stats_file=args.stats_file,
        metrics_addr=None if args.metrics_addr is None else _host_port(args.metrics_addr, "--metrics-addr"),
    )
    return replace(cfg, peers=tuple(_peer(text, cfg) for text in args.peer))


def _host_port(text: str, flag: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:  # "²" is a digit, no int
        raise DataplaneError(f"{flag} {text!r} is not HOST:PORT")
    return host or "0.0.0.0", int(port)


def _routes(cfg: TunnelConfig, peers: tuple[Peer, ...]) -> dict[str, tuple[str, int]]:
    return {str(peer.subnet): (str(peer.addr), cfg.port) for peer in peers}


def run(cfg: TunnelConfig, peers: tuple[Peer, ...]) -> None:
    """Bring the tunnel up, forward until SIGINT/SIGTERM, take it down. The signals are blocked by main()."""
    if os.geteuid() != 0:
        raise DataplaneError("must run as root (creating flannel0 needs CAP_NET_ADMIN)")
    mtu = min(underlay_mtu(ip) - (ENCAP_OVERHEAD if ip.version == 4 else ENCAP_OVERHEAD6)
              for ip in (cfg.iface_ip, cfg.iface_ip6) if ip is not None)
    keeper = Keeper(PumpSpec(iface_ip=cfg.iface_ip, port=cfg.port, tun_name=cfg.tun, subnet=cfg.subnet,
                             network=cfg.network, mtu=mtu, wanted=cfg.offloads, batch=cfg.batch,
                             check_source=cfg.check_source, queues=cfg.queues, iface_ip6=cfg.iface_ip6,
                             subnet6=cfg.subnet6, network6=cfg.network6))
    server = None
    if cfg.metrics_addr is not None:  # before flannel0, so that a port in use leaves nothing behind
        server = metrics.serve(*cfg.metrics_addr, metrics.registry(metrics.EngineCollector(keeper.stats)),
                               {"/healthz": (lambda: keeper.failure, 500, "flannel-tunnel is running")})
    try:
        pump = keeper.start(_routes(cfg, peers))
        log.info("%s up: subnet %s, mtu %d, %d peers, udp %s port %d, batch %d, queues %d, engine memory %.1f MiB, "
                 "offloads: %s", cfg.tun, " ".join(map(str, pump.subnets)), mtu, len(peers),
                 " ".join(str(ip) for ip in (cfg.iface_ip, cfg.iface_ip6) if ip is not None), cfg.port, cfg.batch,
                 cfg.queues, sum(pump.memory().values()) / (1 << 20), pump.offloads.describe())
        sig = _serve(cfg, keeper)
        keeper.pump.stop()
        _write_stats(cfg.stats_file, keeper)
    finally:
        if server is not None:
            server.shutdown()
        keeper.close()
    log.info("stopped on %s", _name(sig))


def _serve(cfg: TunnelConfig, keeper: Keeper) -> int:
    """Serve signals, and check the dataplane every CHECK_INTERVAL seconds; returns the signal that stops it."""
    next_check = time.monotonic() + CHECK_INTERVAL
    while True:
        info = signal.sigtimedwait(WATCHED, max(0.0, next_check - time.monotonic()))
        if info is None:
            keeper.check()
            next_check = time.monotonic() + CHECK_INTERVAL
        elif info.si_signo in STOP:
            return info.si_signo
        elif info.si_signo == signal.SIGUSR1:
            _write_stats(cfg.stats_file, keeper)
        elif info.si_signo == signal.SIGHUP:
            _reload(cfg, keeper)
        else:
            log.info("ignored %s from pid %d", _name(info.si_signo), info.si_pid)


def _reload(cfg: TunnelConfig, keeper: Keeper) -> None:
    """SIGHUP: the --peers-file again, applied as a difference; a file that does not parse changes nothing."""
    if cfg.peers_file is None:
        log.info("SIGHUP: no --peers-file to re-read")
        return
    try:
        peers = all_peers(cfg)
    except DataplaneError as exc:
        log.error("SIGHUP: kept the %d routes in use: %s", len(keeper.routes), exc)
        return
    changed, removed = keeper.replace_routes(_routes(cfg, peers))
    unrouted = len(keeper.unrouted)
    log.info("SIGHUP: %d peers from %s: %d routes added or changed, %d removed%s", len(peers), cfg.peers_file,
             changed, removed, f", {unrouted} not routed (retried every second)" if unrouted else "")


def _write_stats(path: str | None, keeper: Keeper) -> None:
    """The counters as JSON, replacing `path` in one rename: a reader never sees half a file, and nothing
    planted at a predictable temporary name (a symlink, say) is ever opened. Failures are logged, not fatal."""
    if path is None:
        return
    directory, name = os.path.split(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)  # O_CREAT|O_EXCL: never follows a link
    except OSError as exc:
        log.error("cannot write stats to %s: %s", path, exc.strerror)
        return
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(keeper.stats(), f)
        os.replace(tmp, path)
    except OSError as exc:
        os.unlink(tmp)
        log.error("cannot write stats to %s: %s", path, exc.strerror)


def _name(signo: int) -> str:
    try:
        return signal.Signals(signo).name
    except ValueError:
        return f"SIGRTMIN+{signo - signal.SIGRTMIN}"


def main(argv: list[str] | None = None) -> int:
    """Exit 0 after a clean stop, 2 for flags that do not make sense, 1 when the host refuses the setup."""
    # Before anything else, so that no signal can kill the setup: each waits until _serve takes it (and the
    # engine threads, started later, inherit the mask, so only _serve ever sees one).
    signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)
    faulthandler.enable()
    try:
        cfg = parse_config(argv)
        peers = all_peers(cfg)
    except DataplaneError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    try:
        run(cfg, peers)
    except DataplaneError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
