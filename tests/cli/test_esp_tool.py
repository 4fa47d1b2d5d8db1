"""`espswitch esp decrypt|encrypt` against scapy's independent ESP implementation.

Every test runs the installed `espswitch` console script in a subprocess, as a user would.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Packet, Raw
from scapy.utils import RawPcapReader, wrpcap

SPI = 0x1234ABCD
MAC_A = "02:00:00:00:00:0a"
MAC_B = "02:00:00:00:00:0b"

# Distinctive keys (no long runs of one digit) so that a leak is found by a substring search.
K16 = bytes.fromhex("8f3a61c2d94e07b5a1f6c83e52d07b94")
K32 = bytes.fromhex("5c9e2f71a8d34b06e1c7f95a3d2b8064c1f7e39a52d6b0847e3c9f15a6d2b873")
SALT = bytes.fromhex("c3e5a7f1")
HMAC32 = bytes.fromhex("e4b7c2a9f5d1368b0c7e2f94a6d3b158f2c9e7a4b1d6038c5e9f2a7b4c1d8e63")

# Our transform name, our keymat (RFC 7296 order), scapy's algorithms and keys.
CASES = {
    "aes128gcm16": (K16 + SALT, dict(crypt_algo="AES-GCM", crypt_key=K16 + SALT)),
    "aes256gcm16": (K32 + SALT, dict(crypt_algo="AES-GCM", crypt_key=K32 + SALT)),
    "chacha20poly1305": (K32 + SALT, dict(crypt_algo="CHACHA20-POLY1305",
                                          crypt_key=K32 + SALT)),
    "aes128-sha256": (K16 + HMAC32, dict(crypt_algo="AES-CBC", crypt_key=K16,
                                         auth_algo="SHA2-256-128", auth_key=HMAC32)),
}


def _espswitch() -> list[str]:
    exe = shutil.which("espswitch")
    return [exe] if exe else [sys.executable, "-m", "espswitch.cli.main"]


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*_espswitch(), *map(str, args)], capture_output=True, text=True,
                          timeout=60, check=False)


def esp_args(cmd: str, transform: str, keymat: bytes, *extra: str | Path,
             spi: int = SPI) -> list[str | Path]:
    return ["esp", cmd, "--esp", transform, "--spi", hex(spi), "--key", keymat.hex(), *extra]


def frames(path: Path) -> list[bytes]:
    return [data for data, _meta in RawPcapReader(str(path))]


def write(path: Path, pkts: list[bytes | Packet]) -> Path:
    wrpcap(str(path), [Ether(p) if isinstance(p, bytes) else p for p in pkts])
    return path


def originals() -> list[bytes]:
    """Ethernet/IPv4 frames of several sizes and protocols, with correct checksums."""
    eth = Ether(src=MAC_A, dst=MAC_B)
    pkts = [
        eth / IP(src="10.0.0.1", dst="10.0.0.2", id=7) / UDP(sport=1234, dport=4789) / Raw(b"v"),
        eth / IP(src="10.0.0.1", dst="10.0.0.2", id=8, flags="DF") / ICMP(id=3, seq=1)
        / Raw(bytes(range(200))),
        eth / IP(src="10.0.0.2", dst="10.0.0.1", ttl=17, tos=0x28) / UDP(sport=9, dport=53)
        / Raw(b"\xa5" * 1400),
    ]
    return [bytes(p) for p in pkts]


def scapy_sa(transform: str, **kw: object) -> SecurityAssociation:
    base = transform.removesuffix("-esn")
    return SecurityAssociation(ESP, spi=kw.pop("spi", SPI), **CASES[base][1], **kw)


def scapy_protect(sa: SecurityAssociation, frame: bytes, **kw: object) -> bytes:
    eth = Ether(frame)
    return bytes(Ether(src=eth.src, dst=eth.dst) / sa.encrypt(eth[IP], **kw))


def check_clean(proc: subprocess.CompletedProcess[str], keymat: bytes) -> None:
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out
    for text in (keymat.hex(), keymat.hex().upper(), keymat.hex(":")):
        assert text not in out


# -- decrypt what scapy protected --------------------------------------------------------


@pytest.mark.parametrize(
    ("transform", "esn_high"),
    [
        ("aes128gcm16", 0),
        ("aes256gcm16", 0),
        ("chacha20poly1305", 0),
        ("aes128-sha256", 0),
        ("chacha20poly1305-esn", 3),
        ("aes128gcm16-esn", 1),
        ("aes128-sha256-esn", 0x10000),
    ],
)
def test_decrypt_restores_the_packets_scapy_protected(tmp_path: Path, transform: str,
                                                       esn_high: int) -> None:
    keymat = CASES[transform.removesuffix("-esn")][0]
    esn = dict(esn_en=True, esn=esn_high) if esn_high else {}
    sa = scapy_sa(transform, seq_num=5, **esn)
    other_sa = scapy_sa(transform, spi=SPI + 1, **esn)
    orig = originals()
    arp = bytes(Ether(src=MAC_A, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="10.0.0.1"))
    other = scapy_protect(other_sa, orig[0])
    capture = [scapy_protect(sa, f) for f in orig] + [arp, other]
    src = write(tmp_path / "in.pcap", capture)
    out = tmp_path / "out.pcap"
    extra = ["--esn-high", str(esn_high)] if esn_high else []
    proc = run(*esp_args("decrypt", transform, keymat, *extra, src, out))
    check_clean(proc, keymat)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.strip() == f"decrypted 3 of 3 ESP packets for SPI 0x{SPI:08x}; 0 failed"
    # Non-ESP frames and ESP of another SPI are copied unchanged.
    assert frames(out) == [*orig, arp, other]


@pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark")
def test_decrypt_reads_the_pcapng_tshark_writes(tmp_path: Path) -> None:
    """tshark and dumpcap write pcapng unless told otherwise: a capture re-written by tshark
    decrypts to the same packets; the output is a classic pcap."""
    keymat = CASES["aes128gcm16"][0]
    sa = scapy_sa("aes128gcm16", seq_num=9)
    orig = originals()
    src = write(tmp_path / "in.pcap", [scapy_protect(sa, f) for f in orig])
    ng = tmp_path / "in.pcapng"
    subprocess.run(["tshark", "-r", str(src), "-w", str(ng)], check=True, timeout=60,
                   capture_output=True)
    assert ng.read_bytes()[:4] == b"\x0a\x0d\x0d\x0a"  # really pcapng
    out = tmp_path / "out.pcap"
    proc = run(*esp_args("decrypt", "aes128gcm16", keymat, ng, out))
    check_clean(proc, keymat)
    assert proc.returncode == 0, proc.stderr
    assert frames(out) == orig


def test_decrypt_infers_the_esn_high_half_across_a_rollover(tmp_path: Path) -> None:
    keymat = CASES["aes256gcm16"][0]
    orig = originals()
    before = scapy_sa("aes256gcm16", seq_num=0xFFFFFFFF, esn_en=True, esn=7)
    after = scapy_sa("aes256gcm16", seq_num=0, esn_en=True, esn=8)
    capture = [scapy_protect(before, orig[0]), scapy_protect(after, orig[1]),
               scapy_protect(after, orig[2])]
    src = write(tmp_path / "in.pcap", capture)
    out = tmp_path / "out.pcap"
    proc = run(*esp_args("decrypt", "aes256gcm16-esn", keymat, "--esn-high", "7", src, out))
    assert proc.returncode == 0, proc.stderr
    assert frames(out) == orig


def test_decrypt_with_the_wrong_esn_high_half_fails_authentication(tmp_path: Path) -> None:
    keymat = CASES["chacha20poly1305"][0]
    sa = scapy_sa("chacha20poly1305", esn_en=True, esn=2)
    src = write(tmp_path / "in.pcap", [scapy_protect(sa, f) for f in originals()])
    out = tmp_path / "out.pcap"
    proc = run(*esp_args("decrypt", "chacha20poly1305-esn", keymat, "--esn-high", "1", src, out))
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"packet {n}: integrity check failed" for n in (1, 2, 3)]


def test_decrypt_tunnel_mode_gives_the_inner_packets(tmp_path: Path) -> None:
    keymat = CASES["aes128gcm16"][0]
    sa = scapy_sa("aes128gcm16", tunnel_header=IP(src="192.0.2.1", dst="192.0.2.2"))
    orig = originals()
    v6 = bytes(Ether(src=MAC_A, dst=MAC_B) / IPv6(src="2001:db8::1", dst="2001:db8::2")
               / UDP(sport=1, dport=2) / Raw(b"six"))
    capture = [scapy_protect(sa, f) for f in orig]
    # scapy's tunnel mode wraps IPv6 too; the outer Ethernet header says IPv4.
    inner6 = IPv6(v6[14:])
    capture.append(bytes(Ether(src=MAC_A, dst=MAC_B) / sa.encrypt(inner6)))
    src = write(tmp_path / "in.pcap", capture)
    out = tmp_path / "out.pcap"
    proc = run(*esp_args("decrypt", "aes128gcm16", keymat, "--mode", "tunnel", src, out))
    assert proc.returncode == 0, proc.stderr
    # The IPv6 inner packet gets the IPv6 ethertype back.
    assert frames(out) == [*orig, v6]


def test_decrypt_handles_udp_encapsulation_and_skips_ike_and_keepalives(tmp_path: Path) -> None:
    keymat = CASES["aes128-sha256"][0]
    sa = scapy_sa("aes128-sha256", nat_t_header=UDP(sport=4500, dport=4500))
    orig = originals()
    eth_ip = Ether(src=MAC_A, dst=MAC_B) / IP(src="192.0.2.1", dst="192.0.2.2")
    ike = bytes(eth_ip / UDP(sport=4500, dport=4500) / Raw(b"\0\0\0\0" + b"IKE" * 10))
    keepalive = bytes(eth_ip / UDP(sport=4500, dport=4500) / Raw(b"\xff"))
    capture = [scapy_protect(sa, orig[0]), ike, scapy_protect(sa, orig[1]), keepalive,
               scapy_protect(sa, orig[2])]
    assert Ether(capture[0])[IP].proto == 17
    src = write(tmp_path / "in.pcap", capture)
    out = tmp_path / "out.pcap"
    proc = run(*esp_args("decrypt", "aes128-sha256", keymat, src, out))
    assert proc.returncode == 0, proc.stderr
    assert "decrypted 3 of 3 ESP packets" in proc.stdout
    assert frames(out) == [orig[0], ike, orig[1], keepalive, orig[2]]


def test_tampered_packet_is_reported_and_not_written_decrypted(tmp_path: Path) -> None:
    keymat = CASES["chacha20poly1305"][0]
    sa = scapy_sa("chacha20poly1305")
    orig = originals()
    capture = [scapy_protect(sa, f) for f in orig]
    tampered = bytearray(capture[1])
    tampered[60] ^= 0x01  # inside the ciphertext
    capture[1] = bytes(tampered)
    src = write(tmp_path / "in.pcap", capture)
    out = tmp_path / "out.pcap"
    proc = run(*esp_args("decrypt", "chacha20poly1305", keymat, src, out))
    check_clean(proc, keymat)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == ["packet 2: integrity check failed"]
    assert proc.stdout.strip() == f"decrypted 2 of 3 ESP packets for SPI 0x{SPI:08x}; 1 failed"
    written = frames(out)
    assert written[0] == orig[0] and written[2] == orig[2]
    # The failed packet is left as it was captured: encrypted, nothing of it decrypted.
    assert written[1] == capture[1]


def test_wrong_key_fails_every_packet(tmp_path: Path) -> None:
    sa = scapy_sa("aes128gcm16")
    src = write(tmp_path / "in.pcap", [scapy_protect(sa, f) for f in originals()])
    wrong = bytes(reversed(CASES["aes128gcm16"][0]))
    proc = run(*esp_args("decrypt", "aes128gcm16", wrong, src, tmp_path / "out.pcap"))
    assert proc.returncode == 1
    assert "decrypted 0 of 3" in proc.stdout
    assert len(proc.stderr.splitlines()) == 3


# -- encrypt -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("transform", "extra"),
    [
        ("aes128gcm16", []),
        ("chacha20poly1305-esn", ["--esn-high", "2", "--seq", "0xfffffffe"]),
        ("aes128-sha256", ["--udp-encap"]),
        ("aes256gcm16", ["--mode", "tunnel"]),
        ("chacha20poly1305", ["--mode", "tunnel", "--udp-encap", "--tunnel-src", "192.0.2.7",
                              "--tunnel-dst", "192.0.2.8"]),
    ],
)
def test_encrypt_then_decrypt_round_trips(tmp_path: Path, transform: str,
                                          extra: list[str]) -> None:
    keymat = CASES[transform.removesuffix("-esn")][0]
    orig = originals()
    src = write(tmp_path / "in.pcap", orig)
    enc = tmp_path / "enc.pcap"
    dec = tmp_path / "dec.pcap"
    proc = run(*esp_args("encrypt", transform, keymat, *extra, src, enc))
    check_clean(proc, keymat)
    assert proc.returncode == 0, proc.stderr
    encrypted = frames(enc)
    assert all(f not in e for f, e in zip(orig, encrypted, strict=True))
    dec_extra = [a for a in extra if a not in ("--seq", "0xfffffffe")]
    dec_extra = [a for a in dec_extra if not a.startswith(("--tunnel", "192.0.2"))]
    proc = run(*esp_args("decrypt", transform, keymat, *dec_extra, enc, dec))
    check_clean(proc, keymat)
    assert proc.returncode == 0, proc.stderr
    assert frames(dec) == orig


def test_encrypt_output_is_decrypted_by_scapy_with_the_given_sequence_numbers(
        tmp_path: Path) -> None:
    keymat = CASES["aes128-sha256"][0]
    orig = originals()
    src = write(tmp_path / "in.pcap", orig)
    enc = tmp_path / "enc.pcap"
    proc = run(*esp_args("encrypt", "aes128-sha256-esn", keymat, "--esn-high", "4",
                         "--seq", "41", src, enc))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        f"encrypted 3 of 3 IPv4 packets with SPI 0x{SPI:08x}; 0 failed")
    sa = scapy_sa("aes128-sha256", esn_en=True, esn=4)
    for n, (frame, plain) in enumerate(zip(frames(enc), orig, strict=True)):
        ip = Ether(frame)[IP]
        assert ip.proto == 50
        assert ip[ESP].spi == SPI and ip[ESP].seq == 41 + n
        assert bytes(sa.decrypt(ip)) == plain[14:]


def test_encrypt_tunnel_output_is_decrypted_by_scapy(tmp_path: Path) -> None:
    keymat = CASES["chacha20poly1305"][0]
    orig = originals()
    src = write(tmp_path / "in.pcap", orig)
    enc = tmp_path / "enc.pcap"
    proc = run(*esp_args("encrypt", "chacha20poly1305", keymat, "--mode", "tunnel",
                         "--tunnel-src", "198.51.100.1", src, enc))
    assert proc.returncode == 0, proc.stderr
    sa = scapy_sa("chacha20poly1305", tunnel_header=IP(src="198.51.100.1", dst="10.0.0.2"))
    for frame, plain in zip(frames(enc), orig, strict=True):
        outer = Ether(frame)[IP]
        # The outer source is the one given, the destination the packet's own.
        assert outer.src == "198.51.100.1" and outer.dst == IP(plain[14:]).dst
        assert IP(bytes(outer)).chksum == outer.chksum
        assert bytes(sa.decrypt(outer)) == plain[14:]


def test_encrypt_copies_non_ip_frames_unchanged(tmp_path: Path) -> None:
    keymat = CASES["aes128gcm16"][0]
    arp = bytes(Ether(src=MAC_A, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="10.0.0.1"))
    src = write(tmp_path / "in.pcap", [arp, originals()[0]])
    enc = tmp_path / "enc.pcap"
    proc = run(*esp_args("encrypt", "aes128gcm16", keymat, src, enc))
    assert proc.returncode == 0, proc.stderr
    assert "encrypted 1 of 1" in proc.stdout
    out = frames(enc)
    assert out[0] == arp and Ether(out[1])[IP].proto == 50


# -- usage errors ------------------------------------------------------------------------

GCM_KEY = CASES["aes128gcm16"][0]


def _bad_args(tmp_path: Path) -> dict[str, tuple[list[str | Path], str]]:
    good = write(tmp_path / "good.pcap", originals())
    text = tmp_path / "notes.txt"
    text.write_text("this is not a capture\n" * 4)
    pcapng = tmp_path / "capture.pcapng"
    pcapng.write_bytes(struct.pack("<II", 0x0A0D0D0A, 28) + b"\x4d\x3c\x2b\x1a" + bytes(40))
    damaged = tmp_path / "damaged.pcap"
    damaged.write_bytes(good.read_bytes()[:-10])  # the last record is cut short
    out = tmp_path / "out.pcap"
    return {
        "bad key length": (esp_args("decrypt", "aes128gcm16", GCM_KEY[:16], good, out),
                           "20 bytes"),
        "non-hex key": (["esp", "decrypt", "--esp", "aes128gcm16", "--spi", "256", "--key",
                         GCM_KEY.hex()[:-2] + "zz", good, out], "not hex"),
        "unknown transform": (esp_args("decrypt", "aes-rot13", GCM_KEY, good, out),
                              "chacha20poly1305"),
        "missing file": (esp_args("decrypt", "aes128gcm16", GCM_KEY, tmp_path / "nope.pcap",
                                  out), "no such file"),
        "text file": (esp_args("encrypt", "aes128gcm16", GCM_KEY, text, out),
                      "not a pcap file"),
        "damaged pcapng": (esp_args("decrypt", "aes128gcm16", GCM_KEY, pcapng, out), "damaged"),
        # The output was started when the damage is found: no half-written file is left.
        "damaged pcap": (esp_args("encrypt", "aes128gcm16", GCM_KEY, damaged, out),
                         "truncated pcap record"),
        "missing --spi": (["esp", "decrypt", "--esp", "aes128gcm16", "--key", GCM_KEY.hex(),
                           good, out], "--spi"),
        "spi zero": (esp_args("decrypt", "aes128gcm16", GCM_KEY, good, out, spi=0), "SPI"),
        "esn-high without esn": (esp_args("decrypt", "aes128gcm16", GCM_KEY, "--esn-high",
                                          "1", good, out), "-esn"),
        "unwritable output": (esp_args("encrypt", "aes128gcm16", GCM_KEY, good,
                                       tmp_path / "no-such-dir" / "out.pcap"),
                              "cannot write"),
    }


BAD_CASES = ["bad key length", "non-hex key", "unknown transform", "missing file", "text file",
             "damaged pcapng", "damaged pcap", "missing --spi", "spi zero", "esn-high without esn",
             "unwritable output"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_arguments_give_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    args, expected = _bad_args(tmp_path)[case]
    proc = run(*args)
    check_clean(proc, GCM_KEY)
    assert GCM_KEY.hex()[:-2] not in proc.stderr
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert expected in lines[0]
    assert not (tmp_path / "out.pcap").exists()


def test_key_with_prefix_and_colons_is_accepted_and_not_echoed(tmp_path: Path) -> None:
    keymat = CASES["aes128gcm16"][0]
    sa = scapy_sa("aes128gcm16")
    orig = originals()
    src = write(tmp_path / "in.pcap", [scapy_protect(sa, f) for f in orig])
    out = tmp_path / "out.pcap"
    proc = run("esp", "decrypt", "--esp", "aes128gcm16", "--spi", str(SPI), "--key",
               "0x" + keymat.hex(":"), src, out)
    check_clean(proc, keymat)
    assert proc.returncode == 0, proc.stderr
    assert frames(out) == orig
