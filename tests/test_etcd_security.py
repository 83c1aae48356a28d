"""flanneld against Debian's etcd as operators run it: TLS with client certificates (--client-cert-auth), and
users with passwords, including a token that expires while flanneld is idle (--auth-token-ttl)."""

from __future__ import annotations

import ipaddress
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemons import FLANNELD, NET, PREFIX, Certs, Etcd, Log, make_certs, start_flanneld, wait_for, wait_for_env

from pyflannel.bench.rig import Rig


@pytest.fixture
def rig2() -> Iterator[Rig]:
    """A node and an etcd host."""
    with Rig(2, tag="pfs") as r:
        yield r


def _stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM, and everything flanneld wrote to stderr."""
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    return err


def _tls_flags(certs: Certs, client: bool = True) -> list[str]:
    flags = ["--etcd-cafile", str(certs.ca)]
    if client:
        flags += ["--etcd-certfile", str(certs.client[1]), "--etcd-keyfile", str(certs.client[0])]
    return flags


def test_tls_with_client_certificates(rig2: Rig, tmp_path: Path) -> None:
    node, etcd_host = rig2.hosts
    certs = make_certs(tmp_path / "pki", str(etcd_host.underlay))
    etcd = Etcd(etcd_host, tmp_path / "etcd", certs)
    etcd.start()
    etcd.put(f"{PREFIX}/config", NET % "host-gw")
    assert etcd.url.startswith("https://")

    without_cert = Log(start_flanneld(node, ["--etcd-endpoints", etcd.url, *_tls_flags(certs, client=False)],
                                      tmp_path / "x.env"))
    without_cert.wait_for(f"no etcd endpoint answered ({etcd.url}:")
    assert not (tmp_path / "x.env").exists(), "etcd requires a client certificate: no lease without one"
    without_cert.proc.send_signal(signal.SIGTERM)
    assert without_cert.proc.wait(20) == 0 and "Traceback" not in without_cert.text()

    proc = start_flanneld(node, ["--etcd-endpoints", etcd.url, *_tls_flags(certs)], tmp_path / "n.env")
    subnet = ipaddress.IPv4Interface(wait_for_env(tmp_path / "n.env", proc)["FLANNEL_SUBNET"]).network
    key = f"{PREFIX}/subnets/{subnet.network_address}-24"
    assert f'"PublicIP":"{node.underlay}"' in etcd.items(key)[key]
    # a bare host:port speaks TLS when a client certificate is given (clientv3's rule): a second node's way in
    bare = etcd.url.removeprefix("https://")
    other = start_flanneld(etcd_host, ["--etcd-endpoints", bare, *_tls_flags(certs)], tmp_path / "o.env")
    wait_for_env(tmp_path / "o.env", other)
    for p in (proc, other):
        assert "insecure" not in _stop(p)


def test_password_token_expiry_and_wrong_password(rig2: Rig, tmp_path: Path) -> None:
    node, etcd_host = rig2.hosts
    etcd = Etcd(etcd_host, tmp_path / "etcd", etcd_args=("--auth-token-ttl", "2"))
    etcd.start()
    etcd.enable_auth("root-secret", "flannel", "s3cret")
    etcd.put(f"{PREFIX}/config", NET % "host-gw")
    endpoint = ["--etcd-endpoints", etcd.url]

    wrong = start_flanneld(node, [*endpoint, "--etcd-username", "flannel", "--etcd-password", "nope"],
                           tmp_path / "w.env")
    assert wrong.wait(30) == 1
    lines = wrong.communicate()[1].strip().splitlines()
    assert lines[-1].startswith(f"flanneld: error: etcd at {etcd.url}: authentication failed for user 'flannel'")
    assert not any("Traceback" in line or "no etcd endpoint answered" in line for line in lines)

    proc = start_flanneld(node, [*endpoint, "--etcd-username", "flannel", "--etcd-password", "s3cret"],
                          tmp_path / "n.env")
    subnet = ipaddress.IPv4Interface(wait_for_env(tmp_path / "n.env", proc)["FLANNEL_SUBNET"]).network
    key = f"{PREFIX}/subnets/{subnet.network_address}-24"
    value = etcd.items(key)[key]
    time.sleep(5)  # idle for longer than --auth-token-ttl: etcd forgets flanneld's token
    etcd.delete(key)
    wait_for(lambda: etcd.items(key).get(key) == value, 30, "the lease written again with a new token")
    err = _stop(proc)
    assert "etcd auth token expired; authenticating again" in err, err
    assert "ERROR" not in err and "Traceback" not in err, err
    assert f"no certificate provided: connecting to etcd with http. This is insecure ({etcd.url})" in err


@pytest.mark.parametrize("flags, status, message", [
    (["--etcd-username", "flannel"], 2, "--etcd-username and --etcd-password go together: give both or neither"),
    (["--etcd-certfile", "/etc/hostname"], 2, "--etcd-certfile and --etcd-keyfile go together"),
    (["--etcd-cafile", "/nonexistent/ca.crt"], 1, "etcd TLS files (--etcd-cafile /nonexistent/ca.crt"),
    (["--etcd-certfile", "/etc/hostname", "--etcd-keyfile", "/etc/hostname"], 1, "etcd TLS files ("),
    (["--etcd-endpoints", "unix:///run/etcd.sock"], 2, "invalid etcd endpoint 'unix:///run/etcd.sock'"),
    (["--etcd-endpoints", "http://127.0.0.1:99999"], 2, "invalid etcd endpoint 'http://127.0.0.1:99999'"),
    (["--etcd-endpoints", "http://[::1"], 2, "invalid etcd endpoint 'http://[::1'"),
])
def test_etcd_flag_mistakes_are_one_line(flags: list[str], status: int, message: str, tmp_path: Path) -> None:
    """Caught before any connection is tried, so no etcd (and no test host) is needed."""
    result = subprocess.run([FLANNELD, *flags, "--subnet-file", str(tmp_path / "s.env")], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == status
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flanneld: error: ") and message in lines[0], result.stderr
