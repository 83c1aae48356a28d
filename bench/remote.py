"""The near end of a two-host run: the ssh session to `flannel-bench agent` on the far host, and that host's end.

ssh is run as the user would run it (their ssh config applies; `--ssh-config FILE` names another), with
BatchMode because nobody can answer a prompt, and in a session of its own, so that Ctrl-C reaches flannel-bench,
which then removes what it set up at both ends before it closes the session.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pyflannel.bench.agent import VERSION
from pyflannel.bench.end import Endpoints, LocalEnd, join
from pyflannel.bench.modes import Lease, ModeUnavailable, version
from pyflannel.bench.rig import host_subnet
from pyflannel.daemon.config import Address

LOCAL, REMOTE = 1, 2
"""Whose subnets the ends have: this host a rig's first host's (10.244.1.0/24, fd00:10:244:1::/64), HOST the
second's."""


class SessionError(Exception):
    """The far host cannot be reached or used; the run stops (the message says why)."""


class Session:
    """One ssh session to the far host's agent; call() is one request and its reply."""

    def __init__(self, target: str, *, remote_bin: str, ssh_config: str | None, idle_timeout: float) -> None:
        self.target = target
        self.remote_bin = remote_bin
        self._stderr: IO[str] = tempfile.TemporaryFile("w+")  # noqa: SIM115 (open as long as the session)
        # remote_bin goes to the remote shell as it is, so that `--remote-bin "sudo -n flannel-bench"` works
        command = f"{remote_bin} agent --idle-timeout {idle_timeout:.0f}"
        self._proc = subprocess.Popen(
            ["ssh", *(["-F", ssh_config] if ssh_config else []), "-T", "-o", "BatchMode=yes",
             "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3", target, command],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True, start_new_session=True)
        self._unread = 0   # replies not read because an interrupt came first; read before the next one

    def call(self, op: str, **args: Any) -> Any:
        """The agent's result; ModeUnavailable if the request failed for this mode only, else SessionError."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        try:
            self._proc.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
            self._proc.stdin.flush()
            self._unread += 1
            while self._unread:
                line = self._proc.stdout.readline()
                if not line:
                    break
                self._unread -= 1
        except BrokenPipeError:
            line = ""
        if not line:
            raise SessionError(self._why_lost())
        reply = json.loads(line)
        if "error" in reply:
            raise (ModeUnavailable if reply["skip"] else SessionError)(f"{self.target}: {reply['error']}")
        return reply["ok"]

    def _why_lost(self) -> str:
        try:
            code = self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        self._stderr.seek(0)
        said = [line.strip() for line in self._stderr if line.strip()]
        last = said[-1] if said else ""
        if code == 255:
            return f"ssh {self.target} failed: {last or 'exit status 255'}"
        if code == 127:
            return f"{self.target} has no {self.remote_bin} (install pyflannel[bench] there, or give --remote-bin)"
        return f"lost the connection to {self.target}{': ' + last if last else ''}"

    def close(self) -> None:
        """End of input: the agent removes anything still set up and exits, and so does ssh."""
        if self._proc.stdin:
            with suppress(BrokenPipeError):
                self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._stderr.close()


class RemoteEnd:
    """The far host's end (a bench.end.End): each call is a request to its agent, whose end is of one family at a
    time (open() switches it, for the IPv6 modes and back)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.version = 0

    def open(self, underlay: Address) -> dict[str, Any]:
        """The agent's end on `underlay` with the far subnet of its family; the far machine's description."""
        described: dict[str, Any] = self.session.call("open", underlay=str(underlay),
                                                      subnet=str(host_subnet(underlay.version, REMOTE)))
        self.version = underlay.version
        return described

    def prepare(self, mode: str) -> Lease:
        return Lease.from_json(self.session.call("prepare", mode=mode))

    def connect(self, mode: str, peer: Lease) -> None:
        self.session.call("connect", mode=mode, peer=peer.to_json())

    def serve(self, addr: Address, port: int) -> None:
        self.session.call("serve", addr=str(addr), port=port)

    def engine_stats(self) -> dict[str, Any] | None:
        result: dict[str, Any] | None = self.session.call("engine_stats")
        return result

    def busy_seconds(self) -> float:
        return float(self.session.call("busy_seconds"))

    def reset(self) -> None:
        self.session.call("reset")


@dataclass
class Pair:
    """This host's end per family and the far host's end, with the far underlay address of each family; a family
    is here only when both hosts have an underlay address of it (IPv6: --local-ip6 and --remote-ip6)."""

    far: RemoteEnd
    local: dict[int, LocalEnd] = field(default_factory=dict)
    remote_ip: dict[int, Address] = field(default_factory=dict)


@contextmanager
def ends(args: argparse.Namespace, files: Path) -> Iterator[tuple[Pair, dict[str, Any]]]:
    """Both hosts' ends, checked (every family's, before anything is set up) and described (the report's
    "machine"); the session closes when the block ends, after this host's ends are reset."""
    session = Session(args.remote, remote_bin=args.remote_bin, ssh_config=args.ssh_config,
                      idle_timeout=4 * (args.seconds + 60) + args.pings)
    pair = Pair(RemoteEnd(session))
    try:
        local_ip, pair.remote_ip[4] = _addresses(session.call("hello"), args)
        if args.local_ip6:
            pair.remote_ip[6] = args.remote_ip6
            pair.local[6] = LocalEnd.this_host(args.local_ip6, host_subnet(6, LOCAL), files)
        pair.local[4] = LocalEnd.this_host(local_ip, host_subnet(4, LOCAL), files)
        try:
            if 6 in pair.remote_ip:
                pair.far.open(pair.remote_ip[6])   # checked first; the IPv4 end stays open
            far = pair.far.open(pair.remote_ip[4])
            yield pair, {"local": pair.local[4].describe(), "remote": far}
        finally:
            for local in pair.local.values():
                local.reset()
    finally:
        session.close()


def _addresses(hello: dict[str, Any], args: argparse.Namespace) -> tuple[Address, Address]:
    """(this host's, the far host's) underlay address: as given, or the ends of the ssh connection."""
    if hello["version"] != VERSION:
        raise SessionError(f"{args.remote} runs pyflannel {hello['version']} and this host {VERSION}; "
                           "install the same version on both")
    if hello["uid"] != 0:
        raise SessionError(f"the agent on {args.remote} runs as uid {hello['uid']}, not root; ssh in as root or "
                           "give --remote-bin 'sudo -n flannel-bench'")
    seen = hello["ssh_connection"].split()
    local_ip = args.local_ip or (seen[0] if seen else "")
    remote_ip = args.remote_ip or (seen[2] if seen else "")
    for ip in (local_ip, remote_ip):
        try:
            ipaddress.IPv4Address(ip)
        except ValueError:
            raise SessionError(f"ssh reached {args.remote} as {ip or 'an unknown address'}, not IPv4; give "
                               "--local-ip and --remote-ip (the underlay addresses of the two hosts)") from None
    return ipaddress.IPv4Address(local_ip), ipaddress.IPv4Address(remote_ip)


@contextmanager
def path(mode: str, pair: Pair) -> Iterator[Endpoints]:
    """The mode set up across the two hosts for one measurement, and removed at both ends afterwards."""
    family = version(mode)
    if family not in pair.local:
        raise ModeUnavailable(f"{mode} across two hosts needs their IPv6 underlay addresses: give --local-ip6 "
                              "and --remote-ip6")
    if pair.far.version != family:
        pair.far.open(pair.remote_ip[family])
    local = pair.local[family]
    try:
        yield join(mode, local, pair.far, separate_machines=True)
    finally:
        local.reset()
        pair.far.reset()
