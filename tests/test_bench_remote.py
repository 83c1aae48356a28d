"""flannel-bench across two hosts: two namespaces as the hosts, Debian's sshd in the far one, started by the test
with keys it generates, and the near one running `flannel-bench --remote` through ssh as an operator would.

Short runs only; no speed is asserted anywhere.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from daemons import add_ipv6_underlay, underlay6, wait_for

from pyflannel.bench import report
from pyflannel.bench.measure import Result
from pyflannel.bench.modes import MODES
from pyflannel.bench.nic import OFFLOADS
from pyflannel.bench.rig import Host, Rig

BENCH = str(Path(sys.executable).with_name("flannel-bench"))
SSHD_PORT = 2222
FIGURES = {"tcp_gbps", "tcp_parallel_gbps", "udp64_kpps", "rtt_ms_p50", "rtt_ms_p99", "rtt_loaded_ms_p50",
           "rtt_loaded_ms_p99", "tcp_loaded_gbps", "rr_per_s", "cpu_s_per_gb", "retransmits"}
ENGINE = {"tx_syscalls_per_gb", "rx_syscalls_per_gb", "tx_packets_per_syscall", "rx_packets_per_syscall"}
PER_END_CPU = {"client_cpu_s_per_gb", "server_cpu_s_per_gb"}
QUICK = ("--seconds", "1", "--repeats", "1", "--pings", "10")


@dataclass(frozen=True)
class Hosts:
    near: Host
    far: Host
    ssh_config: Path   # Host "far" is the far namespace's sshd; Host "closed" is a port nothing listens on
    sshd: int          # its pid (ip netns exec runs sshd in its own process)

    def clean(self) -> bool:
        """Nothing is configured or running on either host beyond what the test set up."""
        return _configured(self.near) == [] and _configured(self.far, self.sshd) == []


def _sshd(far: Host, keys: Path) -> tuple[Path, int]:
    """sshd in the far host with its own config and keys, root logging in with a key: the ssh config to reach
    it, and its pid."""
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True)
    (keys / "authorized_keys").write_text((keys / "client.pub").read_text())
    (keys / "known_hosts").write_text(f"[{far.underlay}]:{SSHD_PORT} {(keys / 'host.pub').read_text()}")
    (keys / "sshd_config").write_text(
        f"Port {SSHD_PORT}\nListenAddress {far.underlay}\nHostKey {keys / 'host'}\n"
        f"AuthorizedKeysFile {keys / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\n")
    sshd = far.popen("/usr/sbin/sshd", "-D", "-e", "-f", str(keys / "sshd_config"), stderr=subprocess.DEVNULL)
    wait_for(lambda: f"{far.underlay}:{SSHD_PORT} " in far.run("ss", "-ltnH").stdout, what="sshd")
    config = keys / "ssh_config"
    common = (f"  User root\n  IdentityFile {keys / 'client'}\n  IdentitiesOnly yes\n"
              f"  UserKnownHostsFile {keys / 'known_hosts'}\n  GlobalKnownHostsFile /dev/null\n"
              "  StrictHostKeyChecking yes\n  LogLevel ERROR\n")
    config.write_text(f"Host far\n  HostName {far.underlay}\n  Port {SSHD_PORT}\n{common}"
                      f"Host closed\n  HostName {far.underlay}\n  Port {SSHD_PORT + 1}\n{common}")
    return config, sshd.pid


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    privsep = Path("/run/sshd")   # sshd's compiled-in privilege separation directory; Debian's unit creates it too
    made = not privsep.exists()
    privsep.mkdir(mode=0o755, exist_ok=True)
    try:
        with Rig(tag="pfrb") as rig:
            near, far = rig.hosts
            add_ipv6_underlay(rig.hosts)
            yield Hosts(near, far, *_sshd(far, tmp_path_factory.mktemp("ssh")))
    finally:
        if made:
            privsep.rmdir()


def _bench(hosts: Hosts, *argv: str) -> list[str]:
    return [BENCH, "--remote", "far", "--ssh-config", str(hosts.ssh_config), "--remote-bin", BENCH, *argv]


def _configured(host: Host, keep: int = 0) -> list[str]:
    """Anything on the host beyond its bare state (lo, eth0 and its addresses and subnet routes of both families,
    process `keep`): links, routes, addresses, processes."""
    links = [line.split(":")[1].strip().split("@")[0] for line in host.run("ip", "-o", "link").stdout.splitlines()]
    extra = [f"link {name}" for name in links if name not in ("lo", "eth0")]
    extra += [f"route {r}" for r in host.run("ip", "route").stdout.splitlines() if not r.startswith("198.18.0.0/24")]
    extra += [f"route {r}" for r in host.run("ip", "-6", "route").stdout.splitlines()
              if not r.startswith(("2001:2::/64 dev eth0", "fe80::/64 "))]   # link-local: every link has one
    extra += [f"address {a}" for a in re.findall(r"inet6? (\S+)", host.run("ip", "addr").stdout)
              if a not in ("127.0.0.1/8", f"{host.underlay}/24", "::1/128", f"{underlay6(host)}/64")
              and not a.startswith("fe80:")]
    return extra + [f"process {_command(pid)}" for pid in _pids(host) if pid != keep]


def _pids(host: Host) -> list[int]:
    return [int(pid) for pid in subprocess.run(["ip", "netns", "pids", host.ns], capture_output=True,
                                               text=True).stdout.split()]


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
    except FileNotFoundError:
        return "(gone)"


def test_two_host_run_reports_as_the_namespace_run_does_with_each_ends_nic(hosts: Hosts, tmp_path: Path) -> None:
    out, png = tmp_path / "two.json", tmp_path / "two.png"
    r = hosts.near.run(*_bench(hosts, *QUICK, "--json", str(out), "--plot", str(png)), check=False, timeout=240)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert set(data) == {"machine", "config", "modes", "penalty_pct", "rtt_vs_flannel_c"}, data.get("skipped")
    assert set(data["modes"]) == set(MODES)
    assert set(data["rtt_vs_flannel_c"]) == set(MODES) - {"flannel-c"}
    for mode, figures in data["modes"].items():
        assert set(figures) == FIGURES | PER_END_CPU | (ENGINE if mode.startswith("udp") else set()), mode
        assert all(v > 0 for k, v in figures.items() if k != "retransmits"), (mode, figures)
        assert figures["cpu_s_per_gb"] == pytest.approx(
            figures["client_cpu_s_per_gb"] + figures["server_cpu_s_per_gb"], abs=0.002)
    assert set(data["penalty_pct"]) == set(MODES) - {"none"}
    assert data["config"]["remote"] == "far"
    for end, host in (("local", hosts.near), ("remote", hosts.far)):
        machine = data["machine"][end]
        assert {"kernel", "cpus", "cpu_model", "python"} <= set(machine)
        nic = machine["underlay"]
        assert (nic["iface"], nic["address"], nic["mtu"]) == ("eth0", str(host.underlay), 1500)
        assert set(nic["offloads"]) == set(OFFLOADS)
        assert all(re.fullmatch(r"(on|off)( \[fixed\])?", state) for state in nic["offloads"].values()), nic
        offloads = ", ".join(f"{k} {v}" for k, v in nic["offloads"].items())
        assert f"{end}: {host.underlay} eth0 MTU 1500, kernel {machine['kernel']}: {offloads}" in r.stdout
    assert re.search(r"^udp-basic +\d", r.stdout, re.MULTILINE)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert hosts.clean()


def test_ipv6_modes_across_two_hosts_on_their_ipv6_underlay(hosts: Hosts, tmp_path: Path) -> None:
    """The far end switches family and back (none6 ... none) within one session; penalties per family."""
    out = tmp_path / "six.json"
    r = hosts.near.run(*_bench(hosts, "--modes", "none6,host-gw6,vxlan6,none", "--local-ip6", underlay6(hosts.near),
                               "--remote-ip6", underlay6(hosts.far), *QUICK, "--json", str(out), "--plot",
                               os.devnull), check=False, timeout=240)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert list(data["modes"]) == ["none6", "host-gw6", "vxlan6", "none"], data.get("skipped")
    assert all(figures["tcp_gbps"] > 0 for figures in data["modes"].values())
    assert set(data["penalty_pct"]) == {"host-gw6", "vxlan6"}
    assert hosts.clean()


def test_ipv6_modes_without_ipv6_addresses_are_skipped_with_the_reason(hosts: Hosts, tmp_path: Path) -> None:
    out = tmp_path / "skip.json"
    r = hosts.near.run(*_bench(hosts, "--modes", "none6,none", *QUICK, "--json", str(out), "--plot", os.devnull),
                       check=False, timeout=240)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["skipped"] == {
        "none6": "none6 across two hosts needs their IPv6 underlay addresses: give --local-ip6 and --remote-ip6"}
    assert hosts.clean()


def _far_tunnel_started(far: Host) -> bool:
    return any("flannel-tunnel" in _command(pid) for pid in _pids(far))


def _children(pid: int, command: str) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            name = stat.read_text().split("(", 1)[1].rsplit(")", 1)[0]
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and name == command:
            found.append(int(stat.parent.name))
    return found


def _stopped_mid_mode(hosts: Hosts, stop: Callable[[subprocess.Popen[str]], None]) -> tuple[int, str]:
    """flannel-bench running udp, stopped by `stop` while the far agent is bringing up its flannel-tunnel (the
    near end's is up already, and the near end waits for the agent's reply): its exit status and stderr."""
    # SIGINT's default action restored: a suite started in the background (`make test &`) inherits it ignored, and
    # an ignored SIGINT stays ignored across exec (a program run in the background is not Ctrl-C's to stop).
    bench = hosts.near.popen("env", "--default-signal=INT", *_bench(hosts, "--modes", "udp", *QUICK, "--json",
                                                                   os.devnull, "--plot", os.devnull),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: _far_tunnel_started(hosts.far), timeout=60, what="flannel-tunnel on the far host")
        assert "flannel0" in hosts.near.run("ip", "link").stdout
        stop(bench)
        _, err = bench.communicate(timeout=60)
    finally:
        if bench.poll() is None:
            bench.kill()
    assert "Traceback" not in err
    return bench.returncode, err.splitlines()[-1]


def test_a_killed_ssh_session_leaves_nothing_configured_on_either_host(hosts: Hosts) -> None:
    """The near end stops with one line and removes its half; the agent sees its input close and removes its."""
    def kill_ssh(bench: subprocess.Popen[str]) -> None:
        (ssh,) = _children(bench.pid, "ssh")
        os.kill(ssh, signal.SIGKILL)

    assert _stopped_mid_mode(hosts, kill_ssh) == (1, "flannel-bench: error: lost the connection to far")
    assert _configured(hosts.near) == []
    wait_for(hosts.clean, what="the far host to be clean")


def test_a_killed_agent_takes_its_tunnel_and_iperf3_server_with_it(hosts: Hosts) -> None:
    """SIGKILL leaves the agent no chance to clean up; its children are tied to it (parent death signal), so the
    far flannel-tunnel still stops and removes flannel0. What the agent set up itself (the overlay endpoint address
    on lo) stays, as it must after a SIGKILL; the test removes it."""
    def kill_agent(bench: subprocess.Popen[str]) -> None:
        (agent,) = [pid for pid in _pids(hosts.far) if re.match(r"\S*python\S* \S*flannel-bench agent ", _command(pid))]
        os.kill(agent, signal.SIGKILL)

    code, _ = _stopped_mid_mode(hosts, kill_agent)
    assert code == 1
    assert _configured(hosts.near) == []
    endpoint = f"address {hosts.far.overlay_ip}/32"
    wait_for(lambda: _configured(hosts.far, hosts.sshd) == [endpoint], what="the far tunnel to stop")
    hosts.far.remove_overlay_endpoint()


def test_ctrl_c_removes_both_halves_through_the_session(hosts: Hosts) -> None:
    """SIGINT to flannel-bench alone, as Ctrl-C sends it (ssh runs in a session of its own and stays up): the
    pending reply is read and both ends are reset before the session closes."""
    assert _stopped_mid_mode(hosts, lambda bench: bench.send_signal(signal.SIGINT)) == (
        130, "flannel-bench: interrupted; what it set up on both hosts is removed")
    assert hosts.clean()


def test_a_silent_agent_cleans_up_after_its_idle_timeout(hosts: Hosts) -> None:
    """A link that dies without closing the session: the agent stops waiting and removes what it set up."""
    agent = hosts.near.popen(BENCH, "agent", "--idle-timeout", "1", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    assert agent.stdin and agent.stdout
    for request in ({"op": "open", "args": {"underlay": str(hosts.near.underlay), "subnet": "10.244.1.0/24"}},
                    {"op": "prepare", "args": {"mode": "vxlan"}}):
        agent.stdin.write(json.dumps(request) + "\n")
        agent.stdin.flush()
        assert "ok" in json.loads(agent.stdout.readline())
    assert set(_configured(hosts.near, agent.pid)) == {"link flannel.1", "address 10.244.1.1/32",
                                                       "address 10.244.1.0/32"}
    assert agent.wait(timeout=30) == 0
    assert _configured(hosts.near) == []


def test_errors_are_one_line(hosts: Hosts, tmp_path: Path) -> None:
    missing = hosts.near.run(*_bench(hosts)[:-1], "/opt/nowhere/flannel-bench", check=False)
    assert missing.returncode == 1
    assert missing.stderr == ("flannel-bench: error: far has no /opt/nowhere/flannel-bench (install pyflannel[bench] "
                              "there, or give --remote-bin)\n")
    closed = hosts.near.run(BENCH, "--remote", "closed", "--ssh-config", str(hosts.ssh_config), check=False)
    assert closed.returncode == 1
    assert closed.stderr == (f"flannel-bench: error: ssh closed failed: ssh: connect to host {hosts.far.underlay} "
                             f"port {SSHD_PORT + 1}: Connection refused\n")
    for flag, where in (("--local-ip", ""), ("--remote-ip", "far: ")):
        wrong = hosts.near.run(*_bench(hosts, flag, "198.18.0.9"), check=False)
        assert (wrong.returncode, wrong.stderr) == (
            1, f"flannel-bench: error: {where}198.18.0.9 is not an address of this host\n")
    assert hosts.clean()


@pytest.mark.parametrize(("hello", "message"), [
    ({"version": "0.0.1", "uid": 0}, "far runs pyflannel 0.0.1 and this host 0.1.0; install the same version on both"),
    ({"version": "0.1.0", "uid": 1000},
     "the agent on far runs as uid 1000, not root; ssh in as root or give --remote-bin 'sudo -n flannel-bench'"),
])
def test_an_unfit_far_end_is_refused_before_anything_is_set_up(hosts: Hosts, tmp_path: Path, hello: dict[str, object],
                                                                 message: str) -> None:
    """The far end stands for an older install or a non-root login: a script that answers the greeting as such
    an agent would (neither exists on this machine)."""
    agent = tmp_path / "agent"
    agent.write_text(f"#!/bin/sh\nread request\necho '{json.dumps({'ok': {**hello, 'ssh_connection': ''}})}'\n"
                     "read request\n")
    agent.chmod(0o755)
    r = hosts.near.run(*_bench(hosts)[:-1], str(agent), check=False)
    assert (r.returncode, r.stderr) == (1, f"flannel-bench: error: {message}\n")


def _report(path: Path, tcp: float) -> None:
    result = Result(tcp_gbps=tcp, tcp_parallel_gbps=2 * tcp, udp64_kpps=100.0, rtt_ms_p50=0.1, rtt_ms_p99=0.2,
                    rtt_loaded_ms_p50=1.0, rtt_loaded_ms_p99=3.0, tcp_loaded_gbps=tcp, rr_per_s=1000.0,
                    cpu_s_per_gb=1.0, retransmits=3)
    report.write_json(report.build({"none": [result], "vxlan": [result]}, {"parallel": 4}, {}), path)


def test_compare_prints_the_runs_side_by_side_and_plots_them(tmp_path: Path) -> None:
    before, after, png = tmp_path / "before.json", tmp_path / "after.json", tmp_path / "cmp.png"
    _report(before, 10.0)
    _report(after, 12.5)
    r = subprocess.run([BENCH, "compare", str(before), str(after), "--plot", str(png)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["mode", "figure", "before.json", "after.json", "after.json", "vs", "before.json"]
    assert re.search(r"^none +TCP Gbit/s +10 +12\.5 +\+25\.0%$", r.stdout, re.MULTILINE), r.stdout
    assert re.search(r"^vxlan +TCP parallel Gbit/s +20 +25 +\+25\.0%$", r.stdout, re.MULTILINE), r.stdout
    assert re.search(r"^vxlan +retransmits +3 +3 +\+0\.0%$", r.stdout, re.MULTILINE), r.stdout
    assert lines[-2].startswith("before.json: ") and lines[-1].startswith("after.json: ")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_refuses_what_is_not_a_report(tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    other.write_text('{"modes": {}}')
    r = subprocess.run([BENCH, "compare", str(other), str(tmp_path / "gone.json")], capture_output=True, text=True,
                       timeout=60)
    assert (r.returncode, r.stderr) == (1, f"flannel-bench compare: error: {other}: not a flannel-bench report "
                                           "(no machine, config, modes and penalty_pct)\n")


def test_compare_into_a_reader_that_went_away_ends_quietly(tmp_path: Path) -> None:
    """As with `| head`: the pipe's reading end is closed before flannel-bench writes, so every write fails."""
    before, after = tmp_path / "before.json", tmp_path / "after.json"
    _report(before, 10.0)
    _report(after, 12.5)
    proc = subprocess.Popen([BENCH, "compare", str(before), str(after)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    assert (proc.wait(timeout=60), proc.stderr.read()) == (141, "")
