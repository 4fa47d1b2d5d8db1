"""Geneve and GRE tunnels between in-memory hypervisors, byte for byte, and what each
encapsulation refuses (RFC 8926, RFC 2784/2890)."""

from __future__ import annotations

import struct

import pytest

from espswitch.datapath.encap import Geneve, Gre
from espswitch.datapath.tunnel import ip4
from espswitch.packet.checksum import internet_checksum

from .helpers import Hypervisor, csum, eth, ipv4, mac, udp

INNER = eth(mac(2), mac(1), ipv4("192.168.1.1", "192.168.1.2", 1, b"ping" * 10))


def pair(kind: str, **options: str) -> tuple[Hypervisor, Hypervisor]:
    vni = 100 if kind == "geneve" else None  # GRE: the key only where a test sets it
    a = Hypervisor("10.0.0.1", "10.0.0.2", vni, tun_type=kind, tun_options=options)
    b = Hypervisor("10.0.0.2", "10.0.0.1", vni, tun_type=kind, tun_options=options)
    for hv, peer in ((a, b), (b, a)):
        hv.dp.neigh.learn("br-phy", ip4(peer.ip), peer.dev("br-phy").mac, hv.dp.now)
    return a, b


def sent(hv: Hypervisor) -> bytes:
    out = [f for f in hv.dev("eth0").take() if f[12:14] == b"\x08\x00"]
    assert len(out) == 1
    return out[0]


def test_geneve_end_to_end_in_memory():
    a, b = pair("geneve")
    a.inject("vm", INNER)
    f = sent(a)
    ip = f[14:34]
    assert ip[9] == 17 and csum(ip) == 0
    sport, dport, ulen = struct.unpack("!HHH", f[34:40])
    assert dport == 6081 and sport >= 49152 and ulen == len(f) - 34
    # Version 0, no options, no O/C bits, Ethernet, VNI 100.
    assert f[42:50] == bytes([0, 0, 0x65, 0x58, 0, 0, 100, 0])
    assert f[50:] == INNER
    b.inject("eth0", f)
    assert b.dev("vm").take() == [INNER]
    assert a.tun.status()["tunnel_mtu"] == str(1500 - 20 - 16 - 14)


def geneve_frame(b: Hypervisor, *, flags: int = 0, opts: bytes = b"", vni: int = 100,
                 proto: int = 0x6558, version: int = 0, optlen: int | None = None) -> bytes:
    optlen = len(opts) // 4 if optlen is None else optlen
    hdr = bytes([version << 6 | optlen, flags]) + struct.pack("!HI", proto, vni << 8)
    pkt = ipv4("10.0.0.1", "10.0.0.2", 17, udp(50000, 6081, hdr + opts + INNER))
    return b.dev("br-phy").mac + mac(50) + b"\x08\x00" + pkt


def test_geneve_options_are_skipped_critical_ones_and_control_packets_dropped():
    _, b = pair("geneve")
    option = struct.pack("!HBB", 0x0102, 0x05, 1) + b"\xaa" * 4  # a non-critical TLV
    b.inject("eth0", geneve_frame(b, opts=option))
    assert b.dev("vm").take() == [INNER]
    critical = struct.pack("!HBB", 0x0102, 0x85, 1) + b"\xaa" * 4
    b.inject("eth0", geneve_frame(b, flags=0x40, opts=critical))  # C bit
    b.inject("eth0", geneve_frame(b, flags=0x80))  # O bit: OAM, never forwarded
    b.inject("eth0", geneve_frame(b, version=1))
    b.inject("eth0", geneve_frame(b, proto=0x0800))
    b.inject("eth0", geneve_frame(b, optlen=63))  # options longer than the packet
    assert b.dev("vm").take() == []
    drops = b.dp.drops
    assert drops.get("geneve_critical_options") == 1 and drops.get("geneve_control") == 1
    assert drops.get("geneve_malformed") == 3


@pytest.mark.parametrize(("options", "header"), [
    ({}, b"\x00\x00\x65\x58"),
    ({"key": "4294967295"}, b"\x20\x00\x65\x58\xff\xff\xff\xff"),
    ({"key": "77", "csum": "true"}, None),
])
def test_gre_end_to_end_in_memory(options, header):
    a, b = pair("gre", **options)
    a.inject("vm", INNER)
    f = sent(a)
    ip = f[14:34]
    assert ip[9] == 47 and csum(ip) == 0
    gre = f[34:]
    if header is not None:
        assert gre[: len(header)] == header
    else:  # checksum and key: C and K bits, the checksum over the GRE packet checks
        assert gre[:4] == b"\xa0\x00\x65\x58" and gre[8:12] == struct.pack("!I", 77)
        assert internet_checksum(gre) == 0
    assert gre.endswith(INNER)
    b.inject("eth0", f)
    assert b.dev("vm").take() == [INNER]
    overhead = {0: 4, 1: 8, 2: 12}[len(options)]
    assert a.tun.status()["tunnel_mtu"] == str(1500 - 20 - overhead - 14)


def test_gre_refuses_what_it_does_not_carry():
    _, b = pair("gre", key="9", csum="true")
    good = Gre("t", {"key": "9", "csum": "true"}).push(INNER)
    head = b.dev("br-phy").mac + mac(50) + b"\x08\x00"

    def frame(gre: bytes) -> bytes:
        return head + ipv4("10.0.0.1", "10.0.0.2", 47, gre)

    bad_sum = bytearray(good)
    bad_sum[-1] ^= 1
    with_seq = bytes([good[0] | 0x10]) + good[1:]
    not_eth = good[:2] + b"\x08\x00" + good[4:]
    other_key = Gre("t", {"key": "10", "csum": "true"}).push(INNER)
    b.inject("eth0", frame(good))
    assert b.dev("vm").take() == [INNER]
    for f in (bytes(bad_sum), with_seq, not_eth, other_key, good[:10]):
        b.inject("eth0", frame(f))
    assert b.dev("vm").take() == []
    d = b.dp.drops
    assert d.get("gre_bad_checksum") == 1 and d.get("gre_seq_unsupported") == 1
    assert d.get("gre_malformed") == 2 and d.get("gre_unknown_tunnel") == 1


def test_gre_with_the_routing_bit_is_dropped_not_delivered():
    """RFC 2784 §2.3: bits 1-5 set are discarded (unless RFC 1701 is implemented, which
    would put a checksum word and routing around the key). A receiver that ignored the
    routing bit took the key right after the base header and delivered the frame."""
    _, b = pair("gre", key="9")
    head = b.dev("br-phy").mac + mac(50) + b"\x08\x00"
    key = struct.pack("!I", 9)
    for gre in (struct.pack("!HH", 0x6000, 0x6558) + key + INNER,  # R, K; key next
                struct.pack("!HH", 0x4000, 0x6558) + INNER,  # R alone
                # As RFC 1701 lays it out: checksum and offset, key, a NULL SRE.
                struct.pack("!HH", 0x6000, 0x6558) + bytes(4) + key + bytes(4) + INNER):
        b.inject("eth0", head + ipv4("10.0.0.1", "10.0.0.2", 47, gre))
    assert b.dev("vm").take() == []
    assert b.dp.drops.get("gre_malformed") == 3
    assert Gre.pop(struct.pack("!HH", 0x6000, 0x6558) + key + INNER, 0,
                   8 + len(INNER)) == "malformed"
    # The same packet without the routing bit is the tunnel's.
    b.inject("eth0", head + ipv4("10.0.0.1", "10.0.0.2", 47,
                                 struct.pack("!HH", 0x2000, 0x6558) + key + INNER))
    assert b.dev("vm").take() == [INNER]


def test_geneve_and_gre_pop_never_raise_on_any_bytes():
    from hypothesis import given
    from hypothesis import strategies as st

    @given(st.binary(max_size=80), st.integers(0, 90))
    def check(data, end):
        for enc in (Geneve, Gre):
            r = enc.pop(data, 0, min(end, len(data)))
            assert type(r) is str or (type(r) is tuple and r[1] <= r[2] <= len(data))

    check()
