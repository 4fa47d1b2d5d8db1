"""pcap files: our writer read by scapy and tshark, scapy's files read by us."""

import io
import shutil
import struct
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.all import IP, UDP, Dot1Q, Ether, IPv6, raw, rdpcap
from scapy.utils import PcapWriter as ScapyPcapWriter
from scapy.utils import wrpcapng

from espswitch.packet.errors import PacketError
from espswitch.packet.pcap import (
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_RAW,
    PcapError,
    PcapngReader,
    PcapReader,
    PcapRecord,
    PcapWriter,
    ip_packet_of,
    open_capture,
)

FRAMES = [
    raw(
        Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        / IP(src="10.0.0.1", dst="10.0.0.2")
        / UDP()
        / (b"a" * n)
    )
    for n in (0, 1, 100, 1400)
]


def _written(frames, **kwargs):
    buf = io.BytesIO()
    writer = PcapWriter(buf, **kwargs)
    for i, frame in enumerate(frames):
        writer.write(frame, ts_sec=1_700_000_000 + i, ts_frac=123_456 + i)
    return buf.getvalue()


def test_our_file_is_read_by_scapy(tmp_path):
    path = tmp_path / "ours.pcap"
    path.write_bytes(_written(FRAMES))
    packets = rdpcap(str(path))
    assert [raw(p) for p in packets] == FRAMES
    assert int(packets[1].time) == 1_700_000_001
    assert round(float(packets[1].time) % 1, 6) == 0.123457


def test_our_nanosecond_file_is_read_by_scapy(tmp_path):
    path = tmp_path / "ns.pcap"
    buf = io.BytesIO()
    PcapWriter(buf, nanosecond=True).write(FRAMES[0], ts_sec=10, ts_frac=999_999_999)
    path.write_bytes(buf.getvalue())
    (packet,) = rdpcap(str(path))
    assert raw(packet) == FRAMES[0]
    assert packet.time == pytest.approx(10.999999999, abs=1e-9)


@pytest.mark.parametrize("endianness", ["<", ">"])
@pytest.mark.parametrize("nano", [False, True])
def test_reads_scapy_files_in_both_byte_orders_and_resolutions(tmp_path, endianness, nano):
    path = tmp_path / "scapy.pcap"
    writer = ScapyPcapWriter(
        str(path), linktype=LINKTYPE_ETHERNET, endianness=endianness, nano=nano, sync=True
    )
    for i, frame in enumerate(FRAMES):
        packet = Ether(frame)
        packet.time = 1000 + i + (0.25 if not nano else 0.000000125)
        writer.write(packet)
    writer.close()
    with path.open("rb") as f:
        reader = PcapReader(f)
        records = list(reader)
    assert reader.linktype == LINKTYPE_ETHERNET and reader.nanosecond is nano
    assert [r.data for r in records] == FRAMES
    assert [r.orig_len for r in records] == [len(f) for f in FRAMES]
    assert records[2].ts_sec == 1002
    assert records[2].ts_frac == (125 if nano else 250_000)


def test_our_writer_round_trips_through_our_reader_with_truncation():
    data = _written(FRAMES, snaplen=64, linktype=LINKTYPE_RAW)
    reader = PcapReader(io.BytesIO(data))
    assert reader.linktype == LINKTYPE_RAW and reader.snaplen == 64 and not reader.nanosecond
    records = list(reader)
    assert records[3] == PcapRecord(
        ts_sec=1_700_000_003, ts_frac=123_459, data=FRAMES[3][:64], orig_len=len(FRAMES[3])
    )


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
def test_tshark_reads_our_file(tmp_path):
    path = tmp_path / "ours.pcap"
    path.write_bytes(_written(FRAMES))
    out = subprocess.run(
        ["tshark", "-r", str(path), "-T", "fields", "-e", "frame.len", "-e", "ip.src"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split("\n")
    rows = [line.split("\t") for line in out if line]
    assert rows == [[str(len(f)), "10.0.0.1"] for f in FRAMES]


def test_pcapng_reader_refers_a_classic_reader_to_it(tmp_path):
    path = tmp_path / "x.pcapng"
    wrpcapng(str(path), [Ether(FRAMES[0])])
    with path.open("rb") as f, pytest.raises(PcapError, match="PcapngReader"):
        PcapReader(f)


def test_scapy_pcapng_is_read_back(tmp_path):
    path = tmp_path / "x.pcapng"
    wrpcapng(str(path), [Ether(f) for f in FRAMES])
    with path.open("rb") as f:
        reader = open_capture(f)
        assert isinstance(reader, PcapngReader) and reader.linktype == LINKTYPE_ETHERNET
        assert [r.data for r in reader] == FRAMES


@pytest.mark.skipif(shutil.which("editcap") is None, reason="needs editcap (tshark)")
def test_editcap_pcapng_has_the_classic_files_packets_and_timestamps(tmp_path):
    classic = tmp_path / "x.pcap"
    with classic.open("wb") as f:
        w = PcapWriter(f)
        for i, frame in enumerate(FRAMES):
            w.write(frame, ts_sec=1_700_000_000 + i, ts_frac=123_456 + i)
    ng = tmp_path / "x.pcapng"
    subprocess.run(["editcap", "-F", "pcapng", str(classic), str(ng)], check=True, timeout=30)
    with classic.open("rb") as a, ng.open("rb") as b:
        want = [(r.ts_sec, r.ts_frac, r.data) for r in open_capture(a)]
        got_reader = open_capture(b)
        assert isinstance(got_reader, PcapngReader)
        assert [(r.ts_sec, r.ts_frac, r.data) for r in got_reader] == want


def _block(order: str, btype: int, body: bytes) -> bytes:
    body += bytes(-len(body) % 4)
    n = 12 + len(body)
    return struct.pack(order + "II", btype, n) + body + struct.pack(order + "I", n)


def _shb(order: str) -> bytes:
    return _block(order, 0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1))


def _idb(order: str, linktype: int, tsresol: int | None = None) -> bytes:
    opts = b""
    if tsresol is not None:
        opts = struct.pack(order + "HH", 9, 1) + bytes([tsresol, 0, 0, 0])
        opts += struct.pack(order + "HH", 0, 0)
    return _block(order, 1, struct.pack(order + "HHI", linktype, 0, 65535) + opts)


def _epb(order: str, iface: int, ts: int, data: bytes) -> bytes:
    return _block(order, 6, struct.pack(order + "IIIII", iface, ts >> 32, ts & 0xFFFFFFFF,
                                        len(data), len(data)) + data)


@pytest.mark.parametrize("order", ["<", ">"])
def test_hand_built_pcapng_sections_resolutions_and_skipped_blocks(order):
    raw_ip = FRAMES[0][14:]
    data = (_shb(order) + _idb(order, LINKTYPE_ETHERNET, tsresol=9)
            + _block(order, 4, b"\0\0\0\0")  # a name resolution block: skipped
            + _epb(order, 0, 1_700_000_000 * 10**9 + 987_654_321, FRAMES[0])
            + _block(order, 3, struct.pack(order + "I", len(FRAMES[1])) + FRAMES[1])
            + _block(order, 5, bytes(12))  # interface statistics: skipped
            # A second section in the other byte order: interface ids start again.
            + _shb(">" if order == "<" else "<")
            + _idb(">" if order == "<" else "<", LINKTYPE_ETHERNET)
            + _epb(">" if order == "<" else "<", 0, 5_000_001, FRAMES[2]))
    reader = open_capture(io.BufferedReader(io.BytesIO(data)))
    assert reader.linktype == LINKTYPE_ETHERNET and reader.nanosecond
    recs = list(reader)
    assert [r.data for r in recs] == FRAMES[:3]
    assert (recs[0].ts_sec, recs[0].ts_frac) == (1_700_000_000, 987_654_321)
    assert (recs[2].ts_sec, recs[2].ts_frac) == (5, 1000)  # microseconds, shown in ns
    mixed = _shb(order) + _idb(order, LINKTYPE_ETHERNET) + _idb(order, LINKTYPE_RAW) + \
        _epb(order, 1, 0, raw_ip)
    with pytest.raises(PcapError, match="mixes link types"):
        list(open_capture(io.BufferedReader(io.BytesIO(mixed))))


@pytest.mark.parametrize("cut", [4, 9, 30, 50])
def test_damaged_pcapng_is_a_pcap_error(cut):
    good = _shb("<") + _idb("<", LINKTYPE_ETHERNET) + _epb("<", 0, 0, FRAMES[0])
    with pytest.raises(PcapError):
        list(open_capture(io.BufferedReader(io.BytesIO(good[:-cut]))))
    undeclared = _shb("<") + _idb("<", LINKTYPE_ETHERNET) + _epb("<", 3, 0, FRAMES[0])
    with pytest.raises(PcapError, match="undeclared interface"):
        list(open_capture(io.BufferedReader(io.BytesIO(undeclared))))


@given(st.binary(max_size=300))
def test_random_bytes_after_a_section_header_only_give_pcap_errors(tail):
    data = _shb("<") + _idb("<", LINKTYPE_ETHERNET) + tail
    try:
        for _ in open_capture(io.BufferedReader(io.BytesIO(data))):
            pass
    except PcapError:
        pass


@pytest.mark.parametrize("content", [b"", b"\xd4\xc3", b"GIF89a" + bytes(30), bytes(24)])
def test_other_content_is_not_a_pcap_file(content):
    with pytest.raises(PcapError, match=r"^not a pcap file$"):
        PcapReader(io.BytesIO(content))


def test_truncated_file_header_record_header_and_data_are_reported():
    data = _written(FRAMES[:2])
    with pytest.raises(PcapError, match="truncated pcap file header"):
        PcapReader(io.BytesIO(data[:20]))
    first_end = 24 + 16 + len(FRAMES[0])
    with pytest.raises(PcapError, match="truncated pcap record header"):
        list(PcapReader(io.BytesIO(data[: first_end + 5])))
    with pytest.raises(PcapError, match="truncated pcap record data"):
        list(PcapReader(io.BytesIO(data[:-1])))
    assert isinstance(PcapError("x"), PacketError)


def test_absurd_record_length_is_reported_not_allocated():
    data = bytearray(_written(FRAMES[:1]))
    struct.pack_into("<I", data, 24 + 8, 0x7FFFFFFF)
    with pytest.raises(PcapError, match="damaged"):
        list(PcapReader(io.BytesIO(bytes(data))))


def test_writer_rejects_bad_timestamps():
    writer = PcapWriter(io.BytesIO())
    with pytest.raises(ValueError):
        writer.write(b"x", ts_frac=1_000_000)
    ns = PcapWriter(io.BytesIO(), nanosecond=True)
    ns.write(b"x", ts_frac=999_999_999)


# --- finding the IPv4 packet ------------------------------------------------------------


def test_ip_packet_of_each_link_type():
    ip = raw(IP(src="10.0.0.1", dst="10.0.0.2") / UDP())
    eth = raw(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(ip))
    tagged = raw(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / Dot1Q(vlan=7) / IP(ip))
    sll = bytes(14) + b"\x08\x00" + ip
    sll2 = b"\x08\x00" + bytes(18) + ip
    assert ip_packet_of(eth, LINKTYPE_ETHERNET) == (eth[:14], 14)
    assert ip_packet_of(tagged, LINKTYPE_ETHERNET) == (tagged[:18], 18)
    assert ip_packet_of(ip, LINKTYPE_RAW) == (b"", 0)
    assert ip_packet_of(ip, LINKTYPE_IPV4) == (b"", 0)
    assert ip_packet_of(sll, LINKTYPE_LINUX_SLL) == (sll[:16], 16)
    assert ip_packet_of(sll2, LINKTYPE_LINUX_SLL2) == (sll2[:20], 20)


def test_ip_packet_of_rejects_non_ipv4():
    with pytest.raises(PcapError, match="not IPv4"):
        ip_packet_of(raw(Ether() / IPv6()), LINKTYPE_ETHERNET)
    with pytest.raises(PcapError):
        ip_packet_of(raw(IPv6()), LINKTYPE_RAW)
    with pytest.raises(PcapError, match="link type"):
        ip_packet_of(raw(IP()), 147)
    with pytest.raises(PacketError):
        ip_packet_of(b"\x00" * 10, LINKTYPE_ETHERNET)
