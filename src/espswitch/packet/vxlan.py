"""VXLAN (RFC 7348): the 8-byte header and the flow-hash UDP source port."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from espswitch.packet.errors import PacketError, TruncatedPacket

__all__ = [
    "VXLAN_FLAG_I",
    "VXLAN_HLEN",
    "VXLAN_PORT",
    "VXLAN_SPORT_MAX",
    "VXLAN_SPORT_MIN",
    "VXLAN_STRUCT",
    "VxlanHeader",
    "build_vxlan_header",
    "parse_vxlan",
    "vxlan_source_port",
]

VXLAN_PORT = 4789
VXLAN_HLEN = 8
VXLAN_FLAG_I = 0x08  # "the VNI is valid"; must be set
#: flags byte, 3 reserved bytes, then VNI << 8 (the last byte is reserved).
VXLAN_STRUCT = struct.Struct("!B3xI")

# RFC 7348 section 5: the source port should come from the dynamic/private range.
VXLAN_SPORT_MIN = 49152
VXLAN_SPORT_MAX = 65535


@dataclass(frozen=True, slots=True, kw_only=True)
class VxlanHeader:
    """A parsed VXLAN header; the inner Ethernet frame starts at offset 8."""

    vni: int
    flags: int

    def __post_init__(self) -> None:
        if not 0 <= self.vni < 1 << 24:
            raise ValueError(f"VNI {self.vni} out of range")


def build_vxlan_header(vni: int) -> bytes:
    """Return the 8-byte VXLAN header for ``vni`` (0 <= vni < 2**24) with the I flag set."""
    if not 0 <= vni < 1 << 24:
        raise ValueError(f"VNI {vni} out of range 0..16777215")
    return VXLAN_STRUCT.pack(VXLAN_FLAG_I, vni << 8)


def parse_vxlan(buf: bytes | bytearray | memoryview) -> VxlanHeader:
    """Parse a VXLAN header (the UDP payload). The I flag must be set; reserved bits are
    ignored, as RFC 7348 asks of receivers."""
    if len(buf) < VXLAN_HLEN:
        raise TruncatedPacket(f"VXLAN header of {len(buf)} bytes, shorter than 8")
    flags, word = VXLAN_STRUCT.unpack_from(buf, 0)
    if not flags & VXLAN_FLAG_I:
        raise PacketError("VXLAN I flag not set")
    return VxlanHeader(vni=word >> 8, flags=flags)


def vxlan_source_port(inner_frame: bytes | bytearray | memoryview) -> int:
    """Return a UDP source port in 49152..65535 that is a hash of the inner flow.

    Hashed: the inner Ethernet addresses; for IPv4 also the addresses and protocol, and
    for TCP/UDP/SCTP/UDP-Lite first fragments the ports; for IPv6 the addresses and next
    header. One 802.1Q tag is stepped over. Never raises: what a short frame lacks is not
    hashed. Deterministic (CRC-32), so one flow always takes the same underlay path.
    """
    # A memoryview so the slices handed to crc32 are not copies.
    f = memoryview(inner_frame)
    n = len(f)
    h = zlib.crc32(f[0:12])
    off = 12
    if n >= off + 2 and f[off] == 0x81 and f[off + 1] == 0x00:
        off += 4
    if n < off + 2:
        return VXLAN_SPORT_MIN | (h & 0x3FFF)
    etype = (f[off] << 8) | f[off + 1]
    ip = off + 2
    if etype == 0x0800 and n >= ip + 20:
        proto = f[ip + 9]
        h = zlib.crc32(f[ip + 9 : ip + 10], h)
        h = zlib.crc32(f[ip + 12 : ip + 20], h)
        l4 = ip + (f[ip] & 0x0F) * 4
        not_later_fragment = (f[ip + 6] & 0x1F) == 0 and f[ip + 7] == 0
        if proto in (6, 17, 132, 136) and not_later_fragment and n >= l4 + 4:
            h = zlib.crc32(f[l4 : l4 + 4], h)
    elif etype == 0x86DD and n >= ip + 40:
        h = zlib.crc32(f[ip + 6 : ip + 7], h)
        h = zlib.crc32(f[ip + 8 : ip + 40], h)
    # Keep 14 bits of the hash: 49152 + (h mod 16384).
    return VXLAN_SPORT_MIN | (h & 0x3FFF)
