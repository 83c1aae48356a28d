"""Helpers for flanneld tests: etcd in a test host, flanneld processes, reading subnet.env and etcd keys, and the
IPv6 underlay (2001:2::/48, RFC 5180 benchmarking space) for dual-stack ones."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

from conftest import host_socket
from packets import Parsed, parse_ipv4
from prometheus_client.parser import text_string_to_metric_families

from pyflannel.bench.rig import Host, Rig

PREFIX = "/coreos.com/network"
NET = '{"Network":"10.244.0.0/16","Backend":{"Type":"%s"}}'
FLANNELD = str(Path(sys.executable).with_name("flanneld"))
ETCD_PORT = 2379
ETCD_TOOL = str(Path(__file__).with_name("etcd_tool.py"))
SUBNET_KEYS = ("FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET")
IFA_F_NODAD = 0x02


class Log:
    """A process's stderr, read as it is written (a thread), so that a test can wait for a line instead of
    sleeping; the process's stderr is this object's from then on."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        self.proc = proc
        self._lines: list[str] = []
        self._ended = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_for(self, text: str, timeout: float = 20) -> str:
        """The first line with text in it, once written; TimeoutError (or AssertionError if the process ended
        first) otherwise."""
        def found() -> str | None:
            return next((line for line in self._lines if text in line), None)
        with self._changed:
            if not self._changed.wait_for(lambda: found() is not None or self._ended, timeout):
                raise TimeoutError(f"no line with {text!r} after {timeout} s")
            line = found()
        assert line is not None, f"the process ended without a line with {text!r}: {self.text()}"
        return line

    def text(self) -> str:
        """Everything written so far (all of it, once the process has ended)."""
        if self.proc.poll() is not None:
            self._reader.join(20)
        with self._changed:
            return "".join(self._lines)


def wait_for(cond: Callable[[], object], timeout: float = 20, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while not (result := cond()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return result


@dataclass(frozen=True)
class Certs:
    """A test CA, and a server and a client certificate it signed (openssl, EC P-256, valid for a day)."""
    ca: Path
    server: tuple[Path, Path]
    client: tuple[Path, Path]


def make_certs(where: Path, server_ip: str) -> Certs:
    where.mkdir(parents=True, exist_ok=True)
    ca = _openssl_key_and_cert(where, "ca", "/CN=pyflannel test CA", None,
                               "basicConstraints=critical,CA:TRUE\nkeyUsage=keyCertSign")
    server = _openssl_key_and_cert(where, "server", "/CN=etcd", ca,
                                   f"subjectAltName=IP:{server_ip}\nextendedKeyUsage=serverAuth")
    client = _openssl_key_and_cert(where, "client", "/CN=flanneld", ca, "extendedKeyUsage=clientAuth")
    return Certs(ca[1], server, client)


def _openssl_key_and_cert(where: Path, name: str, subject: str, ca: tuple[Path, Path] | None, ext: str
                          ) -> tuple[Path, Path]:
    """(key, certificate) for name, signed by ca (or by itself), with the extensions given."""
    key, csr, crt, extfile = (where / f"{name}.{suffix}" for suffix in ("key", "csr", "crt", "ext"))
    extfile.write_text(ext + "\n")
    subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(csr), "-subj", subject], check=True, capture_output=True)
    signer = ["-CA", str(ca[1]), "-CAkey", str(ca[0]), "-CAcreateserial"] if ca else ["-signkey", str(key)]
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-out", str(crt), "-days", "1", *signer,
                    "-extfile", str(extfile)], check=True, capture_output=True)
    return key, crt


class Etcd:
    """Debian's etcd-server in a test host, on the underlay address; with `certs`, clients must speak TLS and
    show a certificate the test CA signed; `etcd_args` go to etcd as they are (e.g. --auth-token-ttl)."""

    def __init__(self, host: Host, data: Path, certs: Certs | None = None, etcd_args: tuple[str, ...] = ()) -> None:
        self.host = host
        self.data = data
        self.certs = certs
        self.etcd_args = etcd_args
        self.url = f"{'https' if certs else 'http'}://{host.underlay}:{ETCD_PORT}"
        self.tool_args: list[str] = []
        if certs:
            self.tool_args = ["--cacert", str(certs.ca), "--cert", str(certs.client[1]), "--key", str(certs.client[0])]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.start_unchecked()
        wait_for(lambda: self._answers(), 30, "etcd to answer")

    def start_unchecked(self) -> None:
        """Start etcd without waiting for it to answer (a test may have cut it off)."""
        log = open(self.data.with_suffix(".log"), "ab")  # noqa: SIM115 (the process owns it)
        tls = []
        if self.certs:
            tls = ["--cert-file", str(self.certs.server[1]), "--key-file", str(self.certs.server[0]),
                   "--client-cert-auth", "--trusted-ca-file", str(self.certs.ca)]
        self.proc = self.host.popen(
            "etcd", "--name", "test", "--data-dir", str(self.data), "--listen-client-urls", self.url,
            "--advertise-client-urls", self.url, "--listen-peer-urls", "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
            "--initial-cluster", "test=http://127.0.0.1:2380", *tls, *self.etcd_args, stdout=log, stderr=log)

    def _answers(self) -> bool:
        return self.tool("status", check=False).returncode == 0

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(20)

    def tool(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.host.run(sys.executable, ETCD_TOOL, self.url, *self.tool_args, *args, check=check)

    def enable_auth(self, root_password: str, user: str, password: str) -> None:
        """Users root and `user` (read-write on PREFIX only), then authentication on; this tool goes on as root."""
        self.tool("enable-auth", root_password, user, password, PREFIX)
        self.tool_args += ["--user", f"root:{root_password}"]

    def put(self, key: str, value: str) -> None:
        self.tool("put", key, value)

    def put_file(self, key: str, path: Path) -> None:
        self.tool("put-file", key, str(path))

    def delete(self, key: str) -> None:
        self.tool("delete", key)

    def items(self, prefix: str) -> dict[str, str]:
        return dict(json.loads(self.tool("dump", prefix).stdout))


def write_leases(db: Path, changes: dict[str, str | None]) -> None:
    """Other nodes' leases written straight into the embedded registry in one transaction, with the events its
    watchers read (value None: deleted), as a crowd of daemons joining and leaving between two polls would."""
    conn = sqlite3.connect(db, timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        for key, value in changes.items():
            data = None if value is None else value.encode()
            rev = conn.execute("INSERT INTO events (key, value) VALUES (?, ?)", (key, data)).lastrowid
            if data is None:
                conn.execute("DELETE FROM leases WHERE key = ?", (key,))
            else:
                conn.execute("INSERT OR REPLACE INTO leases (key, value, expires, rev) VALUES (?, ?, ?, ?)",
                             (key, data, time.time() + 3600, rev))
        conn.execute("COMMIT")
    finally:
        conn.close()


def embedded_registry(tmp_path: Path, net_conf: str) -> list[str]:
    """flanneld's flags for an embedded registry in tmp_path (leases.db) with this network config."""
    (tmp_path / "net-conf.json").write_text(net_conf)
    return ["--local-registry", str(tmp_path / "leases.db"), "--net-config-path", str(tmp_path / "net-conf.json")]


def start_flanneld(host: Host, registry: list[str], subnet_file: Path, *extra: str,
                   iface: tuple[str, ...] = ("--iface", "eth0"), env: dict[str, str] | None = None
                   ) -> subprocess.Popen[str]:
    """flanneld on host (with `env` added to the environment); the test hosts have no default route, so the
    interface is named unless `iface` says how else to find it."""
    return host.popen(FLANNELD, *registry, "--subnet-file", str(subnet_file), *iface, *extra,
                      stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


def wait_for_env(path: Path, proc: subprocess.Popen[str], timeout: float = 30) -> dict[str, str]:
    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"flanneld exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        return path.exists()
    wait_for(ready, timeout, f"{path}")
    return read_env(path)


def underlay6(host: Host) -> str:
    """The host's IPv6 underlay address: 198.18.0.N -> 2001:2::N."""
    return f"2001:2::{host.underlay.packed[3]:x}"


def add_ipv6_underlay(nodes: list[Host]) -> None:
    """An IPv6 address beside each node's IPv4 one on eth0 (no duplicate address detection, so it is usable at
    once)."""
    for node in nodes:
        with node.ipr() as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname="eth0")[0], address=underlay6(node), prefixlen=64,
                     flags=IFA_F_NODAD)


def start_nodes(rig: Rig, nodes: list[Host], registry: list[str], tmp_path: Path, *extra: str
                 ) -> list[tuple[subprocess.Popen[str], dict[str, str]]]:
    """flanneld on each node; each node's first address of every subnet it leased goes on its lo, standing in
    for a pod (added once: a restart that keeps the subnets finds them there)."""
    procs = [(node, start_flanneld(node, registry, tmp_path / f"{node.ns}.env", *extra)) for node in nodes]
    out = []
    for node, proc in procs:
        env = wait_for_env(tmp_path / f"{node.ns}.env", proc)
        with node.ipr() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            present = {a.get("IFA_ADDRESS") for a in ipr.get_addr(index=lo)}
            for addr in (env[key].split("/")[0] for key in SUBNET_KEYS if key in env):
                if addr not in present:
                    ipr.addr("add", index=lo, address=addr, prefixlen=32 if "." in addr else 128, flags=IFA_F_NODAD)
        out.append((proc, env))
    return out


def assert_all_pairs_reach(nodes: list[Host], envs: list[dict[str, str]], key: str = "FLANNEL_SUBNET") -> None:
    """Every node pings every other from its pod address of the family `key` names, to theirs."""
    addrs = [env[key].split("/")[0] for env in envs]
    for i, src in enumerate(nodes):
        for j, dst in enumerate(addrs):
            if i != j:
                wait_for(partial(pings, src, addrs[i], dst), 20, f"{addrs[i]} -> {dst}")


def pings(host: Host, src: str, dst: str) -> bool:
    return "1 received" in host.run("ping", "-c", "1", "-W", "1", "-I", src, dst, check=False).stdout


def send_and_catch(node: Host, src: str, flannel_node: socket.socket) -> Parsed | None:
    with host_socket(node) as s:
        s.bind((src, 0))
        s.sendto(b"hello flannel", ("10.244.200.7", 9))
    try:
        while True:
            pkt = parse_ipv4(flannel_node.recv(65536))
            if pkt.payload[8:] == b"hello flannel" and pkt.src == src:
                return pkt
    except TimeoutError:
        return None


def unreachable(node: Host, src: str) -> bool:
    with host_socket(node) as s:
        s.setsockopt(socket.IPPROTO_IP, 11, 1)  # IP_RECVERR
        s.bind((src, 0))
        s.connect(("10.244.200.7", 9))
        s.settimeout(1)
        s.send(b"x")
        try:
            s.recv(10)
        except OSError as exc:
            return exc.errno == 101  # ENETUNREACH: no route any more
    return False


def http(node: Host, path: str, port: int = 8471) -> str:
    """The whole HTTP response (status line, headers, body) of flanneld's health server on node, or any other."""
    with host_socket(node, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return b"".join(chunks).decode()


def serves(node: Host, path: str, text: str) -> bool:
    """Does flanneld's health server on node (port 8471) answer path with text in the response?"""
    return text in http(node, path)


def scrape(node: Host, port: int = 8471) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics on node (flanneld's health server by default), parsed as Prometheus does: {(sample, labels):
    value}. Every flannel_ family must say what it is (HELP)."""
    body = http(node, "/metrics", port).split("\r\n\r\n", 1)[1]
    samples = {}
    for family in text_string_to_metric_families(body):
        assert not family.name.startswith("flannel_") or family.documentation, f"{family.name} has no HELP"
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples
