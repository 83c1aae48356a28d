"""IPv6 in flanneld's pieces, against facts from flannel's own tests (pkg/subnet config_test.go and
subnet_test.go, pkg/ip ip6net_test.go, the CNI plugin's flannel_linux_test.go) and its documentation: config
defaults and checks, lease keys and JSON, subnet.env, ip6tables rules, the CNI delegate, allocation of both
families over a real SQLite registry, and hostile IPv6 records refused by reason."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio.client import V1Node, V1NodeSpec, V1ObjectMeta

from pyflannel.daemon import cni, config, iptables, subnet_env, subnets
from pyflannel.daemon.errors import ConfigError, FlannelError
from pyflannel.daemon.kube import KubeManager
from pyflannel.daemon.lease import BadRecord, Lease, LeaseAttrs, check_public_ipv6, decode, parse_subnet_key, subnet_key
from pyflannel.daemon.peers import Entry, PeerTable
from pyflannel.daemon.registry.local import LocalRegistry

Net4, Net6 = ipaddress.IPv4Network, ipaddress.IPv6Network
IP4, IP6 = ipaddress.IPv4Address, ipaddress.IPv6Address
DUAL = '{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:10:244::/48"}'
V6_ONLY = '{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00:10:244::/48"}'


def test_flannels_ipv6_config_defaults_and_overrides() -> None:
    cfg = config.parse('{ "enableIPv6": true, "ipv6Network": "fc00::/48", "enableIPv4": false }')
    assert cfg.ipv4 is None and cfg.ipv6 is not None
    assert (str(cfg.ipv6.network), str(cfg.ipv6.subnet_min), str(cfg.ipv6.subnet_max), cfg.ipv6.subnet_len) == \
        ("fc00::/48", "fc00:0:0:1::", "fc00:0:0:ffff::", 64)
    cfg = config.parse('{ "EnableIPv6": true, "IPv6Network": "fc00::/48", "IPv6SubnetMin": "fc00:0:0:1::", '
                       '"IPv6SubnetMax": "fc00:0:0:f::", "IPv6SubnetLen": 124, "enableIPv4": false }')
    assert cfg.ipv6 is not None
    assert (str(cfg.ipv6.subnet_min), str(cfg.ipv6.subnet_max), cfg.ipv6.subnet_len) == \
        ("fc00:0:0:1::", "fc00:0:0:f::", 124)
    dual = config.parse(DUAL)
    assert dual.ipv4 is not None and dual.ipv6 is not None and str(dual.ipv4.network) == "10.244.0.0/16"
    assert config.parse('{"Network": "10.244.0.0/16"}').ipv6 is None, "EnableIPv6 defaults to false"
    assert config.parse('{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00::/48", '
                        '"IPv6SubnetMin": "::"}').ipv6 == \
        config.parse('{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00::/48"}').ipv6, \
        ":: means unset, as 0 does in Go"


@pytest.mark.parametrize(("network", "subnet_len"), [
    ("fd00::/8", 64), ("fd00::/48", 64), ("fd00::/62", 64), ("fd00::/63", 65), ("fd00::/64", 66),
    ("fd00::/124", 126),
])
def test_ipv6_subnet_len_defaults(network: str, subnet_len: int) -> None:
    pool = config.parse(f'{{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "{network}"}}').ipv6
    assert pool is not None and pool.subnet_len == subnet_len
    size = 1 << (128 - subnet_len)
    assert int(pool.subnet_min) == int(Net6(network).network_address) + size, "the first subnet is never handed out"
    assert int(pool.subnet_max) == int(Net6(network).broadcast_address) + 1 - size


@pytest.mark.parametrize(("fields", "message"), [
    ('"IPv6Network": "fd00::/125"', "IPv6Network is too small. Minimum useful network prefix is /124"),
    ('"IPv6Network": "fd00::/48", "IPv6SubnetLen": 127', "SubnetLen must be less than /127"),
    ('"IPv6Network": "fd00::/48", "IPv6SubnetLen": 49', "network must be able to accommodate at least four subnets"),
    ('"IPv6Network": "fd00::/48", "IPv6SubnetMin": "fd01::"', "IPv6SubnetMin is not in the range of the IPv6Network"),
    ('"IPv6Network": "fd00::/48", "IPv6SubnetMax": "fd00:0:0:1::1"',
     "IPv6SubnetMax is not on a SubnetLen boundary: fd00:0:0:1::1"),
    ('"IPv6Network": "fd00::/48", "IPv6SubnetMin": "10.0.0.0"', "IPv6SubnetMin '10.0.0.0' is not an IPv6 address"),
    ('"IPv6SubnetLen": 64', "please define a correct IPv6Network parameter in the flannel config"),
    ('"IPv6Network": "10.0.0.0/8"', "invalid IPv6 CIDR format: '10.0.0.0/8'"),
    ('"IPv6Network": "fd00::/48", "EnableIPv6": "yes"', "EnableIPv6 must be true or false, not 'yes'"),
    ('"IPv6Network": "fd00::/48", "EnableIPv6": false', "none defined stack"),
])
def test_ipv6_config_errors(fields: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.parse(f'{{"EnableIPv4": false, "EnableIPv6": true, {fields}}}')
    assert str(err.value).startswith(message), str(err.value)


def test_flannels_dual_stack_keys() -> None:
    key = "10.12.13.0-24&fd00:12:13::-56"
    assert parse_subnet_key(key) == (Net4("10.12.13.0/24"), Net6("fd00:12:13::/56"))
    assert subnet_key(Net4("10.12.13.0/24"), Net6("fd00:12:13::/56")) == key
    assert subnet_key(Net4("10.244.5.0/24"), Net6("fd00:10:244:5::/64")) == "10.244.5.0-24&fd00:10:244:5::-64"
    assert subnet_key(None, Net6("fd00:12:13::/56")) == "0.0.0.0-0&fd00:12:13::-56", "an IPv6-only lease"
    assert parse_subnet_key("0.0.0.0-0&fd00:12:13::-56") == (None, Net6("fd00:12:13::/56"))


@pytest.mark.parametrize("key", [
    "10", "10.12.13.0", "10.12.13-24", "10.12.13.300-24", "10.12.13.0-24hi", "&2001::-56", "10.12.13.0-24&:12:13:-56",
    "10.12.13.0-24&20011::-56", "10.12.13.0-24&2001-56", "10.12.13.0-24&2001::", "10.12.13.0-24&2001::-56hi",
    # ours, stricter than flannel's regex: its own spelling, no host bits, a prefix that exists, some subnet
    "10.12.13.0-24&fd00:0000:12::-48", "10.12.13.0-24&FD00::-48", "10.12.13.0-24&fd00::1-64",
    "10.12.13.0-24&fd00::-129", "10.12.13.0-24&fd00::-064", "0.0.0.0-0",
])
def test_flannels_invalid_keys_and_ours_are_refused(key: str) -> None:
    with pytest.raises(BadRecord) as bad:
        parse_subnet_key(key)
    assert bad.value.reason == "bad_key"


def test_public_ipv6_is_global_or_unique_local_unicast() -> None:
    for ok in ("fc00::1", "fcff::1", "fd00::1", "fdff::1", "2001::", "2001:2::5"):  # ip6net_test's private ones
        assert check_public_ipv6(ok) == IP6(ok)
    for bad in ("fe00::", "::", "::1", "ff02::1", "fe80::1", "::ffff:198.18.0.1", "::198.18.0.1", "198.18.0.1", 5,
                None, "fd00::1%eth0"):
        with pytest.raises(BadRecord) as err:
            check_public_ipv6(bad)
        assert err.value.reason == "bad_public_ipv6"


def test_dual_stack_lease_json_is_flannels() -> None:
    attrs = LeaseAttrs(IP4("192.168.64.3"), "vxlan", {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"}, IP6("fc00::1"),
                       {"VNI": 1, "VtepMAC": "a2:d2:32:6f:8f:45"})
    assert attrs.to_json() == ('{"PublicIP":"192.168.64.3","PublicIPv6":"fc00::1","BackendType":"vxlan",'
                               '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"},'
                               '"BackendV6Data":{"VNI":1,"VtepMAC":"a2:d2:32:6f:8f:45"}}')
    assert LeaseAttrs.from_json(attrs.to_json(), ipv4=True, ipv6=True) == attrs
    assert LeaseAttrs.from_json(attrs.to_json()) == LeaseAttrs(IP4("192.168.64.3"), "vxlan", attrs.backend_data), \
        "an IPv4-only network reads only the IPv4 part"
    assert LeaseAttrs(None, "host-gw", public_ipv6=IP6("2001:2::1")).to_json() == \
        '{"PublicIP":"0.0.0.0","PublicIPv6":"2001:2::1","BackendType":"host-gw"}', "IPv6-only: Go's zero IP4"


def test_subnet_env_as_flannels_documentation_shows_it(tmp_path: Path) -> None:
    cfg = config.parse('{"Network": "10.42.0.0/16", "EnableIPv6": true, "IPv6Network": "2001:cafe:42::/56"}')
    lease = Lease(Net4("10.42.0.0/24"), LeaseAttrs(None), ipv6_subnet=Net6("2001:cafe:42::/64"))
    text = subnet_env.render(cfg, lease, mtu=1450, ip_masq=True)
    assert text == ("FLANNEL_NETWORK=10.42.0.0/16\nFLANNEL_SUBNET=10.42.0.1/24\n"
                    "FLANNEL_IPV6_NETWORK=2001:cafe:42::/56\nFLANNEL_IPV6_SUBNET=2001:cafe:42::1/64\n"
                    "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")
    v6_only = subnet_env.render(config.parse(V6_ONLY), Lease(None, LeaseAttrs(None), ipv6_subnet=Net6("fc00:1::/64")),
                                mtu=1430, ip_masq=False)
    assert v6_only == ("FLANNEL_IPV6_NETWORK=fd00:10:244::/48\nFLANNEL_IPV6_SUBNET=fc00:1::1/64\n"
                       "FLANNEL_MTU=1430\nFLANNEL_IPMASQ=false\n"), "ip6net_test: fc00:1::/64 + 1 is fc00:1::1/64"
    path = tmp_path / "subnet.env"
    path.write_text(text)
    assert subnet_env.previous_subnets(str(path)) == (Net4("10.42.0.0/24"), Net6("2001:cafe:42::/64"))
    path.write_text("FLANNEL_IPV6_SUBNET=fd00::1/64,fd00:0:0:1::1/64\nFLANNEL_SUBNET=fd00::1/64\n")
    assert subnet_env.previous_subnets(str(path)) == (None, None), "a list, or the wrong family: no previous"


def test_ip6tables_rules_are_flannels() -> None:
    rs = iptables.masq_rules(Net6("fd00:10:244::/48"), Net6("fd00:10:244:5::/64"), fully_random=False)
    c = '-m comment --comment "flanneld masq"'
    assert rs.version == 6 and [f"-A {rs.chain} {iptables._join(rule)}" for rule in rs.rules] == [
        f"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {c} -j RETURN",
        f"-A FLANNEL-POSTRTG -s fd00:10:244:5::/64 -d fd00:10:244::/48 {c} -j RETURN",
        f"-A FLANNEL-POSTRTG -s fd00:10:244::/48 -d fd00:10:244:5::/64 {c} -j RETURN",
        f"-A FLANNEL-POSTRTG ! -s fd00:10:244::/48 -d fd00:10:244:5::/64 {c} -j RETURN",
        f"-A FLANNEL-POSTRTG -s fd00:10:244::/48 ! -d ff00::/8 {c} -j MASQUERADE",
        f"-A FLANNEL-POSTRTG ! -s fd00:10:244::/48 -d fd00:10:244::/48 {c} -j MASQUERADE",
    ]
    assert iptables.Backend("nft").tool("restore", 6) == "ip6tables-nft-restore"
    assert iptables.forward_rules(Net6("fd00:10:244::/48")).version == 6


NETCONF = {"name": "cni-flannel", "type": "flannel"}


@pytest.mark.parametrize(("env", "ranges", "routes"), [
    ("FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_IPV6_NETWORK=fc00::/48\n"
     "FLANNEL_IPV6_SUBNET=fc00::1/64\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n",
     [[{"subnet": "10.1.17.0/24"}], [{"subnet": "fc00::/64"}]], [{"dst": "10.1.0.0/16"}, {"dst": "fc00::/48"}]),
    ("FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00::1/64\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n",
     [[{"subnet": "fc00::/64"}]], [{"dst": "fc00::/48"}]),
])
def test_cni_delegate_matches_flannels_golden_output(tmp_path: Path, env: str, ranges: Any, routes: Any) -> None:
    (tmp_path / "subnet.env").write_text(env)
    delegate = cni.delegate_config(NETCONF, cni.load_subnet_env(str(tmp_path / "subnet.env")))
    assert delegate == {"ipMasq": False, "ipam": {"routes": routes, "ranges": ranges, "type": "host-local"},
                        "isGateway": True, "mtu": 1472, "name": "cni-flannel", "type": "bridge"}


def test_cni_names_what_subnet_env_lacks_as_flannel_does(tmp_path: Path) -> None:
    (tmp_path / "subnet.env").write_text("FLANNEL_IPMASQ=false\n")
    with pytest.raises(cni.CniError) as err:
        cni.load_subnet_env(str(tmp_path / "subnet.env"))
    assert err.value.msg.endswith("is missing FLANNEL_NETWORK, FLANNEL_IPV6_NETWORK, FLANNEL_SUBNET, "
                                  "FLANNEL_IPV6_SUBNET, FLANNEL_MTU")


def _registry(tmp_path: Path, text: str) -> tuple[LocalRegistry, config.NetworkConfig]:
    conf = tmp_path / "net.json"
    conf.write_text(text)
    return LocalRegistry(str(tmp_path / "r.db"), str(conf)), config.parse(text)


def test_dual_stack_allocation_chooses_each_family_on_its_own(tmp_path: Path) -> None:
    async def go() -> None:
        reg, cfg = _registry(tmp_path, DUAL)
        a = LeaseAttrs(IP4("198.18.0.1"), public_ipv6=IP6("2001:2::1"))
        first, record = await subnets.acquire(reg, cfg, a, (Net4("10.244.7.0/24"), Net6("fd00:10:244:7::/64")))
        assert (first.subnet, first.ipv6_subnet) == (Net4("10.244.7.0/24"), Net6("fd00:10:244:7::/64"))
        assert record.key == "10.244.7.0-24&fd00:10:244:7::-64"
        b = LeaseAttrs(IP4("198.18.0.2"), public_ipv6=IP6("2001:2::2"))
        second, _ = await subnets.acquire(reg, cfg, b, (Net4("10.244.8.0/24"), Net6("fd00:10:244:7::/64")))
        assert second.subnet == Net4("10.244.8.0/24"), "the free previous IPv4 subnet is kept"
        assert second.ipv6_subnet not in (None, first.ipv6_subnet), "the previous IPv6 one is another's: not taken"
        again, _ = await subnets.acquire(reg, cfg, a, (None, None))
        assert (again.subnet, again.ipv6_subnet) == (first.subnet, first.ipv6_subnet), "found by PublicIP"
        await reg.close()
    asyncio.run(go())


def test_turning_ipv6_on_keeps_a_nodes_ipv4_subnet(tmp_path: Path) -> None:
    async def go() -> None:
        reg, cfg4 = _registry(tmp_path, '{"Network": "10.244.0.0/16"}')
        me = LeaseAttrs(IP4("198.18.0.1"))
        old, _ = await subnets.acquire(reg, cfg4, me, (None, None))
        cfg = config.parse(DUAL)
        dual = LeaseAttrs(IP4("198.18.0.1"), public_ipv6=IP6("2001:2::1"))
        new, _ = await subnets.acquire(reg, cfg, dual, (old.subnet, None))  # subnet.env of the IPv4-only run
        assert new.subnet == old.subnet and new.ipv6_subnet is not None
        records, _ = await reg.list_records()
        assert [r.key for r in records] == [new.key()], "the IPv4-only lease is replaced, not kept beside"
        await reg.close()
    asyncio.run(go())


def test_ipv6_only_allocation_knows_nodes_by_public_ipv6(tmp_path: Path) -> None:
    async def go() -> None:
        reg, cfg = _registry(tmp_path, '{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00::/124"}')
        nodes = [LeaseAttrs(None, public_ipv6=IP6(f"2001:2::{i}")) for i in range(1, 4)]
        leases = [(await subnets.acquire(reg, cfg, attrs, (None, None)))[0] for attrs in nodes]
        assert sorted(str(lease.ipv6_subnet) for lease in leases) == ["fd00::4/126", "fd00::8/126", "fd00::c/126"]
        assert all(lease.subnet is None and lease.key().startswith("0.0.0.0-0&") for lease in leases)
        again, _ = await subnets.acquire(reg, cfg, nodes[1], (None, None))
        assert again.ipv6_subnet == leases[1].ipv6_subnet, "its own lease, not the first with PublicIP 0.0.0.0"
        with pytest.raises(FlannelError, match="out of subnets: every /126 between fd00::4 and fd00::c"):
            await subnets.acquire(reg, cfg, LeaseAttrs(None, public_ipv6=IP6("2001:2::9")), (None, None))
        await reg.close()
    asyncio.run(go())


OK6 = b'{"PublicIP":"198.18.0.7","PublicIPv6":"2001:2::7","BackendType":"vxlan"}'


@pytest.mark.parametrize(("key", "value", "reason"), [
    ("10.244.3.0-24&fd00:10:244:3::1-64", OK6, "bad_key"),
    ("10.244.3.0-24&fd00:10:244:03::-64", OK6, "bad_key"),
    ("10.244.3.0-24&fd00:99:244:3::-64", OK6, "outside_network"),
    ("10.244.3.0-24&fd00:10:244:300::-56", OK6, "wrong_length"),
    ("10.244.3.0-24&fd00:10::-32", OK6, "outside_network"),
    ("10.244.3.0-24&fd00:10:244:3::-64", b'{"PublicIP":"198.18.0.7"}', "bad_public_ipv6"),
    ("10.244.3.0-24&fd00:10:244:3::-64", b'{"PublicIP":"198.18.0.7","PublicIPv6":null}', "bad_public_ipv6"),
    ("10.244.3.0-24&fd00:10:244:3::-64", b'{"PublicIP":"198.18.0.7","PublicIPv6":"fe80::7"}', "bad_public_ipv6"),
    ("10.244.3.0-24&fd00:10:244:3::-64", b'{"PublicIP":"198.18.0.7","PublicIPv6":"::ffff:1.2.3.4"}',
     "bad_public_ipv6"),
    ("10.244.3.0-24&fd00:10:244:3::-64", b'{"PublicIP":"198.18.0.7","PublicIPv6":"ff05::2"}', "bad_public_ipv6"),
    ("10.244.3.0-24&fd00:10:244:3::-64", b'{"PublicIP":"0.0.0.0","PublicIPv6":"2001:2::7"}', "bad_public_ip"),
    ("10.244.3.0-24&fd00:10:244:3::-64", b'{"PublicIP":"198.18.0.7","PublicIPv6":"2001:2::7","BackendType":1}',
     "bad_value"),
])
def test_every_part_of_a_dual_stack_record_is_checked(key: str, value: bytes, reason: str) -> None:
    with pytest.raises(BadRecord) as bad:
        decode(key, value, config.parse(DUAL))
    assert bad.value.reason == reason, str(bad.value)


def test_records_keep_only_the_networks_families() -> None:
    dual, v4, v6 = (config.parse(text) for text in (DUAL, '{"Network": "10.244.0.0/16"}', V6_ONLY))
    both = decode("10.244.3.0-24&fd00:10:244:3::-64", OK6, dual)
    assert both == Lease(Net4("10.244.3.0/24"), LeaseAttrs(IP4("198.18.0.7"), "vxlan", public_ipv6=IP6("2001:2::7")),
                         ipv6_subnet=Net6("fd00:10:244:3::/64"))
    assert decode("10.244.3.0-24&fd00:10:244:3::-64", OK6, v4).ipv6_subnet is None, "IPv4-only: routes IPv4"
    assert decode("10.244.3.0-24", OK6, dual).routes() == [(Net4("10.244.3.0/24"), IP4("198.18.0.7"))], \
        "a node not on IPv6 yet keeps its IPv4 route on a dual-stack network"
    only6 = decode("0.0.0.0-0&fd00:10:244:3::-64", b'{"PublicIP":"0.0.0.0","PublicIPv6":"2001:2::7"}', v6)
    assert only6.routes() == [(Net6("fd00:10:244:3::/64"), IP6("2001:2::7"))]
    with pytest.raises(BadRecord) as bad:
        decode("10.244.3.0-24", OK6, v6)
    assert bad.value.reason == "wrong_family"


def test_an_ipv6_subnet_overlapping_a_routed_one_waits_its_turn() -> None:
    own = Lease(Net4("10.244.1.0/24"), LeaseAttrs(IP4("198.18.0.1")), ipv6_subnet=Net6("fd00:10:244:1::/64"))
    table = PeerTable(own)
    attrs = LeaseAttrs(IP4("198.18.0.2"), public_ipv6=IP6("2001:2::2"))
    first = Lease(Net4("10.244.2.0/24"), attrs, ipv6_subnet=Net6("fd00:10:244:2::/64"))
    thief = Lease(Net4("10.244.3.0/24"), attrs, ipv6_subnet=Net6("fd00:10:244:2::/64"))
    mine = Lease(Net4("10.244.4.0/24"), attrs, ipv6_subnet=Net6("fd00:10:244:1::/64"))
    a_v6_slash_24 = Lease(Net4("10.244.5.0/24"), attrs, ipv6_subnet=Net6("fd01::/24"))
    events = table.apply([("a", Entry(first)), ("b", Entry(thief)), ("c", Entry(mine)), ("d", Entry(a_v6_slash_24))])
    assert [e.lease for e in events] == [first, a_v6_slash_24], "b overlaps a, c our own; d's /24s are another's"
    assert table.rejected["overlap"] == 2
    events = table.apply([("a", None)])
    assert [(e.type.value, e.lease) for e in events] == [("removed", first), ("added", thief)]


def test_a_kubernetes_node_advertises_both_families(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_NAME", "me")
    manager = KubeManager(net_config_path="", kubeconfig="", api_url="", annotation_prefix="flannel.alpha.coreos.com",
                          set_network_unavailable=False)
    p = "flannel.alpha.coreos.com/"
    ann = {p + "kube-subnet-manager": "true", p + "public-ip": "198.18.0.7", p + "backend-type": "vxlan",
           p + "backend-data": '{"VNI":1,"VtepMAC":"02:00:00:00:00:07"}', p + "public-ipv6": "2001:2::7",
           p + "backend-v6-data": '{"VNI":1,"VtepMAC":"02:00:00:00:00:17"}'}

    def entry(cidrs: list[str], text: str = DUAL, **changed: str) -> Entry | None:
        annotations = {**ann, **{p + k: v for k, v in changed.items()}}
        node = V1Node(metadata=V1ObjectMeta(name="other", annotations=annotations),
                      spec=V1NodeSpec(pod_cidr=cidrs[0], pod_cidrs=cidrs))
        return manager.source(config.parse(text))._entry(node)

    good = entry(["10.244.7.0/24", "fd00:10:244:7::/64"])
    assert good is not None and isinstance(good.lease, Lease)
    assert good.lease.routes() == [(Net4("10.244.7.0/24"), IP4("198.18.0.7")),
                                   (Net6("fd00:10:244:7::/64"), IP6("2001:2::7"))]
    assert good.lease.attrs.backend_v6_data == {"VNI": 1, "VtepMAC": "02:00:00:00:00:17"}
    for cidrs, text, changed, reason in (
            (["10.244.7.0/24", "fd00:10:244:7::/64", "10.244.8.0/24"], DUAL, {}, "bad_value"),
            (["10.244.7.0/24", "10.244.8.0/24"], DUAL, {}, "bad_value"),
            (["10.244.7.0/24", "fd00:99::/64"], DUAL, {}, "outside_network"),
            (["10.244.7.0/24", "fd00:10:244:7::/64"], DUAL, {"public-ipv6": "fe80::7"}, "bad_public_ipv6"),
            (["10.244.7.0/24"], V6_ONLY, {}, "wrong_family")):
        bad = entry(cidrs, text, **changed)
        assert bad is not None and isinstance(bad.lease, BadRecord) and bad.lease.reason == reason, (cidrs, bad)
