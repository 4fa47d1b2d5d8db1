"""ESP interop with scapy's independent implementation (scapy.layers.ipsec).

Every transform, in transport and tunnel mode, with and without extended sequence numbers,
both ways: scapy encrypts and espswitch's InboundSA must give back the exact original packet;
espswitch's OutboundSA protects and scapy must decrypt (checking the ICV) to the same packet.
The ESN cases start just below 2^32 so the sequence number's high half changes mid-test and
really goes into the ICV; separate tests check that a wrong high half fails the ICV.

The key lengths and scapy algorithm names below are written out here, not taken from the
engine, so that a wrong key split in the engine shows up as a mismatch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.ipsec import ESP, IPSecIntegrityError, SecurityAssociation
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw, raw
from scapy.utils import checksum

from espswitch.ipsec import (
    TRANSFORM_NAMES,
    DropReason,
    EspDrop,
    InboundSA,
    OutboundSA,
    SaParams,
)

SEQ32 = (1 << 32) - 1
OUTER_SRC, OUTER_DST = "192.0.2.1", "192.0.2.2"
TUNNEL_SRC, TUNNEL_DST = "198.51.100.1", "198.51.100.2"
ESN_HIGH = 7  # the high half of the first ESN sequence number; it becomes 8 mid-test


@dataclass(frozen=True)
class Algo:
    """How scapy spells one espswitch transform, and its key lengths (RFC 7296 KEYMAT)."""

    crypt: str
    enc_key_len: int
    salt_len: int
    auth: str | None
    integ_key_len: int


ALGOS = {
    "aes128gcm16": Algo("AES-GCM", 16, 4, None, 0),
    "aes192gcm16": Algo("AES-GCM", 24, 4, None, 0),
    "aes256gcm16": Algo("AES-GCM", 32, 4, None, 0),
    "chacha20poly1305": Algo("CHACHA20-POLY1305", 32, 4, None, 0),
    "aes128-sha256": Algo("AES-CBC", 16, 0, "SHA2-256-128", 32),
    "aes256-sha256": Algo("AES-CBC", 32, 0, "SHA2-256-128", 32),
    "aes128-sha1": Algo("AES-CBC", 16, 0, "HMAC-SHA1-96", 20),
    "null-sha256": Algo("NULL", 0, 0, "SHA2-256-128", 32),
}


@dataclass(frozen=True)
class Case:
    name: str
    mode: str
    esn: bool

    @property
    def id(self) -> str:
        return f"{self.name}-{self.mode}-{'esn' if self.esn else 'noesn'}"

    @property
    def proposal(self) -> str:
        return self.name + ("-esn" if self.esn else "")


CASES = [
    Case(name, mode, esn)
    for name in ALGOS
    for mode in ("transport", "tunnel")
    for esn in (False, True)
]


def _bytes(label: str, n: int) -> bytes:
    out = b""
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{label}/{counter}".encode()).digest()
        counter += 1
    return out[:n]


def keys(name: str) -> tuple[bytes, bytes, bytes]:
    """(encryption key, salt, integrity key) for a transform, fixed per name."""
    a = ALGOS[name]
    return (_bytes(name + "/enc", a.enc_key_len), _bytes(name + "/salt", a.salt_len),
            _bytes(name + "/integ", a.integ_key_len))


def spi_of(case: Case) -> int:
    return 0x10000 + CASES.index(case) if case in CASES else 0x20000


def espswitch_params(case: Case, spi: int) -> SaParams:
    enc, salt, integ = keys(case.name)
    return SaParams(spi=spi, transform=case.proposal, keymat=enc + salt + integ, mode=case.mode,
                    tunnel_src=bytes(map(int, TUNNEL_SRC.split("."))),
                    tunnel_dst=bytes(map(int, TUNNEL_DST.split("."))))


def scapy_sa(case: Case, spi: int) -> SecurityAssociation:
    a = ALGOS[case.name]
    enc, salt, integ = keys(case.name)
    return SecurityAssociation(
        ESP, spi=spi,
        crypt_algo=a.crypt, crypt_key=(enc + salt) or None,
        auth_algo=a.auth, auth_key=integ or None,
        tunnel_header=IP(src=TUNNEL_SRC, dst=TUNNEL_DST) if case.mode == "tunnel" else None,
        esn_en=case.esn, esn=0)


def sequence_numbers(case: Case) -> list[int]:
    """Full (64-bit with ESN) sequence numbers of the packets of one case."""
    if case.esn:
        first = (ESN_HIGH << 32) | (SEQ32 - 1)
        return [first + i for i in range(4)]  # low halves ffff_fffe, ffff_ffff, 0, 1
    return [1, 2, 3, 4]


def vxlan_packet(i: int) -> bytes:
    """IPv4/UDP 4789/VXLAN/Ethernet/IPv4/ICMP echo; payload lengths vary so padding varies."""
    inner = (Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
             / IP(src="10.0.0.1", dst="10.0.0.2", id=100 + i)
             / ICMP(type=8, id=0x4242, seq=i)
             / Raw(bytes(range(i * 5 + (i % 3)))))
    pkt = (IP(src=OUTER_SRC, dst=OUTER_DST, id=1000 + i, flags="DF", ttl=63)
           / UDP(sport=49152 + i, dport=4789)
           / VXLAN(vni=5001)
           / inner)
    return raw(pkt)


def set_seq(sa: SecurityAssociation, seq: int) -> None:
    """Make scapy's next packet use the full sequence number `seq` (low half and ESN high)."""
    sa.seq_num = seq & SEQ32
    sa.esn = seq >> 32


def esp_plaintext(sa: SecurityAssociation, wire: bytes):
    """scapy's decrypted ESP (_ESPPlain: data, padding, pad length, next header)."""
    icv_size = sa.crypt_algo.icv_size or sa.auth_algo.icv_size
    return sa.crypt_algo.decrypt(sa, IP(wire)[ESP], sa.crypt_key, icv_size,
                                 esn_en=sa.esn_en, esn=sa.esn)


# -- the matrix ---------------------------------------------------------------------------


def test_every_espswitch_transform_has_a_scapy_mapping():
    assert set(TRANSFORM_NAMES) == set(ALGOS)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_espswitch_unprotects_scapy_encrypted_packets_to_the_original(case):
    spi = spi_of(case)
    seqs = sequence_numbers(case)
    sender = scapy_sa(case, spi)
    receiver = InboundSA(espswitch_params(case, spi),
                         esn_high=seqs[0] >> 32 if case.esn else 0)
    for i, seq in enumerate(seqs):
        original = vxlan_packet(i)
        set_seq(sender, seq)
        wire = raw(sender.encrypt(IP(original)))
        outer = IP(wire)
        assert outer.proto == 50
        assert (outer[ESP].spi, outer[ESP].seq) == (spi, seq & SEQ32)
        got = receiver.unprotect(wire)
        assert bytes(got) == original, f"packet {i} (seq {seq:#x})"
    assert receiver.packets == len(seqs)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_scapy_decrypts_espswitch_protected_packets_to_the_original(case):
    spi = spi_of(case)
    seqs = sequence_numbers(case)
    sender = OutboundSA(espswitch_params(case, spi), seq_start=seqs[0])
    receiver = scapy_sa(case, spi)
    for i, seq in enumerate(seqs):
        original = vxlan_packet(i)
        wire = bytes(sender.protect(original))
        outer = IP(wire)
        assert outer.proto == 50
        assert outer.len == len(wire)
        if case.mode == "tunnel":
            assert (outer.src, outer.dst) == (TUNNEL_SRC, TUNNEL_DST)
        else:
            assert (outer.src, outer.dst, outer.id, outer.ttl) == (OUTER_SRC, OUTER_DST,
                                                                 1000 + i, 63)
        assert checksum(wire[: outer.ihl * 4]) == 0  # the IPv4 header checksum is right
        assert (outer[ESP].spi, outer[ESP].seq) == (spi, seq & SEQ32)
        receiver.esn = seq >> 32
        # scapy's decrypt changes the packet it is given: give it a fresh parse.
        got = receiver.decrypt(IP(wire))
        assert raw(got) == original, f"packet {i} (seq {seq:#x})"
        # scapy's decrypt ignores the trailer; look at it with scapy's lower-level decrypt.
        plain = esp_plaintext(receiver, wire)
        assert plain.nh == (4 if case.mode == "tunnel" else 17)
        assert plain.padding == bytes(range(1, plain.padlen + 1))  # RFC 4303 §2.4


# -- the ESN high half really is authenticated ------------------------------------------------


ESN_NAMES = list(ALGOS)


@pytest.mark.parametrize("name", ESN_NAMES)
def test_espswitch_rejects_scapy_packet_when_its_esn_high_half_differs(name):
    case = Case(name, "transport", True)
    seq = (ESN_HIGH << 32) | 5
    sender = scapy_sa(case, 0x3000)
    set_seq(sender, seq)
    wire = raw(sender.encrypt(IP(vxlan_packet(1))))

    wrong = InboundSA(espswitch_params(case, 0x3000), esn_high=ESN_HIGH + 1)
    with pytest.raises(EspDrop) as exc:
        wrong.unprotect(wire)
    assert exc.value.reason is DropReason.AUTH_FAILED
    assert wrong.packets == 0

    right = InboundSA(espswitch_params(case, 0x3000), esn_high=ESN_HIGH)
    assert bytes(right.unprotect(wire)) == vxlan_packet(1)


@pytest.mark.parametrize("name", ESN_NAMES)
def test_scapy_rejects_espswitch_packet_when_its_esn_high_half_differs(name):
    case = Case(name, "transport", True)
    seq = (ESN_HIGH << 32) | 5
    wire = bytes(OutboundSA(espswitch_params(case, 0x3001), seq_start=seq)
                 .protect(vxlan_packet(2)))
    receiver = scapy_sa(case, 0x3001)

    receiver.esn = ESN_HIGH - 1
    with pytest.raises(IPSecIntegrityError):
        receiver.decrypt(IP(wire))

    receiver.esn = ESN_HIGH
    assert raw(receiver.decrypt(IP(wire))) == vxlan_packet(2)


@pytest.mark.parametrize("name", ESN_NAMES)
def test_esn_sa_with_high_half_zero_still_differs_from_a_non_esn_sa(name):
    # With ESN the high half goes into the ICV even when it is 0 (RFC 4303 §2.2.1; RFC 4106
    # §5 for the 12-byte AAD): a peer that did not negotiate ESN must fail the ICV.
    esn_case, plain_case = Case(name, "transport", True), Case(name, "transport", False)
    wire = bytes(OutboundSA(espswitch_params(esn_case, 0x3002)).protect(vxlan_packet(3)))
    with pytest.raises(IPSecIntegrityError):
        scapy_sa(plain_case, 0x3002).decrypt(IP(wire))
    with pytest.raises(EspDrop) as exc:
        InboundSA(espswitch_params(plain_case, 0x3002)).unprotect(wire)
    assert exc.value.reason is DropReason.AUTH_FAILED
    assert raw(scapy_sa(esn_case, 0x3002).decrypt(IP(wire))) == vxlan_packet(3)


# -- tunnel mode with an IPv6 inner packet ---------------------------------------------------


def ipv6_packet(i: int) -> bytes:
    return raw(IPv6(src="2001:db8::1", dst="2001:db8::2", hlim=64)
               / ICMPv6EchoRequest(id=7, seq=i, data=bytes(range(i * 3))))


@pytest.mark.parametrize("name", ["aes128gcm16", "chacha20poly1305", "aes128-sha256"])
def test_tunnel_mode_ipv6_inner_packets_interoperate_both_ways(name):
    case = Case(name, "tunnel", False)
    # scapy -> espswitch
    sender = scapy_sa(case, 0x4000)
    receiver = InboundSA(espswitch_params(case, 0x4000))
    for i in range(1, 4):
        wire = raw(sender.encrypt(IPv6(ipv6_packet(i))))
        assert IP(wire).proto == 50
        assert bytes(receiver.unprotect(wire)) == ipv6_packet(i)
    # espswitch -> scapy
    out = OutboundSA(espswitch_params(case, 0x4001))
    back = scapy_sa(case, 0x4001)
    for i in range(1, 4):
        wire = bytes(out.protect(ipv6_packet(i)))
        assert IP(wire)[ESP].seq == i
        assert raw(back.decrypt(IP(wire))) == ipv6_packet(i)
