"""An IPv6-underlay tunnel next to an IPv4 one with the compiled pipelines on: both
families' ESP in one batch are hits, each to its tunnel; the IPv6 tunnel's transmit row
seals what the peer opens."""

from __future__ import annotations

from datapath.helpers import Hypervisor, eth, ipv4, ipv6, mac, udp, vxlan
from espswitch.datapath import fast
from espswitch.datapath.tunnel import Route, ip4, ip_addr
from espswitch.ipsec import InboundSA, OutboundSA, SaParams, parse_transform

KEY = bytes(range(20))
VM_MAC, PEER_VM = mac(2), mac(1)


def esp_opts(spi_in: int, spi_out: int) -> dict[str, str]:
    return {"spi_in": hex(spi_in), "spi_out": hex(spi_out), "esp_key_in": KEY.hex(),
            "esp_key_out": KEY.hex()}


def test_ipv4_and_ipv6_esp_in_one_batch_are_hits():
    hv = Hypervisor("10.0.0.2", "10.0.0.1", vni=100, tun_type="vxlanipsec",
                    tun_options=esp_opts(0x2001, 0x1001))
    dp = hv.dp
    dp.routes.set_system(
        [Route(prefix=int.from_bytes(ip4("10.0.0.0"), "big"), plen=24, dev="br-phy"),
         Route(prefix=int.from_bytes(ip_addr("fd00::"), "big"), plen=64, dev="br-phy",
               v6=True)],
        {"br-phy": [ip4("10.0.0.2"), ip_addr("fd00::2")]})
    tun6 = dp.add_port("br-int", "vx6", "vxlanipsec",
                       {"remote_ip": "fd00::1", "key": "200", **esp_opts(0x3001, 0x4001)})
    dp.run(dp.now)
    assert dp.fast_path and fast.is_compiled(hv.tun.esp.sa_in)
    hv.inject("vm", eth(b"\xff" * 6, VM_MAC, b"\0" * 46, et=0x0806))
    hv.dev("vm").take()
    hv.dev("eth0").take()

    inner = eth(VM_MAC, PEER_VM, ipv4("192.168.1.1", "192.168.1.2", 1, b"i" * 64))
    sa4 = OutboundSA(SaParams(spi=0x2001, transform=parse_transform("aes128gcm16"),
                              keymat=KEY))
    sa6 = OutboundSA(SaParams(spi=0x3001, transform=parse_transform("aes128gcm16"),
                              keymat=KEY))
    phy = hv.dev("br-phy").mac
    def f4() -> bytes:
        return eth(phy, mac(50), ipv4("10.0.0.1", "10.0.0.2", 50, sa4.encrypt(
            udp(50000, 4789, vxlan(100, inner)), 17)))

    inner6 = eth(VM_MAC, mac(3), ipv4("192.168.1.3", "192.168.1.2", 1, b"j" * 64))

    def f6() -> bytes:
        l4 = ipv6("fd00::1", "fd00::2", 17, udp(50000, 4789, vxlan(200, inner6)))[40:]
        return eth(phy, mac(50), ipv6("fd00::1", "fd00::2", 50, sa6.encrypt(l4, 17)), 0x86DD)

    # The first IPv4 packet is a miss: the Python path learns its MACs.
    hv.inject("eth0", f4(), f6())
    assert hv.dev("vm").take() == [inner, inner6]
    ft = dp._fast
    ft.ensure()
    assert hv.dp.ports["eth0"] in ft.rx_ports
    assert sorted(len(row[0].selector.dst) for row in ft.spis) == [4, 16]
    misses, hits = ft.misses, ft.hits
    hv.inject("eth0", f4(), f6(), f4(), f6())
    assert (ft.hits - hits, ft.misses - misses) == (4, 0)
    assert hv.dev("vm").take() == [inner, inner6, inner, inner6]
    assert tun6.stats["rx_packets"] == 3 and tun6.stats["esp_auth_failures"] == 0
    # Another next header (AH) in the IPv6 outer header: a miss; nothing the Python path
    # does with it touches an SA or a tunnel, so the batch goes on in the fast path.
    bad = bytearray(f6())
    bad[20] = 51
    hv.inject("eth0", f4(), bytes(bad), f6())
    assert (ft.hits - hits, ft.misses - misses) == (6, 1)
    assert hv.dev("vm").take() == [inner, inner6]


def test_an_ipv6_tunnel_is_in_the_compiled_transmit_table():
    hv = Hypervisor("fd00::2", "fd00::1", vni=100, tun_type="vxlanipsec",
                    tun_options=esp_opts(0x2001, 0x1001))
    dp = hv.dp
    assert dp.fast_path and fast.is_compiled(hv.tun.esp.sa_out)
    assert hv.tun.esp.fast_outbound() is hv.tun.esp.sa_out
    dp.neigh.learn("br-phy", ip_addr("fd00::1"), mac(9), dp.now)
    hv.inject("eth0", eth(hv.dev("br-phy").mac, mac(9), b"\0" * 46, et=0x88B5))  # learn mac 9
    hv.dev("br-phy").take()
    inner = eth(PEER_VM, VM_MAC, ipv4("192.168.1.2", "192.168.1.1", 1, b"o" * 64))
    hv.inject("vm", inner)  # the Python path learns the VM's MAC (and floods the frame)
    # As if the peer's VM had spoken through the tunnel: its MAC is on the tunnel port.
    hv.dp.bridges["br-int"].macs[(0, PEER_VM)] = [hv.tun, dp.now]
    dp.fast_changed()
    hv.dev("eth0").take()
    for _ in range(3):
        hv.inject("vm", inner)
    dp._fast.ensure()
    assert hv.tun in dp._fast.tx_tunnels and dp._fast.tx_hits == 3
    assert "vx0 2: (vxlanipsec: remote_ip=fd00::1" in dp.show() and "fast-tx-tunnel" in dp.show()
    out = hv.dev("eth0").take()
    assert len(out) == 3
    peer = InboundSA(SaParams(spi=0x1001, transform=parse_transform("aes128gcm16"),
                              keymat=KEY))
    for f in out:
        assert f[12:14] == b"\x86\xdd" and f[20] == 50
        assert f[22:38] == ip_addr("fd00::2") and f[38:54] == ip_addr("fd00::1")
        nh, payload = peer.open(f[54:])
        assert nh == 17 and payload.endswith(inner)
