"""ICMP for IPv4 (RFC 792): echo, and "fragmentation needed" for path MTU discovery (RFC 1191)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from espswitch.packet.checksum import internet_checksum, ones_complement_sum
from espswitch.packet.errors import PacketError, TruncatedPacket
from espswitch.packet.ipv4 import IPV4_PROTO_ICMP, build_ipv4_header, parse_ipv4

__all__ = [
    "ICMP_CODE_FRAG_NEEDED",
    "ICMP_CODE_HOST_UNREACH",
    "ICMP_CODE_NET_UNREACH",
    "ICMP_CODE_PORT_UNREACH",
    "ICMP_CODE_PROTO_UNREACH",
    "ICMP_CODE_TTL_EXCEEDED",
    "ICMP_DEST_UNREACH",
    "ICMP_ECHO_REPLY",
    "ICMP_ECHO_REQUEST",
    "ICMP_HLEN",
    "ICMP_STRUCT",
    "ICMP_TIME_EXCEEDED",
    "IcmpHeader",
    "build_echo",
    "build_frag_needed",
    "parse_icmp",
]

ICMP_ECHO_REPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_ECHO_REQUEST = 8
ICMP_TIME_EXCEEDED = 11

# Codes of ICMP_DEST_UNREACH.
ICMP_CODE_NET_UNREACH = 0
ICMP_CODE_HOST_UNREACH = 1
ICMP_CODE_PROTO_UNREACH = 2
ICMP_CODE_PORT_UNREACH = 3
ICMP_CODE_FRAG_NEEDED = 4
# Code of ICMP_TIME_EXCEEDED.
ICMP_CODE_TTL_EXCEEDED = 0

ICMP_HLEN = 8
#: type, code, checksum, then the 4 type-specific bytes.
ICMP_STRUCT = struct.Struct("!BBH4s")
_ECHO_STRUCT = struct.Struct("!BBHHH")
_FRAG_NEEDED_STRUCT = struct.Struct("!BBHHH")  # type, code, checksum, unused, next-hop MTU

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True, kw_only=True)
class IcmpHeader:
    """A parsed ICMP header; ``rest`` is the 4 type-specific bytes. The body starts at 8."""

    type: int
    code: int
    checksum: int
    rest: bytes

    def __post_init__(self) -> None:
        if len(self.rest) != 4:
            raise ValueError("ICMP rest-of-header must be 4 bytes")

    @property
    def ident(self) -> int:
        """Echo identifier (meaningful for echo request/reply)."""
        return int.from_bytes(self.rest[0:2], "big")

    @property
    def seq(self) -> int:
        """Echo sequence number (meaningful for echo request/reply)."""
        return int.from_bytes(self.rest[2:4], "big")

    @property
    def next_hop_mtu(self) -> int:
        """Next-hop MTU of a "fragmentation needed" message (RFC 1191)."""
        return int.from_bytes(self.rest[2:4], "big")


def parse_icmp(buf: Buffer, verify_checksum: bool = True) -> IcmpHeader:
    """Parse an ICMP message; ``buf`` is exactly the IP payload (the checksum covers all of it)."""
    if len(buf) < ICMP_HLEN:
        raise TruncatedPacket(f"ICMP message of {len(buf)} bytes, shorter than 8")
    typ, code, csum, rest = ICMP_STRUCT.unpack_from(buf, 0)
    if verify_checksum and ones_complement_sum(buf) != 0xFFFF:
        raise PacketError("bad ICMP checksum")
    return IcmpHeader(type=typ, code=code, checksum=csum, rest=rest)


def build_echo(type: int, ident: int, seq: int, payload: Buffer) -> bytes:
    """Return an ICMP echo request (type 8) or reply (type 0) message with its checksum."""
    if type not in (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY):
        raise ValueError(f"ICMP type {type} is not an echo request or reply")
    if not 0 <= ident <= 0xFFFF or not 0 <= seq <= 0xFFFF:
        raise ValueError("ICMP echo identifier and sequence must fit 16 bits")
    msg = bytearray(_ECHO_STRUCT.pack(type, 0, 0, ident, seq))
    msg += payload
    struct.pack_into("!H", msg, 2, internet_checksum(msg))
    return bytes(msg)


def build_frag_needed(original_ip_packet: Buffer, next_hop_mtu: int, src_ip: bytes) -> bytes:
    """Return a complete IPv4 packet carrying ICMP "fragmentation needed and DF set".

    It goes from ``src_ip`` to the sender of ``original_ip_packet``, and quotes that packet's
    IP header (with options) and the first 8 bytes of its payload (RFC 792). The next-hop
    MTU is in bytes 6-7 of the ICMP header (RFC 1191). TTL 64, DF clear, ident 0.
    """
    if not 68 <= next_hop_mtu <= 0xFFFF:
        raise ValueError(f"next-hop MTU {next_hop_mtu} out of range 68..65535")
    # The quoted header's checksum is not our concern: quote what was received.
    orig = parse_ipv4(original_ip_packet, verify_checksum=False)
    quote = bytes(original_ip_packet[: min(orig.header_len + 8, orig.total_length)])
    msg = bytearray(
        _FRAG_NEEDED_STRUCT.pack(ICMP_DEST_UNREACH, ICMP_CODE_FRAG_NEEDED, 0, 0, next_hop_mtu)
    )
    msg += quote
    struct.pack_into("!H", msg, 2, internet_checksum(msg))
    ip = build_ipv4_header(
        src=src_ip, dst=orig.src, proto=IPV4_PROTO_ICMP, payload_len=len(msg), df=False
    )
    return ip + msg
