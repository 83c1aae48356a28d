"""flannel's masquerade and FORWARD rules, applied with iptables-restore (pkg/trafficmngr/iptables).

The rule set and order are flannel's (N = the network, P = this node's subnet, R = --random-fully):
    nat    POSTROUTING -> FLANNEL-POSTRTG: RETURN for the kube-proxy mark 0x4000/0x4000, P->N, N->P and !N->P;
           MASQUERADE R for N->!224.0.0.0/4 and !N->N
    filter FORWARD -> FLANNEL-FWD: ACCEPT from N and to N
Each chain is flushed and refilled, and the jump from the built-in chain is deleted and appended again, in one
`iptables-restore --noflush --wait` payload per table. ensure() checks every rule with `iptables -C` and
re-applies the set if any is missing (the periodic resync). Rules stay in place on shutdown, as with flannel.
Every call is blocking (flanneld runs them in worker threads) and bounded by TIMEOUT; IptablesError is retried.
The rules go into the backend (legacy or nft) that the host's rules are in: see detect().
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
from dataclasses import dataclass

from pyflannel.daemon.errors import FlannelError

TIMEOUT = 30  # seconds for one iptables call
MASQ = "flanneld masq"
FORWARD = "flanneld forward"


@dataclass(frozen=True)
class RuleSet:
    table: str
    parent: str  # the built-in chain that jumps to ours
    chain: str
    comment: str
    rules: tuple[tuple[str, ...], ...]

    def jump(self) -> tuple[str, ...]:
        return ("-m", "comment", "--comment", self.comment, "-j", self.chain)


def masq_rules(network: ipaddress.IPv4Network, subnet: ipaddress.IPv4Network, fully_random: bool) -> RuleSet:
    n, p = str(network), str(subnet)
    c = ("-m", "comment", "--comment", MASQ)
    r = ("--random-fully",) if fully_random else ()
    return RuleSet("nat", "POSTROUTING", "FLANNEL-POSTRTG", MASQ, (
        ("-m", "mark", "--mark", "0x4000/0x4000", *c, "-j", "RETURN"),
        ("-s", p, "-d", n, *c, "-j", "RETURN"),
        ("-s", n, "-d", p, *c, "-j", "RETURN"),
        ("!", "-s", n, "-d", p, *c, "-j", "RETURN"),
        ("-s", n, "!", "-d", "224.0.0.0/4", *c, "-j", "MASQUERADE", *r),
        ("!", "-s", n, "-d", n, *c, "-j", "MASQUERADE", *r),
    ))


def forward_rules(network: ipaddress.IPv4Network) -> RuleSet:
    c = ("-m", "comment", "--comment", FORWARD)
    return RuleSet("filter", "FORWARD", "FLANNEL-FWD", FORWARD, (
        ("-s", str(network), *c, "-j", "ACCEPT"),
        ("-d", str(network), *c, "-j", "ACCEPT"),
    ))


@dataclass(frozen=True)
class Backend:
    """Which iptables flanneld drives: "legacy" or "nft" (iptables-legacy, iptables-nft-restore, ...), or "" for
    whatever plain `iptables` is. Rules in the other backend than kube-proxy's still run, but in an order neither
    program sees, so flanneld writes where the host's rules already are."""

    name: str = ""

    def tool(self, suffix: str = "") -> str:
        return "-".join(part for part in ("iptables", self.name, suffix) if part)


def detect() -> Backend:
    """The host's backend, decided as Kubernetes' iptables-wrapper does: the kubelet's marker chains first (nft,
    then legacy), else whichever backend holds more rules; nft when both are empty. Plain `iptables` when the two
    variants are not both installed."""
    if not (shutil.which("iptables-legacy-save") and shutil.which("iptables-nft-save")):
        return Backend()
    saves = {name: _run([f"iptables-{name}-save"]).stdout for name in ("nft", "legacy")}
    for name, text in saves.items():
        if "KUBE-IPTABLES-HINT" in text or "KUBE-KUBELET-CANARY" in text:
            return Backend(name)
    rules = {name: sum(line.startswith("-") for line in text.splitlines()) for name, text in saves.items()}
    return Backend("legacy" if rules["legacy"] > rules["nft"] else "nft")


def supports_random_fully(backend: Backend) -> bool:
    """iptables >= 1.6.2 knows --random-fully (flannel's HasRandomFully)."""
    out = _run([backend.tool(), "--version"]).stdout
    m = re.search(r"v(\d+)\.(\d+)\.(\d+)", out)
    return bool(m) and tuple(int(x) for x in m.groups()) >= (1, 6, 2)  # type: ignore[union-attr]


class IptablesError(FlannelError):
    """iptables refused or did not answer in time (another program holding the xtables lock): retried."""


def _run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=TIMEOUT)
    except FileNotFoundError:
        raise FlannelError(f"{argv[0]} not found: install iptables") from None
    except subprocess.TimeoutExpired:
        raise IptablesError(f"{argv[0]} did not finish within {TIMEOUT} s (is another program holding the "
                            "xtables lock?)") from None


def _exists(backend: Backend, table: str, chain: str, rule: tuple[str, ...]) -> bool:
    return _run([backend.tool(), "-t", table, "-C", chain, *rule]).returncode == 0


def _join(rule: tuple[str, ...]) -> str:
    """iptables-restore's own quoting: double quotes around arguments with spaces (it knows no single quotes)."""
    return " ".join(f'"{arg}"' if " " in arg else arg for arg in rule)


def payload(backend: Backend, rs: RuleSet) -> str:
    """The iptables-restore input for one rule set: flush our chain, refill it, re-append the jump."""
    q = _join
    lines = [f"*{rs.table}", f":{rs.chain} - [0:0]", f"-F {rs.chain}"]
    lines += [f"-A {rs.chain} {q(rule)}" for rule in rs.rules]
    if _exists(backend, rs.table, rs.parent, rs.jump()):
        lines.append(f"-D {rs.parent} {q(rs.jump())}")
    lines += [f"-A {rs.parent} {q(rs.jump())}", "COMMIT", ""]
    return "\n".join(lines)


def apply(backend: Backend, rs: RuleSet) -> None:
    r = _run([backend.tool("restore"), "--noflush", "--wait"], payload(backend, rs))
    if r.returncode != 0:
        raise IptablesError(f"iptables-restore failed for {rs.chain}: {r.stderr.strip().splitlines()[-1:]}")


def ensure(backend: Backend, rs: RuleSet) -> bool:
    """Re-apply the set if any of its rules is missing; True if it had to."""
    missing = not _exists(backend, rs.table, rs.parent, rs.jump()) or any(
        not _exists(backend, rs.table, rs.chain, rule) for rule in rs.rules)
    if missing:
        apply(backend, rs)
    return missing
