"""Interface.mtu_request on ports (in memory): devices take it, tunnels size themselves
from their egress device's MTU, refusals are shown and change nothing."""

from __future__ import annotations

from espswitch.datapath.tunnel import ip4

from .helpers import Hypervisor, eth, ipv4, mac


def pair() -> tuple[Hypervisor, Hypervisor]:
    a = Hypervisor("10.0.0.1", "10.0.0.2")
    b = Hypervisor("10.0.0.2", "10.0.0.1")
    for hv, peer in ((a, b), (b, a)):
        hv.dp.neigh.learn("br-phy", ip4(peer.ip), peer.dev("br-phy").mac, hv.dp.now)
    return a, b


def big_frame(size: int) -> bytes:
    """An Ethernet frame of `size` bytes: ICMP-less IPv4 with DF set."""
    ip = bytearray(ipv4("192.168.1.1", "192.168.1.2", 17, bytes(size - 14 - 20)))
    ip[6] |= 0x40
    return eth(mac(2), mac(1), bytes(ip))


def test_a_jumbo_underlay_mtu_raises_the_tunnels_mtu_and_big_frames_pass_whole():
    a, b = pair()
    assert a.tun.status()["tunnel_mtu"] == str(1500 - 20 - 8 - 8 - 14)
    for hv in (a, b):
        for name in ("br-phy", "eth0"):
            hv.dp.ports[name].set_mtu_request(9000)
        hv.dp.run(hv.dp.now)
    assert a.dp.ports["br-phy"].mtu() == 9000 and a.dp.ports["eth0"].mtu() == 9000
    assert a.tun.status()["tunnel_mtu"] == str(9000 - 20 - 8 - 8 - 14)
    frame = big_frame(9000 - 20 - 8 - 8)  # the largest the tunnel carries
    a.inject("vm", frame)
    out = [f for f in a.dev("eth0").take() if f[12:14] == b"\x08\x00"]
    assert len(out) == 1 and len(out[0]) == 14 + 9000  # one packet, not fragments
    b.inject("eth0", out[0])
    assert b.dev("vm").take() == [frame]


def test_a_refused_mtu_request_is_shown_and_changes_nothing():
    a, _ = pair()
    vm = a.dp.ports["vm"]
    for bad in (70000, 60):
        vm.set_mtu_request(bad)
        assert "out of range" in vm.status()["mtu_error"], vm.status()
        assert vm.mtu() == 1500
    vm.set_mtu_request(None)
    assert vm.status() == {} and vm.mtu() == 1500
    # Ports without a device of their own keep the request and do nothing, as OVS's do.
    a.tun.set_mtu_request(9000)
    assert a.tun.mtu() is None and "mtu_error" not in a.tun.status()


def test_a_tap_with_an_mtu_request_is_not_lowered_to_the_tunnels_mtu():
    a, _ = pair()
    vm = a.dp.ports["vm"]
    vm.set_mtu_request(9000)
    a.dp.mtus_changed()
    a.dp.run(a.dp.now)
    assert vm.mtu() == 9000
