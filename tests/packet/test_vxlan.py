"""VXLAN headers and the flow-hash source port, cross-checked with scapy."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.all import IP, TCP, UDP, Dot1Q, Ether, IPv6, raw
from scapy.layers.vxlan import VXLAN

from espswitch.packet.errors import PacketError, TruncatedPacket
from espswitch.packet.ethernet import ETHERTYPE_IPV4, build_ethernet, mac_to_bytes
from espswitch.packet.ipv4 import IPV4_PROTO_UDP, build_ipv4_header, ip_to_bytes
from espswitch.packet.udp import build_udp
from espswitch.packet.vxlan import (
    VXLAN_FLAG_I,
    VXLAN_HLEN,
    VXLAN_PORT,
    VxlanHeader,
    build_vxlan_header,
    parse_vxlan,
    vxlan_source_port,
)


@given(st.integers(0, 2**24 - 1))
def test_header_equals_scapys_and_parses_back(vni):
    hdr = build_vxlan_header(vni)
    assert len(hdr) == VXLAN_HLEN
    assert hdr == raw(VXLAN(vni=vni, flags="Instance"))
    assert parse_vxlan(hdr) == VxlanHeader(vni=vni, flags=VXLAN_FLAG_I)


@pytest.mark.parametrize("vni", [-1, 2**24])
def test_vni_out_of_range_is_a_caller_error(vni):
    with pytest.raises(ValueError):
        build_vxlan_header(vni)


def test_missing_i_flag_is_rejected_and_reserved_bits_ignored():
    with pytest.raises(PacketError, match="I flag"):
        parse_vxlan(raw(VXLAN(vni=5, flags=0)))
    noisy = bytes([0x08 | 0x80, 1, 2, 3, 0, 0, 7, 0xEE])
    assert parse_vxlan(noisy).vni == 7
    with pytest.raises(TruncatedPacket):
        parse_vxlan(b"\x08\0\0\0\0\0\0")


def test_full_encapsulation_dissected_by_scapy():
    inner = raw(
        Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        / IP(src="10.0.0.1", dst="10.0.0.2")
        / UDP(sport=7, dport=9)
        / b"inner"
    )
    src, dst = ip_to_bytes("192.0.2.1"), ip_to_bytes("192.0.2.2")
    sport = vxlan_source_port(inner)
    udp = build_udp(sport, VXLAN_PORT, build_vxlan_header(4242) + inner)
    ip = build_ipv4_header(src=src, dst=dst, proto=IPV4_PROTO_UDP, payload_len=len(udp))
    frame = (
        build_ethernet(
            mac_to_bytes("02:00:00:00:01:01"), mac_to_bytes("02:00:00:00:01:02"), ETHERTYPE_IPV4
        )
        + ip
        + udp
    )
    pkt = Ether(frame)
    assert pkt[UDP].sport == sport and pkt[UDP].dport == 4789
    assert pkt[VXLAN].vni == 4242
    assert raw(pkt[VXLAN].payload) == inner
    assert pkt[VXLAN][IP].src == "10.0.0.1"


def _inner(sport=1000, dport=2000, proto=UDP, payload=b"x", vlan=None, **ip):
    l2 = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    if vlan is not None:
        l2 = l2 / Dot1Q(vlan=vlan)
    return raw(
        l2
        / IP(src=ip.get("src", "10.0.0.1"), dst=ip.get("dst", "10.0.0.2"), frag=ip.get("frag", 0))
        / proto(sport=sport, dport=dport)
        / payload
    )


def test_source_port_is_in_range_and_deterministic():
    frame = _inner()
    port = vxlan_source_port(frame)
    assert 49152 <= port <= 65535
    assert vxlan_source_port(bytearray(frame)) == port
    assert vxlan_source_port(memoryview(frame)) == port


def test_source_port_ignores_payload_and_ttl_but_follows_the_flow():
    base = vxlan_source_port(_inner(payload=b"a" * 10))
    assert vxlan_source_port(_inner(payload=b"b" * 500)) == base
    ttl_changed = bytearray(_inner(payload=b"a" * 10))
    ttl_changed[14 + 8] = 1  # inner TTL, not part of the flow (checksum left stale on purpose)
    assert vxlan_source_port(ttl_changed) == base
    ports = {vxlan_source_port(_inner(sport=s)) for s in range(1000, 1200)}
    assert len(ports) > 150  # 200 flows over 16384 ports: collisions are rare
    ports_tcp = {vxlan_source_port(_inner(sport=s, proto=TCP)) for s in range(1000, 1050)}
    assert len(ports_tcp) > 40
    by_address = {vxlan_source_port(_inner(src=f"10.0.1.{i}")) for i in range(100)}
    assert len(by_address) > 80


def test_source_port_sees_through_one_vlan_tag_and_ipv6():
    tagged = {vxlan_source_port(_inner(sport=s, vlan=10)) for s in range(1000, 1100)}
    assert len(tagged) > 80
    v6 = {
        vxlan_source_port(raw(Ether() / IPv6(src=f"2001:db8::{i:x}") / UDP()))
        for i in range(1, 101)
    }
    assert len(v6) > 80


def test_non_first_fragments_hash_without_ports():
    # A later fragment has no L4 header: bytes there are data, and must not be hashed.
    a = vxlan_source_port(_inner(sport=1, frag=10))
    b = vxlan_source_port(_inner(sport=2, frag=10))
    assert a == b


@given(st.binary(max_size=80))
def test_source_port_never_raises_and_stays_in_range(frame):
    assert 49152 <= vxlan_source_port(frame) <= 65535
