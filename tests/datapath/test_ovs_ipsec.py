"""Open vSwitch's tunnel types with IPsec options, in memory (issue 12): `gre`, `geneve` and
`vxlan` keyed manually or by IKE are ESP-protected, never carry plaintext, and check what
they decrypt against their selectors, including the narrower ones of Open vSwitch's two
CHILD_SAs of a VXLAN or Geneve tunnel (UDP to each side's port)."""

from __future__ import annotations

import struct

import pytest

from espswitch.datapath.errors import PortError
from espswitch.datapath.tunnel import ip4
from espswitch.ike.ts import parse_ts, resolve_dynamic
from espswitch.ipsec import InboundSA, OutboundSA, SaParams, parse_transform
from espswitch.vswitchd.ike_events import child_role
from espswitch.vswitchd.ike_peers import child_selectors

from .helpers import Hypervisor, eth, ipv4, mac, udp

INNER = eth(mac(2), mac(1), ipv4("192.168.1.1", "192.168.1.2", 1, b"ping" * 10))
KEY_AB = bytes(range(20))
KEY_BA = bytes(range(100, 120))
GCM = parse_transform("aes128gcm16")
NEXT_HEADER = {"gre": 47, "geneve": 17, "vxlan": 17}
UDP_PORT = {"geneve": 6081, "vxlan": 4789}


def manual(spi_out: int, spi_in: int, key_out: bytes, key_in: bytes) -> dict[str, str]:
    return {"spi_out": hex(spi_out), "spi_in": hex(spi_in), "esp_key_out": key_out.hex(),
            "esp_key_in": key_in.hex()}


def pair(kind: str, a_opts: dict[str, str], b_opts: dict[str, str]
         ) -> tuple[Hypervisor, Hypervisor]:
    vni = None if kind == "gre" else 100
    a = Hypervisor("10.0.0.1", "10.0.0.2", vni, tun_type=kind, tun_options=a_opts)
    b = Hypervisor("10.0.0.2", "10.0.0.1", vni, tun_type=kind, tun_options=b_opts)
    for hv, peer in ((a, b), (b, a)):
        hv.dp.neigh.learn("br-phy", ip4(peer.ip), peer.dev("br-phy").mac, hv.dp.now)
    return a, b


def manual_pair(kind: str) -> tuple[Hypervisor, Hypervisor]:
    return pair(kind, manual(0x1001, 0x2002, KEY_AB, KEY_BA),
                manual(0x2002, 0x1001, KEY_BA, KEY_AB))


def sent(hv: Hypervisor) -> list[bytes]:
    return [f for f in hv.dev("eth0").take() if f[12:14] == b"\x08\x00"]


@pytest.mark.parametrize("kind", ["gre", "geneve", "vxlan"])
def test_manual_keys_protect_every_tunnel_type(kind):
    a, b = manual_pair(kind)
    assert type(a.tun).__name__ == f"{kind.capitalize()}IpsecPort" and kind == a.tun.TYPE
    a.inject("vm", INNER)
    (f,) = sent(a)
    assert f[14 + 9] == 50  # ESP, nothing of the frame in the clear
    assert INNER[14:] not in f
    # Transport mode: what b's SA opens is the encapsulation itself (next header 47 / 17).
    result = InboundSA(SaParams(spi=0x1001, transform=GCM, keymat=KEY_AB), now=0.0).open(f[34:])
    assert type(result) is tuple and result[0] == NEXT_HEADER[kind]
    b.inject("eth0", f)
    assert b.dev("vm").take() == [INNER]
    st = a.tun.status()
    assert st["ipsec_state"] == "manual" and st["ipsec_mode"] == "transport"
    assert a.tun.describe().startswith(f"{kind}: ")
    # The overheads add up: ESP's on top of the encapsulation's.
    clear = {"gre": 1500 - 20 - 4 - 14, "geneve": 1500 - 20 - 16 - 14,
             "vxlan": 1500 - 20 - 16 - 14}[kind]
    assert int(st["tunnel_mtu"]) < clear


@pytest.mark.parametrize("kind", ["gre", "geneve", "vxlan"])
def test_a_protected_tunnel_refuses_plaintext(kind):
    clear_a, _ = pair(kind, {}, {})
    _, b = manual_pair(kind)
    clear_a.inject("vm", INNER)
    (f,) = sent(clear_a)
    assert f[14 + 9] == NEXT_HEADER[kind]
    b.inject("eth0", b.dev("br-phy").mac + f[6:])
    assert b.dev("vm").take() == []
    assert b.tun.stats["esp_plaintext_drops"] == 1


def test_the_gre_selector_is_protocol_47():
    _, b = manual_pair("gre")
    peer = OutboundSA(SaParams(spi=0x1001, transform=GCM, keymat=KEY_AB))
    # Authentic ESP from the peer, but UDP inside, not GRE: a selector drop.
    payload = udp(50000, 4789, b"\x08\0\0\0\0\0\x64\0" + INNER)
    esp = peer.encrypt(payload, 17)
    b.inject("eth0", b.dev("br-phy").mac + mac(50) + b"\x08\x00"
             + ipv4("10.0.0.1", "10.0.0.2", 50, esp))
    assert b.dev("vm").take() == []
    assert b.tun.stats["esp_selector_drops"] == 1
    esp = peer.encrypt(b"\x00\x00\x65\x58" + INNER, 47)
    b.inject("eth0", b.dev("br-phy").mac + mac(50) + b"\x08\x00"
             + ipv4("10.0.0.1", "10.0.0.2", 50, esp))
    assert b.dev("vm").take() == [INNER]


@pytest.mark.parametrize(("options", "words"), [
    ({"esp": "aes128gcm16"},
     "interface vx0: options:esp is an IPsec option, but nothing keys this gre"),
    ({"ipsec_encapsulation": "yes"}, "interface vx0: options:ipsec_encapsulation is an IPsec"),
    ({"spi_out": "0x1001"}, "a protected tunnel needs keys"),
    ({"psk": "x", "spi_in": "0x1001"}, "cannot be combined"),
])
def test_ipsec_options_that_do_not_key_a_gre_tunnel_are_one_sentence(options, words):
    with pytest.raises(PortError) as e:
        Hypervisor("10.0.0.1", "10.0.0.2", None, tun_type="gre", tun_options=options)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_an_unkeyed_ordinary_tunnel_stays_clear():
    a, _ = pair("geneve", {}, {})
    assert a.tun.esp is None and type(a.tun).__name__ == "GenevePort"


# -- IKE: the selectors ovs-monitor-ipsec uses, and what each CHILD_SA is to the tunnel --------


def ts(text: str, addr: str):
    return (resolve_dynamic(parse_ts(text), ip4(addr)),)


def test_child_selectors_are_ovs_monitor_ipsecs():
    gre, _ = pair("gre", {"psk": "swordfish"}, {"psk": "swordfish"})
    assert child_selectors(gre.tun) == [("gre", "dynamic[gre]", "dynamic[gre]")]
    for kind, port in UDP_PORT.items():
        hv, _ = pair(kind, {"psk": "swordfish"}, {"psk": "swordfish"})
        assert child_selectors(hv.tun) == [
            ("out", "dynamic[udp]", f"dynamic[udp/{port}]"),
            ("in", f"dynamic[udp/{port}]", "dynamic[udp]")]
    vx, _ = pair("vxlanipsec", {"psk": "x"}, {"psk": "x"})
    assert child_selectors(vx.tun) == [("vxlan", "dynamic[udp]", "dynamic[udp]")]


def test_child_role_from_negotiated_selectors():
    a, _ = pair("vxlan", {"psk": "swordfish"}, {"psk": "swordfish"})
    me, peer = "10.0.0.1", "10.0.0.2"
    # "out": UDP to the peer's 4789: it protects what we send; the peer sends from 4789.
    assert child_role(a.tun, ts("dynamic[udp]", me), ts("dynamic[udp/4789]", peer)) == (
        True, ((4789, 4789), (0, 65535)))
    # "in": UDP to our 4789: only what the peer sends; the tunnel's selector is as narrow.
    assert child_role(a.tun, ts("dynamic[udp/4789]", me), ts("dynamic[udp]", peer)) == (
        False, None)
    # Narrower than the tunnel's: both ports checked.
    assert child_role(a.tun, ts("dynamic[udp/4789]", me), ts("dynamic[udp/50000]", peer)) == (
        False, ((50000, 50000), (4789, 4789)))
    # vxlanipsec's one CHILD_SA: both ways, no narrower ports.
    assert child_role(a.tun, ts("dynamic[udp]", me), ts("dynamic[udp]", peer)) == (True, None)
    g, _ = pair("gre", {"psk": "swordfish"}, {"psk": "swordfish"})
    assert child_role(g.tun, ts("dynamic[gre]", me), ts("dynamic[gre]", peer)) == (True, None)


def params(spi: int, key: bytes) -> SaParams:
    return SaParams(spi=spi, transform=GCM, keymat=key)


@pytest.mark.parametrize("kind", ["vxlan", "geneve"])
def test_two_child_sas_one_for_each_direction(kind):
    """a and b as IKE would key them: a's "out" CHILD_SA is b's "in" and the reverse. What
    each sends goes on its "out" pair, what arrives on an "in" pair is delivered, and what
    arrives authentic on an "out" pair from a port that is not the peer's is dropped."""
    port = UDP_PORT[kind]
    a, b = pair(kind, {"psk": "swordfish"}, {"psk": "swordfish"})
    out_rx = ((port, port), (0, 65535))  # an "out" pair's inbound SA: from the peer's port
    in_rx = ((0, 65535), (port, port))   # an "in" pair's inbound SA: to our port
    s1, s2, s3, s4 = 0x101, 0x102, 0x103, 0x104
    k1, k2, k3, k4 = (bytes([n]) * 20 for n in (1, 2, 3, 4))
    # a: "out" = (s1 out, s2 in), "in" = (s4 out, s3 in); b mirrors it.
    a.tun.install_child(params(s1, k1), params(s2, k2), sends=True, rx_ports=out_rx)
    a.tun.install_child(params(s4, k4), params(s3, k3), sends=False, rx_ports=in_rx)
    b.tun.install_child(params(s3, k3), params(s4, k4), sends=True, rx_ports=out_rx)
    b.tun.install_child(params(s2, k2), params(s1, k1), sends=False, rx_ports=in_rx)
    assert a.tun.sa_out.spi == s1 and b.tun.sa_out.spi == s3
    assert a.tun.ipsec_state() == "established"
    a.inject("vm", INNER)
    (f,) = sent(a)
    assert struct.unpack("!I", f[34:38])[0] == s1
    b.inject("eth0", f)
    assert b.dev("vm").take() == [INNER]
    reply = eth(mac(1), mac(2), ipv4("192.168.1.2", "192.168.1.1", 1, b"pong" * 10))
    b.inject("vm", reply)
    (f,) = sent(b)
    assert struct.unpack("!I", f[34:38])[0] == s3
    a.inject("eth0", f)
    assert a.dev("vm").take() == [reply]
    # b seals a tunnel packet (flow-hashed source port) with its receive-only pair's
    # outbound SA, s2: a opens it with its "out" pair's inbound SA, whose selectors say
    # "from the peer's port": a selector drop.
    forged = OutboundSA(params(s2, k2))
    esp = forged.encrypt(b.tun.encapsulation.push(reply), 17)
    a.inject("eth0", a.dev("br-phy").mac + mac(50) + b"\x08\x00"
             + ipv4("10.0.0.2", "10.0.0.1", 50, esp))
    assert a.dev("vm").take() == []
    assert a.tun.stats["esp_selector_drops"] == 1
    # The fast path leaves the narrower SAs to Python; the in pair's rows show as active.
    assert a.tun.esp.fast_inbound(s2) is None
    states = {r["spi"]: r["state"] for r in a.tun.sa_rows()}
    assert set(states.values()) == {"active"}, states
    # Deleting the receive-only pair never makes its outbound SA the sender.
    assert a.tun.remove_child(s3)
    assert a.tun.sa_out.spi == s1
    assert a.tun.remove_child(s2)
    assert a.tun.sa_out is None and a.tun.ipsec_state() == "connecting"


def test_a_receive_only_pair_stays_receive_only_when_it_moves():
    """A reconfigured port hands its IKE pairs to its new port object (`adopt_child`):
    what each pair is to the tunnel goes along."""
    a, _ = pair("vxlan", {"psk": "swordfish"}, {"psk": "swordfish"})
    out_rx, in_rx = ((4789, 4789), (0, 65535)), ((0, 65535), (4789, 4789))
    a.tun.install_child(params(0x101, KEY_AB), params(0x102, KEY_BA), sends=True,
                        rx_ports=out_rx)
    a.tun.install_child(params(0x104, KEY_AB), params(0x103, KEY_BA), sends=False,
                        rx_ports=in_rx)
    b = Hypervisor("10.0.0.3", "10.0.0.2", 100, tun_type="vxlan",
                   tun_options={"psk": "swordfish"})
    for sa_out, sa_in in a.tun.child_sas():
        role = a.tun.esp.child_role(sa_in.spi)
        a.tun.release_child(sa_in.spi)
        b.tun.adopt_child(sa_out, sa_in, *role)
    assert b.tun.sa_out.spi == 0x101
    assert b.tun.esp.child_role(0x103) == (False, in_rx)
    assert b.tun.esp.child_role(0x102) == (True, out_rx)
