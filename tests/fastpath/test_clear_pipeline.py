"""The compiled pipelines on a clear `vxlan` tunnel, against the Python path, in memory.

Two identical hypervisors (br-phy: eth0 + internal; br-int: vm + a plain VXLAN tunnel),
one with `Datapath.fast_path` on and one with it off, get the same frames from the
underlay and from the VM: what leaves every device (byte for byte, IPv4 IDs included),
every port's statistics, the MAC tables and the datapath's drops must be the same.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datapath.helpers import BCAST, Hypervisor, arp, eth, ipv4, mac, udp, vxlan
from fastpath.diff import PIPELINES
from fastpath.test_tx_pipeline import KINDS as TX_KINDS
from fastpath.test_tx_pipeline import VNET_KINDS, make, make_vnet

LOCAL, REMOTE = "10.0.0.2", "10.0.0.1"
VNI = 100
VM_MAC, PEER_VM, PEER_HV = mac(2), mac(1), mac(60)


def inner(dst: bytes = VM_MAC, src: bytes = PEER_VM, n: int = 0) -> bytes:
    return eth(dst, src, ipv4("192.168.1.1", "192.168.1.2", 1, bytes([n & 0xFF]) * (40 + n % 90)))


def outer(hv: Hypervisor, l4: bytes, *, src: str = REMOTE, dst: str = LOCAL, proto: int = 17,
          frag: int = 0, options: bool = False, vlan: bool = False, pad: int = 0) -> bytes:
    ip = bytearray(ipv4(src, dst, proto, l4))
    if frag:
        struct.pack_into("!H", ip, 6, frag)
    if options:
        ip = bytearray(bytes([0x46]) + ip[1:20] + b"\x01\x01\x01\x01" + ip[20:])
        struct.pack_into("!H", ip, 2, len(ip))
    head = hv.dev("br-phy").mac + PEER_HV + (b"\x81\x00\x00\x00" if vlan else b"")
    return head + b"\x08\x00" + bytes(ip) + bytes(pad)


RX_KINDS = ("valid", "wrong_vni", "wrong_dport", "unknown_dst", "broadcast", "short_udp",
            "long_udp", "padded", "no_i_flag", "fragment", "options", "vlan", "other_src",
            "other_dst", "tagged_inner", "inner_src_moves", "to_tunnel_itself", "arp", "runt")


def make_rx(hv: Hypervisor, kind: str, n: int) -> bytes:
    body = inner(n=n)
    if kind == "wrong_vni":
        return outer(hv, udp(49152, 4789, vxlan(VNI + 1, body)))
    if kind == "wrong_dport":
        return outer(hv, udp(49152, 4790, vxlan(VNI, body)))
    if kind == "unknown_dst":
        return outer(hv, udp(49152, 4789, vxlan(VNI, inner(dst=mac(9), n=n))))
    if kind == "broadcast":
        return outer(hv, udp(49152, 4789, vxlan(VNI, inner(dst=BCAST, n=n))))
    if kind in ("short_udp", "long_udp"):
        u = bytearray(udp(49152, 4789, vxlan(VNI, body)))
        struct.pack_into("!H", u, 4, 20 if kind == "short_udp" else len(u) + 10)
        return outer(hv, bytes(u))
    if kind == "padded":
        return outer(hv, udp(49152, 4789, vxlan(VNI, body)), pad=6)
    if kind == "no_i_flag":
        v = bytearray(vxlan(VNI, body))
        v[0] = 0
        return outer(hv, udp(49152, 4789, bytes(v)))
    if kind == "fragment":
        return outer(hv, udp(49152, 4789, vxlan(VNI, body)), frag=0x2000)
    if kind == "options":
        return outer(hv, udp(49152, 4789, vxlan(VNI, body)), options=True)
    if kind == "vlan":
        return outer(hv, udp(49152, 4789, vxlan(VNI, body)), vlan=True)
    if kind == "other_src":
        return outer(hv, udp(49152, 4789, vxlan(VNI, body)), src="10.0.0.9")
    if kind == "other_dst":
        return outer(hv, udp(49152, 4789, vxlan(VNI, body)), dst="10.0.0.77")
    if kind == "tagged_inner":
        return outer(hv, udp(49152, 4789, vxlan(VNI, VM_MAC + PEER_VM + b"\x81\x00\x00\x05"
                                                 + body[12:])))
    if kind == "inner_src_moves":
        return outer(hv, udp(49152, 4789, vxlan(VNI, inner(src=mac(7), n=n))))
    if kind == "to_tunnel_itself":
        return outer(hv, udp(49152, 4789, vxlan(VNI, inner(dst=PEER_VM, n=n))))
    if kind == "arp":
        return eth(BCAST, PEER_HV, arp(1, PEER_HV, REMOTE, b"\0" * 6, LOCAL), et=0x0806)
    if kind == "runt":
        return hv.dev("br-phy").mac + PEER_HV + b"\x08\x00" + bytes(20)
    return outer(hv, udp(49152, 4789, vxlan(VNI, body)))


def hypervisor(fast_path: bool) -> Hypervisor:
    hv = Hypervisor(LOCAL, REMOTE, vni=VNI, tun_type="vxlan")
    hv.dp.fast_path = fast_path
    phy = hv.dev("br-phy").mac
    hv.inject("eth0", eth(phy, PEER_HV, arp(2, PEER_HV, REMOTE, phy, LOCAL), et=0x0806))
    hv.inject("eth0", outer(hv, udp(49152, 4789, vxlan(VNI, eth(VM_MAC, PEER_VM)))))
    hv.inject("vm", eth(PEER_VM, VM_MAC, bytes(46)))
    for name in ("vm", "eth0", "br-phy", "br-int"):
        hv.dev(name).take()
    return hv


def state(hv: Hypervisor) -> dict:
    return {
        "out": {n: hv.dev(n).take() for n in ("vm", "eth0", "br-phy", "br-int")},
        "stats": {name: dict(p.stats) for name, p in hv.dp.ports.items()},
        "drops": dict(hv.dp.drops),
        "ip_id": hv.tun.underlay.ip_ids[0],
        "macs": {b.name: sorted((k, v[0].name) for k, v in b.macs.items())
                 for b in hv.dp.bridges.values()},
    }


def run_both(script: list[tuple[str, list[str]]], vnet: bool = False
             ) -> tuple[Hypervisor, Hypervisor]:
    """Batches from "eth0" (RX_KINDS) or "vm" (the transmit tests' kinds) through a fast
    and a Python hypervisor; asserts they agree after each."""
    on, off = hypervisor(True), hypervisor(False)
    for hv in (on, off):
        hv.dp.ports["vm"].vnet = vnet
    assert state(on) == state(off)
    n = 0
    for where, kinds in script:
        frames = []
        for k in kinds:
            n += 1
            if where == "eth0":
                frames.append(make_rx(on, k, n))
            else:
                frames.append(make_vnet(on, k, n) if vnet else make(on, k, n))
        on.inject(where, *frames)
        off.inject(where, *frames)
        PIPELINES["rx frames" if where == "eth0" else
                  "tx offload reads" if vnet else "tx frames"] += len(frames)
        assert state(on) == state(off), (where, kinds)
    return on, off


def test_plain_vxlan_both_ways_takes_the_compiled_pipelines() -> None:
    on, _ = run_both([("eth0", ["valid"] * 5), ("vm", ["plain"] * 5)])
    f = on.dp._fast
    assert f.hits == 5 and f.tx_hits == 5
    show = on.dp.show()
    assert "eth0 1: (system) fast-rx" in show and "vm 1: (tap) fast-tx" in show
    assert "fast-tx-tunnel" in show


def test_the_ip_id_counter_is_shared_with_the_python_path() -> None:
    on = hypervisor(True)
    start = on.tun.underlay.ip_ids[0]
    # compiled, Python (a flood goes out of the tunnel too), compiled
    for frame in (make(on, "plain", 1), make(on, "broadcast", 2), make(on, "plain", 3)):
        on.inject("vm", frame)
    outs = [f for f in on.dev("eth0").take() if f[12:14] == b"\x08\x00"]
    assert on.dp._fast.tx_hits == 2
    assert [struct.unpack_from("!H", f, 18)[0] for f in outs] == [start + 1, start + 2,
                                                                  start + 3]
    assert on.tun.underlay.ip_ids[0] == start + 3


def test_every_receive_kind_alone_matches_the_python_path() -> None:
    run_both([("eth0", [k]) for k in RX_KINDS] + [("eth0", [k, "valid"]) for k in RX_KINDS])


def test_expected_receive_outcomes() -> None:
    for kind in RX_KINDS:
        on, _ = run_both([("eth0", [kind])])
        assert on.dp._fast.hits == (1 if kind in ("valid", "padded") else 0), kind


def test_every_transmit_kind_alone_matches_the_python_path() -> None:
    run_both([("vm", [k]) for k in TX_KINDS])
    run_both([("vm", [k]) for k in VNET_KINDS], vnet=True)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=False))
def test_long_scripts_both_ways_match_the_python_path(rnd) -> None:
    rx = ("valid",) * 10 + RX_KINDS
    tx = ("plain",) * 10 + TX_KINDS
    script = []
    for _ in range(40):
        if rnd.random() < 0.5:
            script.append(("eth0", [rnd.choice(rx) for _ in range(rnd.randint(1, 48))]))
        else:
            script.append(("vm", [rnd.choice(tx) for _ in range(rnd.randint(1, 48))]))
    run_both(script)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=False))
def test_long_offload_scripts_match_the_python_path(rnd) -> None:
    kinds = ("tso",) * 6 + VNET_KINDS
    run_both([("vm", [rnd.choice(kinds) for _ in range(rnd.randint(1, 12))])
              for _ in range(30)], vnet=True)
