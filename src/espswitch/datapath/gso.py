"""Transmit-side offloads of TAP devices: what a TAP read with a virtio-net header stands for.

With `TUNSETOFFLOAD` (checksum and TCPv4 segmentation offload) the VM's kernel hands a TAP
reader what it would hand a NIC with those features: TCP super-frames of up to 64 KiB with
"segment me in pieces of N bytes" in the virtio-net header, and frames whose TCP or UDP
checksum is left partial ("fill it in from byte S, store it at S + O"). One read then
carries up to 45 MTU-sized segments, and the VM's TCP stack skips its own segmentation;
wireguard-go's TUN reader got past 10 Gbit/s this way.

`complete(raw)` turns one such read into the frames it stands for, as the kernel's software
GSO (`skb_gso_segment` -> `tcp4_gso_segment`) and `skb_checksum_help` would:

- no GSO: the partial checksum, if any, is completed over [csum_start, end) and stored
  complemented at csum_start + csum_offset;
- TCPv4 GSO: the payload after the headers is cut in gso_size pieces; each segment gets
  the headers with the IPv4 total length, ID (the first one's + i) and header checksum,
  the TCP sequence number advanced by what came before, FIN and PSH only on the last
  segment, CWR only on the first, and a complete TCP checksum.

This is the Python path's reference; the compiled transmit pipeline segments in C and is
tested byte for byte against it. Pure functions on bytes; anything it cannot make sense of
is None (the caller counts and drops it): the header comes from our own kernel, but a
frame the VM built is as hostile as any other.
"""

from __future__ import annotations

import struct

from espswitch.datapath.gro import VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4
from espswitch.packet.checksum import fold, internet_checksum

__all__ = ["GSO_NONE", "complete", "finish_checksum", "segment_tcp4"]

_VNET = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_LEN = _VNET.size
GSO_NONE = 0
GSO_ECN = 0x80  # the sender may set ECN bits: the same segmentation
_TCP_FIN, _TCP_PSH, _TCP_CWR = 0x01, 0x08, 0x80
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


def finish_checksum(frame: bytes, start: int, offset: int) -> bytes | None:
    """`frame` with the partial checksum at `start + offset` completed over [start, end)."""
    if start + offset + 2 > len(frame):
        return None
    buf = bytearray(frame)
    _U16.pack_into(buf, start + offset, internet_checksum(memoryview(buf)[start:]))
    return bytes(buf)


def segment_tcp4(frame: bytes, mss: int) -> list[bytes] | None:
    """The MTU-sized segments of a TCP/IPv4 super-frame, `mss` payload bytes each."""
    n = len(frame)
    if mss <= 0 or n < 14 + 20 + 20 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
        return None
    if frame[14] >> 4 != 4:
        return None
    ihl = (frame[14] & 0x0F) * 4
    l4 = 14 + ihl
    if ihl < 20 or l4 + 20 > n:
        return None
    thl = (frame[l4 + 12] >> 4) * 4
    hlen = l4 + thl
    if thl < 20 or hlen > n:
        return None
    payload = memoryview(frame)[hlen:]
    if not payload:
        return None
    ident = _U16.unpack_from(frame, 18)[0]
    seq = _U32.unpack_from(frame, l4 + 4)[0]
    flags = frame[l4 + 13]
    # The pseudo header's addresses and protocol, summed once.
    pseudo = sum(struct.unpack_from("!4H", frame, 26)) + 6
    out = []
    count = (len(payload) + mss - 1) // mss
    for i in range(count):
        piece = payload[i * mss:(i + 1) * mss]
        hdr = bytearray(frame[:hlen])
        tcp_len = thl + len(piece)
        _U16.pack_into(hdr, 16, ihl + tcp_len)
        _U16.pack_into(hdr, 18, (ident + i) & 0xFFFF)
        hdr[24:26] = b"\0\0"
        _U16.pack_into(hdr, 24, internet_checksum(memoryview(hdr)[14:l4]))
        _U32.pack_into(hdr, l4 + 4, (seq + i * mss) & 0xFFFFFFFF)
        f = flags
        if i != count - 1:
            f &= ~(_TCP_FIN | _TCP_PSH) & 0xFF
        if i:
            f &= ~_TCP_CWR & 0xFF
        hdr[l4 + 13] = f
        hdr[l4 + 16:l4 + 18] = b"\0\0"
        seg = bytes(hdr) + piece
        s = internet_checksum(memoryview(seg)[l4:], fold(pseudo + tcp_len))
        out.append(seg[:l4 + 16] + _U16.pack(s) + seg[l4 + 18:])
    return out


def complete(raw: bytes) -> list[bytes] | None:
    """The frames one TAP read (virtio-net header + frame) stands for, or None."""
    if len(raw) < VNET_LEN + 14:
        return None
    flags, gso_type, _hdr_len, gso_size, start, offset = _VNET.unpack_from(raw)
    frame = raw[VNET_LEN:]
    gso = gso_type & ~GSO_ECN
    if gso == GSO_NONE:
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            done = finish_checksum(frame, start, offset)
            return None if done is None else [done]
        return [frame]
    if gso == VIRTIO_NET_HDR_GSO_TCPV4:
        return segment_tcp4(frame, gso_size)
    return None
