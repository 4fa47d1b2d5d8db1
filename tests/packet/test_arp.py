"""ARP frames, cross-checked with scapy."""

import pytest
from scapy.all import ARP, Ether, raw

from espswitch.packet.arp import (
    ARP_OP_REPLY,
    ARP_OP_REQUEST,
    ArpPacket,
    build_arp_reply,
    build_arp_request,
    parse_arp,
)
from espswitch.packet.errors import PacketError, TruncatedPacket
from espswitch.packet.ethernet import ETH_HLEN, mac_to_bytes, parse_ethernet
from espswitch.packet.ipv4 import ip_to_bytes

MAC_A = mac_to_bytes("02:00:00:00:00:0a")
MAC_B = mac_to_bytes("02:00:00:00:00:0b")
IP_A = ip_to_bytes("192.0.2.10")
IP_B = ip_to_bytes("192.0.2.11")


def test_request_is_a_broadcast_that_scapy_reads_as_who_has():
    frame = build_arp_request(MAC_A, IP_A, IP_B)
    pkt = Ether(frame)
    assert pkt.dst == "ff:ff:ff:ff:ff:ff" and pkt.src == "02:00:00:00:00:0a"
    assert pkt[ARP].op == 1 and pkt[ARP].hwsrc == "02:00:00:00:00:0a"
    assert pkt[ARP].psrc == "192.0.2.10" and pkt[ARP].pdst == "192.0.2.11"
    assert pkt[ARP].hwdst == "00:00:00:00:00:00"
    assert frame == raw(
        Ether(dst="ff:ff:ff:ff:ff:ff", src="02:00:00:00:00:0a")
        / ARP(
            op=1,
            hwsrc="02:00:00:00:00:0a",
            psrc="192.0.2.10",
            hwdst="00:00:00:00:00:00",
            pdst="192.0.2.11",
        )
    )


def test_reply_is_unicast_and_equals_scapys():
    frame = build_arp_reply(MAC_B, IP_B, MAC_A, IP_A)
    theirs = raw(
        Ether(dst="02:00:00:00:00:0a", src="02:00:00:00:00:0b")
        / ARP(
            op=2,
            hwsrc="02:00:00:00:00:0b",
            psrc="192.0.2.11",
            hwdst="02:00:00:00:00:0a",
            pdst="192.0.2.10",
        )
    )
    assert frame == theirs


def test_parses_what_scapy_builds_even_padded_to_60_bytes():
    frame = raw(
        Ether()
        / ARP(
            op="is-at",
            hwsrc="02:00:00:00:00:0b",
            psrc="192.0.2.11",
            hwdst="02:00:00:00:00:0a",
            pdst="192.0.2.10",
        )
    ).ljust(60, b"\0")
    eth = parse_ethernet(frame)
    assert parse_arp(memoryview(frame)[eth.payload_offset :]) == ArpPacket(
        op=ARP_OP_REPLY, sha=MAC_B, spa=IP_B, tha=MAC_A, tpa=IP_A
    )


def test_own_request_parses_back():
    frame = build_arp_request(MAC_A, IP_A, IP_B)
    pkt = parse_arp(frame[ETH_HLEN:])
    assert (pkt.op, pkt.sha, pkt.spa, pkt.tpa) == (ARP_OP_REQUEST, MAC_A, IP_A, IP_B)


def test_non_ethernet_ipv4_arp_is_rejected():
    with pytest.raises(PacketError):
        parse_arp(raw(ARP(hwtype=6)))
    with pytest.raises(PacketError):
        parse_arp(raw(ARP(ptype=0x86DD)))


def test_short_arp_is_truncated():
    with pytest.raises(TruncatedPacket):
        parse_arp(raw(ARP())[:27])


def test_bad_address_lengths_are_caller_errors():
    with pytest.raises(ValueError):
        build_arp_request(MAC_A[:5], IP_A, IP_B)
    with pytest.raises(ValueError):
        build_arp_reply(MAC_A, IP_A + b"\0", MAC_B, IP_B)
