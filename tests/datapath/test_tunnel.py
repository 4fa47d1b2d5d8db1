"""Native VXLAN tunneling between two in-memory hypervisors."""

from __future__ import annotations

import struct

import pytest

from espswitch.datapath import Datapath, PortError
from espswitch.datapath.devices import MemoryDevices
from espswitch.datapath.tunnel import FOUND, MISSING, PENDING, NeighborCache, Route, RouteTable, ip4

from .helpers import BCAST, Hypervisor, arp, csum, eth, ipv4, mac, udp, vxlan


def answer_arp(hv: Hypervisor, peer: Hypervisor) -> None:
    """Answer the ARP request `hv` sent on eth0 as `peer`'s kernel would."""
    out = hv.dev("eth0").take()
    reqs = [f for f in out if f[12:14] == b"\x08\x06"]
    assert reqs, "no ARP request was sent"
    req = reqs[0]
    assert req[0:6] == BCAST
    assert req[38:42] == ip4(peer.ip)
    peer_mac = peer.dev("br-phy").mac
    hv.inject("eth0", eth(req[6:12], peer_mac, arp(2, peer_mac, peer.ip, req[6:12], hv.ip), 0x0806))


def test_vxlan_end_to_end_in_memory():
    a = Hypervisor("10.0.0.1", "10.0.0.2")
    b = Hypervisor("10.0.0.2", "10.0.0.1")
    inner = eth(mac(2), mac(1), ipv4("192.168.1.1", "192.168.1.2", 1, b"ping" * 10))
    a.inject("vm", inner)
    # Next hop unknown: an ARP request went out, the frame waits in the queue.
    state, _ = a.dp.neigh.lookup("br-phy", ip4("10.0.0.2"), a.dp.now)
    assert state == PENDING
    answer_arp(a, b)
    out = a.dev("eth0").take()
    assert len(out) == 1
    f = out[0]
    assert f[0:6] == b.dev("br-phy").mac and f[6:12] == a.dev("br-phy").mac
    ip = f[14:34]
    assert ip[0] == 0x45 and ip[9] == 17 and csum(ip) == 0
    assert ip[12:16] == ip4("10.0.0.1") and ip[16:20] == ip4("10.0.0.2")
    assert struct.unpack("!H", ip[6:8])[0] & 0x4000  # DF
    sport, dport, ulen = struct.unpack("!HHH", f[34:40])
    assert dport == 4789 and sport >= 49152 and ulen == len(f) - 34
    assert f[42:50] == vxlan(100, b"")
    assert f[50:] == inner
    # Hand it to b's underlay: it is decapsulated and reaches b's VM.
    b.inject("eth0", f)
    assert b.dev("vm").take() == [inner]
    assert b.dev("br-phy").take() == []  # tunnel traffic does not reach the kernel
    assert b.tun.stats["rx_packets"] == 1
    assert a.tun.stats["tx_packets"] == 1
    # b learned a's MAC from the ARP? No: from the tunnel frame it learns VM MACs on vx0.
    assert b.dp.bridges["br-int"].macs[(0, mac(1))][0] is b.tun


def test_ip_id_increments_and_source_port_follows_flow():
    a = Hypervisor("10.0.0.1", "10.0.0.2")
    a.dp.neigh.learn("br-phy", ip4("10.0.0.2"), mac(99), a.dp.now)
    f1 = eth(mac(2), mac(1), ipv4("192.168.1.1", "192.168.1.2", 6, udp(1000, 80, b"a" * 30)))
    f2 = eth(mac(2), mac(1), ipv4("192.168.1.1", "192.168.1.2", 6, udp(1001, 80, b"a" * 30)))
    a.inject("vm", f1, f1, f2)
    out = a.dev("eth0").take()
    ids = [struct.unpack("!H", f[18:20])[0] for f in out]
    assert ids == [ids[0], ids[0] + 1, ids[0] + 2]
    sports = [struct.unpack("!H", f[34:36])[0] for f in out]
    assert sports[0] == sports[1] != sports[2]


def test_unknown_vni_and_malformed_vxlan_are_counted():
    b = Hypervisor("10.0.0.2", "10.0.0.1")
    inner = eth(mac(2), mac(1))
    bad_vni = eth(
        b.dev("br-phy").mac,
        mac(50),
        ipv4("10.0.0.1", "10.0.0.2", 17, udp(5000, 4789, vxlan(7, inner))),
    )
    short = eth(
        b.dev("br-phy").mac, mac(50), ipv4("10.0.0.1", "10.0.0.2", 17, udp(5000, 4789, b"\x08\0\0"))
    )
    b.inject("eth0", bad_vni, short)
    st = b.dp.ports["eth0"].stats
    assert st["rx_unknown_tunnel"] == 1 and st["rx_malformed"] == 1 and st["rx_dropped"] == 2
    assert b.dev("vm").take() == []


def test_non_tunnel_traffic_to_local_ip_reaches_the_kernel():
    b = Hypervisor("10.0.0.2", "10.0.0.1")
    icmp = eth(b.dev("br-phy").mac, mac(50), ipv4("10.0.0.1", "10.0.0.2", 1, b"\x08" * 20))
    other_udp = eth(
        b.dev("br-phy").mac, mac(50), ipv4("10.0.0.1", "10.0.0.2", 17, udp(5000, 53, b"q" * 20))
    )
    b.inject("eth0", icmp, other_udp)
    assert b.dev("br-phy").take() == [icmp, other_udp]


def test_arp_queue_is_bounded_and_given_up():
    a = Hypervisor("10.0.0.1", "10.0.0.2")
    frames = [eth(mac(2), mac(1), bytes([i % 256]) * 60) for i in range(100)]
    a.inject("vm", *frames)
    assert a.tun.stats["tx_neigh_drops"] == 100 - 64
    now = a.dp.now
    for k in range(1, 5):
        a.dp.run(now + k * 1.1)
    arps = [f for f in a.dev("eth0").take() if f[12:14] == b"\x08\x06"]
    assert len(arps) == 3  # first try plus two retries
    assert a.tun.stats["tx_neigh_drops"] == 100
    assert not a.dp.tunnels.queues


def test_no_route_is_a_counted_drop_with_status():
    a = Hypervisor("10.0.0.1", "172.16.0.9")
    a.inject("vm", eth(BCAST, mac(1)))
    assert a.tun.stats["tx_no_route"] == 1
    assert "no route" in a.tun.status()["tunnel_problem"]


def test_status_names_egress_iface():
    a = Hypervisor("10.0.0.1", "10.0.0.2")
    assert a.tun.status()["tunnel_egress_iface"] == "br-phy"


@pytest.mark.parametrize(
    ("type_", "options", "words"),
    [
        ("vxlan", {}, "needs options:remote_ip"),
        ("vxlan", {"remote_ip": "10.0.0.9", "key": "16777216"}, "out of range"),
        ("vxlan", {"remote_ip": "nope"}, "not an IPv4 or IPv6 address"),
        ("vxlan", {"remote_ip": "10.0.0.9", "colour": "red"}, "does not take option colour"),
        ("stt", {}, "unknown interface type 'stt'"),
        ("gre", {"remote_ip": "10.0.0.9", "seq": "true"}, "options:seq .* not supported"),
        ("gre", {"remote_ip": "10.0.0.9", "csum": "maybe"}, "options:csum must be true"),
        ("gre", {"remote_ip": "10.0.0.9", "dst_port": "1234"}, "does not take option dst_port"),
        ("geneve", {"remote_ip": "10.0.0.9", "dst_port": "4500"}, "dst_port 4500 is IKE"),
        ("system", {}, "does not exist"),
        ("patch", {}, "needs options:peer"),
        # Issue 9 D3/D4: values that used to be accepted silently.
        ("vxlan", {"remote_ip": "10.0.0.9", "dst_port": "500"}, "dst_port 500 is IKE's port"),
        ("vxlan", {"remote_ip": "10.0.0.9", "dst_port": "4500"}, "dst_port 4500 is IKE and"),
        ("vxlanipsec", {"remote_ip": "10.0.0.9", "dst_port": "500", "psk": "x"},
         "dst_port 500 is IKE's port"),
        ("vxlan", {"remote_ip": "0.0.0.0"}, "the unspecified address"),
        ("vxlan", {"remote_ip": "255.255.255.255"}, "the broadcast address"),
        ("vxlan", {"remote_ip": "224.0.0.1"}, "a multicast address"),
        ("vxlan", {"remote_ip": "127.0.0.1"}, "a loopback address"),
        ("vxlan", {"remote_ip": "240.0.0.1"}, "a reserved address"),
        ("vxlan", {"remote_ip": "10.0.0.9", "local_ip": "224.0.0.5"}, "options:local_ip"),
        ("vxlan", {"remote_ip": "10.0.0.9", "key": "\u0661\u0660"}, "options:key .* not a number"),
        ("vxlan", {"remote_ip": "10.0.0.9", "ttl": "6_4"}, "options:ttl .* not a number"),
        ("vxlan", {"remote_ip": "10.0.0.9", "dst_port": " 4789\n"}, "not a number"),
    ],
)
def test_bad_config_is_a_port_error(type_, options, words):
    dp = Datapath(MemoryDevices())
    dp.add_bridge("br0")
    with pytest.raises(PortError, match=words):
        dp.add_port("br0", "x0", type_, options)
    assert "x0" not in dp.ports


def test_remote_ip_of_this_hypervisor_is_refused():
    a = Hypervisor("10.0.0.1", "10.0.0.2")
    with pytest.raises(PortError, match=r"remote_ip 10\.0\.0\.1 is an address of this hypervisor"):
        a.dp.add_port("br-int", "vx1", "vxlan", {"remote_ip": "10.0.0.1", "key": "7"})
    assert "vx1" not in a.dp.ports and "vx0" in a.dp.ports


def test_a_local_ip_that_is_not_local_is_a_status_problem_until_it_is():
    a = Hypervisor("10.0.0.1", "10.0.0.2")
    tun = a.dp.add_port("br-int", "vx1", "vxlan",
                        {"remote_ip": "10.0.0.3", "local_ip": "10.0.0.77", "key": "7"})
    assert "local_ip 10.0.0.77 is not an address" in tun.status()["tunnel_problem"]
    assert tun.link_state() == "down"
    a.inject("vm", eth(BCAST, mac(1)))
    assert tun.stats["tx_no_route"] == 1
    assert all(f[26:30] != ip4("10.0.0.77") for f in a.dev("eth0").take())
    # The address appears: the tunnel works without being configured again.
    a.dp.routes.set_system(a.dp.routes.system, {"br-phy": [ip4("10.0.0.1"), ip4("10.0.0.77")]})
    a.dp.run(1.0)
    assert "tunnel_problem" not in tun.status() and tun.link_state() == "up"


def test_duplicate_tunnel_rejected():
    a = Hypervisor("10.0.0.1", "10.0.0.2")
    with pytest.raises(PortError, match="duplicates tunnel vx0"):
        a.dp.add_port("br-int", "vx1", "vxlan", {"remote_ip": "10.0.0.2", "key": "100"})


def test_route_table_longest_prefix_and_user_routes():
    rt = RouteTable()
    rt.set_system(
        [
            Route(prefix=0, plen=0, dev="eth9", gw=ip4("10.9.9.9")),
            Route(prefix=int.from_bytes(ip4("10.0.0.0"), "big"), plen=8, dev="br-phy"),
        ],
        {"br-phy": [ip4("10.0.0.1")]},
    )
    assert rt.lookup(ip4("10.1.2.3")).dev == "br-phy"
    assert rt.lookup(ip4("8.8.8.8")).dev == "eth9"
    seq = rt.seq
    rt.add("10.1.0.0/16", "br-x", "10.0.0.254")
    assert rt.seq > seq
    r = rt.lookup(ip4("10.1.2.3"))
    assert r.dev == "br-x" and r.gw == ip4("10.0.0.254")
    assert "User: 10.1.0.0/16 dev br-x GW 10.0.0.254" in rt.show()
    assert rt.delete("10.1.0.0/16") and not rt.delete("10.1.0.0/16")
    assert rt.lookup(ip4("10.1.2.3")).dev == "br-phy"


def test_neighbour_cache_states_and_aging():
    nc = NeighborCache(age=10)
    ip = ip4("10.0.0.2")
    assert nc.lookup("br", ip, 0)[0] == MISSING
    nc.set_pending("br", ip, 0)
    assert nc.lookup("br", ip, 0)[0] == PENDING
    assert nc.learn("br", ip, mac(1), 0)
    assert nc.lookup("br", ip, 5) == (FOUND, mac(1))
    assert nc.run(11) == [("br", ip)]
    assert nc.lookup("br", ip, 11)[0] == MISSING


def test_system_port_follows_its_device_away_and_back():
    a = Hypervisor("10.0.0.1", "10.0.0.2")
    port = a.dp.ports["eth0"]
    old = port.dev
    t = a.dp.now
    a.devs.system_names.discard("eth0")
    a.dp.run(t + 2)
    assert port.dev is None and old.closed and port.link_state() == "down"
    a.inject("br-phy", eth(BCAST, a.dev("br-phy").mac))
    assert port.stats["tx_link_down"] == 1 and port.stats["tx_dropped"] == 1
    a.devs.system_names.add("eth0")
    a.devs.generation["eth0"] = 1
    a.dp.run(t + 4)
    assert port.dev is not None and port.dev is not old
    f = eth(BCAST, a.dev("br-phy").mac)
    a.inject("br-phy", f)
    assert port.dev.take() == [f]
