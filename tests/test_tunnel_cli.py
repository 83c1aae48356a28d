"""flannel-tunnel's user errors: each a single line on stderr, the documented exit code, nothing left behind."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import TUNNEL, host_socket, start_tunnel
from daemons import http, scrape, wait_for

from pyflannel.bench.rig import Rig

BASE = ["--iface-ip", "198.18.0.1", "--subnet", "10.244.1.0/24", "--network", "10.244.0.0/16"]


def _run(argv: list[str], prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(prefix or []), TUNNEL, *argv], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--subnet", "10.244.1.0/24"], "the following arguments are required"),
        ([*BASE, "--bogus"], "unrecognized arguments: --bogus"),
        (["--iface-ip", "198.18.0.1", "--subnet", "10.244.1.0/33", "--network", "10.244.0.0/16"],
         "--subnet '10.244.1.0/33' is not an IPv4 or IPv6 CIDR"),
        (["--iface-ip", "nope", "--subnet", "10.244.1.0/24", "--network", "10.244.0.0/16"],
         "--iface-ip 'nope' is not an IPv4 or IPv6 address"),
        (["--iface-ip", "198.18.0.1", "--subnet", "10.9.1.0/24", "--network", "10.244.0.0/16"],
         "--subnet 10.9.1.0/24 is outside --network 10.244.0.0/16"),
        ([*BASE, "--peer", "10.245.2.0/24=198.18.0.2"], "--peer subnet 10.245.2.0/24 is outside --network"),
        ([*BASE, "--peer", "10.244.2.0/24"], "must look like CIDR=IP"),
        ([*BASE, "--peer", "10.244.2.0/24=198.18.0.2", "--peer", "10.244.2.128/25=198.18.0.3"],
         "--peer subnet 10.244.2.128/25 overlaps --peer 10.244.2.0/24"),
        ([*BASE, "--peer", "10.244.1.0/25=198.18.0.2"], "overlaps --subnet 10.244.1.0/24"),
        ([*BASE, "--batch", "0"], "--batch 0 is out of range 1-128"),
        ([*BASE, "--queues", "0"], "--queues 0 is out of range 1-8"),
        ([*BASE, "--queues", "9"], "--queues 9 is out of range 1-8"),
        ([*BASE, "--port", "70000"], "--port 70000 is out of range"),
        ([*BASE, "--offload", "maybe"], "invalid choice: 'maybe'"),
        ([*BASE, "--metrics-addr", "localhost"], "--metrics-addr 'localhost' is not HOST:PORT"),
        ([*BASE, "--metrics-addr", "127.0.0.1:\u00b2"], "--metrics-addr '127.0.0.1:\u00b2' is not HOST:PORT"),
    ],
)
def test_bad_flags_exit_2_with_one_line(argv: list[str], message: str) -> None:
    r = _run(argv)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("flannel-tunnel: error: "), r.stderr
    assert message in r.stderr


def test_unknown_offload_name_in_the_environment() -> None:
    r = subprocess.run([TUNNEL, *BASE], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "PYFLANNEL_DISABLE_OFFLOADS": "gso,warp"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "PYFLANNEL_DISABLE_OFFLOADS: unknown offload 'warp' (known: coalesce, gro, gso, tso, tso6, uso)" in r.stderr


def test_peers_file_errors_at_start_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "peers"
    bad.write_text("# ok\n10.244.2.0/24=198.18.0.2\n10.245.0.0/24=198.18.0.3\n")
    for path, message in ((bad, f"{bad}:3: subnet 10.245.0.0/24 is outside --network 10.244.0.0/16"),
                          (tmp_path / "none", f"cannot read --peers-file {tmp_path / 'none'}: No such file"),
                          (Path("/dev/zero"), "--peers-file /dev/zero is larger than 16 MiB")):
        r = _run([*BASE, "--peer", "10.244.3.0/24=198.18.0.3", "--peers-file", str(path)])
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    bad.write_text("10.244.3.0/25=198.18.0.3\n")
    r = _run([*BASE, "--peer", "10.244.3.0/24=198.18.0.3", "--peers-file", str(bad)])
    assert r.returncode == 2 and f"{bad}:1: subnet 10.244.3.0/25 overlaps --peer 10.244.3.0/24" in r.stderr


def _host_error(r: subprocess.CompletedProcess[str], message: str) -> None:
    assert r.returncode == 1, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_not_root() -> None:
    _host_error(_run(BASE, ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]), "must run as root")


def test_host_refusals(rig: Rig, tmp_path: Path) -> None:
    a, _ = rig.hosts
    _host_error(a.run(TUNNEL, "--iface-ip", "198.18.7.7", "--subnet", "10.244.1.0/24", "--network", "10.244.0.0/16",
                      check=False), "no local interface has address 198.18.7.7")
    with host_socket(a) as squatter:
        squatter.bind((str(a.underlay), 8285))
        _host_error(a.run(TUNNEL, *BASE, check=False), "UDP port 8285 on 198.18.0.1 is already in use")
    with host_socket(a, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 9471))
        squatter.listen()
        _host_error(a.run(TUNNEL, *BASE, "--metrics-addr", "127.0.0.1:9471", check=False),
                    "metrics port 127.0.0.1:9471 is already in use")
    # No /dev/net/tun: hide it behind an empty tmpfs in a private mount namespace.
    hidden = a.run("unshare", "--mount", "sh", "-c", f"mount -t tmpfs none /dev/net && exec {TUNNEL} {' '.join(BASE)}",
                   check=False)
    _host_error(hidden, "/dev/net/tun does not exist")
    assert "flannel0" not in a.run("ip", "link").stdout, "a failed start leaves nothing configured"


@pytest.mark.parametrize("make", [["ip", "tuntap", "add", "dev", "flannel0", "mode", "tun"],
                                  ["ip", "link", "add", "flannel0", "type", "veth", "peer", "name", "other0"]],
                         ids=["persistent-tun", "veth"])
def test_a_flannel0_that_is_not_ours(rig: Rig, make: list[str]) -> None:
    a, _ = rig.hosts
    a.run(*make)
    before = a.run("ip", "-d", "link", "show", "flannel0").stdout
    _host_error(a.run(TUNNEL, *BASE, check=False),
                "a network device named flannel0 already exists and is not ours: "
                "delete it (ip link del flannel0) or use another name")
    assert a.run("ip", "-d", "link", "show", "flannel0").stdout == before, "left as it was"


def test_a_second_tunnel_on_the_same_network(rig: Rig, tmp_path: Path) -> None:
    a, b = rig.hosts
    first = start_tunnel(a, [b], tmp_path)
    second = a.run(TUNNEL, *BASE, "--tun", "flannel1", "--port", "8286", check=False)
    _host_error(second, "10.244.0.0/16 is already routed through flannel0: is another tunnel running?")
    links = a.run("ip", "-o", "link").stdout
    assert "flannel0" in links and "flannel1" not in links
    assert first.stop() == 0


def test_metrics_count_exactly_what_crossed(rig: Rig, tmp_path: Path) -> None:
    a, b = rig.hosts
    tunnel = start_tunnel(a, [b], tmp_path, "--metrics-addr", "127.0.0.1:9471")
    start_tunnel(b, [a], tmp_path)
    before = scrape(a, 9471)
    with host_socket(a) as s:
        s.bind((str(a.overlay_ip), 0))
        for _ in range(7):
            s.sendto(b"y" * 72, (str(b.overlay_ip), 9))
    peer_tx = ("flannel_peer_packets_total", (("direction", "tx"), ("peer", str(b.underlay))))
    wait_for(lambda: scrape(a, 9471)[peer_tx] >= before.get(peer_tx, 0) + 7, 10, "the datagrams counted")
    after = scrape(a, 9471)
    assert after[peer_tx] - before.get(peer_tx, 0) == 7
    assert after[("flannel_packets_total", (("direction", "tx"),))] - before[("flannel_packets_total",
                                                                             (("direction", "tx"),))] == 7
    assert after[("flannel_bytes_total", (("direction", "tx"),))] - before[("flannel_bytes_total",
                                                                           (("direction", "tx"),))] == 7 * 100
    assert http(a, "/healthz", 9471).startswith("HTTP/1.0 200") and "flannel-tunnel is running" in http(
        a, "/healthz", 9471)
    assert tunnel.stop() == 0
