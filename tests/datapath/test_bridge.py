"""The forwarding core driven with injected batches of frames."""

from __future__ import annotations

import errno

import pytest

from espswitch.datapath import Datapath
from espswitch.datapath.devices import MemoryDevices, _send_all

from .helpers import BCAST, eth, mac, tagged


@pytest.fixture
def dp():
    d = Datapath(MemoryDevices())
    d.add_bridge("br0")
    d.add_port("br0", "br0", "internal")
    for n in ("p1", "p2", "p3"):
        d.add_port("br0", n, "tap")
    return d


def sent(dp, name):
    return dp.devices.devices[name].take()


def test_unknown_floods_except_ingress_then_learned_unicast(dp):
    f = eth(mac(2), mac(1))
    dp.receive(dp.ports["p1"], [f])
    assert sent(dp, "p1") == []
    assert sent(dp, "p2") == [f]
    assert sent(dp, "p3") == [f]
    assert sent(dp, "br0") == [f]
    reply = eth(mac(1), mac(2))
    dp.receive(dp.ports["p2"], [reply])
    assert sent(dp, "p1") == [reply]
    assert sent(dp, "p3") == []
    # Now both are known: unicast only.
    dp.receive(dp.ports["p1"], [f])
    assert sent(dp, "p2") == [f]
    assert sent(dp, "p3") == []
    assert dp.ports["p1"].stats["rx_packets"] == 2
    assert dp.ports["p2"].stats["tx_packets"] == 2


def test_never_back_out_of_ingress_port(dp):
    dp.receive(dp.ports["p1"], [eth(mac(9), mac(1))])
    for name in ("p2", "p3", "br0"):
        sent(dp, name)
    # A frame from p1 to a MAC learned on p1 goes nowhere.
    dp.receive(dp.ports["p1"], [eth(mac(1), mac(5))])
    assert all(sent(dp, n) == [] for n in ("p1", "p2", "p3", "br0"))


def test_broadcast_floods_and_batch_order_kept(dp):
    frames = [eth(BCAST, mac(1), bytes([i]) * 46) for i in range(32)]
    dp.receive(dp.ports["p1"], frames)
    assert sent(dp, "p2") == frames


def test_access_ports_isolated_by_tag(dp):
    dp.add_port("br0", "a10", "tap", tag=10)
    dp.add_port("br0", "b10", "tap", tag=10)
    dp.add_port("br0", "c20", "tap", tag=20)
    f = eth(BCAST, mac(1))
    dp.receive(dp.ports["a10"], [f])
    assert sent(dp, "b10") == [f]
    assert sent(dp, "c20") == []
    # Untagged trunk ports (p1..p3) get it tagged with VLAN 10.
    assert sent(dp, "p1") == [tagged(BCAST, mac(1), 10)]


def test_trunk_in_and_out(dp):
    dp.add_port("br0", "a10", "tap", tag=10)
    dp.add_port("br0", "t20", "tap", trunks=frozenset({20}))
    dp.receive(dp.ports["p1"], [tagged(BCAST, mac(7), 10)])
    assert sent(dp, "a10") == [eth(BCAST, mac(7))]
    assert sent(dp, "t20") == []
    # An access port drops tagged frames; a trunk drops VLANs it does not carry.
    dp.receive(dp.ports["a10"], [tagged(BCAST, mac(1), 10)])
    assert dp.ports["a10"].stats["rx_vlan_drops"] == 1
    dp.receive(dp.ports["t20"], [tagged(BCAST, mac(1), 10)])
    assert dp.ports["t20"].stats["rx_vlan_drops"] == 1
    assert dp.ports["t20"].stats["rx_dropped"] == 1


def test_bad_frames_are_counted_drops(dp):
    dp.receive(dp.ports["p1"], [b"", b"\x01" * 5, b"\x81\x00" * 7, eth(BCAST, mac(1))])
    assert dp.ports["p1"].stats["rx_malformed"] == 3
    assert len(sent(dp, "p2")) == 1


def test_mac_aging_and_fdb(dp):
    dp.now = 1000.0
    dp.receive(dp.ports["p1"], [eth(BCAST, mac(1))])
    rows = dp.bridges["br0"].fdb(1010.0)
    assert [(r[0].name, r[1], r[2], r[3]) for r in rows] == [("p1", 0, "52:54:00:00:00:01", 10)]
    dp.run(1000.0 + 299)
    assert dp.bridges["br0"].macs
    dp.run(1000.0 + 301)
    assert not dp.bridges["br0"].macs


def test_port_removal_forgets_its_macs(dp):
    dp.receive(dp.ports["p1"], [eth(BCAST, mac(1))])
    dp.del_port("p1")
    assert not dp.bridges["br0"].macs
    assert dp.devices.devices["p1"].closed


def test_patch_ports_join_bridges(dp):
    dp.add_bridge("br1")
    dp.add_port("br1", "q1", "tap")
    dp.add_port("br0", "patch-a", "patch", {"peer": "patch-b"})
    dp.add_port("br1", "patch-b", "patch", {"peer": "patch-a"})
    f = eth(BCAST, mac(1))
    dp.receive(dp.ports["p1"], [f])
    assert sent(dp, "q1") == [f]


def test_ofports(dp):
    assert dp.ports["br0"].ofport == 65534
    assert [dp.ports[n].ofport for n in ("p1", "p2", "p3")] == [1, 2, 3]
    dp.del_port("p2")
    assert dp.add_port("br0", "p4", "tap").ofport == 2
    assert dp.add_port("br0", "p5", "tap", ofport=77).ofport == 77


def test_failed_writes_are_counted_by_cause(dp):
    def write(frame):
        if frame[0] == 1:
            raise OSError(errno.EMSGSIZE, "too big")
        if frame[0] == 2:
            raise OSError(errno.ENOBUFS, "full")

    assert _send_all(write, [b"\x00" * 60, b"\x01" * 70, b"\x02" * 80]) == (1, [80], [70])
    dev = dp.devices.devices["p2"]
    dev.send = lambda frames: _send_all(write, frames)
    dp.receive(dp.ports["p1"], [eth(BCAST, mac(1)), b"\x01" * 14 + b"x" * 50])
    st = dp.ports["p2"].stats
    assert st["tx_packets"] == 1 and st["tx_too_big"] == 1 and st["tx_errors"] == 1
