"""IPv4 headers, the hot-path template and fragmentation, cross-checked with scapy."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.all import ICMP, IP, UDP, IPOption_LSRR, IPOption_NOP, IPOption_RR, raw
from scapy.all import defragment as scapy_defragment

from espswitch.packet.errors import PacketError, TruncatedPacket
from espswitch.packet.ipv4 import (
    IPV4_HLEN,
    IPV4_PROTO_ESP,
    IPV4_PROTO_UDP,
    IPV4_STRUCT,
    Ipv4Template,
    build_ipv4_header,
    fragment_ipv4,
    ip_to_bytes,
    ip_to_str,
    ipv4_header_checksum,
    parse_ipv4,
)

SRC = ip_to_bytes("192.0.2.1")
DST = ip_to_bytes("198.51.100.2")


def test_address_text_round_trip():
    assert ip_to_bytes("10.0.255.1") == bytes([10, 0, 255, 1])
    assert ip_to_str(bytes([10, 0, 255, 1])) == "10.0.255.1"


@pytest.mark.parametrize("text", ["", "1.2.3", "1.2.3.256", "a.b.c.d", "::1", "1.2.3.4/24"])
def test_bad_address_text_is_a_packet_error(text):
    with pytest.raises(PacketError):
        ip_to_bytes(text)


def test_ip_to_str_rejects_wrong_length():
    with pytest.raises(PacketError):
        ip_to_str(b"\x01\x02\x03")


def test_struct_constant_describes_the_20_byte_header():
    assert IPV4_STRUCT.size == IPV4_HLEN == 20


@given(
    payload_len=st.integers(0, 65515),
    ttl=st.integers(0, 255),
    tos=st.integers(0, 255),
    ident=st.integers(0, 0xFFFF),
    df=st.booleans(),
    proto=st.integers(0, 255),
)
def test_built_header_equals_scapys(payload_len, ttl, tos, ident, df, proto):
    ours = build_ipv4_header(
        src=SRC,
        dst=DST,
        proto=proto,
        payload_len=payload_len,
        ttl=ttl,
        tos=tos,
        ident=ident,
        df=df,
    )
    theirs = raw(
        IP(
            src="192.0.2.1",
            dst="198.51.100.2",
            proto=proto,
            ttl=ttl,
            tos=tos,
            id=ident,
            flags="DF" if df else 0,
            len=20 + payload_len,
        )
    )
    assert ours == theirs


def test_built_header_with_options_equals_scapys():
    opts = raw(IPOption_RR(routers=["0.0.0.0"] * 2)) + b"\x00"  # 11 bytes + EOL = 12
    ours = build_ipv4_header(src=SRC, dst=DST, proto=1, payload_len=8, options=opts)
    theirs = raw(
        IP(
            src="192.0.2.1",
            dst="198.51.100.2",
            proto=1,
            flags="DF",
            len=40,
            id=0,
            options=[IPOption_RR(routers=["0.0.0.0"] * 2)],
        )
    )
    assert ours == theirs


def test_parses_scapy_packet_with_options_and_skips_them():
    pkt = raw(
        IP(
            src="192.0.2.1",
            dst="198.51.100.2",
            ttl=7,
            tos=0xB8,
            id=0xBEEF,
            frag=3,
            flags="MF",
            options=[IPOption_NOP(), IPOption_RR(routers=["1.2.3.4"] * 3)],
        )
        / UDP(sport=1000, dport=2000)
        / b"data"
    )
    hdr = parse_ipv4(pkt)
    assert hdr.header_len == 20 + 16 and hdr.ihl == 9
    assert (hdr.ttl, hdr.tos, hdr.ident, hdr.proto) == (7, 0xB8, 0xBEEF, IPV4_PROTO_UDP)
    assert hdr.mf and not hdr.df and hdr.flags == 1
    assert hdr.frag_offset == 3 and hdr.frag_offset_bytes == 24 and hdr.is_fragment
    assert (hdr.src, hdr.dst, hdr.total_length) == (SRC, DST, len(pkt))
    assert hdr.checksum == IP(pkt).chksum
    assert pkt[hdr.header_len : hdr.header_len + 2] == struct.pack("!H", 1000)


def test_ethernet_padding_after_total_length_is_allowed():
    pkt = raw(IP(src="192.0.2.1", dst="198.51.100.2") / ICMP())
    assert parse_ipv4(pkt + bytes(18)).total_length == 28


def test_bad_checksum_is_rejected_unless_not_verified():
    pkt = bytearray(raw(IP(src="192.0.2.1", dst="198.51.100.2") / b"x"))
    pkt[10] ^= 0x01
    with pytest.raises(PacketError, match="checksum"):
        parse_ipv4(pkt)
    assert parse_ipv4(pkt, verify_checksum=False).total_length == 21


@pytest.mark.parametrize(
    "mutate,error",
    [
        (lambda p: p.__setitem__(0, 0x65), "version 6"),
        (lambda p: p.__setitem__(0, 0x44), "IHL 4"),
        (lambda p: p.__setitem__(slice(2, 4), struct.pack("!H", 19)), "shorter than the header"),
        (lambda p: p.__setitem__(slice(2, 4), struct.pack("!H", 200)), "only"),
        (lambda p: p.__setitem__(0, 0x4F), "IHL|header"),
    ],
)
def test_inconsistent_headers_are_rejected(mutate, error):
    pkt = bytearray(raw(IP(src="192.0.2.1", dst="198.51.100.2") / (b"x" * 30)))
    mutate(pkt)
    with pytest.raises(PacketError, match=error):
        parse_ipv4(pkt, verify_checksum=False)


def test_short_buffer_is_truncated_packet():
    pkt = raw(IP(options=[IPOption_NOP()] * 4) / b"x")
    for cut in (0, 19, 23):
        with pytest.raises(TruncatedPacket):
            parse_ipv4(pkt[:cut])


def test_header_checksum_function_ignores_stored_field():
    pkt = raw(IP(src="192.0.2.1", dst="198.51.100.2", options=[IPOption_NOP()] * 4) / b"x")
    expected = IP(pkt).chksum
    hdr = bytearray(pkt[:24])
    assert ipv4_header_checksum(hdr) == expected
    hdr[10:12] = b"\x12\x34"
    assert ipv4_header_checksum(hdr) == expected


# --- the template -----------------------------------------------------------------------


@given(
    payload_len=st.integers(0, 65515),
    ident=st.integers(0, 0xFFFF),
    ttl=st.integers(1, 255),
    tos=st.integers(0, 255),
    df=st.booleans(),
    offset=st.integers(0, 40),
)
def test_template_fill_equals_full_build(payload_len, ident, ttl, tos, df, offset):
    tpl = Ipv4Template(src=SRC, dst=DST, proto=IPV4_PROTO_ESP, ttl=ttl, tos=tos, df=df)
    buf = bytearray(b"\xaa" * (offset + 20 + 8))
    tpl.fill(buf, offset, payload_len, ident)
    expected = build_ipv4_header(
        src=SRC,
        dst=DST,
        proto=IPV4_PROTO_ESP,
        payload_len=payload_len,
        ttl=ttl,
        tos=tos,
        ident=ident,
        df=df,
    )
    assert buf[offset : offset + 20] == expected
    assert buf[:offset] == b"\xaa" * offset and buf[offset + 20 :] == b"\xaa" * 8
    assert tpl.checksum(payload_len, ident) == struct.unpack_from("!H", expected, 10)[0]


def test_template_output_is_accepted_by_scapy_and_our_parser():
    tpl = Ipv4Template(src=SRC, dst=DST, proto=IPV4_PROTO_UDP)
    payload = raw(UDP(sport=5, dport=4789) / (b"z" * 100))
    buf = bytearray(20 + len(payload))
    buf[20:] = payload
    tpl.fill(memoryview(buf), 0, len(payload), 0x4242)
    pkt = IP(bytes(buf))
    scapys = IP(
        raw(
            IP(src="192.0.2.1", dst="198.51.100.2", id=0x4242, flags="DF")
            / UDP(sport=5, dport=4789)
            / (b"z" * 100)
        )
    )
    assert pkt.chksum == scapys.chksum
    assert bytes(buf[:20]) == raw(scapys)[:20]
    assert parse_ipv4(buf).ident == 0x4242


def test_template_takes_ident_modulo_2_16_and_rejects_oversize():
    tpl = Ipv4Template(src=SRC, dst=DST, proto=17)
    a, b = bytearray(20), bytearray(20)
    tpl.fill(a, 0, 10, 0x1_0005)
    tpl.fill(b, 0, 10, 5)
    assert a == b
    with pytest.raises(ValueError):
        tpl.fill(a, 0, 65516, 0)


# --- fragmentation ----------------------------------------------------------------------


def _packet(payload_len, options=(), mf=False, frag=0, proto_payload=None):
    body = (
        proto_payload if proto_payload is not None else bytes(i & 0xFF for i in range(payload_len))
    )
    return raw(
        IP(
            src="192.0.2.1",
            dst="198.51.100.2",
            id=0x7777,
            ttl=33,
            tos=0x10,
            flags="MF" if mf else 0,
            frag=frag,
            proto=IPV4_PROTO_UDP,
            options=list(options),
        )
        / body
    )


def _check_fragments(original, frags, mtu):
    orig = parse_ipv4(original)
    offsets = []
    for i, frag in enumerate(frags):
        hdr = parse_ipv4(frag)  # also verifies every fragment's checksum
        assert len(frag) <= mtu and hdr.total_length == len(frag)
        assert (hdr.ident, hdr.ttl, hdr.tos, hdr.proto) == (
            orig.ident,
            orig.ttl,
            orig.tos,
            orig.proto,
        )
        data_len = len(frag) - hdr.header_len
        if i < len(frags) - 1:
            assert hdr.mf and data_len % 8 == 0
        offsets.append((hdr.frag_offset_bytes, data_len))
    # contiguous, starting where the original started
    pos = orig.frag_offset_bytes
    for off, length in offsets:
        assert off == pos
        pos += length
    assert pos == orig.frag_offset_bytes + orig.total_length - orig.header_len


@given(payload_len=st.integers(0, 4000), mtu=st.integers(68, 1500))
def test_fragments_reassemble_in_scapy(payload_len, mtu):
    original = _packet(payload_len)
    frags = fragment_ipv4(original, mtu)
    _check_fragments(original, frags, mtu)
    if len(frags) == 1:
        assert frags[0] == original
        return
    rebuilt = scapy_defragment([IP(f) for f in frags])
    assert len(rebuilt) == 1
    assert raw(rebuilt[0])[20:] == original[20:]
    assert not parse_ipv4(frags[-1]).mf


def test_last_fragment_keeps_mf_of_a_fragment_being_refragmented():
    original = _packet(1000, mf=True, frag=100)
    frags = fragment_ipv4(original, 300)
    _check_fragments(original, frags, 300)
    assert all(parse_ipv4(f).mf for f in frags)
    assert parse_ipv4(frags[0]).frag_offset == 100


def test_only_copied_options_are_repeated_in_later_fragments():
    # LSRR has the copy flag set (type 0x83); RR (type 7) and NOP do not.
    options = [
        IPOption_RR(routers=["0.0.0.0"]),
        IPOption_NOP(),
        IPOption_LSRR(routers=["10.0.0.1", "10.0.0.2"]),
    ]
    original = _packet(600, options=options)
    frags = fragment_ipv4(original, 200)
    _check_fragments(original, frags, 200)
    first = parse_ipv4(frags[0])
    assert frags[0][20 : first.header_len] == original[20 : parse_ipv4(original).header_len]
    for frag in frags[1:]:
        hdr = parse_ipv4(frag)
        opts = frag[20 : hdr.header_len]
        assert opts == raw(IPOption_LSRR(routers=["10.0.0.1", "10.0.0.2"])) + b"\x00"
        assert IP(frag).options[0].routers == ["10.0.0.1", "10.0.0.2"]
    rebuilt = scapy_defragment([IP(f) for f in frags])
    assert raw(rebuilt[0][UDP]) == raw(IP(original)[UDP])


def test_df_packet_too_big_is_refused_but_one_that_fits_passes():
    big = raw(IP(src="192.0.2.1", dst="198.51.100.2", flags="DF") / bytes(1000))
    with pytest.raises(PacketError, match="DF"):
        fragment_ipv4(big, 576)
    assert fragment_ipv4(big, 1020) == [big]


def test_mtu_too_small_for_header_plus_8_bytes_is_a_caller_error():
    with pytest.raises(ValueError):
        fragment_ipv4(_packet(100), 27)


def test_malformed_options_are_a_packet_error():
    hdr = bytearray(
        build_ipv4_header(
            src=SRC, dst=DST, proto=17, payload_len=200, df=False, options=b"\x83\x09\x04\x00"
        )
    )  # length runs past the end
    with pytest.raises(PacketError, match="option"):
        fragment_ipv4(bytes(hdr) + bytes(200), 100)
