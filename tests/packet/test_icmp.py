"""ICMP echo and "fragmentation needed", cross-checked with scapy."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.all import ICMP, IP, UDP, IPerror, IPOption_NOP, UDPerror, raw

from espswitch.packet.errors import PacketError, TruncatedPacket
from espswitch.packet.icmp import (
    ICMP_CODE_FRAG_NEEDED,
    ICMP_DEST_UNREACH,
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    build_echo,
    build_frag_needed,
    parse_icmp,
)
from espswitch.packet.ipv4 import IPV4_PROTO_ICMP, ip_to_bytes, parse_ipv4


@given(
    st.sampled_from([ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY]),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.binary(max_size=200),
)
def test_echo_equals_scapys_and_parses_back(typ, ident, seq, payload):
    msg = build_echo(typ, ident, seq, payload)
    assert msg == raw(ICMP(type=typ, id=ident, seq=seq) / payload)
    hdr = parse_icmp(msg)
    assert (hdr.type, hdr.code, hdr.ident, hdr.seq) == (typ, 0, ident, seq)


def test_echo_rejects_other_types():
    with pytest.raises(ValueError):
        build_echo(3, 1, 1, b"")


def test_parses_scapy_icmp_and_checks_checksum():
    msg = bytearray(raw(ICMP(type=11, code=0) / (b"q" * 28)))
    hdr = parse_icmp(msg)
    assert (hdr.type, hdr.code, hdr.checksum) == (11, 0, ICMP(bytes(msg)).chksum)
    msg[-1] ^= 1
    with pytest.raises(PacketError, match="checksum"):
        parse_icmp(msg)
    assert parse_icmp(msg, verify_checksum=False).type == 11
    with pytest.raises(TruncatedPacket):
        parse_icmp(msg[:7])


@pytest.mark.parametrize("options", [[], [IPOption_NOP()] * 4])
def test_frag_needed_is_dissected_by_scapy(options):
    original = raw(
        IP(src="10.0.0.5", dst="203.0.113.9", flags="DF", ttl=40, id=99, options=options)
        / UDP(sport=4321, dport=4789)
        / bytes(1400)
    )
    router = ip_to_bytes("192.0.2.254")
    packet = build_frag_needed(original, 1300, router)

    ip = parse_ipv4(packet)  # verifies the outer header checksum
    assert ip.proto == IPV4_PROTO_ICMP and ip.total_length == len(packet)
    icmp = parse_icmp(packet[ip.header_len :])  # verifies the ICMP checksum
    assert (icmp.type, icmp.code, icmp.next_hop_mtu) == (
        ICMP_DEST_UNREACH,
        ICMP_CODE_FRAG_NEEDED,
        1300,
    )
    assert icmp.rest[:2] == b"\0\0"

    pkt = IP(packet)
    assert pkt.src == "192.0.2.254" and pkt.dst == "10.0.0.5"
    assert pkt[ICMP].type == 3 and pkt[ICMP].code == 4
    assert pkt[ICMP].nexthopmtu == 1300
    # scapy >= 2.5 splits the unused half into reserved/length (RFC 4884); older: "unused"
    for unused in ("reserved", "length", "unused"):
        if unused in pkt[ICMP].fields and isinstance(pkt[ICMP].fields[unused], int):
            assert pkt[ICMP].fields[unused] == 0
    # Checksums agree with scapy's own computation.
    rebuilt = IP(packet)
    del rebuilt.chksum, rebuilt[ICMP].chksum
    assert raw(rebuilt) == packet
    # The quote: the original header (with options) and the first 8 payload bytes.
    hlen = parse_ipv4(original).header_len
    assert raw(pkt[ICMP].payload) == original[: hlen + 8]
    assert pkt[IPerror].src == "10.0.0.5" and pkt[UDPerror].dport == 4789


def test_frag_needed_of_short_packet_quotes_only_what_exists():
    original = raw(IP(src="10.0.0.5", dst="203.0.113.9") / b"abc")
    packet = build_frag_needed(original + bytes(20), 576, ip_to_bytes("192.0.2.254"))
    assert packet.endswith(original)  # not the Ethernet padding after total_length


def test_frag_needed_rejects_bad_mtu_and_bad_original():
    original = raw(IP() / UDP())
    with pytest.raises(ValueError):
        build_frag_needed(original, 67, ip_to_bytes("192.0.2.1"))
    with pytest.raises(PacketError):
        build_frag_needed(original[:10], 1400, ip_to_bytes("192.0.2.1"))
