"""Tunnel encapsulations, registered by name: what goes between the underlay's IP header
and the inner Ethernet frame (VXLAN today; Geneve and GRE plug in here).

An encapsulation parses its own options (`key`, `dst_port`), knows its overhead, pushes its
header in front of a frame (`push`) and finds the frame again in what was received (`pop`).
It knows nothing of routes, addresses or ESP: the underlay and the protection do that.
Per-packet work is bytes and `struct`.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Mapping
from typing import ClassVar

from espswitch.datapath.errors import PortError
from espswitch.values import parse_uint

UDP = 17
VXLAN_PORT = 4789
# UDP ports a tunnel may not use: the daemon's own protocols listen there.
RESERVED_UDP_PORTS = {500: "IKE", 4500: "IKE and UDP-encapsulated ESP (NAT-T)"}
ETHERNET_MIN = 14
_UDP_VXLAN = struct.Struct("!HHHHII")  # UDP sport, dport, length, checksum; VXLAN flags, VNI


def parse_option_int(name: str, opt: str, text: str, lo: int, hi: int) -> int:
    """An integer option in lo..hi (ASCII decimal or 0x hex), or PortError naming it."""
    v = parse_uint(text)
    if v is None:
        raise PortError(f"interface {name}: options:{opt} '{text}' is not a number "
                        "(decimal or 0x hexadecimal digits)")
    if not lo <= v <= hi:
        raise PortError(f"interface {name}: options:{opt}={text} is out of range ({lo} to {hi})")
    return v


class Encapsulation:
    """One tunnel's encapsulation: its key and UDP port, its header, its overhead."""

    NAME: ClassVar[str] = ""
    #: the IP protocol the encapsulation rides on
    PROTO: ClassVar[int] = UDP
    #: the options this encapsulation reads
    OPTIONS: ClassVar[frozenset[str]] = frozenset()
    #: bytes between the underlay's IP header and the inner frame
    OVERHEAD: ClassVar[int] = 0
    DEFAULT_PORT: ClassVar[int] = 0

    key: int
    dst_port: int

    def push(self, frame: bytes) -> bytes:
        """The encapsulated frame, from the L4 header on."""
        raise NotImplementedError

    @staticmethod
    def pop(buf: bytes, l4: int, end: int) -> tuple[int, int, int] | None:
        """In `buf[l4:end]` (the L4 header onwards) find (key, start, end of the inner
        frame), or None when it is malformed."""
        raise NotImplementedError

    def describe(self) -> list[str]:
        """`key=value` words for dpif/show (defaults left out)."""
        return []


ENCAPSULATIONS: dict[str, Callable[[str, Mapping[str, str]], Encapsulation]] = {}


def register_encapsulation(cls: type[Encapsulation]) -> type[Encapsulation]:
    """Class decorator: make `cls` available to tunnel types under `cls.NAME`."""
    ENCAPSULATIONS[cls.NAME] = cls
    return cls


@register_encapsulation
class Vxlan(Encapsulation):
    """VXLAN (RFC 7348): UDP to `dst_port` (4789), an 8-byte header with the VNI (`key`)."""

    NAME = "vxlan"
    OPTIONS = frozenset({"key", "dst_port"})
    OVERHEAD = 16  # UDP 8 + VXLAN 8
    DEFAULT_PORT = VXLAN_PORT

    __slots__ = ("_vni_word", "dst_port", "key")

    def __init__(self, name: str, options: Mapping[str, str]) -> None:
        self.key = parse_option_int(name, "key", options.get("key", "0"), 0, (1 << 24) - 1)
        self.dst_port = parse_option_int(name, "dst_port",
                                         options.get("dst_port", str(self.DEFAULT_PORT)),
                                         1, 65535)
        if self.dst_port in RESERVED_UDP_PORTS:
            raise PortError(
                f"interface {name}: options:dst_port {self.dst_port} is "
                f"{RESERVED_UDP_PORTS[self.dst_port]}'s port; choose another "
                f"(the default is {self.DEFAULT_PORT})")
        self._vni_word = self.key << 8

    def push(self, frame: bytes) -> bytes:
        # Source port from the inner flow (RFC 7348 §5): MACs, then IPs and L4 ports.
        sport = 49152 | (zlib.crc32(frame[26:38], zlib.crc32(frame[0:14])) & 0x3FFF)
        return _UDP_VXLAN.pack(sport, self.dst_port, len(frame) + 16, 0, 0x08000000,
                               self._vni_word) + frame

    @staticmethod
    def pop(buf: bytes, l4: int, end: int) -> tuple[int, int, int] | None:
        # The UDP length must hold VXLAN and an Ethernet header and end within `end`;
        # what follows it (Ethernet padding, TFC padding) is not part of the inner frame.
        if end - l4 < 8 + 8 + ETHERNET_MIN:
            return None
        udp_end = l4 + ((buf[l4 + 4] << 8) | buf[l4 + 5])
        if udp_end < l4 + 8 + 8 + ETHERNET_MIN or udp_end > end or not buf[l4 + 8] & 0x08:
            return None
        return (buf[l4 + 12] << 16) | (buf[l4 + 13] << 8) | buf[l4 + 14], l4 + 16, udp_end

    def describe(self) -> list[str]:
        words = [f"key={self.key}"] if self.key else []
        if self.dst_port != self.DEFAULT_PORT:
            words.append(f"dst_port={self.dst_port}")
        return words
