"""Tunnel encapsulations, registered by name: what goes between the underlay's IP header
and the inner Ethernet frame: VXLAN (RFC 7348), Geneve (RFC 8926), GRE carrying Ethernet
(RFC 2784, 2890; transparent Ethernet bridging, as Open vSwitch's `gre`).

An encapsulation parses its own options (`key`, `dst_port`, ...), knows its overhead and the
IP protocol it rides on (UDP to a port, or its own protocol number), pushes its header in
front of a frame (`push`) and finds the frame again in what was received (`pop`). It knows
nothing of routes, addresses or ESP: the underlay and the protection do that. Per-packet
work is bytes and `struct`.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Mapping
from typing import ClassVar

from espswitch.datapath.errors import PortError
from espswitch.packet.checksum import internet_checksum
from espswitch.values import parse_uint

UDP = 17
GRE = 47
VXLAN_PORT = 4789
GENEVE_PORT = 6081
ETH_P_TEB = 0x6558  # transparent Ethernet bridging: the payload is an Ethernet frame
# UDP ports a tunnel may not use: the daemon's own protocols listen there.
RESERVED_UDP_PORTS = {500: "IKE", 4500: "IKE and UDP-encapsulated ESP (NAT-T)"}
ETHERNET_MIN = 14
_UDP_VXLAN = struct.Struct("!HHHHII")  # UDP sport, dport, length, checksum; VXLAN flags, VNI
_UDP_GENEVE = struct.Struct("!HHHHBBHI")  # UDP ...; Geneve ver/optlen, flags, proto, VNI
_GRE_BASE = struct.Struct("!HH")  # flags and version, protocol


def flow_port(frame: bytes) -> int:
    """A UDP source port from the inner flow (RFC 7348 §5, RFC 8926 §3.3): MACs, then IPs
    and L4 ports when present, so that the underlay's ECMP spreads flows."""
    return 49152 | (zlib.crc32(frame[26:38], zlib.crc32(frame[0:14])) & 0x3FFF)


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
    """One tunnel's encapsulation: its key and UDP port, its header, its overhead.

    `pop` returns (key, start, end) of the inner frame, or the name of the drop cause
    (counted as `<encapsulation>_<cause>`)."""

    NAME: ClassVar[str] = ""
    #: the IP protocol the encapsulation rides on
    PROTO: ClassVar[int] = UDP
    #: the options this encapsulation reads
    OPTIONS: ClassVar[frozenset[str]] = frozenset()
    DEFAULT_PORT: ClassVar[int] = 0

    key: int
    #: the UDP destination port (0 for an encapsulation that is not UDP)
    dst_port: int
    #: bytes between the underlay's IP header and the inner frame
    overhead: int

    def push(self, frame: bytes) -> bytes:
        """The encapsulated frame, from the L4 header on."""
        raise NotImplementedError

    @staticmethod
    def pop(buf: bytes, l4: int, end: int) -> tuple[int, int, int] | str:
        """In `buf[l4:end]` (the L4 header onwards) find (key, start, end of the inner
        frame), or the drop cause ("malformed", ...)."""
        raise NotImplementedError

    def describe(self) -> list[str]:
        """`key=value` words for dpif/show (defaults left out)."""
        return []


ENCAPSULATIONS: dict[str, Callable[[str, Mapping[str, str]], Encapsulation]] = {}


def register_encapsulation(cls: type[Encapsulation]) -> type[Encapsulation]:
    """Class decorator: make `cls` available to tunnel types under `cls.NAME`."""
    ENCAPSULATIONS[cls.NAME] = cls
    return cls


def _udp_port(name: str, options: Mapping[str, str], default: int) -> int:
    port = parse_option_int(name, "dst_port", options.get("dst_port", str(default)), 1, 65535)
    if port in RESERVED_UDP_PORTS:
        raise PortError(
            f"interface {name}: options:dst_port {port} is {RESERVED_UDP_PORTS[port]}'s "
            f"port; choose another (the default is {default})")
    return port


class _UdpWithVni(Encapsulation):
    """What VXLAN and Geneve share: UDP to `dst_port`, a 24-bit VNI (`key`), 16 bytes of
    headers (UDP 8, their own 8, no options sent)."""

    OPTIONS = frozenset({"key", "dst_port"})

    __slots__ = ("_vni_word", "dst_port", "key", "overhead")

    def __init__(self, name: str, options: Mapping[str, str]) -> None:
        self.key = parse_option_int(name, "key", options.get("key", "0"), 0, (1 << 24) - 1)
        self.dst_port = _udp_port(name, options, self.DEFAULT_PORT)
        self.overhead = 16
        self._vni_word = self.key << 8

    def describe(self) -> list[str]:
        words = [f"key={self.key}"] if self.key else []
        if self.dst_port != self.DEFAULT_PORT:
            words.append(f"dst_port={self.dst_port}")
        return words


@register_encapsulation
class Vxlan(_UdpWithVni):
    """VXLAN (RFC 7348): UDP to `dst_port` (4789), an 8-byte header with the VNI (`key`)."""

    NAME = "vxlan"
    DEFAULT_PORT = VXLAN_PORT
    __slots__ = ()

    def push(self, frame: bytes) -> bytes:
        return _UDP_VXLAN.pack(flow_port(frame), self.dst_port, len(frame) + 16, 0, 0x08000000,
                               self._vni_word) + frame

    @staticmethod
    def pop(buf: bytes, l4: int, end: int) -> tuple[int, int, int] | str:
        # The UDP length must hold VXLAN and an Ethernet header and end within `end`;
        # what follows it (Ethernet padding, TFC padding) is not part of the inner frame.
        if end - l4 < 8 + 8 + ETHERNET_MIN:
            return "malformed"
        udp_end = l4 + ((buf[l4 + 4] << 8) | buf[l4 + 5])
        if udp_end < l4 + 8 + 8 + ETHERNET_MIN or udp_end > end or not buf[l4 + 8] & 0x08:
            return "malformed"
        return (buf[l4 + 12] << 16) | (buf[l4 + 13] << 8) | buf[l4 + 14], l4 + 16, udp_end


@register_encapsulation
class Geneve(_UdpWithVni):
    """Geneve (RFC 8926): UDP to `dst_port` (6081), an 8-byte header with the VNI (`key`)
    and options. We send none; received options are skipped, but a packet with the
    critical bit (options we would have to understand) or the control bit (OAM, never
    forwarded) is dropped and counted (§3.4, §3.5)."""

    NAME = "geneve"
    DEFAULT_PORT = GENEVE_PORT
    __slots__ = ()

    def push(self, frame: bytes) -> bytes:
        return _UDP_GENEVE.pack(flow_port(frame), self.dst_port, len(frame) + 16, 0, 0, 0,
                                ETH_P_TEB, self._vni_word) + frame

    @staticmethod
    def pop(buf: bytes, l4: int, end: int) -> tuple[int, int, int] | str:
        if end - l4 < 8 + 8 + ETHERNET_MIN:
            return "malformed"
        udp_end = l4 + ((buf[l4 + 4] << 8) | buf[l4 + 5])
        g = l4 + 8
        first = buf[g]
        start = g + 8 + (first & 0x3F) * 4
        if first >> 6 or udp_end > end or udp_end < start + ETHERNET_MIN:
            return "malformed"  # a version we do not know, or lengths that do not fit
        if (buf[g + 2] << 8 | buf[g + 3]) != ETH_P_TEB:
            return "malformed"
        flags = buf[g + 1]
        if flags & 0x40:
            return "critical_options"
        if flags & 0x80:
            return "control"
        return (buf[g + 4] << 16) | (buf[g + 5] << 8) | buf[g + 6], start, udp_end


def _gre_key(name: str, options: Mapping[str, str]) -> int | None:
    text = options.get("key")
    if text is None or text == "":
        return None
    return parse_option_int(name, "key", text, 0, (1 << 32) - 1)


@register_encapsulation
class Gre(Encapsulation):
    """GRE carrying Ethernet (protocol 0x6558, as Open vSwitch's `gre`), with a key when
    `options:key` is set (RFC 2890) and a checksum when `options:csum=true` (RFC 2784).
    Sequence numbers are not supported (a packet with them is dropped and counted), and
    `options:seq` is refused."""

    NAME = "gre"
    PROTO = GRE
    OPTIONS = frozenset({"key", "csum", "seq"})

    __slots__ = ("_head", "csum", "dst_port", "key", "key_present", "overhead")

    def __init__(self, name: str, options: Mapping[str, str]) -> None:
        key = _gre_key(name, options)
        self.key_present = key is not None
        self.key = key or 0
        csum = options.get("csum", "false").lower()
        if csum not in ("true", "false"):
            raise PortError(f"interface {name}: options:csum must be true or false")
        self.csum = csum == "true"
        if options.get("seq", "false").lower() != "false":
            raise PortError(f"interface {name}: options:seq (GRE sequence numbers) is not "
                            "supported; remove it")
        self.dst_port = 0
        flags = (0x8000 if self.csum else 0) | (0x2000 if self.key_present else 0)
        head = _GRE_BASE.pack(flags, ETH_P_TEB)
        if self.csum:
            head += b"\0\0\0\0"  # checksum and reserved, filled per packet
        if self.key_present:
            head += struct.pack("!I", self.key)
        self._head = head
        self.overhead = len(head)

    def push(self, frame: bytes) -> bytes:
        if not self.csum:
            return self._head + frame
        pkt = bytearray(self._head + frame)
        struct.pack_into("!H", pkt, 4, internet_checksum(pkt))
        return bytes(pkt)

    @staticmethod
    def pop(buf: bytes, l4: int, end: int) -> tuple[int, int, int] | str:
        if end - l4 < 4 + ETHERNET_MIN:
            return "malformed"
        flags = buf[l4] << 8 | buf[l4 + 1]
        if flags & 0x47FF or (buf[l4 + 2] << 8 | buf[l4 + 3]) != ETH_P_TEB:
            # Routing (RFC 1701: a checksum word, then routing after the key; Linux drops
            # it too), strict source route, recursion, flags, a version; not Ethernet.
            return "malformed"
        if flags & 0x1000:
            return "seq_unsupported"
        off = l4 + 4
        if flags & 0x8000:
            if internet_checksum(memoryview(buf)[l4:end]) != 0:
                return "bad_checksum"
            off += 4
        key = 0
        if flags & 0x2000:
            if end - off < 4:
                return "malformed"
            key = int.from_bytes(buf[off : off + 4], "big")
            off += 4
        if end - off < ETHERNET_MIN:
            return "malformed"
        return key, off, end

    def describe(self) -> list[str]:
        words = [f"key={self.key}"] if self.key_present else []
        if self.csum:
            words.append("csum=true")
        return words
