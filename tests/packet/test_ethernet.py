"""Ethernet headers, 802.1Q tags and MAC text, cross-checked with scapy."""

import pytest
from scapy.all import Dot1Q, Ether, raw

from espswitch.packet.errors import PacketError, TruncatedPacket
from espswitch.packet.ethernet import (
    BROADCAST_MAC,
    ETH_HLEN,
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    ETHERTYPE_QINQ,
    ETHERTYPE_VLAN,
    VLAN_HLEN,
    EthernetHeader,
    build_ethernet,
    is_multicast,
    mac_to_bytes,
    mac_to_str,
    parse_ethernet,
    pop_vlan,
    push_vlan,
)

SRC = mac_to_bytes("02:00:00:aa:bb:01")
DST = mac_to_bytes("02:00:00:aa:bb:02")


def test_mac_text_round_trips_in_lowercase():
    assert mac_to_str(mac_to_bytes("0A:1b:2C:3d:4E:5f")) == "0a:1b:2c:3d:4e:5f"
    assert mac_to_bytes("0a-1b-2c-3d-4e-5f") == bytes.fromhex("0a1b2c3d4e5f")
    assert mac_to_bytes("0:1:2:3:4:5") == bytes(range(6))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "00:11:22:33:44",
        "00:11:22:33:44:55:66",
        "00:11:22:33:44:5g",
        "001:1:2:3:4:5",
        "00:11:22:33:44:",
        "0011.2233.4455",
        "00:11-22:33:44:55",
        " 0:1:2:3:4:5",
    ],
)
def test_bad_mac_text_is_a_packet_error(text):
    with pytest.raises(PacketError):
        mac_to_bytes(text)


def test_mac_to_str_rejects_wrong_length():
    with pytest.raises(PacketError):
        mac_to_str(b"\x00" * 5)


def test_multicast_bit():
    assert is_multicast(BROADCAST_MAC)
    assert is_multicast(mac_to_bytes("01:00:5e:00:00:01"))
    assert is_multicast(mac_to_bytes("33:33:00:00:00:01"))
    assert not is_multicast(SRC)


def test_untagged_header_built_is_what_scapy_builds():
    assert build_ethernet(DST, SRC, ETHERTYPE_IPV4) == raw(
        Ether(dst="02:00:00:aa:bb:02", src="02:00:00:aa:bb:01", type=0x0800)
    )


def test_tagged_header_built_is_what_scapy_builds():
    ours = build_ethernet(DST, SRC, ETHERTYPE_ARP, vlan=100, pcp=5)
    theirs = raw(
        Ether(dst="02:00:00:aa:bb:02", src="02:00:00:aa:bb:01")
        / Dot1Q(vlan=100, prio=5, type=0x0806)
    )
    assert ours == theirs
    assert len(ours) == ETH_HLEN + VLAN_HLEN


def test_parses_scapy_untagged_frame():
    frame = raw(Ether(dst="ff:ff:ff:ff:ff:ff", src="02:00:00:aa:bb:01", type=0x86DD) / (b"x" * 3))
    assert parse_ethernet(frame) == EthernetHeader(
        dst=BROADCAST_MAC, src=SRC, ethertype=0x86DD, vlan=None, pcp=0, payload_offset=14
    )


def test_parses_scapy_tagged_frame_including_vid_4095_and_pcp_7():
    frame = raw(
        Ether(dst="02:00:00:aa:bb:02", src="02:00:00:aa:bb:01")
        / Dot1Q(vlan=4095, prio=7, type=0x0800)
        / b"payload"
    )
    hdr = parse_ethernet(memoryview(frame))
    assert (hdr.vlan, hdr.pcp, hdr.ethertype, hdr.payload_offset) == (4095, 7, 0x0800, 18)
    assert frame[hdr.payload_offset :] == b"payload"


def test_qinq_outer_tag_is_reported_not_stepped_over():
    frame = raw(
        Ether(src="02:00:00:aa:bb:01", dst="02:00:00:aa:bb:02", type=ETHERTYPE_QINQ)
        / Dot1Q(vlan=5)
        / b"x"
    )
    hdr = parse_ethernet(frame)
    assert hdr.ethertype == ETHERTYPE_QINQ and hdr.vlan is None


def test_push_then_pop_restores_the_frame_and_scapy_sees_the_tag():
    frame = raw(
        Ether(dst="02:00:00:aa:bb:02", src="02:00:00:aa:bb:01", type=0x0800) / (b"\x45" * 30)
    )
    tagged = push_vlan(frame, 42, pcp=3)
    dissected = Ether(tagged)
    assert dissected[Dot1Q].vlan == 42 and dissected[Dot1Q].prio == 3
    assert dissected[Dot1Q].type == 0x0800
    assert pop_vlan(tagged) == frame


def test_pop_vlan_of_untagged_frame_is_a_packet_error():
    with pytest.raises(PacketError, match=r"no 802\.1Q tag"):
        pop_vlan(build_ethernet(DST, SRC, ETHERTYPE_IPV4))


def test_truncated_tagged_frame_is_truncated_packet():
    tagged = build_ethernet(DST, SRC, ETHERTYPE_IPV4, vlan=1)
    with pytest.raises(TruncatedPacket):
        parse_ethernet(tagged[:16])
    with pytest.raises(TruncatedPacket):
        parse_ethernet(tagged[:13])
    with pytest.raises(TruncatedPacket):
        pop_vlan(tagged[:15])


@pytest.mark.parametrize("vid,pcp", [(-1, 0), (4096, 0), (1, 8), (1, -1)])
def test_out_of_range_tag_fields_are_caller_errors(vid, pcp):
    with pytest.raises(ValueError):
        push_vlan(build_ethernet(DST, SRC, ETHERTYPE_IPV4), vid, pcp)
    with pytest.raises(ValueError):
        build_ethernet(DST, SRC, ETHERTYPE_IPV4, vlan=vid, pcp=pcp)


def test_header_dataclass_is_frozen_and_keyword_only():
    hdr = parse_ethernet(build_ethernet(DST, SRC, ETHERTYPE_VLAN + 1))
    with pytest.raises(AttributeError):
        hdr.ethertype = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        EthernetHeader(DST, SRC, 0x800)  # type: ignore[misc]
