"""The compiled pipelines on Geneve, GRE and IPv6-underlay tunnels, against the Python path.

For each tunnel (VXLAN, Geneve or GRE over an IPv4 or IPv6 underlay; ESP-protected with
manual keys on the ordinary tunnel type, as Open vSwitch's IPsec options make it, or
clear), two identical hypervisors, one with `Datapath.fast_path` on and one with it off,
get the same frames from the underlay and from the VM: what leaves every device (byte for
byte: UDP checksums over IPv6, IPv4 IDs), every port's statistics, the SAs' counters and
replay windows, the MAC tables and the datapath's drops must be the same. The received
frames include mutated encapsulation headers (Geneve options, critical and control bits,
version, protocol; GRE checksums, sequence numbers, keys) and mutated IPv6 outer headers
(extension headers, fragments, another next header, truncation, payload lengths that lie,
wrong and zero UDP checksums).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datapath.helpers import BCAST, Hypervisor, arp, eth, ipv4, mac
from espswitch.datapath import fast
from espswitch.datapath.encap import ENCAPSULATIONS
from espswitch.datapath.tunnel import ip_addr
from espswitch.ipsec import InboundSA, OutboundSA, SaParams, parse_transform
from espswitch.packet.udp import udp_checksum_ipv6
from fastpath.diff import PIPELINES
from fastpath.test_tx_pipeline import KINDS as TX_KINDS
from fastpath.test_tx_pipeline import VNET_KINDS, make, make_vnet

SPI_IN, SPI_OUT = 0x2001, 0x1001
KEY_IN = bytes(range(20))
KEY_OUT = bytes(range(100, 120))
VNI = 100
VM_MAC, PEER_VM, PEER_HV = mac(2), mac(1), mac(60)
GCM = parse_transform("aes128gcm16")


@dataclass(frozen=True)
class Variant:
    encap: str
    v6: bool
    esp: bool

    @property
    def local(self) -> str:
        return "fd00::2" if self.v6 else "10.0.0.2"

    @property
    def remote(self) -> str:
        return "fd00::1" if self.v6 else "10.0.0.1"

    @property
    def proto(self) -> int:
        return ENCAPSULATIONS[self.encap].PROTO

    def __str__(self) -> str:
        return f"{'esp' if self.esp else 'clear'}-{self.encap}{'6' if self.v6 else '4'}"


VARIANTS = [Variant(e, v6, esp) for esp in (True, False) for v6 in (False, True)
            for e in ("vxlan", "geneve", "gre") if v6 or e != "vxlan"]


def esp_options() -> dict[str, str]:
    return {"esp": "aes128gcm16", "spi_in": hex(SPI_IN), "spi_out": hex(SPI_OUT),
            "esp_key_in": KEY_IN.hex(), "esp_key_out": KEY_OUT.hex()}


def inner(dst: bytes = VM_MAC, src: bytes = PEER_VM, n: int = 0) -> bytes:
    return eth(dst, src, ipv4("192.168.1.1", "192.168.1.2", 1, bytes([n & 0xFF]) * (40 + n % 90)))


# -- what arrives from the underlay ----------------------------------------------------------

COMMON = ("valid", "wrong_vni", "unknown_dst", "broadcast", "inner_src_moves",
          "tagged_inner", "to_tunnel_itself", "other_src", "padded", "arp", "runt")
UDP_KINDS = ("wrong_dport", "short_udp", "long_udp")
GENEVE_KINDS = ("g_options", "g_critical", "g_control", "g_version", "g_proto", "g_reserved")
VXLAN_KINDS = ("no_i_flag",)
GRE_KINDS = ("gre_csum", "gre_seq", "gre_nokey", "gre_proto", "gre_routing")
V4_KINDS = ("fragment", "options", "vlan")
V6_KINDS = ("v6_hop_by_hop", "v6_fragment", "v6_other_nh", "v6_truncated", "v6_plen_short",
            "v6_plen_long", "v6_version", "v6_vlan")
ESP_KINDS = ("replay", "forged", "truncated_esp", "nh_wrong", "tfc", "unknown_spi", "dummy")
CLEAR_V6_KINDS = ("v6_bad_csum", "v6_zero_csum")


def rx_kinds(v: Variant) -> tuple[str, ...]:
    kinds = COMMON + (GRE_KINDS if v.encap == "gre" else UDP_KINDS)
    kinds += {"geneve": GENEVE_KINDS, "vxlan": VXLAN_KINDS}.get(v.encap, ())
    kinds += V6_KINDS if v.v6 else V4_KINDS
    if v.esp:
        kinds += ESP_KINDS
    elif v.v6 and v.encap != "gre":
        kinds += CLEAR_V6_KINDS
    return kinds


def encapsulated(v: Variant, kind: str, frame: bytes) -> bytes:
    """The encapsulation's push of `frame` (UDP onwards, or GRE), mutated as `kind` says;
    the UDP checksum is left 0."""
    opts = {"key": str(VNI + 1 if kind == "wrong_vni" else VNI)}
    if kind == "gre_csum":
        opts["csum"] = "true"
    b = bytearray(ENCAPSULATIONS[v.encap]("t", opts).push(frame))
    if kind == "wrong_dport":
        struct.pack_into("!H", b, 2, struct.unpack_from("!H", b, 2)[0] + 1)
    elif kind == "short_udp":
        struct.pack_into("!H", b, 4, 20)
    elif kind == "long_udp":
        struct.pack_into("!H", b, 4, len(b) + 10)
    elif kind == "no_i_flag":
        b[8] = 0
    elif kind == "g_options":  # one 4-byte option (class 0x0102, type 1, no data)
        b[8] = 1
        b[16:16] = b"\x01\x02\x01\x00"
        struct.pack_into("!H", b, 4, len(b))
    elif kind == "g_critical":
        b[9] |= 0x40
    elif kind == "g_control":
        b[9] |= 0x80
    elif kind == "g_version":
        b[8] |= 0x40
    elif kind == "g_proto":
        b[10:12] = b"\x08\x00"
    elif kind == "g_reserved":  # reserved bits and byte: ignored by the receiver
        b[9] |= 0x01
        b[15] = 0x5A
    elif kind == "gre_seq":
        b[0] |= 0x10
        b[8:8] = b"\0\0\0\x07"
    elif kind == "gre_nokey":
        b = bytearray(ENCAPSULATIONS["gre"]("t", {}).push(frame))
    elif kind == "gre_proto":
        b[2:4] = b"\x08\x00"
    elif kind == "gre_routing":
        b[0] |= 0x40
    return bytes(b)


def ipv6_packet(src: bytes, dst: bytes, nh: int, payload: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), nh, 64, src, dst) + payload


def with_udp_checksum(v: Variant, l4: bytes, src: bytes, dst: bytes) -> bytes:
    """`l4` with the UDP checksum an IPv6 sender computes (IPv4: left 0)."""
    if not v.v6 or v.proto != 17:
        return l4
    return l4[:6] + struct.pack("!H", udp_checksum_ipv6(src, dst, l4)) + l4[8:]


def outer(hv: Hypervisor, v: Variant, kind: str, proto: int, payload: bytes) -> bytes:
    """An Ethernet frame from the peer hypervisor to our endpoint carrying `payload` as IP
    protocol `proto`, with `kind`'s mutation of the outer headers."""
    src = ip_addr("fd00::9" if v.v6 else "10.0.0.9") if kind == "other_src" \
        else ip_addr(v.remote)
    dst = ip_addr(v.local)
    head = hv.dev("br-phy").mac + PEER_HV
    if not v.v6:
        ip = bytearray(ipv4(v.remote if kind != "other_src" else "10.0.0.9", v.local, proto,
                            payload))
        if kind == "fragment":
            struct.pack_into("!H", ip, 6, 0x2000)
        elif kind == "options":
            ip = bytearray(bytes([0x46]) + ip[1:20] + b"\x01\x01\x01\x01" + ip[20:])
            struct.pack_into("!H", ip, 2, len(ip))
        if kind == "vlan":
            head += b"\x81\x00\x00\x00"
        return head + b"\x08\x00" + bytes(ip) + (bytes(6) if kind == "padded" else b"")
    if kind == "v6_hop_by_hop":
        ip = bytearray(ipv6_packet(src, dst, 0, bytes([proto, 0, 1, 4, 0, 0, 0, 0]) + payload))
    elif kind == "v6_fragment":  # an atomic fragment: offset 0, no more fragments
        ip = bytearray(ipv6_packet(src, dst, 44, bytes([proto, 0, 0, 0, 0, 0, 0, 9]) + payload))
    else:
        ip = bytearray(ipv6_packet(src, dst, 6 if kind == "v6_other_nh" else proto, payload))
    if kind == "v6_plen_short":
        struct.pack_into("!H", ip, 4, len(ip) - 40 - 5)
    elif kind == "v6_plen_long":
        struct.pack_into("!H", ip, 4, len(ip) - 40 + 5)
    elif kind == "v6_truncated":
        ip = ip[:-7]
    elif kind == "v6_version":
        ip[0] = 0x40
    if kind == "v6_vlan":
        head += b"\x81\x00\x00\x00"
    return head + b"\x86\xdd" + bytes(ip) + (bytes(6) if kind == "padded" else b"")


class Peer:
    """The remote hypervisor: one frame of each kind, the same for both hypervisors."""

    def __init__(self, v: Variant) -> None:
        self.v = v
        self.sa = OutboundSA(SaParams(spi=SPI_IN, transform=GCM, keymat=KEY_IN))
        self.last: bytes | None = None
        self.n = 0

    def make(self, hv: Hypervisor, kind: str) -> bytes:
        v = self.v
        self.n += 1
        n = self.n
        if kind == "arp":
            if v.v6:
                return eth(BCAST, PEER_HV, b"\0" * 46, et=0x88B5)
            return eth(BCAST, PEER_HV, arp(1, PEER_HV, v.remote, b"\0" * 6, v.local), et=0x0806)
        if kind == "runt":
            return hv.dev("br-phy").mac + PEER_HV + (b"\x86\xdd" if v.v6 else b"\x08\x00") \
                + bytes(20)
        frame = inner(n=n)
        if kind == "unknown_dst":
            frame = inner(dst=mac(9), n=n)
        elif kind == "broadcast":
            frame = inner(dst=BCAST, n=n)
        elif kind == "inner_src_moves":
            frame = inner(src=mac(7), n=n)
        elif kind == "to_tunnel_itself":
            frame = inner(dst=PEER_VM, n=n)
        elif kind == "tagged_inner":
            frame = VM_MAC + PEER_VM + b"\x81\x00\x00\x05" + frame[12:]
        l4 = encapsulated(v, kind, frame)
        src, dst = ip_addr(v.remote), ip_addr(v.local)
        if kind != "v6_zero_csum":
            l4 = with_udp_checksum(v, l4, src, dst)
        if kind == "v6_bad_csum":
            l4 = l4[:6] + bytes([l4[6] ^ 0x10, l4[7]]) + l4[8:]
        if not v.esp:
            return outer(hv, v, kind, v.proto, l4)
        sa = self.sa
        if kind == "replay" and self.last is not None:
            return outer(hv, v, kind, 50, self.last)
        if kind == "nh_wrong":
            esp = sa.encrypt(l4, 4)
        elif kind == "tfc":
            esp = sa.encrypt(l4 + bytes(24), v.proto)
        elif kind == "dummy":
            esp = sa.encrypt(bytes(30), 59)
        else:
            esp = sa.encrypt(l4, v.proto)
        if kind == "forged":
            esp = esp[:20] + bytes([esp[20] ^ 1]) + esp[21:]
        elif kind == "truncated_esp":
            esp = esp[:-3]
        elif kind == "unknown_spi":
            esp = esp[:3] + bytes([esp[3] ^ 0x40]) + esp[4:]
        else:
            self.last = esp
        return outer(hv, v, kind, 50, esp)


# -- the two hypervisors ----------------------------------------------------------------------

def hypervisor(v: Variant, fast_path: bool, wire: bool = False) -> Hypervisor:
    """A hypervisor with `v`'s tunnel; the peer hypervisor (next hop), the peer's VM and ours
    learned by the Python path."""
    hv = Hypervisor(v.local, v.remote, vni=VNI, tun_type=v.encap,
                    tun_options=esp_options() if v.esp else {}, wire=wire)
    if v.esp:
        esp = hv.tun.esp
        assert fast.is_compiled(esp.sa_out) and fast.is_compiled(esp.sa_in)
        esp.sa_out._iv_mask = 0  # the same IVs on both hypervisors
    hv.dp.fast_path = fast_path
    phy = hv.dev("br-phy").mac
    if v.v6:
        hv.dp.neigh.learn("br-phy", ip_addr(v.remote), PEER_HV, hv.dp.now)
        hv.inject("eth0", eth(phy, PEER_HV, b"\0" * 46, et=0x88B5))
    else:
        hv.inject("eth0", eth(phy, PEER_HV, arp(2, PEER_HV, v.remote, phy, v.local),
                              et=0x0806))
    hv.inject("eth0", Peer(v).make(hv, "valid"))  # (sequence number 1 on both)
    hv.inject("vm", eth(PEER_VM, VM_MAC, bytes(46)))
    for name in ("vm", "eth0", "br-phy", "br-int"):
        hv.dev(name).take()
    f = hv.dp._fast
    if f is not None:  # the tests count from here
        f.hits = f.misses = f.upcalls = f.drops = f.tx_hits = f.tx_misses = 0
    return hv


def state(hv: Hypervisor) -> dict:
    """Everything observable: outputs per device, statistics, SAs, drops, MAC tables."""
    out = {
        "out": {n: hv.dev(n).take() for n in ("vm", "eth0", "br-phy", "br-int")},
        "stats": {name: dict(p.stats) for name, p in hv.dp.ports.items()},
        "drops": dict(hv.dp.drops),
        "ip_id": hv.tun.underlay.ip_ids[0],
        "macs": {b.name: sorted((k, v[0].name) for k, v in b.macs.items())
                 for b in hv.dp.bridges.values()},
    }
    esp = hv.tun.esp
    if esp is not None:
        out["sa_out"] = (esp.sa_out.counters(), esp.sa_out.seq)
        out["sa_in"] = (esp.sa_in.counters(), esp.sa_in.window.top,
                        list(esp.sa_in.window.blocks))
        out["unknown_spi"] = esp._layer.sad.unknown_spi
    return out


def run_both(v: Variant, script: list[tuple[str, list[str]]], vnet: bool = False,
             wire: bool = False) -> tuple[Hypervisor, Hypervisor]:
    """Batches from "eth0" (rx_kinds) or "vm" (the transmit tests' kinds; with `vnet`,
    reads with a virtio-net header) through a fast and a Python hypervisor; asserts they
    agree after each."""
    on, off = hypervisor(v, True, wire), hypervisor(v, False, wire)
    for hv in (on, off):
        hv.dp.ports["vm"].vnet = vnet
    assert state(on) == state(off)
    peer = Peer(v)
    peer.n = peer.sa.seq = 1
    n = 0
    for where, kinds in script:
        frames = []
        for k in kinds:
            n += 1
            if where == "eth0":
                frames.append(peer.make(on, k))
            else:
                frames.append(make_vnet(on, k, n) if vnet else make(on, k, n))
        on.inject(where, *frames)
        off.inject(where, *frames)
        PIPELINES["rx frames" if where == "eth0" else
                  "tx offload reads" if vnet else "tx frames"] += len(frames)
        assert state(on) == state(off), (where, kinds)
    return on, off


ids = [str(v) for v in VARIANTS]


@pytest.mark.parametrize("v", VARIANTS, ids=ids)
def test_both_directions_take_the_compiled_pipelines(v: Variant) -> None:
    on, _ = run_both(v, [("eth0", ["valid"] * 4), ("vm", ["plain"] * 4)])
    f = on.dp._fast
    assert (f.hits, f.misses, f.upcalls, f.drops) == (4, 0, 0, 0)
    assert (f.tx_hits, f.tx_misses) == (4, 0)
    show = on.dp.show()
    assert "eth0 1: (system) fast-rx" in show and "vm 1: (tap) fast-tx" in show
    assert f"vx0 2: ({v.encap}: " in show and "fast-tx-tunnel" in show
    assert "hits=4 " in show and "tx_hits=4 " in show


@pytest.mark.parametrize("v", VARIANTS, ids=ids)
def test_every_receive_kind_alone_matches_the_python_path(v: Variant) -> None:
    kinds = rx_kinds(v)
    run_both(v, [("eth0", [k]) for k in kinds] + [("eth0", [k, "valid"]) for k in kinds])


# After the ESP open, what the fast path hands up to the tunnel's Python code (it counts
# or delivers them: other keys, MACs it does not know, headers it leaves to Python).
UPCALLS = {"wrong_vni", "unknown_dst", "broadcast", "inner_src_moves", "tagged_inner",
           "to_tunnel_itself", "short_udp", "long_udp", "nh_wrong", "wrong_dport",
           "no_i_flag", *GENEVE_KINDS, *GRE_KINDS} - {"g_reserved"}


def expected(v: Variant, kind: str) -> str:
    """What the fast path's counters say of one frame of `kind`."""
    if kind in ("valid", "padded", "g_reserved", "tfc", "v6_zero_csum"):
        return "hits"
    if kind == "v6_plen_short":
        # ESP: the ICV fails; GRE ends where IP ends: a shorter inner frame, as Python's.
        return "drops" if v.esp else "hits" if v.encap == "gre" else "misses"
    if v.esp and kind in ("replay", "forged", "truncated_esp", "dummy"):
        return "drops"
    if v.esp and kind in UPCALLS:
        return "upcalls"
    return "misses"


@pytest.mark.parametrize("v", VARIANTS, ids=ids)
def test_expected_receive_outcomes(v: Variant) -> None:
    for kind in rx_kinds(v):
        on, _ = run_both(v, [("eth0", ["valid"] if kind == "replay" else []), ("eth0", [kind])])
        f = on.dp._fast
        got = {k: getattr(f, k) for k in ("hits", "drops", "upcalls", "misses")}
        want = {k: int(k == expected(v, kind)) for k in got}
        if kind == "replay":
            want["hits"] += 1
        assert got == want, (kind, got)


@pytest.mark.parametrize("v", VARIANTS, ids=ids)
def test_every_transmit_kind_alone_matches_the_python_path(v: Variant) -> None:
    run_both(v, [("vm", [k]) for k in TX_KINDS])
    run_both(v, [("vm", [k]) for k in VNET_KINDS], vnet=True)


@pytest.mark.parametrize("v", [v for v in VARIANTS if v.esp], ids=[str(v) for v in VARIANTS
                                                                  if v.esp])
def test_what_leaves_is_what_the_peer_opens(v: Variant) -> None:
    on, _ = run_both(v, [])
    sent = eth(PEER_VM, VM_MAC, ipv4("192.168.1.2", "192.168.1.1", 17, b"q" * 301))
    on.inject("vm", sent)
    assert on.dp._fast.tx_hits == 1
    (out,) = on.dev("eth0").take()
    l3 = 54 if v.v6 else 34
    assert out[:6] == PEER_HV and out[12:14] == (b"\x86\xdd" if v.v6 else b"\x08\x00")
    assert out[20 if v.v6 else 23] == 50
    if v.v6:
        assert out[14:18] == b"\x60\0\0\0" and out[21] == 64
        assert struct.unpack_from("!H", out, 18)[0] == len(out) - 54
    nh, pl = InboundSA(SaParams(spi=SPI_OUT, transform=GCM, keymat=KEY_OUT)).open(out[l3:])
    assert nh == v.proto and pl.endswith(sent)
    if v.proto == 17 and v.v6:  # the UDP checksum over the IPv6 pseudo header is right
        assert udp_checksum_ipv6(ip_addr(v.local), ip_addr(v.remote), pl) == \
            struct.unpack_from("!H", pl, 6)[0]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=False))
@pytest.mark.parametrize("v", VARIANTS, ids=ids)
def test_long_scripts_both_ways_match_the_python_path(v: Variant, rnd) -> None:
    rx = ("valid",) * 12 + rx_kinds(v)
    tx = ("plain",) * 10 + TX_KINDS
    script = []
    for _ in range(30):
        if rnd.random() < 0.5:
            script.append(("eth0", [rnd.choice(rx) for _ in range(rnd.randint(1, 40))]))
        else:
            script.append(("vm", [rnd.choice(tx) for _ in range(rnd.randint(1, 40))]))
    run_both(v, script)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=False))
@pytest.mark.parametrize("v", VARIANTS, ids=ids)
def test_long_offload_scripts_match_the_python_path(v: Variant, rnd) -> None:
    kinds = ("tso",) * 6 + ("plain",) * 4 + VNET_KINDS
    run_both(v, [("vm", [rnd.choice(kinds) for _ in range(rnd.randint(1, 10))])
                 for _ in range(20)], vnet=True)


def test_ike_keyed_geneve_with_ovs_selectors_takes_the_fast_path() -> None:
    """An ordinary `geneve` tunnel with `options:psk`, keyed as Open vSwitch's IPsec keys
    it: the "out" CHILD_SA (UDP to the peer's 6081) seals in the fast path; the
    receive-only "in" CHILD_SA (UDP to our 6081 from any port, the tunnel's own selector)
    opens there; the "out" CHILD_SA's inbound SA (UDP from the peer's 6081 only: narrower
    than the tunnel's selector) is not installed, its packets stay the Python path's."""
    v = Variant("geneve", False, True)
    hv = Hypervisor(v.local, v.remote, vni=VNI, tun_type="geneve",
                    tun_options={"psk": "swordfish-0123456789"})
    hv.tun.install_child(SaParams(spi=SPI_OUT, transform=GCM, keymat=KEY_OUT),
                         SaParams(spi=0x3001, transform=GCM, keymat=KEY_OUT),
                         rx_ports=((6081, 6081), (0, 65535)))
    hv.tun.install_child(SaParams(spi=0x1002, transform=GCM, keymat=KEY_IN),
                         SaParams(spi=SPI_IN, transform=GCM, keymat=KEY_IN), sends=False)
    phy = hv.dev("br-phy").mac
    hv.inject("eth0", eth(phy, PEER_HV, arp(2, PEER_HV, v.remote, phy, v.local), et=0x0806))
    peer = Peer(v)
    hv.inject("eth0", peer.make(hv, "valid"))
    hv.inject("vm", eth(PEER_VM, VM_MAC, bytes(46)))
    for name in ("vm", "eth0", "br-phy", "br-int"):
        hv.dev(name).take()
    f = hv.dp._fast
    hits, tx_hits = f.hits, f.tx_hits
    frames = [peer.make(hv, "valid") for _ in range(3)]
    hv.inject("eth0", *frames)
    assert f.hits - hits == 3 and len(hv.dev("vm").take()) == 3
    assert f.table.nspi == 1  # SPI_IN only
    sent = eth(PEER_VM, VM_MAC, ipv4("192.168.1.2", "192.168.1.1", 17, b"g" * 200))
    hv.inject("vm", sent, sent)
    assert f.tx_hits - tx_hits == 2
    opener = InboundSA(SaParams(spi=SPI_OUT, transform=GCM, keymat=KEY_OUT))
    for out in hv.dev("eth0").take():
        assert out[34:38] == SPI_OUT.to_bytes(4, "big")
        nh, pl = opener.open(out[34:])
        assert nh == 17 and pl[2:4] == (6081).to_bytes(2, "big") and pl[16:] == sent
        assert pl[8:16] == b"\0\0\x65\x58" + (VNI << 8).to_bytes(4, "big")
    # From the peer's 6081 on the "out" CHILD_SA: opened and checked by the Python path.
    out_sa = OutboundSA(SaParams(spi=0x3001, transform=GCM, keymat=KEY_OUT))
    l4 = bytearray(encapsulated(v, "valid", inner(n=5)))
    l4[0:2] = (6081).to_bytes(2, "big")
    misses = f.misses
    hv.inject("eth0", outer(hv, v, "valid", 50, out_sa.encrypt(bytes(l4), 17)))
    assert f.misses - misses == 1 and len(hv.dev("vm").take()) == 1
    assert hv.tun.stats["esp_selector_drops"] == 0
    show = hv.dp.show()
    assert "eth0 1: (system) fast-rx" in show and "fast-tx-tunnel" in show
