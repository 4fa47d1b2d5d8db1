"""Receive coalescing for TAP devices: which segments merge, and what the merged frame is."""

from __future__ import annotations

import struct

from scapy.all import IP, TCP, UDP, Ether, raw

from espswitch.datapath.gro import (
    NO_GSO,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VNET_HDR,
    coalesce,
)
from espswitch.packet.checksum import internet_checksum, ipv4_pseudo_header_sum

MSS = 1000


def seg(seq: int, size: int = MSS, flags: str = "A", sport: int = 5001,
        ack: int = 77, window: int = 500) -> bytes:
    return raw(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
               / IP(src="198.51.100.1", dst="198.51.100.2", id=seq & 0xFFFF, flags="DF")
               / TCP(sport=sport, dport=80, seq=seq, ack=ack, flags=flags, window=window)
               / bytes((seq + i) & 0xFF for i in range(size)))


def test_consecutive_segments_of_one_flow_become_one_gso_frame() -> None:
    frames = [seg(1000 + i * MSS) for i in range(5)]
    [(vnet, frame, count)] = coalesce(frames)
    assert count == 5
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack(vnet)
    assert flags == VIRTIO_NET_HDR_F_NEEDS_CSUM and gso_type == VIRTIO_NET_HDR_GSO_TCPV4
    assert (hdr_len, gso_size, csum_start, csum_offset) == (54, MSS, 34, 16)
    pkt = Ether(frame)
    assert pkt[IP].len == 20 + 20 + 5 * MSS
    assert bytes(pkt[TCP].payload) == b"".join(f[54:] for f in frames)
    assert pkt[TCP].seq == 1000
    assert internet_checksum(frame[14:34]) == 0  # the IPv4 header checksum is right
    # CHECKSUM_PARTIAL: the TCP checksum field holds the folded pseudo-header sum.
    pseudo = ipv4_pseudo_header_sum(frame[26:30], frame[30:34], 6, 20 + 5 * MSS)
    assert struct.unpack_from("!H", frame, 50)[0] == pseudo


def test_a_shorter_last_segment_joins_but_ends_the_run() -> None:
    frames = [seg(0), seg(MSS, 300), seg(MSS + 300)]
    out = coalesce(frames)
    assert [c for _, _, c in out] == [2, 1]
    assert out[1] == (NO_GSO, frames[2], 1)


def test_psh_ends_a_run_and_is_kept_on_the_merged_header() -> None:
    frames = [seg(0), seg(MSS, flags="PA"), seg(2 * MSS)]
    out = coalesce(frames)
    assert [c for _, _, c in out] == [2, 1]
    assert Ether(out[0][1])[TCP].flags == "PA"


def test_gaps_other_flows_acks_and_control_segments_are_not_merged() -> None:
    frames = [
        seg(0), seg(2 * MSS),                      # a sequence gap
        seg(0, sport=6000), seg(MSS, sport=6001),  # two flows
        seg(0, ack=1), seg(MSS, ack=2),            # different ACK numbers
        seg(0, window=1), seg(MSS, window=2),      # different windows
        seg(0, size=0), seg(0, size=0),            # pure ACKs
        seg(0, flags="S"), seg(1, flags="FA"),     # SYN, FIN
    ]
    out = coalesce(frames)
    assert [c for _, _, c in out] == [1] * len(frames)
    assert [f for _, f, _ in out] == frames
    assert all(v == NO_GSO for v, _, _ in out)


def test_non_tcp_frames_pass_through_in_order() -> None:
    udp = raw(Ether() / IP(src="1.2.3.4", dst="5.6.7.8") / UDP() / (b"x" * 50))
    frames = [seg(0), seg(MSS), udp, seg(2 * MSS), seg(3 * MSS), b"\x00" * 20]
    out = coalesce(frames)
    assert [c for _, _, c in out] == [2, 1, 2, 1]
    assert out[1][1] == udp and out[3][1] == b"\x00" * 20


def test_a_run_stops_below_the_ipv4_length_limit() -> None:
    frames = [seg(i * 1400, 1400) for i in range(60)]
    out = coalesce(frames)
    assert sum(c for _, _, c in out) == 60
    assert all(len(f) - 14 <= 65535 for _, f, _ in out)
    assert len(out) == 2
