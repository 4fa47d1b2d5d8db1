"""Capture files: classic libpcap and pcapng (what tshark and dumpcap write by default)
read, classic pcap written, and the IPv4 packet of a record found.

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
    "PcapngReader",
    "ip_packet_of",
    "open_capture",
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
            raise PcapError("a pcapng file: read it with PcapngReader (or open_capture)")
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


# pcapng block types (draft-ietf-opsawg-pcapng) and the option that sets timestamp units.
_SHB, _IDB, _PB, _SPB, _EPB = 0x0A0D0D0A, 1, 2, 3, 6
_OPT_END, _OPT_TSRESOL = 0, 9
_BYTE_ORDER_MAGIC = 0x1A2B3C4D
_MAX_BLOCK = _MAX_RECORD + 4096


class PcapngReader:
    """Iterate over the packets of a pcapng file as :class:`PcapRecord` (the interface a
    classic pcap reader has), in either byte order, several sections included.

    Packets come from Enhanced, Simple and (obsolete) Packet Blocks; other blocks are
    skipped. Every packet must be of the first interface's link type (a classic pcap file,
    which is what the tools write, has one). Timestamps come out in micro- or nanoseconds
    (``nanosecond``, from the first interface's resolution).
    """

    def __init__(self, fileobj: BinaryIO) -> None:
        self._f = fileobj
        self._offset = 0
        self._order = "<"
        self._ifaces: list[tuple[int, int, int]] = []  # (link type, snaplen, units per s)
        self._pending: list[tuple[int, bytes]] = []
        head = self._read_block(first=True)
        if head is None:
            raise PcapError("truncated pcapng section header")
        # The first interface fixes the output's link type: read up to it.
        while not self._ifaces:
            block = self._read_block()
            if block is None:
                raise PcapError("pcapng file without an interface description")
            self._pending.append(block)
        self.linktype, self.snaplen, units = self._ifaces[0]
        self.nanosecond = units > 1_000_000
        self._units_out = 1_000_000_000 if self.nanosecond else 1_000_000

    def _read_exact(self, n: int, what: str) -> bytes:
        data = self._f.read(n)
        if len(data) < n:
            raise PcapError(f"truncated pcapng {what} at offset {self._offset}")
        return bytes(data)

    def _read_block(self, first: bool = False) -> tuple[int, bytes] | None:
        """The next block's (type, body), interface descriptions taken in; None at the end."""
        head = self._f.read(8)
        if not head:
            return None
        if len(head) < 8:
            raise PcapError(f"truncated pcapng block header at offset {self._offset}")
        if int.from_bytes(head[:4], "big") == _SHB:
            bom = self._read_exact(4, "section header")
            if int.from_bytes(bom, "little") == _BYTE_ORDER_MAGIC:
                self._order = "<"
            elif int.from_bytes(bom, "big") == _BYTE_ORDER_MAGIC:
                self._order = ">"
            else:
                raise PcapError("not a pcap or pcapng file")
            length = struct.unpack(self._order + "I", head[4:])[0]
            body = bom + self._body(length - 12, 4)
            self._ifaces = []  # interface ids are per section
            return _SHB, body
        if first:
            raise PcapError("not a pcap or pcapng file")
        btype, length = struct.unpack(self._order + "II", head)
        body = self._body(length - 12, 0)
        if btype == _IDB:
            self._ifaces.append(self._interface(body))
        return btype, body

    def _body(self, n: int, already: int) -> bytes:
        """Read a block's body (`n` bytes, `already` of them read) and its trailing length."""
        if n < already or n % 4 or n > _MAX_BLOCK:
            raise PcapError(f"pcapng block at offset {self._offset} has a bad length: the "
                            "file is damaged")
        body = self._read_exact(n - already + 4, "block")[:-4]
        self._offset += 12 + n
        return body

    def _interface(self, body: bytes) -> tuple[int, int, int]:
        if len(body) < 8:
            raise PcapError("truncated pcapng interface description")
        linktype, _reserved, snaplen = struct.unpack_from(self._order + "HHI", body)
        units = 1_000_000
        pos = 8
        while pos + 4 <= len(body):
            code, olen = struct.unpack_from(self._order + "HH", body, pos)
            if code == _OPT_END:
                break
            if code == _OPT_TSRESOL and olen >= 1 and pos + 5 <= len(body):
                v = body[pos + 4]
                units = 2 ** (v & 0x7F) if v & 0x80 else 10 ** v
            pos += 4 + olen + (-olen % 4)
        return linktype, snaplen or _MAX_RECORD, units

    def __iter__(self) -> Iterator[PcapRecord]:
        return self

    def __next__(self) -> PcapRecord:
        while True:
            block = self._pending.pop(0) if self._pending else self._read_block()
            if block is None:
                raise StopIteration
            btype, body = block
            rec = self._packet(btype, body)
            if rec is not None:
                return rec

    def _packet(self, btype: int, body: bytes) -> PcapRecord | None:
        o = self._order
        if btype == _EPB and len(body) >= 20:
            iface, ts_hi, ts_lo, caplen, orig = struct.unpack_from(o + "IIIII", body)
            data = body[20 : 20 + caplen]
        elif btype == _PB and len(body) >= 20:
            iface, _drops, ts_hi, ts_lo, caplen, orig = struct.unpack_from(o + "HHIIII", body)
            data = body[20 : 20 + caplen]
        elif btype == _SPB and len(body) >= 4:
            iface, ts_hi, ts_lo = 0, 0, 0
            orig = struct.unpack_from(o + "I", body)[0]
            caplen = min(orig, self._iface(0)[1], len(body) - 4)
            data = body[4 : 4 + caplen]
        elif btype in (_EPB, _PB, _SPB):
            raise PcapError(f"truncated pcapng packet block before offset {self._offset}")
        else:
            return None
        linktype, _snaplen, units = self._iface(iface)
        if len(data) < caplen:
            raise PcapError(f"pcapng packet block before offset {self._offset} claims "
                            f"{caplen} bytes, holds {len(data)}: the file is damaged")
        if linktype != self.linktype:
            raise PcapError(f"the capture mixes link types {self.linktype} and {linktype}: "
                            "split it with editcap first")
        ts = (ts_hi << 32) | ts_lo
        sec, frac = divmod(ts, units)
        return PcapRecord(ts_sec=sec & 0xFFFFFFFF, ts_frac=frac * self._units_out // units,
                          data=data, orig_len=max(orig, len(data)))

    def _iface(self, n: int) -> tuple[int, int, int]:
        if n >= len(self._ifaces):
            raise PcapError(f"pcapng packet of undeclared interface {n} before offset "
                            f"{self._offset}: the file is damaged")
        return self._ifaces[n]


def open_capture(fileobj: BinaryIO) -> PcapReader | PcapngReader:
    """A reader for a classic pcap or a pcapng file, chosen by its first four bytes (the
    file object must offer ``peek``, as ``open(path, "rb")`` does, or ``seek``)."""
    peek = getattr(fileobj, "peek", None)
    if peek is not None:
        magic = peek(4)[:4]
    else:
        magic = fileobj.read(4)
        fileobj.seek(-len(magic), 1)
    if len(magic) == 4 and int.from_bytes(magic, "big") == _MAGIC_PCAPNG:
        return PcapngReader(fileobj)
    return PcapReader(fileobj)


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
