"""Tunnels over an IPv6 underlay, and IPv6 inside them, between in-memory hypervisors:
neighbour discovery, headers and checksums, every tunnel type, the tunnel MTU, Packet Too
Big, hostile packets, routes."""

from __future__ import annotations

import struct

import pytest

from espswitch.datapath import Datapath, PortError
from espswitch.datapath.devices import MemoryDevices
from espswitch.datapath.tunnel import PENDING, Route, RouteTable, ip_addr
from espswitch.ipsec import OutboundSA, SaParams, parse_transform
from espswitch.packet.checksum import internet_checksum, ipv6_pseudo_header_sum
from espswitch.packet.icmpv6 import parse_nd, solicited_node
from espswitch.packet.udp import verify_udp_checksum_ipv6

from .helpers import Hypervisor, eth, ipv4, ipv6, mac, udp, vxlan

A6, B6 = "fd00::1", "fd00::2"
KEY_AB = bytes(range(20))
KEY_BA = bytes(range(100, 120))
ETH_IPV6 = b"\x86\xdd"


def esp_options(mine: str, mode: str = "transport", **extra: str) -> dict[str, str]:
    """Manual keys for the tunnel of hypervisor `mine` ("a" or "b"): a's out is b's in."""
    out, inn = (KEY_AB, KEY_BA) if mine == "a" else (KEY_BA, KEY_AB)
    spi_out, spi_in = (0x1001, 0x2001) if mine == "a" else (0x2001, 0x1001)
    return {"spi_out": hex(spi_out), "spi_in": hex(spi_in), "esp_key_out": out.hex(),
            "esp_key_in": inn.hex(), "ipsec_mode": mode, **extra}


def na(hv: Hypervisor, peer: Hypervisor, target: str, to: bytes) -> bytes:
    """A solicited Neighbor Advertisement of `target` by `peer`, with its MAC, to `hv`."""
    peer_mac = peer.dev("br-phy").mac
    msg = bytearray(struct.pack("!BBHI16sBB6s", 136, 0, 0, 0x60000000, ip_addr(target),
                                2, 1, peer_mac))
    src, dst = ip_addr(target), to
    struct.pack_into("!H", msg, 2, internet_checksum(
        msg, ipv6_pseudo_header_sum(src, dst, 58, len(msg))))
    pkt = struct.pack("!IHBB16s16s", 6 << 28, len(msg), 58, 255, src, dst) + bytes(msg)
    return hv.dev("br-phy").mac + peer_mac + ETH_IPV6 + pkt


def answer_ns(hv: Hypervisor, peer: Hypervisor) -> bytes:
    """Check the Neighbor Solicitation `hv` sent for `peer` and answer it as `peer`'s kernel
    would; returns the solicitation."""
    out = hv.dev("eth0").take()
    sols = [f for f in out if f[12:14] == ETH_IPV6 and f[20] == 58 and f[54] == 135]
    assert sols, f"no neighbour solicitation among {len(out)} frames"
    ns = sols[0]
    target = ip_addr(peer.ip)
    group = solicited_node(target)
    assert ns[0:6] == b"\x33\x33" + group[12:16]
    assert ns[6:12] == hv.dev("br-phy").mac
    assert ns[21] == 255 and ns[38:54] == group and ns[22:38] == ip_addr(hv.ip)
    typ, known, lladdr = parse_nd(ns[14:])  # a sound message, checksum included
    assert typ == 135 and known == ip_addr(hv.ip) and lladdr == hv.dev("br-phy").mac
    assert ns[62:78] == target
    hv.inject("eth0", na(hv, peer, peer.ip, ip_addr(hv.ip)))
    return ns


def pair(tun_type: str = "vxlan", vni: int | None = 100, opts=None) -> tuple[Hypervisor,
                                                                          Hypervisor]:
    opts = opts or (lambda side: {})
    a = Hypervisor(A6, B6, vni=vni, tun_type=tun_type, tun_options=opts("a"))
    b = Hypervisor(B6, A6, vni=vni, tun_type=tun_type, tun_options=opts("b"))
    return a, b


def inner4(n: int = 1, size: int = 40) -> bytes:
    return eth(mac(2), mac(1), ipv4("192.168.1.1", "192.168.1.2", 1, bytes([n]) * size))


def inner6(size: int = 40, src: str = "fd10::1", dst: str = "fd10::2") -> bytes:
    return eth(mac(2), mac(1), ipv6(src, dst, 17, udp(1000, 2000, b"6" * size)), 0x86DD)


def test_vxlan_over_ipv6_end_to_end_with_neighbour_discovery():
    a, b = pair()
    f = inner4()
    a.inject("vm", f)
    state, _ = a.dp.neigh.lookup("br-phy", ip_addr(B6), a.dp.now)
    assert state == PENDING
    answer_ns(a, b)
    out = a.dev("eth0").take()
    assert len(out) == 1
    pkt = out[0]
    assert pkt[0:6] == b.dev("br-phy").mac and pkt[12:14] == ETH_IPV6
    ip = pkt[14:54]
    assert ip[0] >> 4 == 6 and ip[6] == 17 and ip[7] == 64
    assert ip[8:24] == ip_addr(A6) and ip[24:40] == ip_addr(B6)
    assert struct.unpack("!H", ip[4:6])[0] == len(pkt) - 54
    sport, dport, ulen, csum = struct.unpack("!HHHH", pkt[54:62])
    assert dport == 4789 and sport >= 49152 and ulen == len(pkt) - 54
    assert csum != 0 and verify_udp_checksum_ipv6(ip[8:24], ip[24:40], pkt[54:])
    assert pkt[62:70] == vxlan(100, b"") and pkt[70:] == f
    b.inject("eth0", pkt)
    assert b.dev("vm").take() == [f]
    assert b.dev("br-phy").take() == []  # tunnel traffic does not reach the kernel
    assert b.tun.stats["rx_packets"] == 1 and a.tun.stats["tx_packets"] == 1
    # The advertisement was learned.
    assert a.dp.neigh.lookup("br-phy", ip_addr(B6), a.dp.now)[0] == "found"
    assert "fd00::2" in a.dp.neigh.show(a.dp.now)


def test_a_solicitation_crossing_the_bridge_teaches_the_sender():
    a, b = pair()
    b.inject("vm", inner4())
    ns = b.dev("eth0").take()[0]  # b's datapath solicits a, with its MAC in the option
    assert a.dp.neigh.lookup("br-phy", ip_addr(B6), a.dp.now)[0] == "missing"
    a.inject("eth0", ns)
    assert a.dp.neigh.lookup("br-phy", ip_addr(B6), a.dp.now) == ("found",
                                                                  b.dev("br-phy").mac)
    # A solicitation with a bad checksum, or forwarded (hop limit below 255), is ignored.
    a.dp.neigh.flush()
    bad = bytearray(ns)
    bad[-1] ^= 1
    hop = bytearray(ns)
    hop[21] = 64
    a.inject("eth0", bytes(bad), bytes(hop))
    assert a.dp.neigh.lookup("br-phy", ip_addr(B6), a.dp.now)[0] == "missing"


ESP_TYPES = [
    ("vxlan", None),
    ("geneve", None),
    ("gre", {"key": "7"}),
    ("vxlanipsec", "transport"),
    ("vxlanipsec", "tunnel"),
    ("vxlanipsec", "encap"),
]


def options_for(tun_type: str, extra):
    if tun_type == "vxlanipsec":
        if extra == "encap":
            return lambda side: esp_options(side, ipsec_encapsulation="yes")
        return lambda side: esp_options(side, extra)
    return lambda side: dict(extra or {})


@pytest.mark.parametrize(("tun_type", "extra"), ESP_TYPES,
                         ids=[f"{t}-{e}" for t, e in ESP_TYPES])
def test_every_tunnel_type_carries_ipv4_and_ipv6_both_ways(tun_type, extra):
    a, b = pair(tun_type, vni=None if tun_type == "gre" else 100,
                opts=options_for(tun_type, extra))
    for hv, peer in ((a, b), (b, a)):
        hv.dp.neigh.learn("br-phy", ip_addr(peer.ip), peer.dev("br-phy").mac, hv.dp.now)
    frames = [inner4(1), inner6(100), inner4(2, 1000), inner6(1200)]
    for src, dst in ((a, b), (b, a)):
        src.inject("vm", *frames)
        out = src.dev("eth0").take()
        assert len(out) == len(frames)
        for pkt in out:
            assert pkt[12:14] == ETH_IPV6 and pkt[14] >> 4 == 6
            nh = pkt[20]
            if tun_type == "vxlanipsec":
                assert nh == (17 if extra == "encap" else 50)
                assert b"6" * 100 not in pkt  # encrypted
            else:
                assert nh == {"vxlan": 17, "geneve": 17, "gre": 47}[tun_type]
            if nh == 17:
                assert verify_udp_checksum_ipv6(pkt[22:38], pkt[38:54], pkt[54:])
        dst.inject("eth0", *out)
        assert dst.dev("vm").take() == frames
    if tun_type == "vxlanipsec":
        assert a.tun.status()["ipsec_state"] == "manual"
        assert a.tun.stats["esp_auth_failures"] == 0


def test_esp_tunnel_mode_inner_header_is_ipv6_with_a_udp_checksum():
    a, b = pair("vxlanipsec", opts=lambda side: esp_options(side, "tunnel"))
    a.dp.neigh.learn("br-phy", ip_addr(B6), mac(9), a.dp.now)
    f = inner4()
    a.inject("vm", f)
    pkt = a.dev("eth0").take()[0]
    peer_in = b.tun.sa_in
    nh, inner = peer_in.open(pkt[54:])
    assert nh == 41 and inner[0] >> 4 == 6 and inner[6] == 17
    assert inner[8:24] == ip_addr(A6) and inner[24:40] == ip_addr(B6)
    assert verify_udp_checksum_ipv6(inner[8:24], inner[24:40], inner[40:])
    assert inner[40 + 16:] == f


def test_tunnel_mtu_over_ipv6_is_twenty_bytes_less_than_over_ipv4():
    for tun_type, opts4, opts6 in (
            ("vxlan", {}, {}),
            ("geneve", {}, {}),
            ("gre", {}, {}),
            ("vxlanipsec", esp_options("a"), esp_options("a")),
            ("vxlanipsec", esp_options("a", "tunnel"), esp_options("a", "tunnel"))):
        v4 = Hypervisor("10.0.0.1", "10.0.0.2", tun_type=tun_type, tun_options=opts4)
        v6 = Hypervisor(A6, B6, tun_type=tun_type, tun_options=opts6)
        m4, m6 = int(v4.tun.status()["tunnel_mtu"]), int(v6.tun.status()["tunnel_mtu"])
        # Tunnel mode's inner header grows by 20 bytes too.
        mode = opts6.get("ipsec_mode", "transport")
        expected = 40 if mode == "tunnel" else 20
        # ESP pads to 4 bytes: the difference is within the padding's step.
        assert m4 - expected - 3 <= m6 <= m4 - expected + 3, (tun_type, mode, m4, m6)
    assert int(Hypervisor(A6, B6).tun.status()["tunnel_mtu"]) == 1500 - 40 - 8 - 8 - 14


@pytest.mark.parametrize("tun_type", ["vxlan", "vxlanipsec"])
def test_too_big_inner_ipv6_is_answered_with_packet_too_big(tun_type):
    opts = esp_options("a") if tun_type == "vxlanipsec" else {}
    a = Hypervisor(A6, B6, tun_type=tun_type, tun_options=opts)
    a.dp.neigh.learn("br-phy", ip_addr(B6), mac(9), a.dp.now)
    mtu = a.tun.inner_mtu
    ok = inner6(mtu - 48)
    big = inner6(mtu - 47)
    assert len(ok) - 14 == mtu and len(big) - 14 == mtu + 1
    a.inject("vm", ok, big)
    assert len(a.dev("eth0").take()) == 1  # only the one that fits; nothing fragmented
    back = a.dev("vm").take()
    assert len(back) == 1
    ptb = back[0]
    assert ptb[0:6] == mac(1) and ptb[6:12] == mac(2) and ptb[12:14] == ETH_IPV6
    ip = ptb[14:]
    assert ip[6] == 58 and ip[8:24] == ip_addr("fd10::2") and ip[24:40] == ip_addr("fd10::1")
    icmp = ip[40:]
    assert icmp[0] == 2 and icmp[1] == 0
    assert struct.unpack("!I", icmp[4:8])[0] == mtu
    assert internet_checksum(icmp, ipv6_pseudo_header_sum(ip[8:24], ip[24:40], 58,
                                                          len(icmp))) == 0
    assert icmp[8:48] == big[14:54]  # the invoking packet's header is quoted
    assert len(ip) <= 1280
    assert a.tun.stats["tx_too_big"] == 1


def test_too_big_from_a_multicast_or_unspecified_source_is_dropped_silently():
    a = Hypervisor(A6, B6)
    a.dp.neigh.learn("br-phy", ip_addr(B6), mac(9), a.dp.now)
    size = a.tun.inner_mtu
    a.inject("vm", inner6(size, src="::"), inner6(size, dst="ff02::1"))
    assert a.dev("vm").take() == [] and a.dev("eth0").take() == []
    assert a.tun.stats["tx_too_big"] == 2


def to_b(b: Hypervisor, pkt: bytes) -> bytes:
    return b.dev("br-phy").mac + mac(50) + ETH_IPV6 + pkt


def test_hostile_vxlan_over_ipv6_is_counted_and_never_delivered():
    _a, b = pair()
    good = inner4()
    seg = udp(50000, 4789, vxlan(100, good))
    cases = []
    # Payload length past the frame's end (truncated).
    cases.append(to_b(b, ipv6(A6, B6, 17, seg))[:-10])
    # A wrong checksum.
    p = bytearray(ipv6(A6, B6, 17, seg))
    p[46] ^= 0xFF
    cases.append(to_b(b, bytes(p)))
    # Unknown VNI, from an unknown peer, and a VXLAN header that is too short.
    cases.append(to_b(b, ipv6(A6, B6, 17, udp(50000, 4789, vxlan(7, good)))))
    cases.append(to_b(b, ipv6("fd00::9", B6, 17, seg)))
    cases.append(to_b(b, ipv6(A6, B6, 17, udp(50000, 4789, b"\x08\0\0"))))
    # An outer fragment of a VXLAN packet (first), of ESP and of GRE.
    frag = struct.pack("!BBHI", 17, 0, 1, 0x1234) + seg[:200]
    cases.append(to_b(b, ipv6(A6, B6, 44, frag)))
    cases.append(to_b(b, ipv6(A6, B6, 44, struct.pack("!BBHI", 50, 0, 1, 1) + b"e" * 64)))
    b.inject("eth0", *cases)
    assert b.dev("vm").take() == []
    drops = b.dp.drops
    assert drops.get("ipv6_malformed") == 1
    assert drops.get("vxlan_bad_checksum") == 1
    assert drops.get("vxlan_unknown_tunnel") == 2
    assert drops.get("vxlan_malformed") == 1
    # A fragment other than the last must be at least 256 bytes (ipfrag.py); the ESP one
    # goes to the kernel: ESP is not registered on a switch without protected tunnels.
    assert drops.get("ipfrag_too_small") == 1
    assert b.dev("br-phy").take() == [cases[-1]]
    assert b.dp.ports["eth0"].stats["rx_dropped"] == 5
    # A zero checksum is accepted (RFC 6935/6936), the good packet delivered.
    zero = bytearray(ipv6(A6, B6, 17, seg))
    zero[46:48] = b"\0\0"
    b.inject("eth0", to_b(b, bytes(zero)), to_b(b, ipv6(A6, B6, 17, seg)))
    assert b.dev("vm").take() == [good, good]


def fragments6(src: str, dst: str, nh: int, payload: bytes, ident: int = 0x1234,
               first: int = 512) -> list[bytes]:
    """`payload` (an upper-layer packet of next header `nh`) in two IPv6 fragments."""
    one, two = payload[:first], payload[first:]
    return [ipv6(src, dst, 44, struct.pack("!BBHI", nh, 0, 1, ident) + one),
            ipv6(src, dst, 44, struct.pack("!BBHI", nh, 0, first, ident) + two)]


def test_non_tunnel_ipv6_to_the_local_address_reaches_the_kernel():
    _a, b = pair()
    other = to_b(b, ipv6(A6, B6, 17, udp(5000, 53, b"q" * 20)))
    icmp = to_b(b, ipv6(A6, B6, 58, b"\x80\0\0\0" + b"p" * 20))
    # A fragmented UDP datagram to another port: reassembled to look at its port, then
    # handed to the kernel as the fragments that came.
    frags = [to_b(b, f) for f in fragments6(A6, B6, 17, udp(5000, 53, b"f" * 1000))]
    b.inject("eth0", other, icmp, *frags)
    assert sorted(b.dev("br-phy").take()) == sorted([other, icmp, *frags])
    assert not b.dp.tunnels.ipfrag.pending


@pytest.mark.parametrize("tun_type", ["vxlan", "gre", "vxlanipsec"])
def test_outer_ipv6_fragments_of_tunnel_packets_are_reassembled(tun_type):
    opts = (lambda side: esp_options(side)) if tun_type == "vxlanipsec" else None
    a, b = pair(tun_type, opts=opts)
    a.dp.neigh.learn("br-phy", ip_addr(B6), b.dev("br-phy").mac, a.dp.now)
    f = inner4(5, 1200)
    a.inject("vm", f)
    whole = a.dev("eth0").take()[0]
    ip = whole[14:]
    frags = fragments6(A6, B6, ip[6], ip[40:], first=600)
    # Out of order, with a duplicate: still one datagram.
    b.inject("eth0", *[to_b(b, x) for x in (frags[1], frags[1], frags[0])])
    assert b.dev("vm").take() == [f]
    assert not b.dp.tunnels.ipfrag.pending
    # Overlapping pieces drop the datagram, counted.
    bad = fragments6(A6, B6, ip[6], ip[40:], ident=9, first=600)
    overlap = ipv6(A6, B6, 44, struct.pack("!BBHI", ip[6], 0, 592, 9) + ip[40 + 592:])
    b.inject("eth0", to_b(b, bad[0]), to_b(b, overlap))
    assert b.dev("vm").take() == []
    assert b.dp.drops.get("ipfrag_overlaps") == 1


def test_ipv6_reassembler_limits_and_header():
    from espswitch.datapath.ipfrag import Reassembler

    drops: dict[str, int] = {}
    r = Reassembler(lambda cause, n: drops.__setitem__(cause, drops.get(cause, 0) + n))
    payload = bytes(range(256)) * 4
    f1, f2 = (b"E" * 14 + x for x in fragments6(A6, B6, 17, payload))
    assert r.add6(f1, 14, 0.0) is None and len(r.pending) == 1
    whole, frames = r.add6(f2, 14, 0.1)
    assert frames == [f1, f2] and whole[:14] == b"E" * 14
    assert whole[14:54] == ipv6(A6, B6, 17, payload)[:40]  # next header and length restored
    assert whole[54:] == payload
    # Too small, misaligned, past 65535 bytes, truncated: dropped before anything is held.
    r.add6(b"E" * 14 + ipv6(A6, B6, 44, struct.pack("!BBHI", 17, 0, 1, 5) + b"x" * 64), 14, 1)
    r.add6(b"E" * 14 + ipv6(A6, B6, 44, struct.pack("!BBHI", 17, 0, 1, 6) + b"x" * 300), 14, 1)
    r.add6(b"E" * 14 + ipv6(A6, B6, 44, struct.pack("!BBHI", 17, 0, 0xFFF8, 7) + b"x" * 16),
           14, 1)
    r.add6(b"E" * 14 + ipv6(A6, B6, 44, struct.pack("!BBHI", 17, 0, 1, 8) + b"x" * 512)[:-9],
           14, 1)
    assert drops == {"ipfrag_too_small": 1, "ipfrag_malformed": 3}
    assert not r.pending
    # An unfinished datagram expires.
    r.add6(f1, 14, 2.0)
    r.expire(40.0)
    assert drops["ipfrag_timeouts"] == 1 and not r.pending and r.bytes_held == 0


def test_hostile_esp_over_ipv6_is_counted_and_never_delivered():
    _a, b = pair("vxlanipsec", opts=esp_options)
    peer = OutboundSA(SaParams(spi=0x1001, transform=parse_transform("aes128gcm16"),
                               keymat=KEY_AB))
    good_l4 = udp(50000, 4789, vxlan(100, inner4()))
    forged = bytearray(peer.encrypt(good_l4, 17))
    forged[-1] ^= 1
    unknown = struct.pack("!II", 0x7777, 1) + b"x" * 40
    plaintext = ipv6(A6, B6, 17, good_l4)
    frames = [
        to_b(b, ipv6(A6, B6, 50, bytes(forged))),
        to_b(b, ipv6(A6, B6, 50, b"\0\0\x10\x01")),  # truncated ESP
        to_b(b, ipv6(A6, B6, 50, unknown)),
        to_b(b, plaintext),
        to_b(b, ipv6(A6, B6, 50, peer.encrypt(good_l4, 17)))[:-5],  # cut short
        to_b(b, ipv6(A6, B6, 44, struct.pack("!BBHI", 50, 0, 1, 9) + bytes(forged))),
        # Both fragments of a forged packet: reassembled, then refused by its ICV.
        *[to_b(b, x) for x in fragments6(A6, B6, 50, bytes(forged) + bytes(600), first=304)],
    ]
    b.inject("eth0", *frames)
    assert b.dev("vm").take() == []
    st = b.tun.stats
    assert st["esp_auth_failures"] == 2 and st["esp_plaintext_drops"] == 1
    assert b.dp.drops.get("esp_malformed") == 1
    assert b.dp.drops.get("esp_unknown_spi") == 1
    assert b.dp.drops.get("ipv6_malformed") == 1
    assert b.dp.drops.get("ipfrag_too_small") == 1
    # The authentic packet still goes through afterwards.
    b.inject("eth0", to_b(b, ipv6(A6, B6, 50, peer.encrypt(good_l4, 17))))
    assert b.dev("vm").take() == [inner4()]


def test_esp_selectors_over_ipv6_refuse_other_traffic():
    _a, b = pair("vxlanipsec", opts=esp_options)
    peer = OutboundSA(SaParams(spi=0x1001, transform=parse_transform("aes128gcm16"),
                               keymat=KEY_AB))
    wrong_port = udp(50000, 4790, vxlan(100, inner4()))
    b.inject("eth0", to_b(b, ipv6(A6, B6, 50, peer.encrypt(wrong_port, 17))))
    # From another source address: the selector wants the tunnel's remote_ip.
    b.inject("eth0", to_b(b, ipv6("fd00::9", B6, 50, peer.encrypt(
        udp(50000, 4789, vxlan(100, inner4())), 17))))
    assert b.dev("vm").take() == []
    assert b.tun.stats["esp_selector_drops"] == 2


@pytest.mark.parametrize(("options", "words"), [
    ({"remote_ip": "fd00::2", "local_ip": "10.0.0.1"}, "different families"),
    ({"remote_ip": "10.0.0.2", "local_ip": "fd00::1"}, "different families"),
    ({"remote_ip": "fe80::2"}, "link-local"),
    ({"remote_ip": "ff02::2"}, "multicast"),
    ({"remote_ip": "::"}, "unspecified"),
    ({"remote_ip": "::1"}, "loopback"),
    ({"remote_ip": "::ffff:10.0.0.2"}, "IPv4-mapped"),
])
def test_bad_ipv6_config_is_one_clear_port_error(options, words):
    dp = Datapath(MemoryDevices())
    dp.add_bridge("br0")
    with pytest.raises(PortError, match=words) as e:
        dp.add_port("br0", "x0", "vxlan", options)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("tun_type", ["vxlanipsec", "vxlan", "geneve", "gre"])
def test_ike_keyed_tunnel_over_ipv6_waits_for_ike_and_sends_nothing_in_clear(tun_type):
    """IKEv2 over an IPv6 underlay (once refused): the port is made, connecting, until the
    IKE layer installs a CHILD_SA (tests/datapath/test_ike_ipv6.py does that)."""
    a = Hypervisor(A6, B6, vni=None if tun_type == "gre" else 100, tun_type=tun_type,
                   tun_options={"psk": "secret"})
    status = a.tun.status()
    assert status["ipsec_state"] == "connecting" and status["ipsec_keying"] == "ikev2"
    assert "secret" not in str(status)
    a.inject("vm", inner4())
    assert [f for f in a.dev("eth0").take() if f[20] != 58] == []
    assert a.tun.stats["tx_dropped"] == 1


def test_ipv6_route_table_and_kernel_style_show():
    rt = RouteTable()
    net = int.from_bytes(ip_addr("fd00::"), "big")
    rt.set_system(
        [Route(prefix=net, plen=64, dev="br-phy", v6=True),
         Route(prefix=int.from_bytes(ip_addr("10.0.0.0"), "big"), plen=24, dev="br-phy")],
        {"br-phy": [ip_addr("fe80::1"), ip_addr("fd00::1"), ip_addr("10.0.0.1")]})
    assert rt.lookup(ip_addr("fd00::2")).dev == "br-phy"
    assert rt.lookup(ip_addr("fd01::2")) is None  # no IPv6 default; IPv4 routes don't apply
    assert rt.source_for("br-phy", True) == ip_addr("fd00::1")  # not the link-local one
    assert rt.source_for("br-phy") == ip_addr("10.0.0.1")
    r = rt.add("2001:db8::/32", "br-phy", "fd00::fe")
    assert r.v6 and r.src == ip_addr("fd00::1") and r.gw == ip_addr("fd00::fe")
    rt.add("::/0", "br-phy")
    assert rt.lookup(ip_addr("2001:db8::5")).gw == ip_addr("fd00::fe")
    assert rt.lookup(ip_addr("fd01::2")).plen == 0
    assert rt.lookup(ip_addr("192.0.2.1")) is None  # the IPv6 default is no IPv4 route
    text = rt.show()
    assert "Cached: 10.0.0.0/24 dev br-phy" in text
    assert "Cached: fd00::/64 dev br-phy" in text
    assert "User: 2001:db8::/32 dev br-phy GW fd00::fe SRC fd00::1" in text
    assert "User: ::/0 dev br-phy SRC fd00::1" in text
    with pytest.raises(ValueError, match="family"):
        rt.add("2001:db8::/32", "br-phy", "10.0.0.254")
    assert rt.delete("2001:db8::/32") and not rt.delete("2001:db8::/32")


def test_ipv6_tunnel_follows_a_user_route_through_a_gateway():
    a = Hypervisor(A6, "2001:db8::5")
    assert "no route" in a.tun.status()["tunnel_problem"]
    a.dp.routes.add("2001:db8::/32", "br-phy", "fd00::fe")
    a.dp.run(a.dp.now)
    a.inject("vm", inner4())
    ns = a.dev("eth0").take()[0]
    assert ns[62:78] == ip_addr("fd00::fe")  # the gateway is solicited, not the peer
    assert "tunnel_problem" not in a.tun.status()


def test_neighbour_retries_ask_in_the_next_hops_family_beside_an_ipv4_tunnel():
    a = Hypervisor("10.0.0.1", "10.0.0.2")
    dp = a.dp
    dp.routes.set_system(
        [Route(prefix=int.from_bytes(ip_addr("10.0.0.0"), "big"), plen=24, dev="br-phy"),
         Route(prefix=int.from_bytes(ip_addr("fd00::"), "big"), plen=64, dev="br-phy",
               v6=True)],
        {"br-phy": [ip_addr("10.0.0.1"), ip_addr(A6)]})
    dp.add_port("br-int", "vx6", "vxlan", {"remote_ip": B6, "key": "200"})
    dp.run(dp.now)
    a.inject("vm", inner4(), inner4(3))  # flooded to both tunnels: ARP and NS
    first = a.dev("eth0").take()
    assert sorted(f[12:14] for f in first) == [b"\x08\x06", ETH_IPV6]
    dp.run(dp.now + 1.1)
    retries = a.dev("eth0").take()
    assert sorted(f[12:14] for f in retries) == [b"\x08\x06", ETH_IPV6]
    for f in retries:
        if f[12:14] == ETH_IPV6:
            assert f[22:38] == ip_addr(A6) and parse_nd(f[14:])[0] == 135
        else:
            assert f[28:32] == ip_addr("10.0.0.1")
