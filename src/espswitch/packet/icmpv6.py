"""ICMPv6 (RFC 4443) and neighbour discovery (RFC 4861): what the datapath sends itself.

Packet Too Big answers an inner IPv6 packet that a tunnel cannot carry (path MTU discovery
across the tunnel, RFC 8201); a Neighbor Solicitation asks for a tunnel next hop's MAC;
`parse_nd` reads the answer (or a solicitation, which names its sender too).
"""

from __future__ import annotations

import struct

from espswitch.packet.checksum import internet_checksum, ipv6_pseudo_header_sum
from espswitch.packet.errors import PacketError, TruncatedPacket
from espswitch.packet.ipv6 import IPV6_HLEN, IPV6_NEXT_ICMPV6, build_ipv6_header

__all__ = [
    "ICMPV6_NA",
    "ICMPV6_NS",
    "ICMPV6_PACKET_TOO_BIG",
    "IPV6_MIN_MTU",
    "build_neighbor_solicitation",
    "build_packet_too_big",
    "icmpv6_checksum",
    "parse_nd",
    "solicited_node",
]

ICMPV6_PACKET_TOO_BIG = 2
ICMPV6_NS = 135
ICMPV6_NA = 136
IPV6_MIN_MTU = 1280  # RFC 8200 §5: every link carries this much
ND_OPT_SOURCE_LL = 1
ND_OPT_TARGET_LL = 2

Buffer = bytes | bytearray | memoryview

_PTB = struct.Struct("!BBHI")  # type, code, checksum, MTU


def icmpv6_checksum(src: Buffer, dst: Buffer, msg: Buffer) -> int:
    """The checksum of ICMPv6 message `msg` (its checksum field zero) from `src` to `dst`."""
    return internet_checksum(msg, ipv6_pseudo_header_sum(src, dst, IPV6_NEXT_ICMPV6, len(msg)))


def _packet(src: bytes, dst: bytes, msg: bytearray, hop_limit: int) -> bytes:
    struct.pack_into("!H", msg, 2, icmpv6_checksum(src, dst, msg))
    return build_ipv6_header(src=src, dst=dst, next_header=IPV6_NEXT_ICMPV6,
                             payload_len=len(msg), hop_limit=hop_limit) + bytes(msg)


def build_packet_too_big(original: Buffer, mtu: int, src: bytes) -> bytes:
    """A whole IPv6 packet carrying ICMPv6 Packet Too Big (RFC 4443 §3.2) with `mtu`, from
    `src` to the sender of `original` (an IPv6 packet), quoting as much of it as keeps the
    answer within the minimum MTU of 1280 bytes."""
    if len(original) < IPV6_HLEN:
        raise TruncatedPacket("the packet to answer is shorter than an IPv6 header")
    if original[0] >> 4 != 6:
        raise PacketError("the packet to answer is not IPv6")
    if not 0 < mtu <= 0xFFFFFFFF:
        raise ValueError(f"MTU {mtu} out of range")
    dst = bytes(original[8:24])
    msg = bytearray(_PTB.pack(ICMPV6_PACKET_TOO_BIG, 0, 0, mtu))
    msg += original[: IPV6_MIN_MTU - IPV6_HLEN - len(msg)]
    return _packet(src, dst, msg, 64)


def solicited_node(addr: bytes) -> bytes:
    """The solicited-node multicast address of `addr` (RFC 4291 §2.7.1)."""
    return b"\xff\x02" + b"\0" * 9 + b"\x01\xff" + addr[13:16]


def build_neighbor_solicitation(src: bytes, target: bytes, src_mac: bytes) -> tuple[bytes, bytes]:
    """A Neighbor Solicitation for `target` from `src` (RFC 4861 §4.3) with the source
    link-layer address option: (destination MAC, IPv6 packet), multicast to the target's
    solicited-node group, hop limit 255 as receivers require."""
    group = solicited_node(target)
    msg = bytearray(struct.pack("!BBHI16sBB6s", ICMPV6_NS, 0, 0, 0, target,
                                ND_OPT_SOURCE_LL, 1, src_mac))
    return b"\x33\x33" + group[12:16], _packet(src, group, msg, 255)


def parse_nd(ip: Buffer) -> tuple[int, bytes, bytes | None] | None:
    """For an IPv6 packet (header at 0) carrying a sound Neighbor Solicitation or
    Advertisement: (type, the address it makes known, its MAC if it says), else None.

    An advertisement makes its target known with the target link-layer address; a
    solicitation makes its source known with the source link-layer address (RFC 4861 §7.2.3).
    Hop limit 255 (never forwarded), code 0 and the checksum are checked (§7.1.1, §7.1.2).
    """
    n = len(ip)
    if n < IPV6_HLEN + 24 or ip[6] != IPV6_NEXT_ICMPV6 or ip[7] != 255:
        return None
    plen = (ip[4] << 8) | ip[5]
    if plen < 24 or IPV6_HLEN + plen > n:
        return None
    msg = bytes(ip[IPV6_HLEN : IPV6_HLEN + plen])
    typ = msg[0]
    if typ not in (ICMPV6_NS, ICMPV6_NA) or msg[1] != 0:
        return None
    if internet_checksum(msg, ipv6_pseudo_header_sum(ip[8:24], ip[24:40], IPV6_NEXT_ICMPV6,
                                                     plen)) != 0:
        return None
    want = ND_OPT_TARGET_LL if typ == ICMPV6_NA else ND_OPT_SOURCE_LL
    lladdr = None
    off = 24
    while off + 2 <= plen:
        olen = msg[off + 1] * 8
        if olen == 0 or off + olen > plen:
            return None  # RFC 4861 §7.1: a zero-length option invalidates the message
        if msg[off] == want and olen >= 8:
            lladdr = msg[off + 2 : off + 8]
        off += olen
    known = msg[8:24] if typ == ICMPV6_NA else bytes(ip[8:24])
    return typ, known, lladdr
