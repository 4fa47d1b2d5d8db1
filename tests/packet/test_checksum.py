"""The Internet checksum against RFC 1071's example and scapy's implementation."""

import struct

from hypothesis import given
from hypothesis import strategies as st
from scapy.all import IP, UDP, raw
from scapy.utils import checksum as scapy_checksum

from espswitch.packet.checksum import (
    checksum_update16,
    internet_checksum,
    ipv4_pseudo_header_sum,
    ones_complement_sum,
)


def test_rfc1071_worked_example():
    # RFC 1071 section 3: these bytes sum to 0xddf2 with end-around carry.
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert ones_complement_sum(data) == 0xDDF2
    assert internet_checksum(data) == 0x220D


def test_all_zero_data_has_checksum_ffff():
    assert internet_checksum(bytes(20)) == 0xFFFF
    assert internet_checksum(b"") == 0xFFFF


def test_data_summing_to_negative_zero_has_checksum_zero():
    assert internet_checksum(b"\xff\xff") == 0
    assert internet_checksum(b"\x12\x34\xed\xcb") == 0


@given(st.binary(max_size=2000))
def test_matches_scapy_for_any_length(data):
    assert internet_checksum(data) == scapy_checksum(data)


@given(st.binary(max_size=300))
def test_accepts_bytearray_and_memoryview(data):
    expected = internet_checksum(data)
    assert internet_checksum(bytearray(data)) == expected
    assert internet_checksum(memoryview(data)) == expected


@given(st.binary(max_size=200).filter(lambda b: len(b) % 2 == 0), st.binary(max_size=200))
def test_initial_continues_a_sum(head, tail):
    assert internet_checksum(tail, ones_complement_sum(head)) == internet_checksum(head + tail)


@given(st.binary(min_size=2, max_size=64).filter(lambda b: len(b) % 2 == 0), st.data())
def test_incremental_update_equals_recomputation(data, draw):
    words = len(data) // 2
    index = draw.draw(st.integers(0, words - 1))
    new_word = draw.draw(st.integers(0, 0xFFFF))
    old_word = struct.unpack_from("!H", data, index * 2)[0]
    changed = bytearray(data)
    struct.pack_into("!H", changed, index * 2, new_word)
    updated = checksum_update16(internet_checksum(data), old_word, new_word)
    # 0 and 0xFFFF are the two encodings of the same ones' complement value.
    assert updated % 0xFFFF == internet_checksum(changed) % 0xFFFF


def test_incremental_ttl_decrement_matches_scapy():
    def packet(ttl):
        return raw(IP(src="192.0.2.1", dst="198.51.100.7", ttl=ttl) / UDP() / b"x")

    pkt = bytearray(packet(64))
    old = struct.unpack_from("!H", pkt, 8)[0]  # TTL and protocol share a word
    pkt[8] -= 1
    new = struct.unpack_from("!H", pkt, 8)[0]
    csum = checksum_update16(struct.unpack_from("!H", pkt, 10)[0], old, new)
    assert csum == IP(packet(63)).chksum


@given(st.binary(min_size=8, max_size=200))
def test_pseudo_header_sum_gives_scapy_udp_checksum(payload):
    pkt = IP(raw(IP(src="10.1.2.3", dst="10.9.8.7") / UDP(sport=1, dport=2) / payload))
    seg = bytearray(raw(pkt[UDP]))
    expected = pkt[UDP].chksum
    seg[6:8] = b"\0\0"
    s = ipv4_pseudo_header_sum(bytes([10, 1, 2, 3]), bytes([10, 9, 8, 7]), 17, len(seg))
    assert (internet_checksum(seg, s) or 0xFFFF) == expected
