"""Hostile frames from the underlay at a running `vxlanipsec` tunnel.

An attacker on the underlay sends hv2 truncated and forged ESP, ESP with unknown SPIs,
broken IPv4 headers, fragments, UDP/4500 junk and random Ethernet frames. espswitchd must
count and drop every one of them without delivering anything to the VM, without dying, and
without losing what was configured: the genuine tunnel keeps carrying pings afterwards.
"""

from __future__ import annotations

import os
import random
import re

import pytest

from espswitch.cli.lab import tcpdump
from espswitch.ipsec import parse_transform

from .ipsec_helpers import (
    Keys,
    espswitchd_pid,
    keyed_lab,
    mac_of,
    received,
    sa_rows,
    scapy,
    send_frames,
    statistics,
    wait_for,
    wait_for_counter,
)

pytestmark = pytest.mark.net

UNKNOWN_SPI = 0xDEADBEEF



def forged_esp_bodies(esp: str, rng: random.Random) -> tuple[list[bytes], list[bytes]]:
    """ESP payloads for hv2's inbound SPI: (well-sized forgeries, truncated or misaligned).

    A well-sized forgery has a plausible length for the transform and a sequence number far
    above the window, so only its ICV can reject it (an authentication failure); the others
    are too short or not a whole number of cipher blocks (malformed).
    """
    t = parse_transform(esp)
    fixed = 8 + t.iv_len + t.icv_len
    block = max(t.block_size, 4)
    forged, broken = [], []
    for i, body_len in enumerate((block, 2 * block, 8 * block, 64 * block)):
        seq = 1_000_000 + i
        # The SPI is patched in by the caller; the rest after the sequence number is random.
        forged.append(bytes(4) + seq.to_bytes(4, "big") + rng.randbytes(fixed - 8 + body_len))
    for total in (0, 3, 7, 8, 12, fixed, fixed + 1, fixed + block - 1, fixed + block + 2):
        body = rng.randbytes(total)
        if total >= 8:
            body = body[:4] + (2_000_000 + total).to_bytes(4, "big") + body[8:]
        broken.append(body)
    return forged, broken


@pytest.mark.parametrize("esp", ["aes128gcm16", "aes128-sha256"])
def test_hostile_underlay_frames_are_counted_and_dropped_tunnel_survives(netlab_ok, tmp_path,
                                                                          esp):
    s = scapy()
    rng = random.Random(0x5EED)
    keys = Keys.fresh(esp)
    with keyed_lab(keys) as lab:
        hv1, hv2 = lab.hvs
        assert lab.wait_for_ping()
        pid = espswitchd_pid(lab, 1)
        eth = s.Ether(src=mac_of(hv1.ns, "br-phy"), dst=mac_of(hv2.ns, "br-phy"))
        ip = s.IP(src=hv1.underlay_ip, dst=hv2.underlay_ip)
        spi = keys.spi_1to2.to_bytes(4, "big")

        forged, broken = forged_esp_bodies(esp, rng)
        frames = [eth / ip.copy() / s.Raw(spi + body[4:]) for body in forged]
        # Truncated/misaligned ESP; the first ones are too short even to hold an SPI.
        bad_esp = [eth / ip.copy() / s.Raw(body[:4] if len(body) < 8 else spi + body[4:])
                   for body in broken]
        for f in bad_esp:
            f[s.IP].proto = 50
        for f in frames:
            f[s.IP].proto = 50
        unknown = [eth / s.IP(src=hv1.underlay_ip, dst=hv2.underlay_ip, proto=50)
                   / s.Raw(UNKNOWN_SPI.to_bytes(4, "big") + rng.randbytes(60)) for _ in range(5)]
        # Broken IPv4 carrying ESP: lone fragments (held for reassembly, then expired),
        # a total length past the frame's end, a header length under 20 bytes.
        ipv4_junk = [
            eth / s.IP(src=hv1.underlay_ip, dst=hv2.underlay_ip, proto=50, flags="MF")
            / s.Raw(spi + rng.randbytes(100)),
            eth / s.IP(src=hv1.underlay_ip, dst=hv2.underlay_ip, proto=50, frag=10)
            / s.Raw(spi + rng.randbytes(100)),
            eth / s.IP(src=hv1.underlay_ip, dst=hv2.underlay_ip, proto=50, len=1400)
            / s.Raw(spi + rng.randbytes(40)),
            eth / s.IP(src=hv1.underlay_ip, dst=hv2.underlay_ip, proto=50, ihl=3)
            / s.Raw(spi + rng.randbytes(40)),
            eth / s.IP(src=hv1.underlay_ip, dst=hv2.underlay_ip, proto=50, ihl=15)
            / s.Raw(spi[:2]),
        ]
        # UDP-encapsulated ESP port: keepalive, junk, a forged packet, a truncated header.
        udp = [eth / ip.copy() / s.UDP(sport=4500, dport=4500) / s.Raw(p) for p in
               (b"\xff", b"\x01\x02\x03", spi + rng.randbytes(3), spi + forged[0][4:])]
        udp.append(eth / ip.copy() / s.UDP(sport=4500, dport=4500, len=400) / s.Raw(b"xx"))
        # Plain junk on the wire: bare headers, odd EtherTypes, truncated ARP and 802.1Q.
        junk = [s.Ether(dst=mac_of(hv2.ns, "br-phy"), type=t) / s.Raw(rng.randbytes(n))
                for t, n in ((0x0800, 0), (0x0800, 7), (0x0806, 5), (0x8100, 1), (0x8100, 3),
                             (0x86DD, 10), (0x1234, 46), (0x88CC, 100))]
        junk.append(s.Ether(dst="ff:ff:ff:ff:ff:ff", type=0x0806) / s.Raw(rng.randbytes(9)))
        everything = frames + bad_esp + unknown + ipv4_junk + udp + junk
        pcap = str(tmp_path / "hostile.pcap")
        s.wrpcap(pcap, everything)

        before = statistics(lab, 1)
        vm_pcap = str(tmp_path / "vm2.pcap")
        with tcpdump(hv2.vm_ns, hv2.tap, vm_pcap, ["not arp and not ip6"]):
            for _ in range(3):
                assert send_frames(hv1.ns, hv1.underlay_dev, pcap) == len(everything)
        n_forged = 3 * len(frames)
        got = wait_for_counter(lab, 1, "esp_auth_failures",
                               before.get("esp_auth_failures", 0) + n_forged)
        assert got >= before.get("esp_auth_failures", 0) + n_forged, (before, got)
        after = statistics(lab, 1)
        # Misaligned or short packets that carry the SPI count against this tunnel.
        with_spi = sum(1 for b in broken if len(b) >= 8)
        assert after["esp_malformed"] - before.get("esp_malformed", 0) >= 3 * with_spi, after
        drops = lab.appctl(hv2, "dpif/show").stdout
        m = re.search(r"esp_unknown_spi=(\d+)", drops)
        assert m and int(m.group(1)) >= 3 * len(unknown), drops

        # Nothing reached the VM, the daemon is the same process, configuration intact.
        assert os.path.getsize(vm_pcap) <= 24, "the VM saw frames from the attacker"
        assert espswitchd_pid(lab, 1) == pid
        assert lab.appctl(hv2, "version").returncode == 0
        assert lab.vsctl(hv2, "get", "interface", "tun0", "error").stdout.strip() == "[]"
        assert wait_for(lambda: received(lab.ping(1, 0.1)) == 1, 10)
        assert received(lab.ping(20, 0.01)) == 20


def test_outer_fragments_of_esp_are_reassembled_before_decryption(netlab_ok, tmp_path):
    """RFC 4303 §3.4.1: a peer's ESP packet fragmented on the way (here built by scapy's
    ESP, fragmented by scapy and sent last fragment first) is reassembled, then decrypted
    and delivered; a forged fragment in the same datagram drops it, counted."""
    s = scapy()
    from scapy.layers.ipsec import ESP, SecurityAssociation

    keys = Keys.fresh("aes128gcm16")
    with keyed_lab(keys) as lab:
        hv1, hv2 = lab.hvs
        assert lab.wait_for_ping()
        # Ahead of hv1's own sequence numbers, but inside the window: hv1's genuine packets
        # that follow are neither replays nor too old.
        seq = sa_rows(lab, 0)["out"]["seq"] + 500
        sa = SecurityAssociation(ESP, spi=keys.spi_1to2, crypt_algo="AES-GCM",
                                 crypt_key=bytes.fromhex(keys.key_1to2), seq_num=seq)
        inner = (s.Ether(src=mac_of(hv1.vm_ns, hv1.tap), dst=mac_of(hv2.vm_ns, hv2.tap))
                 / s.IP(src=hv1.vm_ip, dst=hv2.vm_ip) / s.ICMP(type=8, id=0x4343, seq=1)
                 / s.Raw(b"fragmented-esp!!" * 70))
        plain = (s.IP(src=hv1.underlay_ip, dst=hv2.underlay_ip, id=0x7777, flags=0)
                 / s.UDP(sport=49999, dport=4789) / s.VXLAN(vni=lab.vni, flags=0x08) / inner)
        esp = sa.encrypt(plain)
        frags = s.fragment(esp, fragsize=512)
        assert len(frags) == 3
        eth = s.Ether(src=mac_of(hv1.ns, "br-phy"), dst=mac_of(hv2.ns, "br-phy"))
        pcap = str(tmp_path / "frags.pcap")
        s.wrpcap(pcap, [eth / f for f in reversed(frags)])
        vm_pcap = str(tmp_path / "vm2.pcap")
        with tcpdump(hv2.vm_ns, hv2.tap, vm_pcap, ["icmp[icmptype] == 8"]):
            assert send_frames(hv1.ns, hv1.underlay_dev, pcap) == 3
            assert wait_for(lambda: os.path.getsize(vm_pcap) > 24, 5)
        echoes = [p for p in s.rdpcap(vm_pcap) if s.ICMP in p and p[s.ICMP].id == 0x4343]
        assert len(echoes) == 1
        assert bytes(echoes[0][s.ICMP].payload) == b"fragmented-esp!!" * 70

        # The same datagram with its middle fragment tampered: dropped whole, counted.
        esp2 = sa.encrypt(plain)
        frags2 = s.fragment(esp2, fragsize=512)
        frags2[1][s.Raw].load = bytes([frags2[1][s.Raw].load[0] ^ 1]) + \
            frags2[1][s.Raw].load[1:]
        before = statistics(lab, 1).get("esp_auth_failures", 0)
        s.wrpcap(pcap, [eth / f for f in frags2])
        assert send_frames(hv1.ns, hv1.underlay_dev, pcap) == 3
        assert wait_for_counter(lab, 1, "esp_auth_failures", before + 1) == before + 1
        assert received(lab.ping(5, 0.05)) == 5
