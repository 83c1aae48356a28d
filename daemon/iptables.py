"""flannel's masquerade and FORWARD rules, applied with iptables-restore (pkg/trafficmngr/iptables).

The rule set and order are flannel's (N = the network, P = this node's subnet, R = --random-fully):
    nat    POSTROUTING -> FLANNEL-POSTRTG: RETURN for the kube-proxy mark 0x4000/0x4000, P->N, N->P and !N->P;
           MASQUERADE R for N->!224.0.0.0/4 and !N->N
    filter FORWARD -> FLANNEL-FWD: ACCEPT from N and to N
For IPv6 the same sets go through ip6tables with the IPv6 network and subnet, and ff00::/8 for the multicast
exception. Each chain is flushed and refilled, and the jump from the built-in chain is deleted and appended
again, in one `iptables-restore --noflush --wait` payload per table. ensure() checks every rule with `iptables -C` and
re-applies the set if any is missing (the periodic resync). Rules stay in place on shutdown, as with flannel.
Every call is blocking (flanneld runs them in worker threads) and bounded by TIMEOUT; IptablesError is retried.
The rules go into the backend (legacy or nft) that the host's rules of both families are in: see detect().
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from pyflannel.daemon.config import Network
from pyflannel.daemon.errors import FlannelError

TIMEOUT = 30  # seconds for one iptables call
MASQ = "flanneld masq"
FORWARD = "flanneld forward"
MULTICAST = {4: "224.0.0.0/4", 6: "ff00::/8"}
POSTRTG = ("nat", "POSTROUTING", "FLANNEL-POSTRTG", MASQ)  # table, parent chain, chain, comment
FWD = ("filter", "FORWARD", "FLANNEL-FWD", FORWARD)


@dataclass(frozen=True)
class RuleSet:
    table: str
    parent: str  # the built-in chain that jumps to ours
    chain: str
    comment: str
    rules: tuple[tuple[str, ...], ...]
    version: int = 4  # iptables, or ip6tables for 6

    def jump(self) -> tuple[str, ...]:
        return ("-m", "comment", "--comment", self.comment, "-j", self.chain)


def masq_rules(network: Network, subnet: Network, fully_random: bool) -> RuleSet:
    n, p = str(network), str(subnet)
    c = ("-m", "comment", "--comment", MASQ)
    r = ("--random-fully",) if fully_random else ()
    return RuleSet(*POSTRTG, (
        ("-m", "mark", "--mark", "0x4000/0x4000", *c, "-j", "RETURN"),
        ("-s", p, "-d", n, *c, "-j", "RETURN"),
        ("-s", n, "-d", p, *c, "-j", "RETURN"),
        ("!", "-s", n, "-d", p, *c, "-j", "RETURN"),
        ("-s", n, "!", "-d", MULTICAST[network.version], *c, "-j", "MASQUERADE", *r),
        ("!", "-s", n, "-d", n, *c, "-j", "MASQUERADE", *r),
    ), network.version)


def forward_rules(network: Network) -> RuleSet:
    c = ("-m", "comment", "--comment", FORWARD)
    return RuleSet(*FWD, (
        ("-s", str(network), *c, "-j", "ACCEPT"),
        ("-d", str(network), *c, "-j", "ACCEPT"),
    ), network.version)


@dataclass(frozen=True)
class Backend:
    """Which iptables flanneld drives: "legacy" or "nft" (iptables-legacy, iptables-nft-restore, ...), or "" for
    whatever plain `iptables` is. Rules in the other backend than kube-proxy's still run, but in an order neither
    program sees, so flanneld writes where the host's rules already are."""

    name: str = ""

    def tool(self, suffix: str = "", version: int = 4) -> str:
        program = "iptables" if version == 4 else "ip6tables"
        return "-".join(part for part in (program, self.name, suffix) if part)


def detect() -> Backend:
    """The host's backend, decided as Kubernetes' iptables-wrapper does: the kubelet's marker chains first (nft,
    then legacy), else whichever backend holds more rules, IPv4 and IPv6 together; nft when both are empty. Plain
    `iptables` when the two variants are not both installed."""
    if not (shutil.which("iptables-legacy-save") and shutil.which("iptables-nft-save")):
        return Backend()
    saves = {name: "".join(_run([tool]).stdout for tool in (f"iptables-{name}-save", f"ip6tables-{name}-save")
                           if shutil.which(tool))
             for name in ("nft", "legacy")}
    for name, text in saves.items():
        if "KUBE-IPTABLES-HINT" in text or "KUBE-KUBELET-CANARY" in text:
            return Backend(name)
    rules = {name: sum(line.startswith("-") for line in text.splitlines()) for name, text in saves.items()}
    return Backend("legacy" if rules["legacy"] > rules["nft"] else "nft")


def supports_random_fully(backend: Backend, version: int = 4) -> bool:
    """iptables >= 1.6.2 knows --random-fully (flannel's HasRandomFully)."""
    out = _run([backend.tool(version=version), "--version"]).stdout
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


def _exists(backend: Backend, rs: RuleSet, chain: str, rule: tuple[str, ...]) -> bool:
    return _run([backend.tool(version=rs.version), "-t", rs.table, "-C", chain, *rule]).returncode == 0


def _join(rule: tuple[str, ...]) -> str:
    """iptables-restore's own quoting: double quotes around arguments with spaces (it knows no single quotes)."""
    return " ".join(f'"{arg}"' if " " in arg else arg for arg in rule)


def payload(backend: Backend, rs: RuleSet) -> str:
    """The iptables-restore input for one rule set: flush our chain, refill it, re-append the jump."""
    q = _join
    lines = [f"*{rs.table}", f":{rs.chain} - [0:0]", f"-F {rs.chain}"]
    lines += [f"-A {rs.chain} {q(rule)}" for rule in rs.rules]
    lines += _unjump(backend, rs)
    lines += [f"-A {rs.parent} {q(rs.jump())}", "COMMIT", ""]
    return "\n".join(lines)


def _unjump(backend: Backend, rs: RuleSet) -> list[str]:
    """The line deleting the built-in chain's jump to ours, if there is one (-D of a missing rule fails)."""
    return [f"-D {rs.parent} {_join(rs.jump())}"] if _exists(backend, rs, rs.parent, rs.jump()) else []


def _restore(backend: Backend, rs: RuleSet, payload: str, failed: str) -> None:
    tool = backend.tool("restore", rs.version)
    r = _run([tool, "--noflush", "--wait"], payload)
    if r.returncode != 0:
        raise IptablesError(f"{tool} {failed} {rs.chain}: {r.stderr.strip().splitlines()[-1:]}")


def apply(backend: Backend, rs: RuleSet) -> None:
    _restore(backend, rs, payload(backend, rs), "failed for")


def remove_all(backend: Backend) -> None:
    """Take flannel's chains and the jumps to them out of both families' tables, where present (the start of
    nftables mode). A family whose tool is not installed has none."""
    for version in (4, 6):
        if not shutil.which(backend.tool(version=version)):
            continue
        for rs in (RuleSet(*POSTRTG, (), version), RuleSet(*FWD, (), version)):
            if _run([backend.tool(version=version), "-t", rs.table, "-S", rs.chain]).returncode != 0:
                continue
            lines = [f"*{rs.table}", *_unjump(backend, rs), f"-F {rs.chain}", f"-X {rs.chain}", "COMMIT", ""]
            _restore(backend, rs, "\n".join(lines), "could not remove")


def ensure(backend: Backend, rs: RuleSet) -> bool:
    """Re-apply the set if any of its rules is missing; True if it had to."""
    missing = not _exists(backend, rs, rs.parent, rs.jump()) or any(
        not _exists(backend, rs, rs.chain, rule) for rule in rs.rules)
    if missing:
        apply(backend, rs)
    return missing
