"""flannel's wire format by hand: a plain UDP socket plays a flannel udp-backend node against flannel-tunnel."""

from __future__ import annotations

from pathlib import Path

from conftest import flannel_peer_and_app, start_tunnel
from packets import parse_ipv4, udp4

from pyflannel.bench.rig import Rig


def test_raw_ipv4_in_udp_both_ways(rig: Rig, tmp_path: Path) -> None:
    a, b = rig.hosts
    start_tunnel(a, [b], tmp_path)
    flannel_peer, app = flannel_peer_and_app(a, b)
    with flannel_peer, app:
        app.sendto(b"to flannel", (str(b.overlay_ip), 7002))
        datagram, sender = flannel_peer.recvfrom(65536)
        assert sender == (str(a.underlay), 8285), "sent from the socket bound to the interface address"
        pkt = parse_ipv4(datagram)
        assert (pkt.version, pkt.src, pkt.dst, pkt.proto) == (4, str(a.overlay_ip), str(b.overlay_ip), 17)
        assert pkt.ttl == 63 and pkt.header_ok, "TTL decremented once, header checksum patched"
        assert pkt.total == len(datagram), "nothing but the inner packet in the datagram"
        assert pkt.payload[8:] == b"to flannel"

        reply = udp4(str(b.overlay_ip), str(a.overlay_ip), 7002, 7001, b"from flannel", ttl=64)
        flannel_peer.sendto(reply, (str(a.underlay), 8285))
        data, source = app.recvfrom(100)
        assert data == b"from flannel" and source == (str(b.overlay_ip), 7002)
