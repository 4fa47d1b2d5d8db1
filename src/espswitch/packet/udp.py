"""UDP headers (RFC 768) and their checksum over the IPv4 or IPv6 pseudo header."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from espswitch.packet.checksum import (
    ipv4_pseudo_header_sum,
    ipv6_pseudo_header_sum,
    ones_complement_sum,
)
from espswitch.packet.errors import PacketError, TruncatedPacket
from espswitch.packet.ipv4 import IPV4_PROTO_UDP

__all__ = [
    "UDP_HLEN",
    "UDP_OFF_CHECKSUM",
    "UDP_OFF_LENGTH",
    "UDP_STRUCT",
    "UdpHeader",
    "build_udp",
    "parse_udp",
    "udp_checksum_ipv4",
    "udp_checksum_ipv6",
    "verify_udp_checksum_ipv4",
    "verify_udp_checksum_ipv6",
]

UDP_HLEN = 8
#: source port, destination port, length, checksum.
UDP_STRUCT = struct.Struct("!HHHH")
UDP_OFF_LENGTH = 4
UDP_OFF_CHECKSUM = 6

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True, kw_only=True)
class UdpHeader:
    """A parsed UDP header; the payload is ``buf[8:length]``."""

    sport: int
    dport: int
    length: int
    checksum: int

    def __post_init__(self) -> None:
        if self.length < UDP_HLEN:
            raise ValueError(f"UDP length {self.length} < 8")


def parse_udp(buf: Buffer) -> UdpHeader:
    """Parse the UDP header at the start of ``buf`` (the IP payload).

    The length field must be at least 8 and fit in ``buf``; trailing bytes are allowed.
    """
    n = len(buf)
    if n < UDP_HLEN:
        raise TruncatedPacket(f"UDP segment of {n} bytes, shorter than its header")
    sport, dport, length, csum = UDP_STRUCT.unpack_from(buf, 0)
    if length < UDP_HLEN:
        raise PacketError(f"UDP length {length} < 8")
    if length > n:
        raise TruncatedPacket(f"UDP length {length} but only {n} bytes")
    return UdpHeader(sport=sport, dport=dport, length=length, checksum=csum)


def udp_checksum_ipv4(src: Buffer, dst: Buffer, udp_segment: Buffer) -> int:
    """Return the checksum for ``udp_segment`` (header and payload) between IPv4 addresses.

    The checksum field's current contents are ignored. A computed 0 is returned as 0xFFFF
    (RFC 768: zero on the wire means "no checksum").
    """
    return _checksum(udp_segment, lambda n: ipv4_pseudo_header_sum(src, dst, IPV4_PROTO_UDP, n))


def _checksum(udp_segment: Buffer, pseudo: Callable[[int], int]) -> int:
    """The UDP checksum of `udp_segment` given its pseudo header's sum (`pseudo(length)`),
    the stored checksum field taken out; 0 is sent as 0xFFFF."""
    n = len(udp_segment)
    if n < UDP_HLEN:
        raise TruncatedPacket(f"UDP segment of {n} bytes, shorter than its header")
    stored = (udp_segment[UDP_OFF_CHECKSUM] << 8) | udp_segment[UDP_OFF_CHECKSUM + 1]
    initial = pseudo(n) + (~stored & 0xFFFF)
    return (~ones_complement_sum(udp_segment, initial) & 0xFFFF) or 0xFFFF


def verify_udp_checksum_ipv4(src: Buffer, dst: Buffer, udp_segment: Buffer) -> bool:
    """Check the checksum of a received UDP segment; a zero checksum (none sent) is ok.

    The segment's length field decides how many bytes are covered; bytes after it are
    ignored. A segment too short for its length field is a PacketError.
    """
    hdr = parse_udp(udp_segment)
    if hdr.checksum == 0:
        return True
    seg = memoryview(udp_segment)[: hdr.length]
    initial = ipv4_pseudo_header_sum(src, dst, IPV4_PROTO_UDP, hdr.length)
    return ones_complement_sum(seg, initial) == 0xFFFF


def build_udp(
    sport: int,
    dport: int,
    payload: Buffer,
    src_ip: bytes | None = None,
    dst_ip: bytes | None = None,
) -> bytes:
    """Return a UDP segment. With both IPv4 addresses the checksum is computed, else it is 0.

    A zero UDP checksum is allowed over IPv4, and RFC 7348 recommends it for VXLAN.
    """
    length = UDP_HLEN + len(payload)
    if length > 0xFFFF:
        raise ValueError(f"UDP payload of {len(payload)} bytes is too long")
    if not 0 <= sport <= 0xFFFF or not 0 <= dport <= 0xFFFF:
        raise ValueError("UDP port out of range")
    if (src_ip is None) != (dst_ip is None):
        raise ValueError("give both src_ip and dst_ip, or neither")
    seg = bytearray(UDP_STRUCT.pack(sport, dport, length, 0))
    seg += payload
    if src_ip is not None and dst_ip is not None:
        struct.pack_into("!H", seg, UDP_OFF_CHECKSUM, udp_checksum_ipv4(src_ip, dst_ip, seg))
    return bytes(seg)


def udp_checksum_ipv6(src: Buffer, dst: Buffer, udp_segment: Buffer) -> int:
    """Return the checksum for ``udp_segment`` between IPv6 addresses (RFC 8200 §8.1).

    The checksum field's current contents are ignored; a computed 0 is returned as 0xFFFF.
    Over IPv6 the checksum is mandatory: zero on the wire means none was computed, which
    only tunnels may accept (RFC 6935, 6936).
    """
    return _checksum(udp_segment, lambda n: ipv6_pseudo_header_sum(src, dst, IPV4_PROTO_UDP, n))


def verify_udp_checksum_ipv6(src: Buffer, dst: Buffer, udp_segment: Buffer,
                             accept_zero: bool = False) -> bool:
    """Check the checksum of a UDP segment received over IPv6; a zero checksum is accepted
    only with `accept_zero` (a tunnel's choice, RFC 6936 §5)."""
    hdr = parse_udp(udp_segment)
    if hdr.checksum == 0:
        return accept_zero
    seg = memoryview(udp_segment)[: hdr.length]
    initial = ipv6_pseudo_header_sum(src, dst, IPV4_PROTO_UDP, hdr.length)
    return ones_complement_sum(seg, initial) == 0xFFFF
