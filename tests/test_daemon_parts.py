"""flanneld's pieces against flannel's documented behaviour: config checks, lease JSON, keys, flags, subnet.env,
the iptables payload, and the allocation policy over a real SQLite registry."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import subprocess
from pathlib import Path

import pytest
from daemons import FLANNELD

from pyflannel.daemon import config, flags, flanneld, iptables, subnet_env, subnets
from pyflannel.daemon.backend import udp
from pyflannel.daemon.errors import ConfigError, FlannelError
from pyflannel.daemon.lease import Lease, LeaseAttrs, parse_subnet_key, subnet_key
from pyflannel.daemon.registry import LeaseExists, Record
from pyflannel.daemon.registry.local import LocalRegistry
from pyflannel.dataplane import klog
from pyflannel.dataplane.pump import default_queues

Net = ipaddress.IPv4Network
IP = ipaddress.IPv4Address


@pytest.mark.parametrize(("network", "subnet_len"), [
    ("10.0.0.0/8", 24), ("10.244.0.0/16", 24), ("10.0.0.0/22", 24), ("10.0.0.0/23", 25), ("10.0.0.0/24", 26),
    ("10.0.0.0/28", 30),
])
def test_subnet_len_defaults(network: str, subnet_len: int) -> None:
    pool = config.parse(f'{{"network": "{network}"}}').ipv4
    assert pool is not None and pool.subnet_len == subnet_len
    size = 1 << (32 - subnet_len)
    assert pool.subnet_min == Net(network).network_address + size, "the first subnet is never handed out"
    assert pool.subnet_max == Net(network).broadcast_address + 1 - size
    assert config.parse(f'{{"network": "{network}"}}').backend_type == "udp"


@pytest.mark.parametrize(("text", "message"), [
    ('{"Network": "10.0.0.0/29"}', "network is too small. Minimum useful network prefix is /28"),
    ('{"Network": "10.0.0.0/16", "SubnetLen": 31}', "SubnetLen must be less than /31"),
    ('{"Network": "10.0.0.0/16", "SubnetLen": 17}', "network must be able to accommodate at least four subnets"),
    ('{"Network": "10.0.0.0/16", "SubnetMin": "10.1.0.0"}', "SubnetMin is not in the range of the Network"),
    ('{"Network": "10.0.0.0/16", "SubnetMax": "10.0.5.7"}', "SubnetMax is not on a SubnetLen boundary: 10.0.5.7"),
    ('{"SubnetLen": 24}', "please define a correct Network parameter in the flannel config"),
    ('{"Network": "fc00::/64"}', "invalid IPv4 CIDR format"),
    ('{"Network": "10.0.0.0/16", "Backend": {"Port": 1}}', "unknown backend type: ''"),
    ('{"Network": "10.0.0.0/16", "Backend": {"Type": "ipsec"}}', "unknown backend type: 'ipsec'"),
    ('{"Network": ', "invalid network config"),
    ('{"Network": "10.0.0.0/16", "EnableNFTables": "true"}', "EnableNFTables must be true or false, not 'true'"),
    ('{"Network": "10.0.0.0/16", "enableNFTables": 1}', "EnableNFTables must be true or false, not 1"),
    ('{"Network": "10.0.0.0/16", "EnableIPv4": null}', "EnableIPv4 must be true or false, not None"),
])
def test_config_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.parse(text)


def test_config_keys_are_case_insensitive_and_host_bits_masked() -> None:
    cfg = config.parse('{"NETWORK": "10.244.3.4/16", "subnetlen": 26, "BACKEND": {"type": "VXLAN", "vni": 4}}')
    assert cfg.ipv4 is not None and cfg.ipv4.network == Net("10.244.0.0/16") and cfg.ipv4.subnet_len == 26
    assert cfg.backend_type == "vxlan" and cfg.backend_option("VNI", 1) == 4


def test_lease_json_is_flannels() -> None:
    assert LeaseAttrs(IP("10.0.0.1")).to_json() == '{"PublicIP":"10.0.0.1","PublicIPv6":null}'
    vxlan = LeaseAttrs(IP("192.168.64.3"), "vxlan", {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"})
    assert vxlan.to_json() == ('{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
                               '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}')
    assert LeaseAttrs.from_json(vxlan.to_json()) == vxlan


def test_subnet_keys() -> None:
    assert subnet_key(Net("10.5.52.0/24")) == "10.5.52.0-24"
    assert parse_subnet_key("10.5.52.0-24") == (Net("10.5.52.0/24"), None)


def test_flags_go_syntax_and_environment() -> None:
    opts = flags.parse(["-ip-masq", "--iface", "eth0", "-iface=eth1", "--healthz-port=8471", "-etcd-prefix", "/p"],
                       {"FLANNELD_IFACE": "ignored", "FLANNELD_SUBNET_FILE": "/tmp/s.env", "FLANNELD_IP_MASQ": ""})
    assert opts.ip_masq is True and opts.iface == ["eth0", "eth1"] and opts.healthz_port == 8471
    assert opts.etcd_prefix == "/p" and opts.subnet_file == "/tmp/s.env"
    assert flags.parse(["--ip-masq=false"], {"FLANNELD_IP_MASQ": "true"}).ip_masq is False
    assert flags.parse([], {"FLANNELD_IP_MASQ": "true"}).ip_masq is True
    assert flags.parse([], {}).etcd_endpoints == "http://127.0.0.1:4001,http://127.0.0.1:2379"


# Flag errors come before the root check: unprivileged, a check that is missed ends at "must run as root" instead
# of starting a daemon in this namespace.
UNPRIVILEGED = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--healthz-port", "x"], "invalid integer value 'x'"),
    (["--ip-masq=maybe"], "invalid boolean value 'maybe'"),
    (["--subnet-lease-renew-margin", "0"], "invalid subnet-lease-renew-margin 0"),
    (["--healthz-port", "99999"], "invalid healthz-port 99999: must be between 0 and 65535"),
    (["--healthz-port=-1"], "invalid healthz-port -1: must be between 0 and 65535"),
    (["--iptables-resync", "0"], "invalid iptables-resync 0: must be between 1 and 86400 seconds"),
    (["--iface-regex", "("], "invalid --iface-regex '(': missing ), unterminated subpattern at position 0"),
    (["--iface-can-reach", "garbage"], "--iface-can-reach 'garbage' is not an IP address"),
    (["--public-ip", "300.1.1.1"], "--public-ip '300.1.1.1' is not an IPv4 address"),
    (["--public-ipv6", "fe80::1"], "--public-ipv6 'fe80::1' is not a global or unique-local IPv6 address"),
])
def test_bad_flags_exit_2_with_one_line(argv: list[str], message: str) -> None:
    r = subprocess.run([*UNPRIVILEGED, FLANNELD, *argv], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_out_of_range_flag_from_the_environment() -> None:
    r = subprocess.run([*UNPRIVILEGED, FLANNELD], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "FLANNELD_HEALTHZ_PORT": "70000"})
    assert r.returncode == 2, r.stderr
    assert r.stderr == "flanneld: error: invalid healthz-port 70000: must be between 0 and 65535\n"


def test_version_and_not_root(tmp_path: Path) -> None:
    r = subprocess.run([FLANNELD, "--version"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stderr.startswith("v") and r.stdout == ""
    r = subprocess.run([*UNPRIVILEGED, FLANNELD], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and r.stderr.strip() == \
        "flanneld: error: must run as root (it creates network devices, routes and rules)"


def test_bad_config_file_exits_1(tmp_path: Path) -> None:
    conf = tmp_path / "net-conf.json"
    conf.write_text('{"Network": "10.0.0.0/29"}')
    r = subprocess.run([FLANNELD, "--local-registry", str(tmp_path / "r.db"), "--net-config-path", str(conf)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and r.stderr.strip().endswith("network is too small. Minimum useful network prefix "
                                                            "is /28"), r.stderr
    r = subprocess.run([FLANNELD, "--local-registry", str(tmp_path / "r.db"), "--net-config-path",
                        str(tmp_path / "missing.json")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "cannot read network config" in r.stderr and r.stderr.count("\n") == 1


def test_subnet_env(tmp_path: Path) -> None:
    text = subnet_env.render(config.parse('{"Network": "10.42.0.0/16"}'), Lease(Net("10.42.7.0/24"), LeaseAttrs(None)),
                             mtu=1450, ip_masq=True)
    assert text == "FLANNEL_NETWORK=10.42.0.0/16\nFLANNEL_SUBNET=10.42.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
    path = tmp_path / "run" / "subnet.env"
    subnet_env.write(str(path), text)
    assert path.read_text() == text and path.stat().st_mode & 0o777 == 0o644
    assert subnet_env.previous_subnets(str(path)) == (Net("10.42.7.0/24"), None)
    path.write_text('export FLANNEL_SUBNET="10.1.2.3/24"\n')
    assert subnet_env.previous_subnets(str(path)) == (Net("10.1.2.0/24"), None)
    path.write_text("FLANNEL_SUBNET=10.1.2.1/24,10.1.3.1/24\n")
    assert subnet_env.previous_subnets(str(path)) == (None, None)


def test_masq_rules_are_flannels() -> None:
    rs = iptables.masq_rules(Net("10.244.0.0/16"), Net("10.244.1.0/24"), fully_random=True)
    rendered = [f"-A {rs.chain} {iptables._join(rule)}" for rule in rs.rules]
    c = '-m comment --comment "flanneld masq"'
    assert rendered == [
        f"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {c} -j RETURN",
        f"-A FLANNEL-POSTRTG -s 10.244.1.0/24 -d 10.244.0.0/16 {c} -j RETURN",
        f"-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.1.0/24 {c} -j RETURN",
        f"-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.1.0/24 {c} -j RETURN",
        f"-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 {c} -j MASQUERADE --random-fully",
        f"-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 {c} -j MASQUERADE --random-fully",
    ]


def _registry(tmp_path: Path, network: str = '{"Network": "10.244.0.0/16"}'
              ) -> tuple[LocalRegistry, config.NetworkConfig]:
    conf = tmp_path / "net.json"
    conf.write_text(network)
    return LocalRegistry(str(tmp_path / "r.db"), str(conf)), config.parse(network)


def test_allocation_order(tmp_path: Path) -> None:
    async def go() -> None:
        reg, cfg = _registry(tmp_path)
        me = LeaseAttrs(IP("198.18.0.1"))
        first, _ = await subnets.acquire(reg, cfg, me, (None, None))
        assert first.subnet is not None and first.subnet.prefixlen == 24
        assert Net("10.244.1.0/24").network_address <= first.subnet.network_address
        again, _ = await subnets.acquire(reg, cfg, me, (Net("10.244.9.0/24"), None))
        assert again.subnet == first.subnet, "a lease held by this PublicIP wins over the previous subnet"
        other, _ = await subnets.acquire(reg, cfg, LeaseAttrs(IP("198.18.0.2")), (Net("10.244.9.0/24"), None))
        assert other.subnet == Net("10.244.9.0/24"), "then the previous subnet from subnet.env"
        third, _ = await subnets.acquire(reg, cfg, LeaseAttrs(IP("198.18.0.3")), (first.subnet, None))
        assert third.subnet not in (first.subnet, other.subnet), "a previous subnet held by another is skipped"
        with pytest.raises(LeaseExists):
            await reg.create(subnet_key(first.subnet), LeaseAttrs(IP("198.18.0.4")).to_json().encode(), 60)
        await reg.close()
    asyncio.run(go())


def test_racing_acquisitions_get_distinct_subnets(tmp_path: Path) -> None:
    async def go() -> list[tuple[Lease, Record]]:
        reg, cfg = _registry(tmp_path, '{"Network": "10.244.0.0/28", "SubnetLen": 30}')
        # Three subnets exist (the first is never handed out); all want the same previous one.
        leases = await asyncio.gather(*(subnets.acquire(reg, cfg, LeaseAttrs(IP(f"198.18.0.{i}")),
                                                        (Net("10.244.0.4/30"), None)) for i in range(1, 4)))
        with pytest.raises(FlannelError, match="out of subnets"):
            await subnets.acquire(reg, cfg, LeaseAttrs(IP("198.18.0.9")), (None, None))
        await reg.close()
        return leases
    leases = asyncio.run(go())
    assert sorted(str(lease.subnet) for lease, _ in leases) == ["10.244.0.12/30", "10.244.0.4/30", "10.244.0.8/30"]


def test_expired_leases_are_removed_with_an_event(tmp_path: Path) -> None:
    async def go() -> None:
        reg, _ = _registry(tmp_path)
        await reg.create("10.244.5.0-24", b"{}", 3600)
        records, revision = await reg.list_records()
        assert [r.key for r in records] == ["10.244.5.0-24"]
        await reg.create("10.244.6.0-24", b"{}", -1)  # already expired
        records, _ = await reg.list_records()
        assert [r.key for r in records] == ["10.244.5.0-24"], "an expired lease is swept on read"
        events = await anext(aiter(reg.watch(revision)))
        assert [(r.key, r.value) for r in events] == [("10.244.6.0-24", b"{}"), ("10.244.6.0-24", None)]
        await reg.close()
    asyncio.run(go())


def test_an_iptables_call_that_hangs_is_a_retryable_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(iptables, "TIMEOUT", 0.2)  # a real process that outlives it, as on a held xtables lock
    with pytest.raises(iptables.IptablesError, match=r"did not finish within 0\.2 s"):
        iptables._run(["sleep", "5"])


def test_a_failing_loop_is_logged_and_restarted_a_fatal_one_ends_the_daemon(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(flanneld, "RESTART_MIN", 0.01)
    (tmp_path / "net.json").write_text('{"Network": "10.244.0.0/16"}')
    daemon = flanneld.Daemon(flags.parse(["--local-registry", str(tmp_path / "r.db"), "--net-config-path",
                                          str(tmp_path / "net.json")]))
    runs = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError(f"failure {len(runs)}")
        raise FlannelError("fatal")

    with pytest.raises(FlannelError, match="fatal"):
        asyncio.run(daemon._keep("flaky loop", flaky))
    assert len(runs) == 3
    failures = [r.getMessage() for r in caplog.records if "flaky loop failed" in r.getMessage()]
    assert len(failures) == 2 and "RuntimeError: failure 1 at test_daemon_parts.py" in failures[0], failures


def test_klog_lines_and_go_style_verbosity() -> None:
    assert flags.parse(["-v", "2"]).v == 2 and flags.parse(["-v=3"]).v == 3 and flags.parse(["--v", "4"]).v == 4
    record = logging.LogRecord("flanneld", logging.WARNING, "/x/flanneld.py", 42, "lease %s", ("10.244.1.0/24",),
                               None)
    line = klog.KlogFormatter().format(record)
    assert re.fullmatch(r"W\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ flanneld\.py:42\] lease 10\.244\.1\.0/24", line), line
    try:
        klog.setup(1)
        assert logging.getLogger().level == logging.DEBUG and logging.getLogger("pyroute2").level == logging.WARNING
        klog.setup(klog.LIBRARY_VERBOSITY)
        assert logging.getLogger("pyroute2").level == logging.DEBUG
    finally:
        klog.setup(0)


@pytest.mark.parametrize("value", ["0", "9", "-1", "2.5", "two", "1e1", "0x2", "\u0663", "\u00b2"])
def test_udp_queues_from_the_environment_are_refused_by_one_line(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(udp.ENV_QUEUES, value)
    with pytest.raises(FlannelError, match=r"^PYFLANNEL_UDP_QUEUES=.* is not a number of queues from 1 to 8$"):
        udp._queues()


@pytest.mark.parametrize(("value", "queues"), [("1", 1), (" 3 ", 3), ("8", 8), ("", default_queues())])
def test_udp_queues_from_the_environment(value: str, queues: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(udp.ENV_QUEUES, value)
    assert udp._queues() == queues



@pytest.mark.parametrize(("value", "shown"), [('"4"', "'4'"), ("16777216", "16777216"), ("4.5", "4.5"),
                                              ("true", "True"), ("null", "None"), ("-1", "-1")])
def test_whole_number_backend_options_are_checked(value: str, shown: str) -> None:
    """What a backend reads as a number: a wrong type or range is a ConfigError naming it, never a traceback."""
    cfg = config.parse(f'{{"Network": "10.0.0.0/16", "Backend": {{"Type": "vxlan", "vni": {value}}}}}')
    with pytest.raises(ConfigError, match=re.escape(f"Backend.VNI must be a whole number from 0 to 16777215, "
                                                    f"not {shown}")):
        cfg.backend_int("VNI", 1, 0, (1 << 24) - 1)
    assert config.parse('{"Network": "10.0.0.0/16", "Backend": {"Type": "vxlan", "VNI": 7}}').backend_int(
        "VNI", 1, 0, (1 << 24) - 1) == 7
