"""flannel-c: flannel's own udp backend design (one thread, one packet per syscall), the reference flannel-bench
sets every mode's latency against. The loop is src_ext/flannel_c.pyx; this sets up what flannel's udp backend
sets up around it (flannel0 without offloads, MTU - 28, a socket with default buffers on port 8285) and runs it
until SIGINT or SIGTERM.

    python -m pyflannel.bench.flannel_c IFACE_IP SUBNET NETWORK PEER_SUBNET=PEER_IP [...]
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import sys

from pyroute2 import IPRoute

from pyflannel.bench._flannel_c import run
from pyflannel.dataplane.errors import DataplaneError
from pyflannel.dataplane.offload import NONE
from pyflannel.dataplane.pump import DEFAULT_PORT
from pyflannel.dataplane.tun import ENCAP_OVERHEAD, configure_tun, ensure_configured, open_tun, underlay_mtu

USAGE = "usage: python -m pyflannel.bench.flannel_c IFACE_IP SUBNET NETWORK PEER_SUBNET=PEER_IP [...]"


def main(argv: list[str]) -> int:
    try:
        iface_ip, subnet, network = (ipaddress.IPv4Address(argv[0]), ipaddress.IPv4Network(argv[1]),
                                     ipaddress.IPv4Network(argv[2]))
        peers = [(ipaddress.IPv4Network(s), ipaddress.IPv4Address(a)) for s, a in (p.split("=") for p in argv[3:])]
    except (IndexError, ValueError):
        print(USAGE, file=sys.stderr)
        return 2
    routes = [(int(net.network_address), int(net.netmask), int(addr), DEFAULT_PORT) for net, addr in peers]
    stop_r, stop_w = os.pipe()
    os.set_blocking(stop_w, False)
    signal.set_wakeup_fd(stop_w)   # written by the C-level handler even while the loop holds this thread
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        tun = open_tun("flannel0", NONE)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((str(iface_ip), DEFAULT_PORT))
            configure_tun(tun, subnets=[subnet], networks=[network], mtu=underlay_mtu(iface_ip) - ENCAP_OVERHEAD)
            with IPRoute() as ipr:
                ensure_configured(ipr, ipr.link_lookup(ifname=tun.name)[0], subnets=[subnet], networks=[network])
            run(tun.fds[0], sock.fileno(), stop_r, routes)
        tun.close()
    except (DataplaneError, OSError) as exc:
        print(f"flannel-c: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
