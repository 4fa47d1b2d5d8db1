"""IPv6 fixed headers and UDP, cross-checked with scapy."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.all import IP, UDP, IPv6, raw

from espswitch.packet.errors import PacketError, TruncatedPacket
from espswitch.packet.ipv4 import ip_to_bytes
from espswitch.packet.ipv6 import (
    IPV6_HLEN,
    IPV6_STRUCT,
    build_ipv6_header,
    ip6_to_bytes,
    ip6_to_str,
    parse_ipv6,
)
from espswitch.packet.udp import (
    UDP_HLEN,
    UdpHeader,
    build_udp,
    parse_udp,
    udp_checksum_ipv4,
    verify_udp_checksum_ipv4,
)

SRC6 = "2001:db8::1"
DST6 = "2001:db8:0:1::2"
SRC = ip_to_bytes("192.0.2.1")
DST = ip_to_bytes("198.51.100.2")


def test_ipv6_struct_is_40_bytes():
    assert IPV6_STRUCT.size == IPV6_HLEN == 40


def test_ipv6_text_round_trip():
    assert ip6_to_str(ip6_to_bytes("2001:DB8:0:0::1")) == "2001:db8::1"
    with pytest.raises(PacketError):
        ip6_to_bytes("2001:db8::g")


@given(
    tc=st.integers(0, 255),
    fl=st.integers(0, 0xFFFFF),
    nh=st.integers(0, 255),
    hl=st.integers(0, 255),
    plen=st.integers(0, 0xFFFF),
)
def test_ipv6_header_equals_scapys(tc, fl, nh, hl, plen):
    ours = build_ipv6_header(
        src=ip6_to_bytes(SRC6),
        dst=ip6_to_bytes(DST6),
        next_header=nh,
        payload_len=plen,
        hop_limit=hl,
        traffic_class=tc,
        flow_label=fl,
    )
    assert ours == raw(IPv6(src=SRC6, dst=DST6, nh=nh, plen=plen, hlim=hl, tc=tc, fl=fl))


def test_parses_scapy_ipv6():
    pkt = raw(IPv6(src=SRC6, dst=DST6, tc=0xB8, fl=0xABCDE, hlim=3) / UDP() / b"hello")
    hdr = parse_ipv6(pkt)
    assert (hdr.traffic_class, hdr.flow_label, hdr.hop_limit) == (0xB8, 0xABCDE, 3)
    assert (hdr.next_header, hdr.payload_length) == (17, 8 + 5)
    assert (hdr.src, hdr.dst) == (ip6_to_bytes(SRC6), ip6_to_bytes(DST6))


def test_ipv6_version_and_truncation_are_checked():
    pkt = bytearray(raw(IPv6() / b"abcd"))
    with pytest.raises(TruncatedPacket):
        parse_ipv6(pkt[:-1])
    with pytest.raises(TruncatedPacket):
        parse_ipv6(pkt[:39])
    pkt[0] = 0x45
    with pytest.raises(PacketError, match="version 4"):
        parse_ipv6(pkt)


# --- UDP --------------------------------------------------------------------------------


@given(st.binary(max_size=1500), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_udp_with_checksum_equals_scapys(payload, sport, dport):
    ours = build_udp(sport, dport, payload, src_ip=SRC, dst_ip=DST)
    theirs = raw(IP(src="192.0.2.1", dst="198.51.100.2") / UDP(sport=sport, dport=dport) / payload)[
        20:
    ]
    assert ours == theirs
    assert verify_udp_checksum_ipv4(SRC, DST, ours)
    assert udp_checksum_ipv4(SRC, DST, ours) == struct.unpack_from("!H", ours, 6)[0]


def test_udp_without_addresses_has_zero_checksum_and_verifies():
    seg = build_udp(49999, 4789, b"\x08" + bytes(7))
    assert seg[6:8] == b"\0\0"
    assert verify_udp_checksum_ipv4(SRC, DST, seg)


def test_computed_zero_checksum_is_sent_as_ffff_like_scapy():
    # Append the checksum of (payload + 00 00) as the last word: the sum then becomes
    # negative zero, so the computed checksum is 0, which RFC 768 sends as 0xFFFF.
    base = build_udp(1, 2, b"abcd\0\0", src_ip=SRC, dst_ip=DST)
    payload = b"abcd" + base[6:8]
    ours = build_udp(1, 2, payload, src_ip=SRC, dst_ip=DST)
    assert ours[6:8] == b"\xff\xff"
    assert (
        ours == raw(IP(src="192.0.2.1", dst="198.51.100.2") / UDP(sport=1, dport=2) / payload)[20:]
    )
    assert verify_udp_checksum_ipv4(SRC, DST, ours)


def test_corrupted_udp_fails_verification():
    seg = bytearray(build_udp(1, 2, b"payload", src_ip=SRC, dst_ip=DST))
    seg[-1] ^= 0x40
    assert not verify_udp_checksum_ipv4(SRC, DST, seg)
    assert not verify_udp_checksum_ipv4(
        SRC, ip_to_bytes("198.51.100.3"), build_udp(1, 2, b"payload", src_ip=SRC, dst_ip=DST)
    )


def test_verification_covers_only_the_udp_length():
    seg = build_udp(1, 2, b"payload", src_ip=SRC, dst_ip=DST)
    assert verify_udp_checksum_ipv4(SRC, DST, seg + b"\0\0\0\x99")


def test_parses_scapy_udp_and_checks_length():
    seg = raw(IP() / UDP(sport=1234, dport=4500) / b"abc")[20:]
    assert parse_udp(seg) == UdpHeader(
        sport=1234, dport=4500, length=11, checksum=struct.unpack_from("!H", seg, 6)[0]
    )
    with pytest.raises(TruncatedPacket):
        parse_udp(seg[:10])
    with pytest.raises(TruncatedPacket):
        parse_udp(seg[: UDP_HLEN - 1])
    bad = bytearray(seg)
    bad[4:6] = b"\x00\x07"
    with pytest.raises(PacketError, match="< 8"):
        parse_udp(bad)


def test_build_udp_caller_errors():
    with pytest.raises(ValueError):
        build_udp(1, 2, b"", src_ip=SRC)
    with pytest.raises(ValueError):
        build_udp(70000, 2, b"")
    with pytest.raises(ValueError):
        build_udp(1, 2, bytes(65528))
