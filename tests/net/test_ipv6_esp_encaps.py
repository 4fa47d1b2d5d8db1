"""Ordinary `geneve` and `gre` tunnels protected by manually keyed ESP over an IPv6 underlay
(`Lab(underlay_ips=UNDERLAY6)`), in transport and in tunnel mode, checked from outside:

- VM 1 pings VM 2 through the tunnel while hv1's underlay is captured: only ESP (next
  header 50) between the endpoints, the ping's pattern nowhere in the capture;
- scapy decrypts espswitch's ESP in both directions with IPv6 SAs (in tunnel mode the inner
  IPv6 header is between the same endpoints) and finds Geneve with the lab's VNI behind UDP
  to 6081 with a correct (nonzero) checksum over IPv6, or GRE carrying Ethernet (0x6558)
  with the lab's key; inside, the ping's ICMP with its pattern;
- tshark decrypts the capture (the ICV checks) and shows the Geneve VNI or the GRE key;
- ESP over IPv6 built by scapy with hv1's SA (sequence number far ahead), carrying Geneve or
  GRE with an ICMP frame with a unique marker, sent from hv1's underlay device, is decrypted
  by hv2's espswitch and delivered to VM 2.
"""

from __future__ import annotations

import os

import pytest

from espswitch.cli.lab import UNDERLAY6, Lab

from .ipsec_helpers import (
    PATTERN,
    Keys,
    mac_of,
    received,
    scapy,
    status,
    tshark_available,
    tshark_rows,
)
from .test_ipv6_tunnel import assert_delivered_to_vm2, read, scapy_sa

pytestmark = pytest.mark.net

ESP = "aes128gcm16"
GENEVE_PORT = 6081
TEB = 0x6558  # transparent Ethernet bridging: GRE and Geneve carrying Ethernet
PINGS = 10
CASES = [pytest.param(encap, mode, id=f"{encap}-{mode}")
         for encap in ("geneve", "gre") for mode in ("transport", "tunnel")]


def make_lab(encap: str, mode: str) -> tuple[Lab, Keys]:
    keys = Keys.fresh(ESP)
    keys.underlay = UNDERLAY6
    return Lab(underlay_ips=UNDERLAY6, tunnel_type=encap,
               tunnel_options=keys.options(ipsec_mode=mode)), keys


@pytest.mark.parametrize(("encap", "mode"), CASES)
def test_esp_protected_tunnel_over_ipv6_interoperates_with_scapy_and_tshark(
        netlab_ok, tmp_path, encap, mode):
    s = scapy()
    lab, keys = make_lab(encap, mode)
    with lab:
        assert lab.wait_for_ping(), f"no ping through ESP-protected {encap} over IPv6"
        st = status(lab, 0)
        assert "tunnel_problem" not in st, st
        assert st["ipsec_state"] == "manual" and st["ipsec_mode"] == mode, st

        pcap = str(tmp_path / "underlay.pcap")
        with lab.capture(0, pcap):
            ping = lab.ping(count=PINGS, interval=0.05, extra=["-p", PATTERN.hex()])
            assert received(ping) == PINGS, ping.stdout
        assert PATTERN not in read(pcap), "the ping's payload crossed the underlay in clear"
        pkts = [p for p in s.rdpcap(pcap) if p.haslayer(s.IPv6)
                and {p[s.IPv6].src, p[s.IPv6].dst} == set(UNDERLAY6)]
        assert len(pkts) >= 2 * PINGS, len(pkts)
        assert {p[s.IPv6].nh for p in pkts} == {50}, "not only ESP between the endpoints"
        check_esp_capture(lab, keys, encap, mode, pkts)
        check_tshark(lab, keys, encap, pcap)
        # Last: its sequence number, far ahead, moves hv2's replay window past hv1's.
        check_scapy_esp_is_delivered(lab, keys, encap, mode, tmp_path)


def encap_of(plain, encap: str, vni: int):
    """The Geneve or GRE header in a decrypted packet, checked against the lab's; the
    Ethernet frame it carries (as scapy parses it)."""
    s = scapy()
    from scapy.contrib.geneve import GENEVE

    if encap == "geneve":
        assert plain[s.IPv6].nh == 17, plain.summary()
        udp = plain[s.UDP]
        assert udp.dport == GENEVE_PORT, plain.summary()
        # Over IPv6 espswitch always writes the UDP checksum (RFC 8200 §8.1), inside ESP too.
        sent = udp.chksum
        assert sent != 0, "zero UDP checksum over IPv6"
        again = s.IPv6(bytes(plain[s.IPv6]))
        del again[s.UDP].chksum
        assert s.IPv6(bytes(again))[s.UDP].chksum == sent, "wrong UDP checksum"
        gnv = GENEVE(bytes(udp.payload))  # scapy may take the source port for another's
        assert gnv.version == 0 and gnv.proto == TEB, gnv.summary()
        assert gnv.vni == vni, (gnv.vni, vni)
        return s.Ether(bytes(gnv.payload))
    assert plain[s.IPv6].nh == 47, plain.summary()
    gre = plain[s.GRE]
    assert gre.proto == TEB and gre.version == 0, gre.summary()
    assert gre.key_present == 1 and gre.key == vni, (gre.key, vni)
    assert not gre.chksum_present and not gre.seqnum_present, gre.summary()
    return s.Ether(bytes(gre.payload))


def check_esp_capture(lab: Lab, keys: Keys, encap: str, mode: str, pkts: list) -> None:
    """scapy decrypts what espswitch sent, both directions: the encapsulation with the lab's
    VNI or key, and inside it the pings with their pattern."""
    s = scapy()
    sas = {keys.spi_1to2: scapy_sa(keys, mode, 0), keys.spi_2to1: scapy_sa(keys, mode, 1)}
    seen = {keys.spi_1to2: 0, keys.spi_2to1: 0}
    echoes = {8: 0, 0: 0}  # ICMP echo requests and replies with the pattern
    for p in pkts:
        outer = p[s.IPv6]
        spi = int.from_bytes(bytes(outer.payload)[:4], "big")
        assert spi in sas, hex(spi)
        plain = sas[spi].decrypt(s.IPv6(bytes(outer)))
        if mode == "tunnel":
            # The inner header: IPv6 between the same endpoints, the direction's.
            assert isinstance(plain, s.IPv6), plain.summary()
            assert (plain.src, plain.dst) == (outer.src, outer.dst), plain.summary()
        else:
            assert (plain[s.IPv6].src, plain[s.IPv6].dst) == (outer.src, outer.dst)
        frame = encap_of(plain, encap, lab.vni)
        if frame.haslayer(s.ICMP) and PATTERN in bytes(frame[s.ICMP].payload):
            echoes[frame[s.ICMP].type] = echoes.get(frame[s.ICMP].type, 0) + 1
        seen[spi] += 1
    assert min(seen.values()) >= PINGS, seen
    assert echoes[8] == PINGS and echoes[0] == PINGS, echoes


def check_tshark(lab: Lab, keys: Keys, encap: str, pcap: str) -> None:
    """tshark, given both SAs, checks every ICV and shows the VNI or the key inside."""
    if not tshark_available():
        return
    inner = ("geneve.vni", "geneve.proto_type") if encap == "geneve" \
        else ("gre.key", "gre.proto")
    rows = tshark_rows(pcap, keys, ("esp.spi", "esp.icv_good", *inner))
    assert len(rows) >= 2 * PINGS, rows
    assert {int(r["esp.spi"], 16) for r in rows} == {keys.spi_1to2, keys.spi_2to1}
    assert all(r["esp.icv_good"] in ("1", "True") for r in rows), rows[:3]
    ident, proto = inner
    assert all(r[ident] and int(r[ident], 0) == lab.vni for r in rows), rows[:3]
    assert all(r[proto] and int(r[proto], 0) == TEB for r in rows), rows[:3]


def check_scapy_esp_is_delivered(lab: Lab, keys: Keys, encap: str, mode: str,
                                 tmp_path) -> None:
    """ESP over IPv6 built by scapy (hv1's SA, far ahead in sequence) reaches VM 2."""
    s = scapy()
    from scapy.contrib.geneve import GENEVE

    hv1, hv2 = lab.hvs
    sa = scapy_sa(keys, mode, 0)
    sa.seq_num = 1_000_000
    marker = f"scapy-esp-{encap}-{mode}-".encode() + os.urandom(4).hex().encode()
    inner = (s.Ether(src=mac_of(hv1.vm_ns, hv1.tap), dst=mac_of(hv2.vm_ns, hv2.tap))
             / s.IP(src=hv1.vm_ip, dst=hv2.vm_ip) / s.ICMP(id=0x4242, seq=1) / s.Raw(marker))
    outer = s.IPv6(src=UNDERLAY6[0], dst=UNDERLAY6[1])
    if encap == "geneve":
        plain = outer / s.UDP(sport=50000, dport=GENEVE_PORT) \
            / GENEVE(vni=lab.vni, proto=TEB) / inner
    else:
        plain = outer / s.GRE(key_present=1, key=lab.vni, proto=TEB) / inner
    plain = s.IPv6(bytes(plain))  # checksums and lengths filled in
    frame = (s.Ether(src=mac_of(hv1.ns, "br-phy"), dst=mac_of(hv2.ns, "br-phy"))
             / sa.encrypt(plain))
    assert frame[s.IPv6].nh == 50
    assert_delivered_to_vm2(lab, frame, marker, tmp_path,
                            f"scapy's ESP ({encap}, {mode} mode)")
