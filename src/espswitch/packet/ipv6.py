"""The fixed 40-byte IPv6 header (RFC 8200). Extension headers are not walked."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from espswitch.packet.errors import PacketError, TruncatedPacket

__all__ = [
    "IPV6_HLEN",
    "IPV6_NEXT_ESP",
    "IPV6_NEXT_ICMPV6",
    "IPV6_NEXT_NONE",
    "IPV6_NEXT_TCP",
    "IPV6_NEXT_UDP",
    "IPV6_OFF_DST",
    "IPV6_OFF_SRC",
    "IPV6_STRUCT",
    "Ipv6Header",
    "build_ipv6_header",
    "ip6_to_bytes",
    "ip6_to_str",
    "parse_ipv6",
]

IPV6_HLEN = 40
#: version/traffic class/flow label word, payload length, next header, hop limit, src, dst.
IPV6_STRUCT = struct.Struct("!IHBB16s16s")
IPV6_OFF_SRC = 8
IPV6_OFF_DST = 24

IPV6_NEXT_TCP = 6
IPV6_NEXT_UDP = 17
IPV6_NEXT_ESP = 50
IPV6_NEXT_ICMPV6 = 58
IPV6_NEXT_NONE = 59

Buffer = bytes | bytearray | memoryview


def ip6_to_bytes(text: str) -> bytes:
    """Parse IPv6 text into 16 bytes."""
    try:
        return ipaddress.IPv6Address(text).packed
    except (ipaddress.AddressValueError, TypeError, ValueError):
        raise PacketError(f"bad IPv6 address {text!r}") from None


def ip6_to_str(addr: Buffer) -> str:
    """Format 16 address bytes in RFC 5952 text form."""
    if len(addr) != 16:
        raise PacketError(f"IPv6 address must be 16 bytes, got {len(addr)}")
    return str(ipaddress.IPv6Address(bytes(addr)))


@dataclass(frozen=True, slots=True, kw_only=True)
class Ipv6Header:
    """A parsed fixed IPv6 header; the payload is ``buf[40:40 + payload_length]``."""

    traffic_class: int
    flow_label: int
    payload_length: int
    next_header: int
    hop_limit: int
    src: bytes
    dst: bytes

    def __post_init__(self) -> None:
        if len(self.src) != 16 or len(self.dst) != 16:
            raise ValueError("IPv6 addresses must be 16 bytes")
        if not 0 <= self.flow_label <= 0xFFFFF or not 0 <= self.traffic_class <= 0xFF:
            raise ValueError("IPv6 traffic class or flow label out of range")


def parse_ipv6(buf: Buffer) -> Ipv6Header:
    """Parse the fixed IPv6 header at the start of ``buf``; the payload must fit in ``buf``.

    A payload length of 0 (a jumbogram, RFC 2675) is returned as is, not interpreted.
    """
    n = len(buf)
    if n < IPV6_HLEN:
        raise TruncatedPacket(f"IPv6 packet of {n} bytes, shorter than its header")
    word, plen, nxt, hops, src, dst = IPV6_STRUCT.unpack_from(buf, 0)
    if word >> 28 != 6:
        raise PacketError(f"IP version {word >> 28}, expected 6")
    if IPV6_HLEN + plen > n:
        raise TruncatedPacket(f"IPv6 payload length {plen} but only {n - IPV6_HLEN} bytes")
    return Ipv6Header(
        traffic_class=(word >> 20) & 0xFF,
        flow_label=word & 0xFFFFF,
        payload_length=plen,
        next_header=nxt,
        hop_limit=hops,
        src=src,
        dst=dst,
    )


def build_ipv6_header(
    *,
    src: bytes,
    dst: bytes,
    next_header: int,
    payload_len: int,
    hop_limit: int = 64,
    traffic_class: int = 0,
    flow_label: int = 0,
) -> bytes:
    """Return a 40-byte IPv6 header."""
    if len(src) != 16 or len(dst) != 16:
        raise ValueError("IPv6 addresses must be 16 bytes")
    if not 0 <= payload_len <= 0xFFFF:
        raise ValueError(f"IPv6 payload length {payload_len} out of range")
    if not 0 <= flow_label <= 0xFFFFF or not 0 <= traffic_class <= 0xFF:
        raise ValueError("IPv6 traffic class or flow label out of range")
    if not 0 <= next_header <= 0xFF or not 0 <= hop_limit <= 0xFF:
        raise ValueError("IPv6 next header or hop limit out of range")
    word = (6 << 28) | (traffic_class << 20) | flow_label
    return IPV6_STRUCT.pack(word, payload_len, next_header, hop_limit, src, dst)
