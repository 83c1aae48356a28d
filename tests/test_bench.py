"""flannel-bench's own pieces: the rig's cleanup, the report arithmetic and shape, and failure handling.

Short runs only; no speed is asserted anywhere.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pyflannel.bench import cli, modes, report
from pyflannel.bench.measure import Result
from pyflannel.bench.rig import Rig, leftover_namespaces

BENCH = str(Path(sys.executable).with_name("flannel-bench"))


def test_rig_leaves_nothing_behind_even_on_error() -> None:
    procs = []
    with pytest.raises(RuntimeError), Rig(tag="pftrig") as rig:
        for host in rig.hosts:
            procs.append(host.popen("sleep", "600"))
        assert len(leftover_namespaces("pftrig")) == 2
        raise RuntimeError("boom")
    assert leftover_namespaces("pftrig") == []
    assert all(p.poll() is not None for p in procs), "processes started in the rig are gone"


def _result(tcp: float, retrans: int = 0, rtt: float = 0.1) -> Result:
    return Result(tcp_gbps=tcp, tcp_parallel_gbps=2 * tcp, udp64_kpps=100.0, rtt_ms_p50=rtt, rtt_ms_p99=2 * rtt,
                  rtt_loaded_ms_p50=1.0, rtt_loaded_ms_p99=3.0, tcp_loaded_gbps=tcp, rr_per_s=1000.0,
                  cpu_s_per_gb=1.0, retransmits=retrans)


def test_idle_rtt_is_set_against_flannel_c() -> None:
    runs = {"vxlan": [_result(10, rtt=0.01)], "udp": [_result(8, rtt=0.05)], "flannel-c": [_result(1, rtt=0.1)]}
    built = report.build(runs, {"parallel": 4}, {})
    assert built["rtt_vs_flannel_c"] == {"vxlan": {"p50": 0.1, "p99": 0.1}, "udp": {"p50": 0.5, "p99": 0.5}}
    assert re.search(r"^udp +.* 0\.50/0\.50 ", report.table(built), re.MULTILINE)
    assert report.build({"udp": [_result(8)]}, {"parallel": 4}, {})["rtt_vs_flannel_c"] == {}


def test_the_penalty_panel_says_what_is_missing() -> None:
    """Without the plain underlay there is no penalty: the panel says so instead of drawing empty axes."""
    built = report.build({"udp": [_result(8)]}, {"parallel": 4}, {})
    _fig, ax = report.pyplot().subplots()
    report._penalty_panel(ax, built)
    assert any("no plain underlay" in t.get_text() for t in ax.texts)
    assert not ax.patches, "no bars"
    built = report.build({"none": [_result(10)], "udp": [_result(8)]}, {"parallel": 4}, {})
    _fig, ax = report.pyplot().subplots()
    report._penalty_panel(ax, built)
    assert not ax.texts[1:] and [round(p.get_height()) for p in ax.patches] == [20]


def test_missing_bench_extra_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`pip install pyflannel` without [bench]: one line saying what to install, before anything runs."""
    monkeypatch.setitem(sys.modules, "iperf3", None)
    assert cli.main(["--modes", "none"]) == 1
    assert capsys.readouterr().err == ("flannel-bench: error: iperf3 not installed: the benchmark needs pyflannel's "
                                       "bench extra (pip install 'pyflannel[bench]')\n")


def test_medians_and_penalties() -> None:
    runs = {"none": [_result(10), _result(12), _result(8)], "udp": [_result(7.5), _result(9), _result(6)],
            "host-gw": [_result(11, 4), _result(11, 5), _result(11, 6)]}
    built = report.build(runs, {"parallel": 4}, {"vxlan": "no VXLAN here"})
    assert built["modes"]["none"]["tcp_gbps"] == 10
    assert built["modes"]["host-gw"]["retransmits"] == 5
    assert built["penalty_pct"] == {"udp": 25.0, "host-gw": -10.0}
    assert built["skipped"] == {"vxlan": "no VXLAN here"}
    assert re.search(r"^vxlan +skipped: no VXLAN here$", report.table(built), re.MULTILINE)


def test_ipv6_modes_are_measured_against_none6_in_the_same_table() -> None:
    runs = {"none": [_result(10)], "vxlan": [_result(8)], "none6": [_result(20)], "vxlan6": [_result(15)],
            "host-gw6": [_result(22)]}
    built = report.build(runs, {"parallel": 4}, {})
    assert built["penalty_pct"] == {"vxlan": 20.0, "vxlan6": 25.0, "host-gw6": -10.0}
    assert report.penalties({"vxlan6": built["modes"]["vxlan6"]}) == {}, "no none6, no penalty"
    rows = report.table(built).splitlines()
    assert [r.split()[0] for r in rows[1:]] == list(runs)


@pytest.mark.parametrize(("text", "chosen"), [
    ("all6", list(modes.MODES6)),
    ("none,all6,none6", ["none", *modes.MODES6]),
    ("all", [*modes.MODES, *modes.MODES6]),
    ("vxlan6,none", ["vxlan6", "none"]),
])
def test_modes_and_groups(text: str, chosen: list[str]) -> None:
    assert cli.parse(["--modes", text]).modes == chosen


def test_default_modes_stay_ipv4() -> None:
    assert cli.parse([]).modes == list(modes.MODES)


def test_ipv6_run_on_an_ipv6_rig() -> None:
    """Every IPv6 mode end to end, udp6 (flannel-tunnel over an IPv6 underlay) included: this tunnel takes IPv6,
    so a udp6 that could not start is a failure, not a skip."""
    built: dict[str, Any] = cli.run(cli.parse(["--modes", "all6", "--seconds", "1", "--repeats", "1", "--pings",
                                               "10"]))
    measured = built["modes"]
    assert built.get("skipped", {}) == {}
    assert set(measured) == {"none6", "host-gw6", "vxlan6", "udp6"}
    for figures in measured.values():
        assert figures["tcp_gbps"] > 0 and figures["udp64_kpps"] > 0
        assert figures["rtt_ms_p99"] >= figures["rtt_ms_p50"] > 0
    assert set(built["penalty_pct"]) == set(measured) - {"none6"}
    assert leftover_namespaces("pfbench") == []


def test_quick_run_writes_json_and_png(tmp_path: Path) -> None:
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    r = subprocess.run([BENCH, "--modes", "none,udp,flannel-c", "--seconds", "1", "--repeats", "1", "--pings",
                        "10", "--json", str(out), "--plot", str(png)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert set(data) == {"machine", "config", "modes", "penalty_pct", "rtt_vs_flannel_c"}
    assert {"kernel", "cpus"} <= set(data["machine"])
    assert set(data["modes"]) == {"none", "udp", "flannel-c"}
    for mode, figures in data["modes"].items():
        engine = {"tx_syscalls_per_gb", "rx_syscalls_per_gb", "tx_packets_per_syscall", "rx_packets_per_syscall"}
        assert set(figures) == {"tcp_gbps", "tcp_parallel_gbps", "udp64_kpps", "rtt_ms_p50", "rtt_ms_p99",
                                "rtt_loaded_ms_p50", "rtt_loaded_ms_p99", "tcp_loaded_gbps", "rr_per_s",
                                "cpu_s_per_gb", "retransmits"} | (engine if mode == "udp" else set())
        assert figures["tcp_gbps"] > 0 and figures["rtt_ms_p99"] >= figures["rtt_ms_p50"] > 0
        assert figures["tcp_loaded_gbps"] > 0 and figures["rtt_loaded_ms_p99"] >= figures["rtt_loaded_ms_p50"] > 0
        assert figures["rr_per_s"] > 0
    udp = data["modes"]["udp"]
    assert udp["tx_syscalls_per_gb"] > 0 and udp["rx_packets_per_syscall"] > 0
    assert set(data["penalty_pct"]) == {"udp", "flannel-c"}
    assert set(data["rtt_vs_flannel_c"]) == {"none", "udp"}
    assert all(ratio["p50"] > 0 for ratio in data["rtt_vs_flannel_c"].values())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "penalty" in r.stdout and "udp" in r.stdout
    assert leftover_namespaces("pfbench") == []


def test_a_failing_mode_is_reported_and_the_rest_still_run(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_vxlan(*args: object) -> None:
        raise modes.ModeUnavailable("cannot create a VXLAN device: not supported")

    monkeypatch.setitem(modes.CONNECT, "vxlan", no_vxlan)
    built = cli.run(cli.parse(["--modes", "vxlan,none", "--seconds", "1", "--repeats", "2", "--pings", "10"]))
    assert built["skipped"] == {"vxlan": "cannot create a VXLAN device: not supported"}
    assert list(built["modes"]) == ["none"]  # type: ignore[call-overload]
    assert leftover_namespaces("pfbench") == []


@pytest.mark.parametrize(("argv", "message"), [
    (["--modes", "none,warp"], "unknown mode 'warp'"),
    (["--modes", "udp-basic6"], "unknown mode 'udp-basic6'"),
    (["--repeats", "0"], "0 is not a positive number"),
    (["--mtu", "100"], "--mtu 100 is out of range"),
    (["--remote", "far", "--local-ip6", "2001:2::1"], "--local-ip6 and --remote-ip6 go together"),
    (["--local-ip6", "2001:2::1", "--remote-ip6", "2001:2::2"], "go with --remote"),
])
def test_bad_flags(argv: list[str], message: str) -> None:
    r = subprocess.run([BENCH, *argv], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_netem_that_tc_refuses_is_one_line(tmp_path: Path) -> None:
    r = subprocess.run([BENCH, "--netem", "garbage x", "--modes", "none", "--seconds", "1", "--repeats", "1",
                        "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert re.fullmatch(r"flannel-bench: error: --netem 'garbage x': tc says: .+\n", r.stderr.splitlines(True)[-1])
    assert "Traceback" not in r.stderr and leftover_namespaces("pfbench") == []


def test_no_mode_measured_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    def no_route(*args: object) -> None:
        raise modes.ModeUnavailable("no route")

    monkeypatch.setitem(modes.CONNECT, "none", no_route)
    out = tmp_path / "r.json"
    assert cli.main(["--modes", "none", "--seconds", "1", "--repeats", "1", "--json", str(out),
                     "--plot", str(tmp_path / "r.png")]) == 1
    assert json.loads(out.read_text())["skipped"] == {"none": "no route"}, "the report is still written"
    assert capsys.readouterr().err.endswith("flannel-bench: error: no mode could be measured (the reasons are above)\n")
