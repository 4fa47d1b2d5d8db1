"""ESP interop with tshark (Wireshark's dissector) as an independent decoder.

espswitch's OutboundSA protects UDP 4789/VXLAN/Ethernet/IPv4/ICMP echo packets; they go into
an Ethernet pcap, and tshark, given the same SA in its `esp_sa` table, must verify the ICV,
decrypt them and find the VXLAN VNI and the inner ICMP echo request. Negative controls with
wrong keys show that a passing run means tshark really used the keys.

tshark 4.0 has neither ESN nor ChaCha20-Poly1305, so only aes128gcm16 and aes128-sha256
without ESN are checked here (test_interop_scapy.py covers every transform).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw, raw
from scapy.utils import wrpcap

from espswitch.ipsec import OutboundSA, SaParams

TSHARK = shutil.which("tshark")
pytestmark = pytest.mark.skipif(TSHARK is None, reason="tshark is not installed")

SRC, DST = "192.0.2.1", "192.0.2.2"
TUNNEL_SRC, TUNNEL_DST = "198.51.100.1", "198.51.100.2"
VNI = 5001
SEQ_START = 1000
N_PACKETS = 5

FIELDS = ("esp.spi", "esp.sequence", "esp.icv_good", "esp.protocol", "esp.pad_len", "esp.pad",
          "vxlan.vni", "icmp.type")


@dataclass(frozen=True)
class TsharkSa:
    """One transform as espswitch names it and as tshark's esp_sa table spells it."""

    transform: str
    spi: int
    enc_key: bytes  # for GCM: the 16-byte key followed by the 4-byte salt, as tshark wants it
    tshark_enc: str
    integ_key: bytes
    tshark_auth: str
    block: int  # what the encrypted part (payload .. next header) is a multiple of

    def keymat(self) -> bytes:
        return self.enc_key + self.integ_key  # RFC 7296: encryption key (+ salt), integrity key


GCM = TsharkSa("aes128gcm16", 0x00001001,
               bytes.fromhex("00112233445566778899aabbccddeeff") + bytes.fromhex("cafebabe"),
               "AES-GCM with 16 octet ICV [RFC4106]", b"", "NULL", 4)
CBC = TsharkSa("aes128-sha256", 0x00001002,
               bytes.fromhex("0f0e0d0c0b0a09080706050403020100"),
               "AES-CBC [RFC3602]",
               bytes(range(0x40, 0x60)), "HMAC-SHA-256-128 [RFC4868]", 16)
SAS = {"aes128gcm16": GCM, "aes128-sha256": CBC}


def _ip4(text: str) -> bytes:
    return bytes(int(x) for x in text.split("."))


def vxlan_packet(i: int) -> bytes:
    """IPv4/UDP 4789/VXLAN(5001)/Ethernet/IPv4/ICMP echo request; sizes vary the padding."""
    return raw(IP(src=SRC, dst=DST, id=0x100 + i)
               / UDP(sport=50000 + i, dport=4789)
               / VXLAN(vni=VNI)
               / Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
               / IP(src="10.0.0.1", dst="10.0.0.2")
               / ICMP(type=8, id=0x77, seq=i)
               / Raw(b"espswitch" * i + bytes(i)))


def protected_capture(sa: TsharkSa, mode: str, path: Path) -> list[bytes]:
    """Protect N_PACKETS packets with espswitch, write them as an Ethernet pcap."""
    out = OutboundSA(SaParams(spi=sa.spi, transform=sa.transform, keymat=sa.keymat(), mode=mode,
                              tunnel_src=_ip4(TUNNEL_SRC), tunnel_dst=_ip4(TUNNEL_DST)),
                     seq_start=SEQ_START)
    wires = [bytes(out.protect(vxlan_packet(i))) for i in range(N_PACKETS)]
    eth = raw(Ether(src="02:00:00:00:01:01", dst="02:00:00:00:01:02", type=0x0800))
    wrpcap(str(path), [Ether(eth + w) for w in wires])
    return wires


def uat(sa: TsharkSa, mode: str, enc_key: bytes | None = None,
        integ_key: bytes | None = None) -> str:
    src, dst = (TUNNEL_SRC, TUNNEL_DST) if mode == "tunnel" else (SRC, DST)
    enc = sa.enc_key if enc_key is None else enc_key
    integ = sa.integ_key if integ_key is None else integ_key
    fields = ["IPv4", src, dst, f"0x{sa.spi:08x}", sa.tshark_enc, "0x" + enc.hex(),
              sa.tshark_auth, "0x" + integ.hex() if integ else ""]
    return "uat:esp_sa:" + ",".join(f'"{f}"' for f in fields)


def tshark_rows(pcap: Path, esp_sa: str) -> list[dict[str, str]]:
    """Run tshark on the capture with one ESP SA; one dict of FIELDS per packet."""
    cmd = [TSHARK, "-n", "-o", "esp.enable_encryption_decode:TRUE",
           "-o", "esp.enable_authentication_check:TRUE", "-o", esp_sa,
           "-r", str(pcap), "-T", "fields", "-E", "occurrence=l"]
    for f in FIELDS:
        cmd += ["-e", f]
    # tshark warns on stderr when run as root; only stdout matters.
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         timeout=60, check=True)
    rows = [dict(zip(FIELDS, line.split("\t"), strict=True))
            for line in res.stdout.splitlines()]
    assert len(rows) == N_PACKETS, res.stdout
    return rows


def is_true(value: str) -> bool:
    return value in ("1", "True")


CASES = [(name, mode) for name in SAS for mode in ("transport", "tunnel")]
IDS = [f"{name}-{mode}" for name, mode in CASES]


@pytest.mark.parametrize(("name", "mode"), CASES, ids=IDS)
def test_tshark_verifies_and_decodes_espswitch_packets(tmp_path, name, mode):
    sa = SAS[name]
    pcap = tmp_path / "capture.pcap"
    wires = protected_capture(sa, mode, pcap)
    rows = tshark_rows(pcap, uat(sa, mode))
    for i, row in enumerate(rows):
        assert int(row["esp.spi"], 16) == sa.spi, row
        assert int(row["esp.sequence"]) == SEQ_START + i, row
        assert is_true(row["esp.icv_good"]), row
        assert int(row["esp.protocol"], 0) == (4 if mode == "tunnel" else 17), row
        assert row["vxlan.vni"] == str(VNI), row
        assert row["icmp.type"] == "8", row
        # RFC 4303 §2.4: padding bytes are 1, 2, 3, ...; the encrypted part is block-aligned.
        pad_len = int(row["esp.pad_len"])
        assert row["esp.pad"].replace(":", "") == bytes(range(1, pad_len + 1)).hex(), row
        inner_len = len(vxlan_packet(i)) - (0 if mode == "tunnel" else 20)
        assert (inner_len + pad_len + 2) % sa.block == 0, row
        overhead = 20 + 8 + (16 if sa is CBC else 8) + 16  # IPv4, SPI+seq, IV, ICV
        assert len(wires[i]) == inner_len + pad_len + 2 + overhead


@pytest.mark.parametrize("name", list(SAS))
def test_tshark_cannot_decode_with_a_wrong_encryption_key(tmp_path, name):
    sa = SAS[name]
    pcap = tmp_path / "capture.pcap"
    protected_capture(sa, "transport", pcap)
    wrong = bytes(b ^ 0x5A for b in sa.enc_key)
    rows = tshark_rows(pcap, uat(sa, "transport", enc_key=wrong))
    for row in rows:
        # With CBC and random IVs the garbage's "next header" is 50 once in 256 packets:
        # tshark then dissects the garbage as ESP again, and the last SPI is the garbage's.
        assert int(row["esp.spi"], 16) == sa.spi or int(row["esp.protocol"], 0) == 50, row
        assert row["vxlan.vni"] == "", row
        assert row["icmp.type"] == "", row
        if sa is GCM:  # GCM's tag depends on the key; CBC's ICV only on the integrity key
            assert not is_true(row["esp.icv_good"]), row


def test_tshark_flags_the_icv_with_a_wrong_integrity_key(tmp_path):
    pcap = tmp_path / "capture.pcap"
    protected_capture(CBC, "transport", pcap)
    wrong = bytes(b ^ 0x01 for b in CBC.integ_key)
    rows = tshark_rows(pcap, uat(CBC, "transport", integ_key=wrong))
    for row in rows:
        assert not is_true(row["esp.icv_good"]), row
        assert row["vxlan.vni"] == str(VNI), row  # decryption itself still works


@pytest.mark.parametrize("name", list(SAS))
def test_tshark_flags_the_icv_of_a_tampered_packet(tmp_path, name):
    sa = SAS[name]
    pcap = tmp_path / "capture.pcap"
    wires = protected_capture(sa, "transport", pcap)
    # Flip one bit of the ciphertext of the middle packet and rewrite the capture.
    victim = bytearray(wires[2])
    victim[20 + 8 + 16 + 3] ^= 0x10
    wires[2] = bytes(victim)
    eth = raw(Ether(src="02:00:00:00:01:01", dst="02:00:00:00:01:02", type=0x0800))
    wrpcap(str(pcap), [Ether(eth + w) for w in wires])
    rows = tshark_rows(pcap, uat(sa, "transport"))
    assert [is_true(r["esp.icv_good"]) for r in rows] == [True, True, False, True, True]
