"""Receive-side coalescing of TCP/IPv4 segments for TAP devices (what GRO does in a NIC).

A batch of frames bound for one VM often holds consecutive segments of one TCP flow.
Written one by one, each costs a write() and a full pass through the VM kernel's TCP
receive path; merged into one large frame with a virtio-net header that says "TCPv4 GSO,
segment size N, checksum partial" (what a sender's TSO hands a NIC), the kernel takes
them as one, as it takes what its own GRO built, and does not verify the checksum of a
packet whose checksum is marked partial. The TCP checksum field then holds the pseudo-
header sum, as the kernel expects, so the packet stays valid if it is forwarded and
segmented again. The rules are Linux's tcp_gro_receive(): same flow, contiguous
sequence numbers, same ACK number, window, flags and options, equal-sized segments
(only the last may be shorter), nothing after a PSH.

Pure functions on bytes; the TAP device writes what they return.
"""

from __future__ import annotations

import struct

VNET_HDR_LEN = 10
VNET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start/offset
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_TCPV4 = 1
NO_GSO = bytes(VNET_HDR_LEN)
MAX_GSO = 65535 - 20 - 60  # the merged IPv4 packet must fit its 16-bit total length

_ETH_IPV4 = b"\x08\x00"
_TCP_ACK = 0x10
_TCP_PSH = 0x08
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


def _segment(f: bytes) -> tuple[bytes, int, int] | None:
    """(flow key, sequence number, header length) of a mergeable TCP/IPv4 frame, or None."""
    if len(f) < 54 or f[12:14] != _ETH_IPV4 or f[14] != 0x45 or f[23] != 6:
        return None  # not TCP over option-less IPv4
    if f[20] & 0x3F or f[21]:
        return None  # a fragment
    if 14 + ((f[16] << 8) | f[17]) != len(f):
        return None  # Ethernet padding or a truncated packet
    thl = (f[46] >> 4) * 4
    hlen = 34 + thl
    if thl < 20 or hlen >= len(f) or (f[47] & ~_TCP_PSH) != _TCP_ACK:
        return None  # no payload, or SYN/FIN/RST/URG/ECE/CWR: those go alone
    # Everything that must be equal for two segments to merge: addresses, ports, ACK
    # number, window, options, and the IP fields the merged header keeps (TOS, DF, TTL).
    key = f[0:16] + f[20:21] + f[22:23] + f[26:38] + f[42:46] + f[48:50] + f[54:hlen]
    return key, _U32.unpack_from(f, 38)[0], hlen


def _merge(
    first: bytes,
    hlen: int,
    payloads: list[bytes],
    psh: bool,
) -> tuple[bytes, bytes, int]:
    hdr = bytearray(first[:hlen])
    total = hlen - 14 + sum(map(len, payloads))
    _U16.pack_into(hdr, 16, total)
    hdr[24:26] = b"\0\0"
    _U16.pack_into(hdr, 24, ~_fold(sum(struct.unpack_from("!10H", hdr, 14))) & 0xFFFF)
    if psh:
        hdr[47] |= _TCP_PSH
    # CHECKSUM_PARTIAL convention: the field holds the folded pseudo-header sum.
    src_dst = struct.unpack_from("!4H", hdr, 26)
    _U16.pack_into(hdr, 50, _fold(sum(src_dst) + 6 + total - 20))
    vnet = VNET_HDR.pack(
        VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, hlen, len(payloads[0]), 34, 16
    )
    count = len(payloads)
    payloads.insert(0, bytes(hdr))
    return vnet, b"".join(payloads), count


def _fold(s: int) -> int:
    s = (s & 0xFFFF) + (s >> 16)
    return (s & 0xFFFF) + (s >> 16)


def coalesce(frames: list[bytes]) -> list[tuple[bytes, bytes, int]]:
    """Merge runs of consecutive segments.

    Returns (virtio-net header, frame, number of original frames in it), in order.
    """
    out: list[tuple[bytes, bytes, int]] = []
    run_key = None
    run_first = b""
    run_hlen = run_next = run_mss = run_size = 0
    run_payloads: list[bytes] = []
    run_psh = run_closed = False

    def flush() -> None:
        if len(run_payloads) == 1:
            out.append((NO_GSO, run_first, 1))
        else:
            out.append(_merge(run_first, run_hlen, run_payloads, run_psh))

    for f in frames:
        seg = _segment(f)
        if seg is not None:
            key, seq, hlen = seg
            plen = len(f) - hlen
            if (
                run_key == key
                and not run_closed
                and seq == run_next
                and plen <= run_mss
                and run_size + plen <= MAX_GSO
            ):
                run_payloads.append(f[hlen:])
                run_next = (seq + plen) & 0xFFFFFFFF
                run_size += plen
                run_psh = bool(f[47] & _TCP_PSH)
                # A short segment or a PSH ends what can follow (tcp_gro_receive's rule).
                run_closed = plen < run_mss or run_psh
                continue
        if run_key is not None:
            flush()
            run_key = None
        if seg is None:
            out.append((NO_GSO, f, 1))
            continue
        run_key, run_first, run_hlen = key, f, hlen
        run_mss = run_size = plen
        run_next = (seq + plen) & 0xFFFFFFFF
        run_payloads = [f[hlen:]]
        run_psh = bool(f[47] & _TCP_PSH)
        run_closed = run_psh
    if run_key is not None:
        flush()
    return out
