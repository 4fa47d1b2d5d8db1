"""Hostile frames from the underlay at running `geneve` and `gre` tunnels, clear and with
manually keyed ESP, over IPv4 and IPv6 underlays.

An attacker on the underlay, spoofing hv1's address, sends hv2 (three times over, in one
pcap) Geneve that breaks RFC 8926 (a critical option, the control bit, another version or
protocol, a wrong VNI, options or a UDP length past the packet, a cut header), GRE that
breaks RFC 2784/2890 (a wrong checksum, sequence numbers, the routing bit, a wrong or
missing key, another protocol or version, a cut header), forged, truncated and unknown ESP
and, to a protected tunnel, valid plaintext; over IPv6 also extension headers and payload
lengths that do not fit (a tunnel packet behind an extension header is the kernel's, which
has no such tunnel: not counted by espswitch, never delivered). Every inner frame carries a
marker and is addressed to hv2's VM; to a clear tunnel, each round ends with one valid
packet of it, which must be delivered (the capture sees what gets through).
espswitchd (compiled fast path on: the frames meet it first) must count every drop where
it counts that cause, deliver nothing with the marker, keep running with its configuration,
and the genuine tunnel must carry pings afterwards.
"""

from __future__ import annotations

import os
import re
import struct
from collections import Counter
from dataclasses import dataclass, field

import pytest

from espswitch.cli.lab import UNDERLAY6, Lab, tcpdump
from espswitch.ipsec import parse_transform

from .ipsec_helpers import (
    Keys,
    espswitchd_pid,
    mac_of,
    received,
    scapy,
    send_frames,
    statistics,
    wait_for,
)

pytestmark = pytest.mark.net

ESP = "aes128gcm16"
ROUNDS = 3  # the hostile set is sent this many times over
UNKNOWN_SPI = 0xDEADBEEF
GENEVE_PORT = 6081
TEB = 0x6558  # transparent Ethernet bridging
STATS_TIMEOUT = 15.0  # Interface.statistics is written every 5 s; the hosts are shared
# (encapsulation, ESP with manual keys, IPv6 underlay)
CASES = [
    pytest.param("geneve", False, False, id="geneve"),
    pytest.param("gre", False, False, id="gre"),
    pytest.param("geneve", True, False, id="geneve-esp"),
    pytest.param("gre", True, False, id="gre-esp"),
    pytest.param("geneve", False, True, id="geneve-ipv6"),
    pytest.param("gre", True, True, id="gre-esp-ipv6"),
]


@dataclass
class Expected:
    """What one round of the hostile set must add, by where espswitch counts it."""

    dpif: Counter = field(default_factory=Counter)  # `ovs-appctl dpif/show` drops
    underlay: Counter = field(default_factory=Counter)  # hv2's underlay port statistics
    tunnel: Counter = field(default_factory=Counter)  # tun0 statistics


def geneve_header(vni: int, *, version: int = 0, optlen: int | None = None, flags: int = 0,
                  proto: int = TEB, opts: bytes = b"") -> bytes:
    optlen = len(opts) // 4 if optlen is None else optlen
    return bytes([version << 6 | optlen, flags]) + struct.pack("!HI", proto, vni << 8) + opts


def gre_header(*, flags: int = 0, proto: int = TEB, key: int | None = None,
               extra: bytes = b"") -> bytes:
    """GRE flags and protocol, `extra` (a checksum and reserved or offset word, laid out
    by the caller), then the key when given (its K bit is the caller's)."""
    head = struct.pack("!HH", flags, proto) + extra
    return head + (struct.pack("!I", key) if key is not None else b"")


class Attacker:
    """Builds hv2's hostile frames, spoofing hv1's underlay address, and what they count."""

    def __init__(self, lab: Lab, encap: str, keys: Keys | None, v6: bool, marker: bytes):
        self.s = s = scapy()
        self.lab, self.encap, self.keys, self.v6 = lab, encap, keys, v6
        hv1, hv2 = lab.hvs
        self.eth = s.Ether(src=mac_of(hv1.ns, "br-phy"), dst=mac_of(hv2.ns, "br-phy"))
        self.inner = bytes(
            s.Ether(src=mac_of(hv1.vm_ns, hv1.tap), dst=mac_of(hv2.vm_ns, hv2.tap))
            / s.IP(src=hv1.vm_ip, dst=hv2.vm_ip) / s.ICMP(id=0x4848) / s.Raw(marker * 4))
        self.frames: list = []
        self.expect = Expected()

    def ip(self, proto: int | None = None, src: str | None = None, **kw):
        """hv1 -> hv2's outer header; `proto` None: scapy's from what follows."""
        s, (hv1, hv2) = self.s, self.lab.hvs
        src = src or hv1.underlay_ip
        if self.v6:
            h = s.IPv6(src=src, dst=hv2.underlay_ip, **kw)
            if proto is not None:
                h.nh = proto
        else:
            h = s.IP(src=src, dst=hv2.underlay_ip, **kw)
            if proto is not None:
                h.proto = proto
        return h

    def add(self, frame, dpif: str | None = None, underlay: str | None = None,
            tunnel: str | None = None) -> None:
        self.frames.append(frame)
        for counter, name in ((self.expect.dpif, dpif), (self.expect.underlay, underlay),
                              (self.expect.tunnel, tunnel)):
            if name:
                counter[name] += 1

    def encap_drop(self, frame, cause: str) -> None:
        """A frame the encapsulation's demux refuses: `<encap>_<cause>` in dpif/show and
        rx_malformed (or rx_unknown_tunnel) on the port it came in on."""
        self.add(frame, f"{self.encap}_{cause}",
                 "rx_unknown_tunnel" if cause == "unknown_tunnel" else "rx_malformed")

    # -- the encapsulations ------------------------------------------------------------------

    def udp(self, payload: bytes, **kw):
        """UDP to Geneve's port: over IPv6 with its checksum right unless `chksum` is set
        (zero is accepted, as RFC 6935 allows), so that the Geneve header is what is judged."""
        s = self.s
        return self.eth / self.ip() / s.UDP(sport=50000, dport=GENEVE_PORT, **kw) \
            / s.Raw(payload)

    def valid(self):
        """A well-formed packet of the tunnel, from hv1's address (plaintext)."""
        vni = self.lab.vni
        if self.encap == "geneve":
            return self.udp(geneve_header(vni) + self.inner)
        return self.eth / self.ip(47) / self.s.Raw(
            gre_header(flags=0x2000, key=vni) + self.inner)

    def geneve(self) -> None:
        vni, inner = self.lab.vni, self.inner
        critical = struct.pack("!HBB", 0x0102, 0x85, 1) + b"\xaa" * 4  # type with C set
        self.encap_drop(self.udp(geneve_header(vni, flags=0x40, opts=critical) + inner),
                        "critical_options")
        self.encap_drop(self.udp(geneve_header(vni, flags=0x80) + inner), "control")
        self.encap_drop(self.udp(geneve_header(vni, version=1) + inner), "malformed")
        self.encap_drop(self.udp(geneve_header(vni, version=3, flags=0x40) + inner),
                        "malformed")
        self.encap_drop(self.udp(geneve_header(vni, proto=0x0800) + inner), "malformed")
        self.encap_drop(self.udp(geneve_header(vni + 1) + inner), "unknown_tunnel")
        self.encap_drop(self.udp(geneve_header(vni, optlen=63) + inner), "malformed")
        # Options that leave less than an Ethernet header of the packet.
        self.encap_drop(self.udp(geneve_header(vni, optlen=(len(inner) - 10) // 4)
                                 + inner), "malformed")
        self.encap_drop(self.udp(geneve_header(vni)[:5]), "malformed")  # a cut header
        self.encap_drop(self.udp(geneve_header(vni) + inner[:13]), "malformed")
        # The UDP length lies: past the datagram, short of the Ethernet header, under 8.
        n = 8 + 8 + len(inner)
        for ulen in (n + 100, 8 + 8 + 10, 4):
            self.encap_drop(self.udp(geneve_header(vni) + inner, len=ulen,
                                     **({"chksum": 0} if self.v6 else {})), "malformed")
        # Right VNI from another address on the underlay: no tunnel there.
        other = "2001:db8:e5::99" if self.v6 else "192.0.2.99"
        s = self.s
        self.encap_drop(self.eth / self.ip(src=other)
                        / s.UDP(sport=50000, dport=GENEVE_PORT)
                        / s.Raw(geneve_header(vni) + inner), "unknown_tunnel")
        if self.v6:  # over IPv6 a UDP checksum that is not zero must be right
            self.encap_drop(self.udp(geneve_header(vni) + inner, chksum=0x1234),
                            "bad_checksum")

    def gre(self) -> None:
        vni, inner, s = self.lab.vni, self.inner, self.s

        def gre(head: bytes, payload: bytes = inner):
            return self.eth / self.ip(47) / s.Raw(head + payload)

        k = 0x2000
        # C bit: checksum and reserved words first, then the key; the checksum is wrong.
        self.encap_drop(gre(gre_header(flags=0x8000 | k, key=vni, extra=b"\x12\x34\0\0")),
                        "bad_checksum")
        self.encap_drop(gre(gre_header(flags=0x1000 | k, key=vni) + struct.pack("!I", 1)),
                        "seq_unsupported")
        # The routing bit (RFC 1701): dropped as Linux does, whatever follows it: here the
        # key right after the header, as a parser that ignores the bit reads it.
        self.encap_drop(gre(gre_header(flags=0x4000 | k, key=vni)), "malformed")
        # and as RFC 1701 lays it out: checksum and offset, key, then routing.
        self.encap_drop(gre(gre_header(flags=0x4000 | k, key=vni, extra=bytes(4))
                            + b"\0\0\0\0"), "malformed")
        self.encap_drop(gre(gre_header(flags=0x0001 | k, key=vni)), "malformed")  # version 1
        self.encap_drop(gre(gre_header(flags=0x0080 | k, key=vni)), "malformed")  # flags
        self.encap_drop(gre(gre_header(flags=k, key=vni + 1)), "unknown_tunnel")
        self.encap_drop(gre(gre_header()), "unknown_tunnel")  # no key: key 0
        self.encap_drop(gre(gre_header(flags=k, key=vni, proto=0x0800)), "malformed")
        self.encap_drop(gre(gre_header(flags=k, key=vni), inner[:13]), "malformed")
        self.encap_drop(gre(gre_header(flags=k)[:3], b""), "malformed")  # a cut header
        self.encap_drop(gre(gre_header(flags=k), b"\0\0"), "malformed")  # K, no key
        if not self.v6:
            # An IPv4 total length past the frame's end.
            f = self.eth / self.ip(47, len=600) / s.Raw(gre_header(flags=k, key=vni) + inner)
            self.encap_drop(f, "malformed")

    # -- ESP -------------------------------------------------------------------------------

    def esp(self) -> None:
        """Forged, truncated and unknown ESP, and plaintext that is otherwise valid."""
        s, keys = self.s, self.keys
        assert keys is not None
        t = parse_transform(keys.esp)
        spi = keys.spi_1to2.to_bytes(4, "big")
        fixed = 8 + t.iv_len + t.icv_len
        for i, body in enumerate((16, 32, 128, 1024)):
            # Well sized, a sequence number far ahead: only the ICV refuses it.
            esp = spi + (3_000_000 + i).to_bytes(4, "big") + os.urandom(fixed - 8 + body)
            self.add(self.eth / self.ip(50) / s.Raw(esp), tunnel="esp_auth_failures")
        for n in (0, 3, 7):  # not even an SPI and a sequence number
            self.add(self.eth / self.ip(50) / s.Raw((spi + os.urandom(8))[:n]),
                     "esp_malformed", "rx_malformed")
        for n in (8, 12, fixed, fixed + 1, fixed + 15):  # the SA's: too short or misaligned
            body = spi + (4_000_000 + n).to_bytes(4, "big") + os.urandom(n)
            self.add(self.eth / self.ip(50) / s.Raw(body[:n]), tunnel="esp_malformed")
        for _ in range(3):
            self.add(self.eth / self.ip(50)
                     / s.Raw(UNKNOWN_SPI.to_bytes(4, "big") + os.urandom(64)),
                     "esp_unknown_spi", "rx_unknown_tunnel")
        # The tunnel's own packet, in the clear: refused once protected.
        self.add(self.valid(), tunnel="esp_plaintext_drops")

    # -- IPv6 ------------------------------------------------------------------------------

    def ipv6(self) -> None:
        """Extension headers (left to the kernel: espswitch does not walk them) and payload
        lengths that do not fit."""
        s = self.s
        valid = self.valid()
        l4 = valid[s.IPv6].payload.copy()
        nh = valid[s.IPv6].nh
        self.add(self.eth / self.ip() / s.IPv6ExtHdrHopByHop(nh=nh) / l4.copy())
        self.add(self.eth / self.ip() / s.IPv6ExtHdrDestOpt(nh=nh) / l4.copy())
        self.add(self.eth / self.ip() / s.IPv6ExtHdrRouting(nh=nh, segleft=0) / l4.copy())
        if self.keys is not None:
            spi = self.keys.spi_1to2.to_bytes(4, "big")
            forged = spi + (7_000_000).to_bytes(4, "big") + os.urandom(80)
            self.add(self.eth / self.ip() / s.IPv6ExtHdrDestOpt(nh=50) / s.Raw(forged))
        # A payload length past the frame's end.
        cut = bytes(valid)
        self.add(s.Ether(cut[:-30]), "ipv6_malformed", "rx_malformed")
        self.add(self.eth / self.ip(nh, plen=len(bytes(l4)) + 200) / l4.copy(),
                 "ipv6_malformed", "rx_malformed")
        if self.encap == "geneve":
            # Short of the UDP length: Geneve's lengths no longer fit (the checksum,
            # past the datagram, is not checked).
            self.encap_drop(self.eth / self.ip(nh, plen=40) / l4.copy(), "malformed")

    def build(self) -> None:
        getattr(self, self.encap)()
        if self.keys is not None:
            self.esp()
        if self.v6:
            self.ipv6()


def dpif_drops(lab: Lab, hv_index: int) -> Counter:
    out = lab.appctl(lab.hvs[hv_index], "dpif/show").stdout
    m = re.search(r"^\s*drops: (.*)$", out, re.M)
    return Counter({k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}
                   if m else {})


def fast_path(lab: Lab, hv_index: int) -> dict[str, int]:
    """The compiled pipeline's counters in dpif/show (hits, esp_drops, misses, ...)."""
    out = lab.appctl(lab.hvs[hv_index], "dpif/show").stdout
    m = re.search(r"fast-path: enabled, (.*)$", out, re.M)
    assert m, f"the fast path is not on:\n{out}"
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}


def make_lab(encap: str, esp: bool, v6: bool) -> tuple[Lab, Keys | None]:
    keys = Keys.fresh(ESP) if esp else None
    kw = {"underlay_ips": UNDERLAY6} if v6 else {}
    if keys is not None and v6:
        keys.underlay = UNDERLAY6
    options = keys.options() if keys is not None else ({}, {})
    return Lab(tunnel_type=encap, tunnel_options=options, **kw), keys


@pytest.mark.parametrize(("encap", "esp", "v6"), CASES)
def test_hostile_encapsulated_frames_are_counted_and_dropped_tunnel_survives(
        netlab_ok, tmp_path, encap, esp, v6):
    s = scapy()
    lab, keys = make_lab(encap, esp, v6)
    with lab:
        hv1, hv2 = lab.hvs
        assert lab.wait_for_ping()
        pid = espswitchd_pid(lab, 1)
        # The underlay port's frames meet the compiled receive pipeline first, read in
        # place in the NIC's ring.
        assert re.search(rf"^\s+{hv2.underlay_dev} \d+: .* fast-rx zero-copy$",
                         lab.appctl(hv2, "dpif/show").stdout, re.M)
        marker = b"hostile-" + os.urandom(6).hex().encode()
        attacker = Attacker(lab, encap, keys, v6, marker)
        attacker.build()
        # A clear tunnel's own valid packet, last in each round: delivered, so the capture
        # shows what the tunnel lets through after the hostile ones.
        control = b"genuine-" + os.urandom(6).hex().encode()
        if keys is None:
            ok = Attacker(lab, encap, None, v6, control).valid()
            frames = [*attacker.frames, ok] * ROUNDS
        else:
            frames = attacker.frames * ROUNDS
        pcap = str(tmp_path / "hostile.pcap")
        s.wrpcap(pcap, frames)
        exp = attacker.expect

        fast_before = fast_path(lab, 1)
        before = (dpif_drops(lab, 1), statistics(lab, 1, hv2.underlay_dev),
                  statistics(lab, 1))
        vm_pcap = str(tmp_path / "vm2.pcap")
        with tcpdump(hv2.vm_ns, hv2.tap, vm_pcap):
            assert send_frames(hv1.ns, hv1.underlay_dev, pcap) == len(frames)

            missing: list[str] = []

            def all_counted() -> bool:
                """Every counter grown by ROUNDS times its round's count (else `missing`)."""
                missing.clear()
                now = (dpif_drops(lab, 1), statistics(lab, 1, hv2.underlay_dev),
                       statistics(lab, 1))
                for where, want, base, cur in zip(
                        ("dpif/show", hv2.underlay_dev, "tun0"),
                        (exp.dpif, exp.underlay, exp.tunnel), before, now, strict=True):
                    missing.extend(f"{where} {k}: +{cur.get(k, 0) - base.get(k, 0)} < "
                                   f"{ROUNDS * n}" for k, n in want.items()
                                   if cur.get(k, 0) - base.get(k, 0) < ROUNDS * n)
                return not missing

            counted = wait_for(all_counted, STATS_TIMEOUT, 0.5)
            assert counted, f"drops not counted: {missing}"
            # The genuine tunnel, both ways, after the attack.
            assert wait_for(lambda: received(lab.ping(1, 0.1)) == 1, 10)
            pings = lab.ping(10, 0.02)
            assert received(pings) == 10, (pings.stdout, [statistics(lab, i) for i in (0, 1)],
                                           lab.appctl(hv2, "dpif/show").stdout)
        # Every hostile frame went through the compiled pipeline: dropped there (forged
        # ESP to the tunnel's SA) or left to the Python path that counted it above.
        fast_after = fast_path(lab, 1)
        passed = sum(fast_after[k] - fast_before[k] for k in ("misses", "esp_drops"))
        assert passed >= len(attacker.frames) * ROUNDS, (fast_before, fast_after)
        after_ul = statistics(lab, 1, hv2.underlay_dev)
        dropped = sum(exp.underlay.values()) * ROUNDS
        assert after_ul["rx_dropped"] - before[1].get("rx_dropped", 0) >= dropped, after_ul
        if keys is not None:
            after_tun = statistics(lab, 1)
            assert after_tun["rx_dropped"] - before[2].get("rx_dropped", 0) \
                >= sum(exp.tunnel.values()) * ROUNDS, after_tun

        with open(vm_pcap, "rb") as f:
            seen = f.read()
        assert marker not in seen, "a hostile frame reached the VM"
        if keys is None:
            # The capture saw what the tunnel delivers: its valid packet, every round.
            delivered = [p for p in s.rdpcap(vm_pcap) if s.ICMP in p
                         and p[s.ICMP].type == 8 and control in bytes(p)]
            assert len(delivered) == ROUNDS, "the tunnel's valid packets were not delivered"
        assert espswitchd_pid(lab, 1) == pid and hv2.alive()
        assert lab.appctl(hv2, "version").returncode == 0
        for hv in lab.hvs:
            assert lab.vsctl(hv, "get", "interface", "tun0", "error").stdout.strip() == "[]"
