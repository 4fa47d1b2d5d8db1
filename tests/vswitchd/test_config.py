"""Reconcile logic on plain rows."""

from __future__ import annotations

from types import SimpleNamespace as Row

from espswitch.vswitchd.config import IfaceConfig, desired_state, plan


def iface(name, type_="", **options):
    return Row(name=name, type=type_, options=options, ofport_request=[])


def port(name, *ifaces, tag=None, trunks=()):
    return Row(
        name=name,
        interfaces=list(ifaces) or [iface(name)],
        tag=[tag] if tag else [],
        trunks=list(trunks),
    )


def bridge(name, *ports):
    return Row(name=name, ports=[port(name, iface(name, "internal")), *ports])


def test_rows_become_typed_config():
    d = desired_state(
        [
            bridge(
                "br-int",
                port("vm1", iface("vm1", "tap"), tag=10),
                port("vx", iface("vx", "vxlan", remote_ip="10.0.0.2", key="5")),
                port("t", iface("t", "tap"), trunks=(20, 30)),
            )
        ]
    )
    assert d.bridges == {"br-int"}
    assert d.ifaces["vm1"].tag == 10
    assert d.ifaces["vx"].options == (("key", "5"), ("remote_ip", "10.0.0.2"))
    assert d.ifaces["t"].trunks == frozenset({20, 30})
    assert not d.errors


def test_bonds_and_duplicates_are_errors():
    d = desired_state(
        [
            bridge("b1", port("bond0", iface("e1"), iface("e2")), port("x", iface("x", "tap"))),
            bridge("b2", port("x", iface("x", "tap"))),
        ]
    )
    assert "bonds are not supported" in d.errors["e1"]
    assert "in both bridge b1 and bridge b2" in d.errors["x"]
    assert "x" not in d.ifaces and "e1" not in d.ifaces


def test_plan_deletes_first_and_orders_additions():
    d = desired_state(
        [
            bridge(
                "br-int",
                port("vx", iface("vx", "vxlan", remote_ip="10.0.0.2")),
                port("vm1", iface("vm1", "tap")),
            ),
        ]
    )
    p = plan(d, {}, set())
    assert p.add_bridges == ["br-int"]
    assert [c.name for c in p.add_ports] == ["br-int", "vm1", "vx"]


def test_plan_changes():
    old = desired_state(
        [
            bridge(
                "br0",
                port("vm1", iface("vm1", "tap"), tag=10),
                port("vx", iface("vx", "vxlan", remote_ip="10.0.0.2")),
            ),
            bridge("gone"),
        ]
    )
    new = desired_state(
        [
            bridge(
                "br0",
                port("vm1", iface("vm1", "tap"), tag=20),
                port("vx", iface("vx", "vxlan", remote_ip="10.0.0.3")),
            ),
        ]
    )
    p = plan(new, dict(old.ifaces), set(old.bridges))
    assert p.del_ports == ["gone", "vx"]
    assert p.del_bridges == ["gone"]
    assert [c.name for c in p.vlan_updates] == ["vm1"]
    assert [c.name for c in p.add_ports] == ["vx"]


def test_failed_interfaces_are_retried():
    d = desired_state([bridge("br0", port("eth9", iface("eth9", "system")))])
    current = {"br0": IfaceConfig(name="br0", bridge="br0", port="br0", type="internal")}
    p = plan(d, current, {"br0"})
    assert [c.name for c in p.add_ports] == ["eth9"]


def test_an_mtu_request_change_updates_the_port_in_place():
    def rows(mtu):
        vm1 = iface("vm1", "tap")
        vm1.mtu_request = [mtu] if mtu else []
        return [bridge("br0", port("vm1", vm1), port("eth0", iface("eth0")))]

    before, after = desired_state(rows(None)), desired_state(rows(9000))
    assert before.ifaces["vm1"].mtu_request is None
    assert after.ifaces["vm1"].mtu_request == 9000
    p = plan(after, dict(before.ifaces), set(before.bridges))
    # The device is kept (no delete and add), only its MTU is set.
    assert p.del_ports == [] and p.add_ports == []
    assert [c.name for c in p.mtu_updates] == ["vm1"]
    assert plan(after, dict(after.ifaces), set(after.bridges)).mtu_updates == []
    # Cleared again: an update too (the port stops overriding the tunnel's sizing).
    assert [c.name for c in plan(before, dict(after.ifaces), {"br0"}).mtu_updates] == ["vm1"]
