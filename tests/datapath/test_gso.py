"""datapath/gso.py, the Python reference for TSO and checksum offload from VM ports, checked
against scapy as an independent builder and parser of TCP/IPv4 and UDP."""

from __future__ import annotations

import struct

from scapy.all import IP, TCP, UDP, Ether, raw

from espswitch.datapath.gso import MAX_SEGMENTS, complete, finish_checksum, segment_tcp4

VNET = struct.Struct("<BBHHHH")


def super_frame(size: int, flags: str = "PA", options: list | None = None) -> bytes:
    return raw(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
               / IP(src="198.51.100.1", dst="198.51.100.2", id=0xFFFE, flags="DF")
               / TCP(sport=40000, dport=5201, seq=0xFFFFFF00, ack=9, flags=flags,
                     options=options or [])
               / bytes((i * 13) & 0xFF for i in range(size)))


def scapy_valid(frame: bytes) -> Ether:
    """The frame as scapy parses it, after asserting its IPv4 and TCP/UDP checksums are
    what scapy computes."""
    pkt = Ether(frame)
    again = pkt.copy()
    del again[IP].chksum
    l4 = TCP if TCP in again else UDP
    del again[l4].chksum
    again = Ether(raw(again))
    assert pkt[IP].chksum == again[IP].chksum
    assert pkt[l4].chksum == again[l4].chksum
    return pkt


def test_segments_are_valid_tcp_that_carry_the_payload_in_order() -> None:
    frame = super_frame(5000, flags="FPA", options=[("Timestamp", (1, 2))])
    segs = segment_tcp4(frame, 1448)
    assert segs is not None and [len(Ether(s)[TCP].payload) for s in segs] == [1448] * 3 + [656]
    parsed = [scapy_valid(s) for s in segs]
    assert b"".join(bytes(p[TCP].payload) for p in parsed) == bytes(Ether(frame)[TCP].payload)
    assert [p[TCP].seq for p in parsed] == [(0xFFFFFF00 + 1448 * i) & 0xFFFFFFFF
                                            for i in range(4)]
    assert [str(p[TCP].flags) for p in parsed] == ["A", "A", "A", "FPA"]
    assert [p[IP].id for p in parsed] == [0xFFFE, 0xFFFF, 0, 1]
    assert all(p[TCP].options == Ether(frame)[TCP].options for p in parsed)


def test_cwr_stays_on_the_first_segment_only() -> None:
    segs = segment_tcp4(super_frame(3000, flags="CA"), 1000)
    assert [int(scapy_valid(s)[TCP].flags) for s in segs] == [0x90, 0x10, 0x10]


def test_a_partial_udp_checksum_is_completed() -> None:
    pkt = (Ether() / IP(src="10.1.1.1", dst="10.1.1.2") / UDP(sport=1, dport=2)
           / b"hello, offload")
    frame = bytearray(raw(pkt))
    # What the VM leaves: the pseudo header's sum, not complemented.
    words = struct.unpack("!4H", frame[26:34])
    s = sum(words) + 17 + 22
    s = (s & 0xFFFF) + (s >> 16)
    frame[40:42] = struct.pack("!H", s)
    done = complete(VNET.pack(1, 0, 0, 0, 34, 6) + bytes(frame))
    assert done is not None and len(done) == 1
    assert done[0] == finish_checksum(bytes(frame), 34, 6)
    scapy_valid(done[0])


def test_reads_that_cannot_be_segmented_are_refused() -> None:
    frame = super_frame(3000)
    assert complete(VNET.pack(1, 1, 54, 0, 34, 16) + frame) is None  # gso_size 0
    assert complete(VNET.pack(1, 5, 54, 1000, 34, 16) + frame) is None  # UDP GSO
    assert complete(VNET.pack(1, 1, 54, 1000, 34, 16) + frame[:50]) is None  # no payload
    assert complete(VNET.pack(1, 0, 0, 0, 34, 5000) + frame) is None  # offset outside
    too_many = super_frame(MAX_SEGMENTS * 10 + 1)
    assert complete(VNET.pack(1, 1, 54, 10, 34, 16) + too_many) is None
    assert len(complete(VNET.pack(1, 1, 54, 11, 34, 16) + too_many)) <= MAX_SEGMENTS


def test_a_read_without_offload_is_the_frame() -> None:
    frame = super_frame(100)
    assert complete(bytes(10) + frame) == [frame]
