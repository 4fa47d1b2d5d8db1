"""Every parser, fed random bytes or damaged valid packets, raises PacketError or nothing.

An IndexError, struct.error or plain ValueError escaping a parser would crash a datapath
loop that only expects counted drops.
"""

import contextlib
import functools
import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.all import ARP, ICMP, IP, TCP, UDP, Dot1Q, Ether, IPOption_LSRR, IPOption_NOP, IPv6, raw
from scapy.layers.vxlan import VXLAN

from espswitch.packet.arp import parse_arp
from espswitch.packet.errors import PacketError
from espswitch.packet.esp import (
    is_non_esp_marker,
    parse_esp_header,
    parse_esp_trailer,
    split_udp_encap,
)
from espswitch.packet.ethernet import (
    is_multicast,
    mac_to_bytes,
    mac_to_str,
    parse_ethernet,
    pop_vlan,
)
from espswitch.packet.icmp import build_frag_needed, parse_icmp
from espswitch.packet.ipv4 import (
    fragment_ipv4,
    ip_to_bytes,
    ip_to_str,
    ipv4_header_checksum,
    parse_ipv4,
)
from espswitch.packet.ipv6 import ip6_to_bytes, ip6_to_str, parse_ipv6
from espswitch.packet.pcap import (
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_RAW,
    PcapReader,
    PcapWriter,
    ip_packet_of,
)
from espswitch.packet.udp import parse_udp, udp_checksum_ipv4, verify_udp_checksum_ipv4
from espswitch.packet.vxlan import parse_vxlan, vxlan_source_port

SRC = bytes([192, 0, 2, 1])
DST = bytes([192, 0, 2, 2])


def _ether():
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def _ip(pkt):
    return raw(IP(src="10.0.0.1", dst="10.0.0.2") / pkt)


IP_PACKETS = [
    _ip(UDP(sport=1, dport=4789) / VXLAN(vni=7) / _ether() / IP() / TCP()),
    _ip(ICMP() / b"ping"),
    raw(
        IP(flags=0, options=[IPOption_NOP(), IPOption_LSRR(routers=["1.1.1.1"])])
        / UDP()
        / bytes(300)
    ),
    raw(IP(proto=50) / (b"\0\0\1\0" + bytes(40))),
]
FRAMES = [raw(_ether() / p) for p in map(IP, IP_PACKETS)] + [
    raw(_ether() / Dot1Q(vlan=3) / IP(IP_PACKETS[0])),
    raw(_ether() / ARP()),
    raw(_ether() / IPv6() / UDP() / b"x"),
]


def _pcap_file():
    buf = io.BytesIO()
    writer = PcapWriter(buf)
    for frame in FRAMES:
        writer.write(frame, ts_sec=5, ts_frac=6)
    return buf.getvalue()


VALID = {
    "ethernet": FRAMES,
    "ip": IP_PACKETS,
    "ipv6": [raw(IPv6() / UDP() / b"payload")],
    "udp": [raw(IP(p)[UDP]) for p in (IP_PACKETS[0], IP_PACKETS[2])],
    "vxlan": [raw(VXLAN(vni=99) / _ether())],
    "icmp": [raw(ICMP() / b"abc"), raw(ICMP(type=3, code=4, nexthopmtu=1400) / IP() / UDP())],
    "arp": [raw(ARP())],
    "esp": [b"\0\0\1\0\0\0\0\1" + b"data\x01\x02\x02\x04"],
    "pcap": [_pcap_file()],
}


def _ip_packet_of(data, linktype):
    return ip_packet_of(data, linktype)


# Each parser, under a name; each takes one buffer.
PARSERS = {
    "parse_ethernet": (parse_ethernet, "ethernet"),
    "pop_vlan": (pop_vlan, "ethernet"),
    "is_multicast": (is_multicast, "ethernet"),
    "mac_to_str": (mac_to_str, "ethernet"),
    "parse_arp": (parse_arp, "arp"),
    "parse_ipv4": (parse_ipv4, "ip"),
    "parse_ipv4_unverified": (lambda b: parse_ipv4(b, verify_checksum=False), "ip"),
    "ipv4_header_checksum": (ipv4_header_checksum, "ip"),
    "ip_to_str": (ip_to_str, "ip"),
    "fragment_ipv4": (lambda b: fragment_ipv4(b, 100), "ip"),
    "build_frag_needed": (lambda b: build_frag_needed(b, 1400, SRC), "ip"),
    "parse_ipv6": (parse_ipv6, "ipv6"),
    "ip6_to_str": (ip6_to_str, "ipv6"),
    "parse_udp": (parse_udp, "udp"),
    "verify_udp_checksum_ipv4": (lambda b: verify_udp_checksum_ipv4(SRC, DST, b), "udp"),
    "udp_checksum_ipv4": (lambda b: udp_checksum_ipv4(SRC, DST, b), "udp"),
    "parse_vxlan": (parse_vxlan, "vxlan"),
    "vxlan_source_port": (vxlan_source_port, "ethernet"),
    "parse_icmp": (parse_icmp, "icmp"),
    "parse_esp_header": (parse_esp_header, "esp"),
    "parse_esp_trailer": (parse_esp_trailer, "esp"),
    "split_udp_encap": (split_udp_encap, "esp"),
    "is_non_esp_marker": (is_non_esp_marker, "esp"),
    "pcap_reader": (lambda b: list(PcapReader(io.BytesIO(b))), "pcap"),
    **{
        f"ip_packet_of_{lt}": (functools.partial(_ip_packet_of, linktype=lt), "ethernet")
        for lt in (
            LINKTYPE_ETHERNET,
            LINKTYPE_RAW,
            LINKTYPE_IPV4,
            LINKTYPE_LINUX_SLL,
            LINKTYPE_LINUX_SLL2,
        )
    },
}

BUFFER_TYPES = st.sampled_from([bytes, bytearray, memoryview])


def _call(name, data):
    fn, _ = PARSERS[name]
    with contextlib.suppress(PacketError):
        fn(data)


@st.composite
def damaged(draw, kind):
    """A valid packet of ``kind``, truncated and/or with a few bytes overwritten."""
    data = bytearray(draw(st.sampled_from(VALID[kind])))
    for _ in range(draw(st.integers(0, 3))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[: cut if draw(st.booleans()) else len(data)])


# Per parser: 150 random buffers plus 150 damaged packets (about 9000 calls in all).
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("name", sorted(PARSERS))
@SETTINGS
@given(data=st.binary(max_size=120), as_=BUFFER_TYPES)
def test_random_bytes_raise_only_packet_errors(name, data, as_):
    _call(name, as_(data))


@pytest.mark.parametrize("name", sorted(PARSERS))
@SETTINGS
@given(draw=st.data(), as_=BUFFER_TYPES)
def test_damaged_valid_packets_raise_only_packet_errors(name, draw, as_):
    data = draw.draw(damaged(PARSERS[name][1]))
    _call(name, as_(data))


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=40))
def test_address_text_parsers_raise_only_packet_errors(text):
    for fn in (mac_to_bytes, ip_to_bytes, ip6_to_bytes):
        with contextlib.suppress(PacketError):
            fn(text)


def test_valid_corpus_parses():
    # The corpus the damage starts from is itself accepted: otherwise the test above would
    # only ever exercise rejection paths.
    for frame in FRAMES:
        parse_ethernet(frame)
    for packet in IP_PACKETS:
        parse_ipv4(packet)
    assert len(list(PcapReader(io.BytesIO(VALID["pcap"][0])))) == len(FRAMES)
    for seg in VALID["udp"]:
        parse_udp(seg)
    assert verify_udp_checksum_ipv4(bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), VALID["udp"][0])
    parse_vxlan(VALID["vxlan"][0])
    for msg in VALID["icmp"]:
        parse_icmp(msg)
    parse_arp(VALID["arp"][0])
    parse_esp_header(VALID["esp"][0])
    parse_esp_trailer(VALID["esp"][0][8:])
