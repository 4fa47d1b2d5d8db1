"""Classic libpcap capture files (not pcapng): reading, writing, finding the IPv4 packet.

The caller opens the file (binary mode) and passes the file object: no I/O is started here
beyond reading from and writing to that object.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from espswitch.packet.errors import PacketError
from espswitch.packet.ethernet import ETHERTYPE_IPV4, parse_ethernet

__all__ = [
    "LINKTYPE_ETHERNET",
    "LINKTYPE_IPV4",
    "LINKTYPE_LINUX_SLL",
    "LINKTYPE_LINUX_SLL2",
    "LINKTYPE_RAW",
    "PcapError",
    "PcapReader",
    "PcapRecord",
    "PcapWriter",
    "ip_packet_of",
]

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101  # raw IP, IPv4 or IPv6 by the version nibble
LINKTYPE_LINUX_SLL = 113  # "tcpdump -i any", older libpcap
LINKTYPE_IPV4 = 228
LINKTYPE_LINUX_SLL2 = 276  # "tcpdump -i any", libpcap >= 1.10

_MAGIC_US = 0xA1B2C3D4
_MAGIC_NS = 0xA1B23C4D
_MAGIC_PCAPNG = 0x0A0D0D0A  # the section header block type; the same read either way
_MAGICS = {
    _MAGIC_US.to_bytes(4, "big"): (">", False),
    _MAGIC_US.to_bytes(4, "little"): ("<", False),
    _MAGIC_NS.to_bytes(4, "big"): (">", True),
    _MAGIC_NS.to_bytes(4, "little"): ("<", True),
}
_FILE_HEADER_LEN = 24
_RECORD_HEADER_LEN = 16
# The network field's high bits may carry FCS information; the link type is the low bits
# (libpcap's LT_LINKTYPE mask).
_LINKTYPE_MASK = 0x03FFFFFF
# A record larger than this is taken as corruption rather than allocated.
_MAX_RECORD = 0x40000


class PcapError(PacketError):
    """The file is not a classic pcap file, or is damaged."""

    def __init__(self, what: str) -> None:
        # Not "malformed packet: ...": this is about the file, and the message is shown as is.
        ValueError.__init__(self, what)
        self.what = what


@dataclass(frozen=True, slots=True, kw_only=True)
class PcapRecord:
    """One captured packet; ``ts_frac`` is micro- or nanoseconds per the file's magic."""

    ts_sec: int
    ts_frac: int
    data: bytes
    orig_len: int


class PcapReader:
    """Iterate over the :class:`PcapRecord` of a classic pcap file, in either byte order,
    with microsecond or nanosecond timestamps.

    The file header is read and checked when the reader is created.
    """

    def __init__(self, fileobj: BinaryIO) -> None:
        self._f = fileobj
        head = fileobj.read(_FILE_HEADER_LEN)
        magic = bytes(head[:4])
        if len(magic) == 4 and int.from_bytes(magic, "big") == _MAGIC_PCAPNG:
            raise PcapError(
                "not a pcap file (pcapng is not supported: convert with `editcap -F pcap`)"
            )
        if magic not in _MAGICS:
            raise PcapError("not a pcap file")
        if len(head) < _FILE_HEADER_LEN:
            raise PcapError(f"truncated pcap file header ({len(head)} of 24 bytes)")
        order, self.nanosecond = _MAGICS[magic]
        (self.version_major, self.version_minor, _tz, _sigfigs, self.snaplen, network) = (
            struct.unpack(order + "HHiIII", head[4:])
        )
        self.linktype: int = network & _LINKTYPE_MASK
        self._record = struct.Struct(order + "IIII")
        self._max = max(self.snaplen, _MAX_RECORD)
        self._offset = _FILE_HEADER_LEN

    def __iter__(self) -> Iterator[PcapRecord]:
        return self

    def __next__(self) -> PcapRecord:
        head = self._f.read(_RECORD_HEADER_LEN)
        if not head:
            raise StopIteration
        if len(head) < _RECORD_HEADER_LEN:
            raise PcapError(
                f"truncated pcap record header at offset {self._offset} ({len(head)} of 16 bytes)"
            )
        ts_sec, ts_frac, incl_len, orig_len = self._record.unpack(head)
        if incl_len > self._max:
            raise PcapError(
                f"pcap record at offset {self._offset} claims {incl_len} bytes, "
                f"more than the snapshot length {self.snaplen}: the file is damaged"
            )
        data = self._f.read(incl_len)
        if len(data) < incl_len:
            raise PcapError(
                f"truncated pcap record data at offset {self._offset + _RECORD_HEADER_LEN} "
                f"({len(data)} of {incl_len} bytes)"
            )
        self._offset += _RECORD_HEADER_LEN + incl_len
        return PcapRecord(ts_sec=ts_sec, ts_frac=ts_frac, data=bytes(data), orig_len=orig_len)


class PcapWriter:
    """Write a classic little-endian pcap file; the file header is written at once."""

    def __init__(
        self,
        fileobj: BinaryIO,
        linktype: int = LINKTYPE_ETHERNET,
        snaplen: int = 262144,
        nanosecond: bool = False,
    ) -> None:
        if not 0 < snaplen <= 0xFFFFFFFF:
            raise ValueError(f"snaplen {snaplen} out of range")
        if not 0 <= linktype <= _LINKTYPE_MASK:
            raise ValueError(f"link type {linktype} out of range")
        self._f = fileobj
        self.linktype = linktype
        self.snaplen = snaplen
        self.nanosecond = nanosecond
        self._frac_limit = 1_000_000_000 if nanosecond else 1_000_000
        self._record = struct.Struct("<IIII")
        magic = _MAGIC_NS if nanosecond else _MAGIC_US
        fileobj.write(struct.pack("<IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype))

    def write(
        self,
        data: bytes | bytearray | memoryview,
        ts_sec: int = 0,
        ts_frac: int = 0,
        orig_len: int | None = None,
    ) -> None:
        """Append one record; data beyond ``snaplen`` is cut, ``orig_len`` keeps the length
        on the wire (default: ``len(data)``)."""
        if not 0 <= ts_sec <= 0xFFFFFFFF:
            raise ValueError(f"timestamp seconds {ts_sec} out of range")
        if not 0 <= ts_frac < self._frac_limit:
            unit = "nanoseconds" if self.nanosecond else "microseconds"
            raise ValueError(f"timestamp fraction {ts_frac} out of range for {unit}")
        wire_len = len(data) if orig_len is None else orig_len
        if not len(data) <= wire_len <= 0xFFFFFFFF:
            raise ValueError(f"original length {wire_len} less than the {len(data)} bytes given")
        incl = min(len(data), self.snaplen)
        self._f.write(self._record.pack(ts_sec, ts_frac, incl, wire_len))
        self._f.write(data[:incl])


def ip_packet_of(record_data: bytes | bytearray | memoryview, linktype: int) -> tuple[bytes, int]:
    """Find the IPv4 packet in a record: return ``(l2_prefix, ip_offset)``.

    ``l2_prefix`` is ``record_data[:ip_offset]`` (the link-layer header, to put back in front
    of a rewritten packet). Ethernet (with one 802.1Q tag), raw IP, IPv4 and Linux cooked
    captures are understood; anything that is not IPv4 is a PcapError.
    """
    n = len(record_data)
    if linktype == LINKTYPE_ETHERNET:
        eth = parse_ethernet(record_data)
        if eth.ethertype != ETHERTYPE_IPV4:
            raise PcapError(f"Ethernet frame with ethertype {eth.ethertype:#06x}, not IPv4")
        off = eth.payload_offset
    elif linktype in (LINKTYPE_RAW, LINKTYPE_IPV4):
        off = 0
    elif linktype == LINKTYPE_LINUX_SLL:
        if n < 16 or int.from_bytes(record_data[14:16], "big") != ETHERTYPE_IPV4:
            raise PcapError("Linux cooked (SLL) record is not IPv4")
        off = 16
    elif linktype == LINKTYPE_LINUX_SLL2:
        if n < 20 or int.from_bytes(record_data[0:2], "big") != ETHERTYPE_IPV4:
            raise PcapError("Linux cooked (SLL2) record is not IPv4")
        off = 20
    else:
        raise PcapError(f"unsupported link type {linktype}")
    if n <= off or record_data[off] >> 4 != 4:
        raise PcapError("record does not hold an IPv4 packet")
    return bytes(record_data[:off]), off
