"""Two IKE cores over an IPv6 underlay (issue 12): IKE_SA_INIT's NAT detection hashes over
16-byte addresses (RFC 7296 §2.23), ID_IPV6_ADDR identities, TS_IPV6_ADDR_RANGE selectors
for transport and tunnel mode and for Open vSwitch's GRE / VXLAN / Geneve selectors, keys
the ESP engine takes with IPv6 endpoints, rekeys, deletes, liveness checks and fragments
sized for an IPv6 header."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import struct

import pytest

from espswitch.ike import (
    ChildConfig,
    ChildSaDeleted,
    ChildSaInstalled,
    Credentials,
    IkeConfigError,
    IkeCore,
    IkeSaDown,
    IkeSaUp,
    PeerConfig,
)
from espswitch.ike.consts import IdType, Notify, TsType
from espswitch.ike.fragment import max_message_len
from espswitch.ike.message import parse_message
from espswitch.ike.ts import format_ts, parse_ts
from espswitch.ipsec import InboundSA, OutboundSA

from .certs import Ca
from .helpers import PSK, Link, peer

A6, B6 = "2001:db8:0:1::1", "2001:db8:0:1::2"
A6_PACKED, B6_PACKED = ipaddress.IPv6Address(A6).packed, ipaddress.IPv6Address(B6).packed


def ovs_children(port: int) -> tuple[ChildConfig, ...]:
    return (ChildConfig(name="out", local_ts="dynamic[udp]", remote_ts=f"dynamic[udp/{port}]",
                        mode="transport"),
            ChildConfig(name="in", local_ts=f"dynamic[udp/{port}]", remote_ts="dynamic[udp]",
                        mode="transport"))


def pair6(a_kw: dict | None = None, **kw: object) -> tuple[IkeCore, IkeCore, Link]:
    a = IkeCore([peer(A6, B6, "b", **{**kw, **(a_kw or {})})])
    b = IkeCore([peer(B6, A6, "a", **kw)])
    return a, b, Link(a, b)


def selectors(link: Link, core: IkeCore) -> dict[str, tuple[str, str]]:
    return {e.child: (" ".join(map(format_ts, e.local_ts)),
                      " ".join(map(format_ts, e.remote_ts))) for e in link.installed(core)}


def check_esp_both_ways(ev_a: ChildSaInstalled, ev_b: ChildSaInstalled) -> None:
    """The installed keys protect and open one another's packets, both ways."""
    for x, y in ((ev_a, ev_b), (ev_b, ev_a)):
        out, inb = OutboundSA(x.outbound_params()), InboundSA(y.inbound_params())
        assert inb.decrypt(out.encrypt(b"ipv6 underlay", 17)) == (17, b"ipv6 underlay")


def test_nat_detection_hashes_take_the_16_byte_addresses_and_ports():
    a, _b, link = pair6()
    a.initiate("b", 0.0)
    link.run()
    init = parse_message(link.wire[0])
    spi_i = init.spi_i

    def h(addr: bytes, port: int) -> bytes:  # RFC 7296 §2.23, computed here independently
        return hashlib.sha1(spi_i + bytes(8) + addr + struct.pack("!H", port)).digest()

    assert init.notify(Notify.NAT_DETECTION_SOURCE_IP).data == h(A6_PACKED, 500)
    assert init.notify(Notify.NAT_DETECTION_DESTINATION_IP).data == h(B6_PACKED, 500)
    # No NAT between them: IKE stays on port 500, ESP is not UDP-encapsulated.
    up = [e for e in link.events[id(a)] if isinstance(e, IkeSaUp)]
    assert [(e.nat, e.local_addr, e.remote_addr) for e in up] == [(False, (A6, 500), (B6, 500))]
    assert not link.installed(a)[0].encap


def test_an_address_rewritten_on_the_way_is_detected_and_ike_moves_to_4500():
    """A translator in front of a (NPTv6 or NAT66 rewrites its source): both ends see the
    hash of the other's address mismatch, and move to UDP/4500 with ESP in UDP."""
    outside = "2001:db8:ffff::1"
    a = IkeCore([peer(A6, B6, "b")])
    b = IkeCore([peer(B6, outside, "a", remote_id=A6)])
    link = Link(a, b)
    seen_by_b: list[tuple[str, int]] = []

    def nat_run(max_rounds: int = 100) -> None:
        for _ in range(max_rounds):
            moved = False
            for d in a.datagrams_to_send():
                moved = True
                src = (outside, d.src[1])
                seen_by_b.append(src)
                b.receive_datagram(d.data, src=src, dst=d.dst, now=0.0)
            for d in b.datagrams_to_send():
                moved = True
                assert d.dst[0] == outside
                a.receive_datagram(d.data, src=d.src, dst=(A6, d.dst[1]), now=0.0)
            link.events[id(a)] += a.events()
            link.events[id(b)] += b.events()
            if not moved:
                return

    a.initiate("b", 0.0)
    nat_run()
    ia, ib = link.installed(a), link.installed(b)
    assert len(ia) == len(ib) == 1, (a.errors, b.errors)
    assert ia[0].encap and ib[0].encap
    assert ia[0].local_addr == (A6, 4500) and ib[0].remote_addr == (outside, 4500)
    assert seen_by_b[0][1] == 500 and seen_by_b[-1][1] == 4500
    assert all(e.nat for e in link.events[id(a)] + link.events[id(b)] if isinstance(e, IkeSaUp))
    check_esp_both_ways(ia[0], ib[0])


def test_identities_default_to_id_ipv6_addr_and_show_in_rfc5952_form():
    # The peers name each other by address in a long spelling: compared as addresses.
    a = IkeCore([PeerConfig(name="b", local_addr="2001:0db8:0:1:0:0:0:1",
                            remote_addr="2001:db8:0:1::2", credentials=Credentials(psk=PSK))])
    b = IkeCore([PeerConfig(name="a", local_addr=B6, remote_addr="2001:DB8:0:1::0001",
                            credentials=Credentials(psk=PSK))])
    link = Link(a, b)
    a.initiate("b", 0.0)
    link.run()
    (up_a,) = [e for e in link.events[id(a)] if isinstance(e, IkeSaUp)]
    (up_b,) = [e for e in link.events[id(b)] if isinstance(e, IkeSaUp)]
    assert (up_a.local_id, up_a.remote_id) == (A6, B6)
    assert (up_b.local_id, up_b.remote_id) == (B6, A6)
    assert a.ike_sas()[0].remote_id == B6
    # What b received on the wire is an ID_IPV6_ADDR of 16 bytes.
    ident = b._store.all()[0].remote_identity
    assert (ident.id_type, ident.data) == (IdType.IPV6_ADDR, A6_PACKED)


def test_a_certificate_with_an_ipv6_subject_alt_name_vouches_for_that_address():
    ca = Ca("v6 ca")
    now = datetime.datetime.now(datetime.UTC)

    def creds(addr: str) -> Credentials:
        cert, key = ca.issue(f"host {addr}", ip=addr)
        return Credentials(cert=cert, key=key, cas=(ca.cert,))

    a = IkeCore([peer(A6, B6, "b", credentials=creds(A6), local_id=A6, remote_id=B6)],
                wallclock=lambda: now)
    b = IkeCore([peer(B6, A6, "a", credentials=creds(B6), local_id=B6, remote_id=A6)],
                wallclock=lambda: now)
    link = Link(a, b)
    a.initiate("b", 0.0)
    link.run()
    assert len(link.installed(a)) == len(link.installed(b)) == 1, (a.errors, b.errors)
    # A certificate for another address does not vouch for ours: refused when configured.
    with pytest.raises(IkeConfigError, match="does not vouch"):
        peer(A6, B6, "b", credentials=creds(B6), local_id=A6, remote_id=B6)


def test_transport_selectors_are_ipv6_ranges_of_the_two_endpoints():
    child = ChildConfig(name="vx", local_ts="dynamic[udp]", remote_ts="dynamic[udp]",
                        mode="transport")
    a, b, link = pair6(children=(child,))
    a.initiate("b", 0.0)
    link.run()
    (ea,), (eb,) = link.installed(a), link.installed(b)
    assert ea.mode == eb.mode == "transport"
    for ts, addr in ((ea.local_ts, A6_PACKED), (ea.remote_ts, B6_PACKED),
                     (eb.local_ts, B6_PACKED), (eb.remote_ts, A6_PACKED)):
        assert [(t.ts_type, t.start_addr, t.end_addr, t.ip_proto) for t in ts] == [
            (TsType.IPV6_ADDR_RANGE, addr, addr, 17)]
    assert selectors(link, a) == {"vx": (f"{A6}/128[17]", f"{B6}/128[17]")}
    check_esp_both_ways(ea, eb)


def test_tunnel_mode_gives_the_esp_engine_ipv6_tunnel_endpoints():
    a, b, link = pair6(children=(ChildConfig(name="net", mode="tunnel"),))
    a.initiate("b", 0.0)
    link.run()
    (ea,), (eb,) = link.installed(a), link.installed(b)
    assert ea.mode == "tunnel"
    assert selectors(link, b) == {"net": (f"{B6}/128", f"{A6}/128")}
    out = ea.outbound_params()
    assert (out.tunnel_src, out.tunnel_dst) == (A6_PACKED, B6_PACKED)
    assert (eb.inbound_params().tunnel_src, eb.inbound_params().tunnel_dst) == (
        A6_PACKED, B6_PACKED)
    check_esp_both_ways(ea, eb)


def test_explicit_ipv6_subnets_are_narrowed_by_the_responder():
    a_kw = {"children": (ChildConfig(name="net", local_ts="2001:db8:a::/48",
                                     remote_ts="2001:db8:b::/48"),)}
    b_child = ChildConfig(name="net", local_ts="2001:db8:b:1::/64",
                          remote_ts="2001:db8:a::/48, 10.0.0.0/8")
    a, b, link = pair6(a_kw=a_kw, children=(b_child,))
    a.initiate("b", 0.0)
    link.run()
    assert selectors(link, a) == {"net": ("2001:db8:a::/48", "2001:db8:b:1::/64")}
    assert selectors(link, b) == {"net": ("2001:db8:b:1::/64", "2001:db8:a::/48")}


def test_ipv4_selectors_never_match_an_ipv6_offer():
    a_kw = {"children": (ChildConfig(name="net", local_ts="2001:db8:a::/48",
                                     remote_ts="2001:db8:b::/48"),)}
    b_child = ChildConfig(name="net", local_ts="10.2.0.0/16", remote_ts="10.1.0.0/16")
    a, b, link = pair6(a_kw=a_kw, children=(b_child,))
    a.initiate("b", 0.0)
    link.run()
    assert link.installed(a) == link.installed(b) == []
    assert not [c for s in a.ike_sas() + b.ike_sas() for c in s.children]


@pytest.mark.parametrize("port", [4789, 6081])
def test_ovs_vxlan_and_geneve_selectors_over_ipv6_match_in_to_out(port):
    a, b, link = pair6(children=ovs_children(port))
    a.initiate("b", 0.0)
    b.initiate("a", 0.0)  # both at once, as two OVS hypervisors do
    link.run()
    link.advance(5.0)
    udp = f"[17/{port}]"
    assert selectors(link, a) == {"out": (f"{A6}/128[17]", f"{B6}/128{udp}"),
                                  "in": (f"{A6}/128{udp}", f"{B6}/128[17]")}
    assert selectors(link, b) == {"out": (f"{B6}/128[17]", f"{A6}/128{udp}"),
                                  "in": (f"{B6}/128{udp}", f"{A6}/128[17]")}
    live = {(s.peer, c.name): c for core in (a, b) for s in core.ike_sas()
            if s.state == "established" for c in s.children}
    assert live[("b", "out")].spi_out == live[("a", "in")].spi_in
    assert live[("a", "out")].spi_out == live[("b", "in")].spi_in


def test_ovs_gre_selector_over_ipv6_is_protocol_47_between_the_endpoints():
    gre = (ChildConfig(name="gre", local_ts="dynamic[gre]", remote_ts="dynamic[gre]",
                       mode="transport"),)
    a, b, link = pair6(children=gre)
    a.initiate("b", 0.0)
    link.run()
    assert selectors(link, b) == {"gre": (f"{B6}/128[47]", f"{A6}/128[47]")}
    (ea,), (eb,) = link.installed(a), link.installed(b)
    check_esp_both_ways(ea, eb)


def test_child_rekey_delete_and_ike_rekey_over_ipv6():
    a, b, link = pair6(children=(ChildConfig(name="vx", local_ts="dynamic[udp]",
                                             remote_ts="dynamic[udp]", mode="transport"),))
    a.initiate("b", 0.0)
    link.run()
    first = link.installed(a)[0]
    a.rekey_child("b", 1.0)
    link.run()
    ra, rb = link.installed(a)[1], link.installed(b)[1]
    assert ra.rekey_of == first.spi_in and ra.spi_in != first.spi_in
    assert [format_ts(t) for t in ra.local_ts] == [f"{A6}/128[17]"]
    check_esp_both_ways(ra, rb)
    gone = [e.spi_in for e in link.events[id(a)] if isinstance(e, ChildSaDeleted)]
    assert gone == [first.spi_in]
    b.rekey_ike("a", 2.0)
    link.run()
    assert len(a.ike_sas()) == len(b.ike_sas()) == 1
    assert a.ike_sas()[0].spi_i == b.ike_sas()[0].spi_i
    assert len(a.ike_sas()[0].children) == 1
    a.delete_child("b", 3.0)
    link.run()
    assert [c for s in a.ike_sas() + b.ike_sas() for c in s.children] == []


def test_a_silent_ipv6_peer_is_declared_dead_by_the_liveness_check():
    a, _b, link = pair6(dpd_delay=5.0, dpd_timeout=10.0, retransmit_timeout=1.0)
    a.initiate("b", 0.0)
    link.run()
    link.drop = lambda data, sender: True  # b is gone
    link.advance(30.0)
    downs = [e for e in link.events[id(a)] if isinstance(e, IkeSaDown)]
    assert downs and "dead" in downs[0].reason
    assert a.ike_sas() == []


def test_fragments_fit_an_ipv6_datagram_of_fragment_size():
    assert max_message_len(1280, nat_t=False, v6=True) == 1280 - 48
    assert max_message_len(1280, nat_t=True, v6=True) == 1280 - 52
    ca = Ca("root", rsa_bits=3072)
    now = datetime.datetime.now(datetime.UTC)

    def creds(name: str) -> Credentials:
        cert, key = ca.issue(name, kind="rsa", dns=f"{name}.example")
        return Credentials(cert=cert, key=key, cas=(ca.cert,))

    a = IkeCore([peer(A6, B6, "b", credentials=creds("a"), local_id="a.example",
                      remote_id="b.example")], wallclock=lambda: now)
    b = IkeCore([peer(B6, A6, "a", credentials=creds("b"), local_id="b.example",
                      remote_id="a.example")], wallclock=lambda: now)
    link = Link(a, b)
    a.initiate("b", 0.0)
    link.run()
    assert len(link.installed(a)) == 1, (a.errors, b.errors)
    assert a.counters["fragments_sent"] >= 2
    # Every datagram after IKE_SA_INIT fits 1280 bytes with the IPv6 (40) and UDP (8) headers.
    assert max(len(d) for d in link.wire[2:]) <= 1280 - 48


@pytest.mark.parametrize(("local", "remote", "words"), [
    (A6, "192.0.2.2", "one family"),
    ("192.0.2.1", B6, "one family"),
    ("2001:db8::zz", B6, "IPv4 or IPv6 address"),
])
def test_peer_addresses_must_be_addresses_of_one_family(local, remote, words):
    with pytest.raises(IkeConfigError, match=words):
        PeerConfig(name="x", local_addr=local, remote_addr=remote,
                   credentials=Credentials(psk=PSK))


def test_ipv6_selector_text_round_trips():
    for text in ("2001:db8::/32", "2001:db8::1/128[udp/4789]", "::/0[gre]"):
        ts = parse_ts(text)
        assert ts.ts_type == TsType.IPV6_ADDR_RANGE
        assert format_ts(ts) == text.replace("udp", "17").replace("gre", "47")
