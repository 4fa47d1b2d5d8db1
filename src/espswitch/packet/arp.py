"""ARP for IPv4 over Ethernet (RFC 826)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from espswitch.packet.errors import PacketError, TruncatedPacket
from espswitch.packet.ethernet import BROADCAST_MAC, ETH_STRUCT, ETHERTYPE_ARP, ETHERTYPE_IPV4

__all__ = [
    "ARP_HLEN",
    "ARP_OP_REPLY",
    "ARP_OP_REQUEST",
    "ARP_STRUCT",
    "ArpPacket",
    "build_arp",
    "build_arp_reply",
    "build_arp_request",
    "parse_arp",
]

ARP_OP_REQUEST = 1
ARP_OP_REPLY = 2
ARP_HLEN = 28  # the whole Ethernet/IPv4 ARP packet
#: hardware type, protocol type, hardware length, protocol length, operation, sha, spa, tha, tpa.
ARP_STRUCT = struct.Struct("!HHBBH6s4s6s4s")
_HTYPE_ETHERNET = 1
_ZERO_MAC = bytes(6)


@dataclass(frozen=True, slots=True, kw_only=True)
class ArpPacket:
    """An Ethernet/IPv4 ARP packet: operation, sender and target hardware/protocol addresses."""

    op: int
    sha: bytes
    spa: bytes
    tha: bytes
    tpa: bytes

    def __post_init__(self) -> None:
        if not 0 <= self.op <= 0xFFFF:
            raise ValueError(f"ARP operation {self.op} out of range")
        if len(self.sha) != 6 or len(self.tha) != 6:
            raise ValueError("ARP hardware addresses must be 6 bytes")
        if len(self.spa) != 4 or len(self.tpa) != 4:
            raise ValueError("ARP protocol addresses must be 4 bytes")


def parse_arp(buf: bytes | bytearray | memoryview) -> ArpPacket:
    """Parse an ARP packet (the Ethernet payload). Only Ethernet/IPv4 ARP is accepted;
    any operation code is returned as is."""
    if len(buf) < ARP_HLEN:
        raise TruncatedPacket(f"ARP packet of {len(buf)} bytes, shorter than 28")
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = ARP_STRUCT.unpack_from(buf, 0)
    if htype != _HTYPE_ETHERNET or ptype != ETHERTYPE_IPV4 or hlen != 6 or plen != 4:
        raise PacketError(
            f"ARP for hardware {htype}/protocol {ptype:#06x} ({hlen}/{plen}) is not Ethernet/IPv4"
        )
    return ArpPacket(op=op, sha=sha, spa=spa, tha=tha, tpa=tpa)


def build_arp(*, op: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes, eth_dst: bytes) -> bytes:
    """Return a complete, unpadded (42-byte) Ethernet frame carrying this ARP packet."""
    pkt = ArpPacket(op=op, sha=sha, spa=spa, tha=tha, tpa=tpa)  # validates lengths
    if len(eth_dst) != 6:
        raise ValueError("Ethernet destination must be 6 bytes")
    return ETH_STRUCT.pack(eth_dst, sha, ETHERTYPE_ARP) + ARP_STRUCT.pack(
        _HTYPE_ETHERNET, ETHERTYPE_IPV4, 6, 4, pkt.op, sha, spa, tha, tpa
    )


def build_arp_request(src_mac: bytes, src_ip: bytes, target_ip: bytes) -> bytes:
    """Return a broadcast Ethernet frame asking who has ``target_ip`` (target MAC zero)."""
    return build_arp(
        op=ARP_OP_REQUEST,
        sha=src_mac,
        spa=src_ip,
        tha=_ZERO_MAC,
        tpa=target_ip,
        eth_dst=BROADCAST_MAC,
    )


def build_arp_reply(src_mac: bytes, src_ip: bytes, dst_mac: bytes, dst_ip: bytes) -> bytes:
    """Return a unicast Ethernet frame to ``dst_mac`` saying ``src_ip`` is at ``src_mac``."""
    return build_arp(
        op=ARP_OP_REPLY, sha=src_mac, spa=src_ip, tha=dst_mac, tpa=dst_ip, eth_dst=dst_mac
    )
