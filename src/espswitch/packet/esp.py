"""ESP framing (RFC 4303) and its UDP encapsulation for NAT traversal (RFC 3948).

Only the clear parts live here: the SPI/sequence header, the trailer inside the plaintext,
and telling ESP from IKE and keepalives on port 4500. Cryptography is ``espswitch.ipsec``'s.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from espswitch.packet.errors import PacketError, TruncatedPacket

__all__ = [
    "ESP_HLEN",
    "ESP_STRUCT",
    "ESP_TRAILER_LEN",
    "NAT_KEEPALIVE",
    "NAT_T_PORT",
    "NON_ESP_MARKER",
    "NON_ESP_MARKER_LEN",
    "EspHeader",
    "UdpEncapKind",
    "build_padding",
    "is_non_esp_marker",
    "pad_length_for",
    "parse_esp_header",
    "parse_esp_trailer",
    "split_udp_encap",
]

ESP_HLEN = 8
#: SPI, sequence number (low 32 bits when ESN is in use).
ESP_STRUCT = struct.Struct("!II")
ESP_TRAILER_LEN = 2  # pad length, next header
NAT_T_PORT = 4500

NON_ESP_MARKER = b"\x00\x00\x00\x00"  # where an ESP SPI would be: an IKE message follows
NON_ESP_MARKER_LEN = 4
NAT_KEEPALIVE = b"\xff"

# Padding bytes are 1, 2, 3, ... (RFC 4303 section 2.4); at most 255 of them.
_PAD = bytes(range(1, 256))

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True, kw_only=True)
class EspHeader:
    """The clear ESP header; the IV (if any) and ciphertext start at offset 8."""

    spi: int
    seq: int

    def __post_init__(self) -> None:
        if not 0 < self.spi <= 0xFFFFFFFF or not 0 <= self.seq <= 0xFFFFFFFF:
            raise ValueError("ESP SPI or sequence number out of range")


def parse_esp_header(buf: Buffer) -> EspHeader:
    """Parse the ESP header at the start of ``buf``. SPI 0 is reserved and rejected."""
    if len(buf) < ESP_HLEN:
        raise TruncatedPacket(f"ESP packet of {len(buf)} bytes, shorter than its header")
    spi, seq = ESP_STRUCT.unpack_from(buf, 0)
    if spi == 0:
        raise PacketError("ESP SPI 0 is reserved")
    return EspHeader(spi=spi, seq=seq)


def parse_esp_trailer(plaintext: Buffer) -> tuple[int, int, int]:
    """Check the trailer at the end of decrypted ESP payload (ICV already removed).

    Returns ``(pad_length, next_header, payload_end)``: the protected data is
    ``plaintext[:payload_end]``. The padding must be the monotonic 1, 2, 3, ... of
    RFC 4303 section 2.4 (a mismatch is a PacketError). Next header 59 marks a dummy packet
    (section 2.6); deciding what to do with it is the caller's job.
    """
    n = len(plaintext)
    if n < ESP_TRAILER_LEN:
        raise TruncatedPacket(f"ESP plaintext of {n} bytes has no room for its trailer")
    pad_length = plaintext[n - 2]
    next_header = plaintext[n - 1]
    payload_end = n - ESP_TRAILER_LEN - pad_length
    if payload_end < 0:
        raise PacketError(f"ESP pad length {pad_length} exceeds the {n}-byte plaintext")
    if plaintext[payload_end : n - ESP_TRAILER_LEN] != _PAD[:pad_length]:
        raise PacketError("ESP padding is not 1, 2, 3, ...")
    return pad_length, next_header, payload_end


def build_padding(n: int) -> bytes:
    """Return ``n`` (0..255) padding bytes 1, 2, ..., n."""
    if not 0 <= n <= 255:
        raise ValueError(f"ESP pad length {n} out of range 0..255")
    return _PAD[:n]


def pad_length_for(payload_len: int, block_size: int = 4) -> int:
    """Return the pad length that makes payload + padding + trailer a multiple of ``block_size``.

    ``block_size`` is the cipher's block size, at least 4: the trailer must end on a 4-byte
    boundary whatever the cipher (RFC 4303 section 2.4).
    """
    if block_size < 4 or block_size & (block_size - 1) or block_size > 256:
        raise ValueError(f"block size {block_size} must be a power of two in 4..256")
    return -(payload_len + ESP_TRAILER_LEN) % block_size


def is_non_esp_marker(udp_payload: Buffer) -> bool:
    """True if a port-4500 UDP payload starts with the non-ESP marker: an IKE message."""
    return len(udp_payload) >= NON_ESP_MARKER_LEN and udp_payload[:4] == NON_ESP_MARKER


class UdpEncapKind(enum.StrEnum):
    """What a UDP-encapsulated (port 4500) payload carries (RFC 3948 section 2)."""

    ESP = "esp"  # ESP header at offset 0
    IKE = "ike"  # IKE message at offset NON_ESP_MARKER_LEN
    KEEPALIVE = "keepalive"  # a NAT-keepalive: ignore it


def split_udp_encap(udp_payload: Buffer) -> UdpEncapKind:
    """Classify the payload of a UDP datagram on the NAT-T port.

    A single 0xFF byte is a NAT-keepalive, four zero bytes start an IKE message, and
    anything else must be long enough for an ESP header (its SPI is then non-zero).
    """
    n = len(udp_payload)
    if n == 1 and udp_payload[0] == 0xFF:
        return UdpEncapKind.KEEPALIVE
    if n >= NON_ESP_MARKER_LEN and udp_payload[:4] == NON_ESP_MARKER:
        return UdpEncapKind.IKE
    if n < ESP_HLEN:
        raise TruncatedPacket(
            f"UDP-encapsulated payload of {n} bytes is not ESP, IKE or a keepalive"
        )
    return UdpEncapKind.ESP
