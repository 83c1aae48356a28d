"""flannel-tunnel: a standalone flannel udp tunnel with static peers and no registry.

    flannel-tunnel --iface-ip IP --subnet CIDR --network CIDR --peer CIDR=IP [--peer ...] [--port 8285]
                   [--tun flannel0] [--offload auto|off] [--batch N]

It sets up flannel0 as flanneld's udp backend would, forwards until SIGINT/SIGTERM, and removes what it created.
SIGUSR1 writes the engine counters as JSON to --stats-file.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import NoReturn

from dataplane import offload
from dataplane.errors import DataplaneError
from dataplane.keeper import Keeper, PumpSpec
from dataplane.pump import DEFAULT_BATCH, DEFAULT_PORT
from dataplane.tun import ENCAP_OVERHEAD, underlay_mtu

log = logging.getLogger("flannel-tunnel")

PROG = "flannel-tunnel"
CHECK_INTERVAL = 1.0  # seconds between dataplane checks (a deleted flannel0 is back within about this)


@dataclass(frozen=True)
class Peer:
    subnet: ipaddress.IPv4Network
    addr: ipaddress.IPv4Address


@dataclass(frozen=True)
class TunnelConfig:
    iface_ip: ipaddress.IPv4Address
    subnet: ipaddress.IPv4Network
    network: ipaddress.IPv4Network
    peers: tuple[Peer, ...]
    port: int
    tun: str
    offloads: offload.Offloads
    batch: int
    check_source: bool
    stats_file: str | None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line on stderr and exit 2, instead of argparse's usage dump."""
        self.exit(2, f"{PROG}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Standalone flannel udp tunnel between hosts with static peers.")
    p.add_argument("--iface-ip", required=True, help="underlay address to bind the UDP socket to")
    p.add_argument("--subnet", required=True, help="this host's overlay subnet, e.g. 10.244.1.0/24")
    p.add_argument("--network", required=True, help="the whole overlay network, e.g. 10.244.0.0/16")
    p.add_argument("--peer", action="append", default=[], metavar="CIDR=IP", help="a peer's subnet and address")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="UDP port, the same on every host (8285)")
    p.add_argument("--tun", default="flannel0", help="TUN device name (flannel0)")
    p.add_argument("--offload", choices=("auto", "off"), default="auto",
                   help=f"kernel offloads (auto); {offload.ENV_DISABLE}=gso,gro,... turns single ones off")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, help=f"packets per syscall, 1-128 ({DEFAULT_BATCH})")
    p.add_argument("--no-source-check", action="store_true", help="accept packets whose sender is not their peer")
    p.add_argument("--stats-file", help="where SIGUSR1 writes the counters as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    return p


def _ip(text: str, what: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise DataplaneError(f"{what} {text!r} is not an IPv4 address") from None


def _cidr(text: str, what: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(text, strict=False)
    except ValueError:
        raise DataplaneError(f"{what} {text!r} is not an IPv4 CIDR") from None


def _peer(text: str, network: ipaddress.IPv4Network) -> Peer:
    cidr, sep, addr = text.partition("=")
    if not sep:
        raise DataplaneError(f"--peer {text!r} must look like CIDR=IP")
    peer = Peer(_cidr(cidr, "--peer subnet"), _ip(addr, "--peer address"))
    if not peer.subnet.subnet_of(network):
        raise DataplaneError(f"--peer subnet {peer.subnet} is outside --network {network}")
    return peer


def parse_config(argv: list[str] | None) -> TunnelConfig:
    """Parse and cross-check the flags; DataplaneError for values that parse but do not fit together."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format=f"{PROG}: %(message)s")
    network = _cidr(args.network, "--network")
    subnet = _cidr(args.subnet, "--subnet")
    if not subnet.subnet_of(network):
        raise DataplaneError(f"--subnet {subnet} is outside --network {network}")
    peers = tuple(_peer(text, network) for text in args.peer)
    taken = [("--subnet", subnet)]
    for peer in peers:
        for what, other in taken:
            if peer.subnet.overlaps(other):
                raise DataplaneError(f"--peer subnet {peer.subnet} overlaps {what} {other}")
        taken.append((f"--peer {peer.subnet}", peer.subnet))
    if not 0 < args.port < 65536:
        raise DataplaneError(f"--port {args.port} is out of range 1-65535")
    if not 1 <= args.batch <= 128:
        raise DataplaneError(f"--batch {args.batch} is out of range 1-128")
    return TunnelConfig(
        iface_ip=_ip(args.iface_ip, "--iface-ip"),
        subnet=subnet,
        network=network,
        peers=peers,
        port=args.port,
        tun=args.tun,
        offloads=offload.wanted(args.offload),
        batch=args.batch,
        check_source=not args.no_source_check,
        stats_file=args.stats_file,
    )


def run(cfg: TunnelConfig) -> None:
    """Bring the tunnel up, forward until SIGINT/SIGTERM, take it down."""
    if os.geteuid() != 0:
        raise DataplaneError("must run as root (creating flannel0 needs CAP_NET_ADMIN)")
    mtu = underlay_mtu(cfg.iface_ip) - ENCAP_OVERHEAD
    keeper = Keeper(PumpSpec(iface_ip=cfg.iface_ip, port=cfg.port, tun_name=cfg.tun, subnet=cfg.subnet,
                             network=cfg.network, mtu=mtu, wanted=cfg.offloads, batch=cfg.batch,
                             check_source=cfg.check_source))
    # Block the signals before the engine threads exist so that only sigtimedwait below ever sees them.
    signals = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    pump = keeper.start({str(peer.subnet): (str(peer.addr), cfg.port) for peer in cfg.peers})
    log.info("%s up: subnet %s, mtu %d, %d peers, udp %s:%d, batch %d, offloads: %s", cfg.tun, cfg.subnet, mtu,
             len(cfg.peers), cfg.iface_ip, cfg.port, cfg.batch, pump.offloads.describe())
    try:
        sig = _forward(cfg, keeper, signals)
        keeper.pump.stop()
        _write_stats(cfg.stats_file, keeper)
    finally:
        keeper.close()
    log.info("stopped on %s", signal.Signals(sig).name)


def _forward(cfg: TunnelConfig, keeper: Keeper, signals: set[signal.Signals]) -> signal.Signals:
    """Serve signals, and check the dataplane every CHECK_INTERVAL seconds; returns the signal that stops it."""
    next_check = time.monotonic() + CHECK_INTERVAL
    while True:
        info = signal.sigtimedwait(signals, max(0.0, next_check - time.monotonic()))
        if info is None:
            keeper.check()
            next_check = time.monotonic() + CHECK_INTERVAL
        elif info.si_signo == signal.SIGUSR1:
            _write_stats(cfg.stats_file, keeper)
        else:
            return signal.Signals(info.si_signo)


def _write_stats(path: str | None, keeper: Keeper) -> None:
    if path is None:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(keeper.stats(), f)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Exit 0 after a clean stop, 2 for flags that do not make sense, 1 when the host refuses the setup."""
    try:
        cfg = parse_config(argv)
    except DataplaneError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    try:
        run(cfg)
    except DataplaneError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
