"""ESP framing and NAT-T classification (RFC 4303, RFC 3948), cross-checked with scapy."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.all import IP, UDP, raw
from scapy.layers.ipsec import ESP, SecurityAssociation

from espswitch.packet.errors import PacketError, TruncatedPacket
from espswitch.packet.esp import (
    ESP_HLEN,
    ESP_STRUCT,
    NAT_KEEPALIVE,
    NAT_T_PORT,
    NON_ESP_MARKER,
    EspHeader,
    UdpEncapKind,
    build_padding,
    is_non_esp_marker,
    pad_length_for,
    parse_esp_header,
    parse_esp_trailer,
    split_udp_encap,
)


def test_constants():
    assert ESP_STRUCT.size == ESP_HLEN == 8
    assert NAT_T_PORT == 4500
    assert bytes(4) == NON_ESP_MARKER


def test_parses_esp_built_by_scapy_null_cipher_including_its_trailer():
    sa = SecurityAssociation(ESP, spi=0xDEADBEEF, seq_num=41, crypt_algo="NULL", auth_algo="NULL")
    inner = IP(src="192.0.2.1", dst="192.0.2.2") / UDP(sport=5, dport=4789) / b"vxlan!"
    packet = raw(sa.encrypt(inner))
    esp = packet[20:]
    assert parse_esp_header(esp) == EspHeader(spi=0xDEADBEEF, seq=41)
    # With the NULL cipher and no ICV, the "plaintext" is everything after the header.
    pad_length, next_header, end = parse_esp_trailer(esp[ESP_HLEN:])
    assert next_header == 17  # transport mode: the UDP header follows
    assert esp[ESP_HLEN:][:end] == raw(inner[UDP])
    assert (end + pad_length + 2) % 4 == 0


@given(st.binary(max_size=100), st.integers(0, 255), st.integers(0, 255))
def test_trailer_round_trip(payload, pad_length, next_header):
    plaintext = payload + build_padding(pad_length) + bytes([pad_length, next_header])
    assert parse_esp_trailer(plaintext) == (pad_length, next_header, len(payload))
    assert parse_esp_trailer(memoryview(plaintext)) == (pad_length, next_header, len(payload))


def test_non_monotonic_padding_is_rejected():
    with pytest.raises(PacketError, match="padding"):
        parse_esp_trailer(b"data" + b"\x01\x02\x04" + b"\x03\x04")
    with pytest.raises(PacketError, match="padding"):
        parse_esp_trailer(b"data" + bytes(3) + b"\x03\x04")


def test_pad_length_beyond_plaintext_is_rejected():
    with pytest.raises(PacketError, match="exceeds"):
        parse_esp_trailer(b"\x01\x02\x03\x04\x04")  # claims 4 pad bytes, has 3
    with pytest.raises(TruncatedPacket):
        parse_esp_trailer(b"\x00")


def test_build_padding_is_monotonic_and_bounded():
    assert build_padding(0) == b""
    assert build_padding(5) == b"\x01\x02\x03\x04\x05"
    assert len(build_padding(255)) == 255
    with pytest.raises(ValueError):
        build_padding(256)


@given(st.integers(0, 9000), st.sampled_from([4, 8, 16]))
def test_pad_length_for_aligns_the_trailer(payload_len, block):
    pad = pad_length_for(payload_len, block)
    assert 0 <= pad < block and (payload_len + pad + 2) % block == 0


def test_spi_zero_is_reserved():
    with pytest.raises(PacketError, match="SPI 0"):
        parse_esp_header(bytes(8))
    with pytest.raises(TruncatedPacket):
        parse_esp_header(b"\0\0\0\1\0\0\0")


def test_udp_encapsulated_payload_kinds():
    assert split_udp_encap(NAT_KEEPALIVE) is UdpEncapKind.KEEPALIVE
    assert split_udp_encap(NON_ESP_MARKER + b"IKE header........") is UdpEncapKind.IKE
    assert split_udp_encap(b"\0\0\1\0" + bytes(20)) is UdpEncapKind.ESP
    assert UdpEncapKind.ESP == "esp" and UdpEncapKind.IKE == "ike"
    assert is_non_esp_marker(NON_ESP_MARKER + b"x")
    assert not is_non_esp_marker(b"\0\0\0")
    assert not is_non_esp_marker(b"\0\0\0\1")


@pytest.mark.parametrize("payload", [b"", b"\x00", b"\xfe", b"\xff\xff", b"\x01\x02\x03\x04\x05"])
def test_short_non_esp_payloads_are_malformed(payload):
    with pytest.raises(PacketError):
        split_udp_encap(payload)
