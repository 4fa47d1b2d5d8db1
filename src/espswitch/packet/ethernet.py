"""Ethernet II frames with at most one 802.1Q tag.

Frames here carry no FCS (as TAP devices and AF_PACKET sockets deliver them).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from espswitch.packet.errors import PacketError, TruncatedPacket

__all__ = [
    "BROADCAST_MAC",
    "ETHERTYPE_ARP",
    "ETHERTYPE_IPV4",
    "ETHERTYPE_IPV6",
    "ETHERTYPE_QINQ",
    "ETHERTYPE_VLAN",
    "ETH_ALEN",
    "ETH_HLEN",
    "ETH_STRUCT",
    "ETH_TYPE_OFFSET",
    "VLAN_HLEN",
    "VLAN_STRUCT",
    "VLAN_TCI_STRUCT",
    "EthernetHeader",
    "build_ethernet",
    "is_multicast",
    "mac_to_bytes",
    "mac_to_str",
    "parse_ethernet",
    "pop_vlan",
    "push_vlan",
]

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
ETHERTYPE_VLAN = 0x8100  # 802.1Q C-tag
ETHERTYPE_QINQ = 0x88A8  # 802.1ad S-tag
ETHERTYPE_IPV6 = 0x86DD

ETH_ALEN = 6
ETH_HLEN = 14
ETH_TYPE_OFFSET = 12  # the ethertype (or the TPID of a tag) follows the two addresses
VLAN_HLEN = 4

#: dst, src, ethertype: the untagged header.
ETH_STRUCT = struct.Struct("!6s6sH")
#: TPID and TCI of a tag, at offset 12; the inner ethertype follows at 16.
VLAN_STRUCT = struct.Struct("!HHH")
#: TPID and TCI only.
VLAN_TCI_STRUCT = struct.Struct("!HH")

BROADCAST_MAC = b"\xff" * 6

_HEX = frozenset("0123456789abcdefABCDEF")


def mac_to_bytes(text: str) -> bytes:
    """Parse ``aa:bb:cc:dd:ee:ff`` (``-`` separators and one-digit groups accepted)."""
    if not isinstance(text, str):
        raise PacketError(f"MAC address must be text, not {type(text).__name__}")
    sep = "-" if "-" in text and ":" not in text else ":"
    groups = text.split(sep)
    if len(groups) != 6 or not all(0 < len(g) <= 2 and set(g) <= _HEX for g in groups):
        raise PacketError(f"bad MAC address {text!r}")
    return bytes(int(g, 16) for g in groups)


def mac_to_str(mac: bytes | bytearray | memoryview) -> str:
    """Format a 6-byte MAC address as lowercase ``aa:bb:cc:dd:ee:ff``."""
    if len(mac) != ETH_ALEN:
        raise PacketError(f"MAC address must be 6 bytes, got {len(mac)}")
    return bytes(mac).hex(":")


def is_multicast(mac: bytes | bytearray | memoryview) -> bool:
    """True for group addresses (multicast and broadcast): the I/G bit of the first octet."""
    try:
        return bool(mac[0] & 1)
    except IndexError:
        raise PacketError("empty MAC address") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class EthernetHeader:
    """An Ethernet header; ``payload_offset`` is where the ``ethertype`` payload starts."""

    dst: bytes
    src: bytes
    ethertype: int
    vlan: int | None = None  # VID of the 802.1Q tag, None when untagged
    pcp: int = 0
    payload_offset: int = ETH_HLEN

    def __post_init__(self) -> None:
        if len(self.dst) != ETH_ALEN or len(self.src) != ETH_ALEN:
            raise ValueError("MAC addresses must be 6 bytes")
        if not 0 <= self.ethertype <= 0xFFFF:
            raise ValueError(f"ethertype {self.ethertype} out of range")
        if self.vlan is not None and not 0 <= self.vlan <= 0xFFF:
            raise ValueError(f"VLAN ID {self.vlan} out of range")
        if not 0 <= self.pcp <= 7:
            raise ValueError(f"PCP {self.pcp} out of range")


def parse_ethernet(buf: bytes | bytearray | memoryview) -> EthernetHeader:
    """Parse the Ethernet header of ``buf``, stepping over one 802.1Q (0x8100) tag.

    An 802.1ad (0x88A8) outer tag is not stepped over: it is reported as the ethertype.
    """
    n = len(buf)
    if n < ETH_HLEN:
        raise TruncatedPacket(f"Ethernet frame of {n} bytes, shorter than its header")
    dst, src, ethertype = ETH_STRUCT.unpack_from(buf, 0)
    if ethertype != ETHERTYPE_VLAN:
        return EthernetHeader(dst=dst, src=src, ethertype=ethertype)
    if n < ETH_HLEN + VLAN_HLEN:
        raise TruncatedPacket(f"802.1Q frame of {n} bytes, shorter than its header")
    _tpid, tci, ethertype = VLAN_STRUCT.unpack_from(buf, ETH_TYPE_OFFSET)
    return EthernetHeader(
        dst=dst,
        src=src,
        ethertype=ethertype,
        vlan=tci & 0xFFF,
        pcp=tci >> 13,
        payload_offset=ETH_HLEN + VLAN_HLEN,
    )


def _check_mac(name: str, mac: bytes) -> None:
    if len(mac) != ETH_ALEN:
        raise ValueError(f"{name} MAC must be 6 bytes, got {len(mac)}")


def _tci(vid: int, pcp: int) -> int:
    if not 0 <= vid <= 0xFFF:
        raise ValueError(f"VLAN ID {vid} out of range 0..4095")
    if not 0 <= pcp <= 7:
        raise ValueError(f"PCP {pcp} out of range 0..7")
    return (pcp << 13) | vid


def build_ethernet(
    dst: bytes, src: bytes, ethertype: int, vlan: int | None = None, pcp: int = 0
) -> bytes:
    """Return an Ethernet header (14 bytes, or 18 with an 802.1Q tag when ``vlan`` is set)."""
    _check_mac("destination", dst)
    _check_mac("source", src)
    if not 0 <= ethertype <= 0xFFFF:
        raise ValueError(f"ethertype {ethertype} out of range")
    if vlan is None:
        return ETH_STRUCT.pack(dst, src, ethertype)
    return bytes(dst) + bytes(src) + VLAN_STRUCT.pack(ETHERTYPE_VLAN, _tci(vlan, pcp), ethertype)


def push_vlan(frame: bytes | bytearray | memoryview, vid: int, pcp: int = 0) -> bytes:
    """Return ``frame`` with an 802.1Q tag inserted after the source MAC (outermost tag)."""
    if len(frame) < ETH_HLEN:
        raise TruncatedPacket(f"Ethernet frame of {len(frame)} bytes, shorter than its header")
    tag = VLAN_TCI_STRUCT.pack(ETHERTYPE_VLAN, _tci(vid, pcp))
    return b"".join((frame[:ETH_TYPE_OFFSET], tag, frame[ETH_TYPE_OFFSET:]))


def pop_vlan(frame: bytes | bytearray | memoryview) -> bytes:
    """Return ``frame`` without its outer 802.1Q tag; an untagged frame is a PacketError."""
    if len(frame) < ETH_HLEN:
        raise TruncatedPacket(f"Ethernet frame of {len(frame)} bytes, shorter than its header")
    if frame[ETH_TYPE_OFFSET] != ETHERTYPE_VLAN >> 8 or frame[ETH_TYPE_OFFSET + 1] != 0x00:
        raise PacketError("frame has no 802.1Q tag to pop")
    if len(frame) < ETH_HLEN + VLAN_HLEN:
        raise TruncatedPacket(f"802.1Q frame of {len(frame)} bytes, shorter than its header")
    return b"".join((frame[:ETH_TYPE_OFFSET], frame[ETH_TYPE_OFFSET + VLAN_HLEN :]))
