"""IPv4 headers (RFC 791): parsing, building, a hot-path template, and fragmentation."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from espswitch.packet.checksum import internet_checksum, ones_complement_sum
from espswitch.packet.errors import PacketError, TruncatedPacket

__all__ = [
    "IPV4_DF",
    "IPV4_HLEN",
    "IPV4_MAX_HLEN",
    "IPV4_MF",
    "IPV4_OFF_CHECKSUM",
    "IPV4_OFF_DST",
    "IPV4_OFF_FRAG",
    "IPV4_OFF_IDENT",
    "IPV4_OFF_PROTO",
    "IPV4_OFF_SRC",
    "IPV4_OFF_TOTAL_LENGTH",
    "IPV4_OFF_TTL",
    "IPV4_PROTO_ESP",
    "IPV4_PROTO_ICMP",
    "IPV4_PROTO_IPIP",
    "IPV4_PROTO_IPV6",
    "IPV4_PROTO_TCP",
    "IPV4_PROTO_UDP",
    "IPV4_STRUCT",
    "Ipv4Header",
    "Ipv4Template",
    "build_ipv4_header",
    "fragment_ipv4",
    "ip_to_bytes",
    "ip_to_str",
    "ipv4_header_checksum",
    "parse_ipv4",
]

IPV4_PROTO_ICMP = 1
IPV4_PROTO_IPIP = 4
IPV4_PROTO_TCP = 6
IPV4_PROTO_UDP = 17
IPV4_PROTO_IPV6 = 41
IPV4_PROTO_ESP = 50

IPV4_HLEN = 20  # without options
IPV4_MAX_HLEN = 60

#: version/IHL, TOS, total length, ident, flags/fragment offset, TTL, protocol, checksum,
#: source, destination.
IPV4_STRUCT = struct.Struct("!BBHHHBBH4s4s")

# Byte offsets of the fields the datapath patches or reads directly.
IPV4_OFF_TOTAL_LENGTH = 2
IPV4_OFF_IDENT = 4
IPV4_OFF_FRAG = 6
IPV4_OFF_TTL = 8
IPV4_OFF_PROTO = 9
IPV4_OFF_CHECKSUM = 10
IPV4_OFF_SRC = 12
IPV4_OFF_DST = 16

# Bits of the 16-bit flags/fragment-offset word.
IPV4_DF = 0x4000
IPV4_MF = 0x2000
_FRAG_MASK = 0x1FFF

_H = struct.Struct("!H")

Buffer = bytes | bytearray | memoryview


def ip_to_bytes(text: str) -> bytes:
    """Parse dotted-quad IPv4 text into 4 bytes."""
    try:
        return ipaddress.IPv4Address(text).packed
    except (ipaddress.AddressValueError, TypeError, ValueError):
        raise PacketError(f"bad IPv4 address {text!r}") from None


def ip_to_str(addr: Buffer) -> str:
    """Format 4 address bytes as dotted-quad text."""
    if len(addr) != 4:
        raise PacketError(f"IPv4 address must be 4 bytes, got {len(addr)}")
    return f"{addr[0]}.{addr[1]}.{addr[2]}.{addr[3]}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Ipv4Header:
    """A parsed IPv4 header. ``frag_offset`` is in 8-byte units, as on the wire.

    The options, if any, are ``buf[20:header_len]``; the payload is
    ``buf[header_len:total_length]``.
    """

    version: int = 4
    ihl: int
    tos: int
    total_length: int
    ident: int
    flags: int  # the three flag bits: 0b010 is DF, 0b001 is MF
    df: bool
    mf: bool
    frag_offset: int
    ttl: int
    proto: int
    checksum: int
    src: bytes
    dst: bytes
    header_len: int

    def __post_init__(self) -> None:
        if self.version != 4 or not 5 <= self.ihl <= 15 or self.header_len != self.ihl * 4:
            raise ValueError("inconsistent IPv4 version/IHL/header_len")
        if len(self.src) != 4 or len(self.dst) != 4:
            raise ValueError("IPv4 addresses must be 4 bytes")

    @property
    def frag_offset_bytes(self) -> int:
        """The fragment offset in bytes."""
        return self.frag_offset * 8

    @property
    def is_fragment(self) -> bool:
        """True for any fragment of a larger datagram (first, middle or last)."""
        return self.mf or self.frag_offset != 0


def ipv4_header_checksum(hdr: Buffer) -> int:
    """Return the checksum that belongs in ``hdr`` (all of it, options included).

    The current contents of the checksum field are ignored.
    """
    if len(hdr) < IPV4_HLEN:
        raise TruncatedPacket(f"IPv4 header of {len(hdr)} bytes")
    stored = (hdr[IPV4_OFF_CHECKSUM] << 8) | hdr[IPV4_OFF_CHECKSUM + 1]
    # Subtracting the stored field in ones' complement arithmetic is adding its complement.
    return internet_checksum(hdr, ~stored & 0xFFFF)


def parse_ipv4(buf: Buffer, verify_checksum: bool = True) -> Ipv4Header:
    """Parse the IPv4 header at the start of ``buf``.

    Checks the version, IHL >= 5, that the header and ``total_length`` fit in ``buf``
    (trailing bytes such as Ethernet padding are allowed), and the header checksum.
    """
    n = len(buf)
    if n < IPV4_HLEN:
        raise TruncatedPacket(f"IPv4 packet of {n} bytes, shorter than its header")
    (vihl, tos, total, ident, frag, ttl, proto, csum, src, dst) = IPV4_STRUCT.unpack_from(buf, 0)
    version = vihl >> 4
    if version != 4:
        raise PacketError(f"IP version {version}, expected 4")
    ihl = vihl & 0x0F
    if ihl < 5:
        raise PacketError(f"IPv4 IHL {ihl} < 5")
    hlen = ihl * 4
    if n < hlen:
        raise TruncatedPacket(f"IPv4 header of {hlen} bytes in a buffer of {n}")
    if total < hlen:
        raise PacketError(f"IPv4 total length {total} shorter than the header ({hlen})")
    if total > n:
        raise TruncatedPacket(f"IPv4 total length {total} but only {n} bytes")
    # memoryview: checksum the header in place, without copying it.
    if verify_checksum and ones_complement_sum(memoryview(buf)[:hlen]) != 0xFFFF:
        raise PacketError("bad IPv4 header checksum")
    return Ipv4Header(
        ihl=ihl,
        tos=tos,
        total_length=total,
        ident=ident,
        flags=frag >> 13,
        df=bool(frag & IPV4_DF),
        mf=bool(frag & IPV4_MF),
        frag_offset=frag & _FRAG_MASK,
        ttl=ttl,
        proto=proto,
        checksum=csum,
        src=src,
        dst=dst,
        header_len=hlen,
    )


def _check_addr(name: str, addr: Buffer) -> None:
    if len(addr) != 4:
        raise ValueError(f"IPv4 {name} address must be 4 bytes, got {len(addr)}")


def build_ipv4_header(
    *,
    src: bytes,
    dst: bytes,
    proto: int,
    payload_len: int,
    ttl: int = 64,
    tos: int = 0,
    ident: int = 0,
    df: bool = True,
    options: bytes = b"",
) -> bytes:
    """Return an IPv4 header (20 bytes plus ``options``) with a correct checksum."""
    _check_addr("source", src)
    _check_addr("destination", dst)
    if len(options) % 4 or len(options) > IPV4_MAX_HLEN - IPV4_HLEN:
        raise ValueError("IPv4 options must be a multiple of 4 bytes, at most 40")
    hlen = IPV4_HLEN + len(options)
    total = hlen + payload_len
    if payload_len < 0 or total > 0xFFFF:
        raise ValueError(f"IPv4 payload length {payload_len} out of range")
    for name, value, top in (("ttl", ttl, 0xFF), ("tos", tos, 0xFF), ("proto", proto, 0xFF)):
        if not 0 <= value <= top:
            raise ValueError(f"IPv4 {name} {value} out of range")
    hdr = bytearray(
        IPV4_STRUCT.pack(
            0x40 | (hlen >> 2),
            tos,
            total,
            ident & 0xFFFF,
            IPV4_DF if df else 0,
            ttl,
            proto,
            0,
            src,
            dst,
        )
    )
    hdr += options
    _H.pack_into(hdr, IPV4_OFF_CHECKSUM, internet_checksum(hdr))
    return bytes(hdr)


# The template writes the whole 20-byte header with one pack_into: the fixed parts as two
# opaque byte strings, and the three per-packet fields as integers.
_TEMPLATE_STRUCT = struct.Struct("!2sHH4sH8s")


class Ipv4Template:
    """A precomputed 20-byte IPv4 header for one tunnel: fixed src, dst, proto, TTL, TOS, DF.

    :meth:`fill` writes it into an outgoing buffer with the per-packet total length,
    identification and checksum. The checksum comes from the sum of the fixed fields,
    computed once here, plus the two per-packet words: a few integer operations per packet.
    """

    __slots__ = ("_fixed_mid", "_fixed_tail", "_head", "_partial", "header")

    def __init__(
        self,
        *,
        src: bytes,
        dst: bytes,
        proto: int,
        ttl: int = 64,
        tos: int = 0,
        df: bool = True,
    ) -> None:
        #: The header with total length, ident and checksum zero (for inspection and tests).
        self.header = build_ipv4_header(
            src=src, dst=dst, proto=proto, payload_len=0, ttl=ttl, tos=tos, df=df
        )
        zeroed = bytearray(self.header)
        zeroed[IPV4_OFF_TOTAL_LENGTH : IPV4_OFF_TOTAL_LENGTH + 2] = b"\0\0"
        zeroed[IPV4_OFF_CHECKSUM : IPV4_OFF_CHECKSUM + 2] = b"\0\0"
        self.header = bytes(zeroed)
        # Sum of every fixed word; cannot be zero (the version nibble is set).
        self._partial = ones_complement_sum(zeroed)
        self._head = self.header[0:2]
        self._fixed_mid = self.header[IPV4_OFF_FRAG:IPV4_OFF_CHECKSUM]
        self._fixed_tail = self.header[IPV4_OFF_SRC:IPV4_HLEN]

    def checksum(self, payload_len: int, ident: int) -> int:
        """Return the header checksum for this payload length and identification."""
        s = self._partial + IPV4_HLEN + payload_len + (ident & 0xFFFF)
        s = (s & 0xFFFF) + (s >> 16)
        s = (s & 0xFFFF) + (s >> 16)
        return ~s & 0xFFFF

    def fill(self, buf: bytearray | memoryview, offset: int, payload_len: int, ident: int) -> None:
        """Write the complete header into ``buf[offset:offset + 20]``.

        ``ident`` is taken modulo 2**16, so a free-running counter may be passed.
        Raises ValueError if the packet would exceed 65535 bytes.
        """
        total = IPV4_HLEN + payload_len
        if total > 0xFFFF or payload_len < 0:
            raise ValueError(f"IPv4 payload length {payload_len} out of range")
        ident &= 0xFFFF
        # partial <= 0xFFFF, total and ident <= 0xFFFF: two folds bring the sum to 16 bits.
        s = self._partial + total + ident
        s = (s & 0xFFFF) + (s >> 16)
        s = (s & 0xFFFF) + (s >> 16)
        _TEMPLATE_STRUCT.pack_into(
            buf, offset, self._head, total, ident, self._fixed_mid, ~s & 0xFFFF, self._fixed_tail
        )


# --- fragmentation ---------------------------------------------------------------------


def _copied_options(options: Buffer) -> bytes:
    """Return the options whose copy flag is set, padded with EOL to a multiple of 4 bytes."""
    out = bytearray()
    i = 0
    n = len(options)
    while i < n:
        kind = options[i]
        if kind == 0:  # end of option list
            break
        if kind == 1:  # no-operation, a single byte; its copy flag is clear
            i += 1
            continue
        if i + 1 >= n:
            raise PacketError("IPv4 option truncated")
        olen = options[i + 1]
        if olen < 2 or i + olen > n:
            raise PacketError(f"IPv4 option {kind} has bad length {olen}")
        if kind & 0x80:
            out += options[i : i + olen]
        i += olen
    out += bytes(-len(out) % 4)
    return bytes(out)


def fragment_ipv4(packet: Buffer, mtu: int) -> list[bytes]:
    """Fragment an IPv4 packet (RFC 791) into packets of at most ``mtu`` bytes.

    A packet that fits is returned unchanged, as the single element. Otherwise DF must be
    clear (else PacketError: the caller should answer with ICMP "fragmentation needed").
    Each fragment's data is a multiple of 8 bytes except the last's; MF is set on all but
    the last, which keeps the MF of ``packet`` (so fragments can be fragmented again).
    Options: the first fragment carries all of them; later fragments carry only those
    whose copy flag is set (RFC 791 section 3.1), padded to a 4-byte boundary.
    TTL, TOS, identification and protocol are kept; checksums are recomputed.
    """
    hdr = parse_ipv4(packet, verify_checksum=False)
    total = hdr.total_length
    if total <= mtu:
        return [bytes(packet[:total])]
    if hdr.df:
        raise PacketError(f"packet of {total} bytes exceeds MTU {mtu} and has DF set")
    hlen = hdr.header_len
    view = memoryview(packet)
    first_header = bytearray(view[:hlen])
    later_options = _copied_options(view[IPV4_HLEN:hlen])
    later_header = bytearray(view[:IPV4_HLEN]) + later_options
    later_header[0] = 0x40 | (len(later_header) >> 2)
    # Both headers must leave room for at least 8 bytes of data.
    if mtu - hlen < 8:
        raise ValueError(f"MTU {mtu} too small to fragment a packet with a {hlen}-byte header")

    payload = view[hlen:total]
    base = hdr.frag_offset * 8
    flags = IPV4_DF if hdr.df else 0
    fragments: list[bytes] = []
    pos = 0
    plen = len(payload)
    while pos < plen:
        header = first_header if pos == 0 else later_header
        room = (mtu - len(header)) & ~7
        chunk = payload[pos : pos + room]
        last = pos + len(chunk) >= plen
        more = hdr.mf if last else True
        frag = bytearray(header)
        frag += chunk
        _H.pack_into(frag, IPV4_OFF_TOTAL_LENGTH, len(frag))
        offset_units = (base + pos) >> 3
        if offset_units > _FRAG_MASK:
            raise PacketError("fragment offset exceeds 13 bits")
        _H.pack_into(frag, IPV4_OFF_FRAG, flags | (IPV4_MF if more else 0) | offset_units)
        _H.pack_into(frag, IPV4_OFF_CHECKSUM, 0)
        _H.pack_into(frag, IPV4_OFF_CHECKSUM, internet_checksum(memoryview(frag)[: len(header)]))
        fragments.append(bytes(frag))
        pos += len(chunk)
    return fragments
