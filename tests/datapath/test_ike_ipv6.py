"""IKE-keyed tunnels over an IPv6 underlay between in-memory hypervisors (issue 12).

Each hypervisor runs the daemon's own IKE parts on its datapath (`PeerSync` makes the core's
peer from the IKE-keyed port, `PortEvents` installs what the core negotiates); the two
cores exchange their datagrams in memory. What must hold: the peer is configured with the
IPv6 endpoints, the CHILD_SAs carry TS_IPV6_ADDR_RANGE selectors (ovs-monitor-ipsec's for
vxlan, geneve and gre; one UDP CHILD_SA for vxlanipsec), they are installed into the IPv6
tunnel, and VM traffic crosses the tunnel both ways as ESP over IPv6 (next header 50, or
UDP/4500), transport and tunnel mode; a rekey and a delete change which SAs are used."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from espswitch.datapath.tunnel import ip_addr
from espswitch.ike import IkeCore, IkeSaDown, IkeSaUp
from espswitch.ike.consts import TsType
from espswitch.vswitchd.ike_certs import Certificates
from espswitch.vswitchd.ike_events import PortEvents
from espswitch.vswitchd.ike_peers import PeerSync

from .helpers import Hypervisor, eth, ipv4, ipv6, mac, udp
from .test_ipv6 import A6, B6, ETH_IPV6, answer_ns, inner4

PSK = "v6-in-memory-psk"


class Side:
    """One hypervisor's IKE layer: core, peers and port events, as espswitchd has them."""

    def __init__(self, hv: Hypervisor) -> None:
        self.hv = hv
        self.core = IkeCore([])
        self.peers = PeerSync(hv.dp, self.core, Certificates(dict, lambda: None))
        self.events = PortEvents(self.core, self.peers)
        self.peers.sync(0.0)
        self.seen: list = []


def step(x: Side, y: Side, now: float = 0.0) -> int:
    """Deliver what `x` has to send to `y` once, applying both sides' events."""
    sent = x.core.datagrams_to_send()
    for d in sent:
        y.core.receive_datagram(d.data, src=d.src, dst=d.dst, now=now)
    for side in (x, y):
        for ev in side.core.events():
            side.seen.append(ev)
            side.events.apply(ev, now)
    return len(sent)


def run(a: Side, b: Side, now: float = 0.0) -> None:
    """Carry datagrams between the cores, applying their events, until both are quiet."""
    for _ in range(100):
        moved = False
        for x, y in ((a, b), (b, a)):
            for d in x.core.datagrams_to_send():
                moved = True
                # The core sends from and to IPv6 endpoints, as the sockets would carry them.
                assert d.src[0] == x.hv.ip and d.dst[0] == y.hv.ip
                y.core.receive_datagram(d.data, src=d.src, dst=d.dst, now=now)
            for ev in x.core.events():
                x.seen.append(ev)
                x.events.apply(ev, now)
        if not moved:
            return
    raise AssertionError("the cores never went quiet")


def one_by_one(a: Side, b: Side, after: Callable[[Side, Side], None],
               now: float = 0.0) -> None:
    """Carry datagrams between the cores one at a time, each side in turn, applying both
    sides' events, until both are quiet; after each, `after(x, y)`: y just took one of x's
    messages."""
    pending: dict[int, list] = {id(a): [], id(b): []}
    for _ in range(200):
        moved = False
        for x, y in ((a, b), (b, a)):
            pending[id(x)] += x.core.datagrams_to_send()
            if not pending[id(x)]:
                continue
            d = pending[id(x)].pop(0)
            moved = True
            y.core.receive_datagram(d.data, src=d.src, dst=d.dst, now=now)
            for side in (x, y):
                for ev in side.core.events():
                    side.seen.append(ev)
                    side.events.apply(ev, now)
            after(x, y)
        if not moved:
            return
    raise AssertionError("the cores never went quiet")


def keyed(kind: str, who: str | None = "a",
          **options: str) -> tuple[Hypervisor, Hypervisor, Side, Side]:
    """a and b with a `kind` tunnel keyed by a PSK; `who` ("a", or None) initiates."""
    vni = None if kind == "gre" else 100
    opts = {"psk": PSK, **options}
    a = Hypervisor(A6, B6, vni, tun_type=kind, tun_options=opts)
    b = Hypervisor(B6, A6, vni, tun_type=kind, tun_options=opts)
    sa, sb = Side(a), Side(b)
    assert a.tun.ipsec_state() == "connecting"
    (cfg,) = [p.cfg for p in sa.peers.peers.values()]
    assert (cfg.local_addr, cfg.remote_addr) == (A6, B6)
    if who is not None:
        sa.core.initiate("vx0", 0.0)
        run(sa, sb)
    return a, b, sa, sb


def crosses(src: Hypervisor, dst: Hypervisor, frame: bytes, first: bool = False) -> bytes:
    """`frame` from src's VM reaches dst's VM; returns the underlay packet it went in."""
    src.inject("vm", frame)
    if first:
        answer_ns(src, dst)
    out = [f for f in src.dev("eth0").take() if f[12:14] == ETH_IPV6 and f[20] != 58]
    assert len(out) == 1, out
    dst.inject("eth0", out[0])
    assert dst.dev("vm").take() == [frame]
    return out[0]


def spi_of(pkt: bytes) -> int:
    off = 54 if pkt[20] == 50 else 62  # ESP, or ESP in UDP/4500
    return struct.unpack("!I", pkt[off : off + 4])[0]


def reply4() -> bytes:
    return eth(mac(1), mac(2), ipv4("192.168.1.2", "192.168.1.1", 1, b"pong" * 10))


@pytest.mark.parametrize(("kind", "port"), [("vxlan", 4789), ("geneve", 6081)])
def test_ovs_udp_tunnel_over_ipv6_gets_two_ipv6_child_sas_and_carries_traffic(kind, port):
    a, b, sa, _sb = keyed(kind)
    assert a.tun.ipsec_state() == b.tun.ipsec_state() == "established"
    (ike,) = sa.core.ike_sas("vx0")
    kids = {c.name: (c.local_ts, c.remote_ts) for c in ike.children}
    assert kids == {"out": (f"{A6}/128[17]", f"{B6}/128[17/{port}]"),
                    "in": (f"{A6}/128[17/{port}]", f"{B6}/128[17]")}
    installed = [e for e in sa.seen if type(e).__name__ == "ChildSaInstalled"]
    assert {t.ts_type for e in installed for t in e.local_ts + e.remote_ts} == {
        TsType.IPV6_ADDR_RANGE}
    pkt = crosses(a, b, inner4(), first=True)
    assert pkt[20] == 50 and pkt[22:38] == ip_addr(A6) and pkt[38:54] == ip_addr(B6)
    assert spi_of(pkt) == a.tun.sa_out.spi
    back = crosses(b, a, reply4(), first=True)
    assert spi_of(back) == b.tun.sa_out.spi
    assert a.tun.stats["esp_selector_drops"] == b.tun.stats["esp_selector_drops"] == 0


def test_gre_over_ipv6_child_sa_is_protocol_47_and_carries_traffic():
    a, b, sa, _sb = keyed("gre")
    (ike,) = sa.core.ike_sas("vx0")
    assert [(c.local_ts, c.remote_ts) for c in ike.children] == [
        (f"{A6}/128[47]", f"{B6}/128[47]")]
    crosses(a, b, inner4(), first=True)
    crosses(b, a, reply4(), first=True)


@pytest.mark.parametrize("mode", ["transport", "tunnel"])
@pytest.mark.parametrize("encap", ["no", "yes"])
def test_vxlanipsec_over_ipv6_keyed_by_ike_each_mode(mode, encap):
    a, b, sa, _sb = keyed("vxlanipsec", ipsec_mode=mode, ipsec_encapsulation=encap)
    (ike,) = sa.core.ike_sas("vx0")
    (child,) = ike.children
    assert child.mode == mode
    if mode == "transport":
        assert (child.local_ts, child.remote_ts) == (f"{A6}/128[17]", f"{B6}/128[17]")
    pkt = crosses(a, b, inner4(), first=True)
    if encap == "yes":
        assert pkt[20] == 17 and struct.unpack("!HH", pkt[54:58]) == (4500, 4500)
    else:
        assert pkt[20] == 50
    status = a.tun.status()
    assert status["ipsec_state"] == "established" and status["ipsec_mode"] == mode
    crosses(b, a, reply4(), first=True)
    if mode == "tunnel":
        # The receiver delivered it, so the inner header was IPv6 (next header 41) between
        # the endpoints the selectors name.
        assert (child.local_ts, child.remote_ts) == (f"{A6}/128[17]", f"{B6}/128[17]")
        assert b.tun.stats["esp_selector_drops"] == 0


def test_rekey_then_delete_over_ipv6_switch_and_remove_the_sas():
    a, b, sa, sb = keyed("vxlanipsec")
    crosses(a, b, inner4(), first=True)
    crosses(b, a, reply4(), first=True)
    old = a.tun.sa_out.spi
    sa.core.rekey_child("vx0", 1.0)
    run(sa, sb, 1.0)
    # The old pair is deleted by the rekey; the new one carries the traffic both ways.
    assert a.tun.sa_out.spi != old
    assert spi_of(crosses(a, b, inner4(2))) == a.tun.sa_out.spi
    assert spi_of(crosses(b, a, reply4())) == b.tun.sa_out.spi
    assert len(sa.core.ike_sas("vx0")[0].children) == 1
    sb.core.delete_ike("vx0", 2.0)
    run(sa, sb, 2.0)
    assert a.tun.ipsec_state() == b.tun.ipsec_state() == "connecting"
    a.inject("vm", inner4(3))
    assert [f for f in a.dev("eth0").take() if f[20] != 58] == []  # nothing in clear


def test_plaintext_vxlan_over_ipv6_is_refused_by_an_ike_keyed_tunnel():
    a, b, _sa, _sb = keyed("vxlan")
    clear = ipv6(A6, B6, 17, udp(50000, 4789, b"\x08\0\0\0\0\0\x64\0" + inner4()))
    b.inject("eth0", b.dev("br-phy").mac + a.dev("br-phy").mac + ETH_IPV6 + clear)
    assert b.dev("vm").take() == []
    assert b.tun.stats["esp_plaintext_drops"] == 1


def test_an_initiation_whose_first_packet_was_lost_is_abandoned_once_the_peer_is_up():
    """Both sides initiate; a's IKE_SA_INIT is lost (b was not configured yet) and b's
    makes the IKE SA. a's retransmission would make a second IKE SA seconds later, and
    settling the two would delete the pair in use: a abandons its initiation instead."""
    a, b, sa, sb = keyed("vxlanipsec", who=None)
    sa.core.initiate("vx0", 0.0)
    assert len(sa.core.datagrams_to_send()) == 1  # lost
    sb.core.initiate("vx0", 0.0)
    run(sa, sb)
    crosses(a, b, inner4(), first=True)
    crosses(b, a, reply4(), first=True)
    spis = a.tun.sa_out.spi, b.tun.sa_out.spi
    (down,) = [e for e in sa.seen if isinstance(e, IkeSaDown)]
    assert down.reason.startswith("abandoned")
    for t in (1.0, 3.0, 7.0, 15.0, 31.0):  # past every IKE_SA_INIT retransmission
        for side in (sa, sb):
            if (side.core.next_deadline() or t + 1) <= t:
                side.core.on_timer(t)
        run(sa, sb, t)
    for side in (sa, sb):
        assert len([e for e in side.seen if isinstance(e, IkeSaUp)]) == 1
    assert len(sa.core.ike_sas("vx0")) == len(sb.core.ike_sas("vx0")) == 1
    assert (a.tun.sa_out.spi, b.tun.sa_out.spi) == spis
    assert len(a.tun.pairs) == len(b.tun.pairs) == 1
    assert spi_of(crosses(a, b, inner4(2))) == spis[0]


def test_crossing_initiations_send_only_on_pairs_the_peer_has():
    """Both IKE_SA_INITs cross: each side is the IKE_AUTH responder of the other's IKE SA.
    a installs that second pair before b has it, so a keeps sending on the pair in use
    (which b can open) until a packet arrives on the new one or one pair is deleted."""
    a, b, sa, sb = keyed("vxlanipsec", who=None)
    sa.core.initiate("vx0", 0.0)
    sb.core.initiate("vx0", 0.0)
    assert step(sa, sb) == 1  # a's IKE_SA_INIT; b answers
    assert step(sb, sa) == 2  # b's IKE_SA_INIT and that answer; a answers, sends IKE_AUTH
    assert step(sa, sb) == 2  # b installs a's pair, sends its IKE_AUTH
    assert len(b.tun.pairs) == 1 and len(a.tun.pairs) == 0
    assert step(sb, sa) == 2  # a installs that pair, and b's as its responder
    assert len(a.tun.pairs) == 2 and len(b.tun.pairs) == 1
    (first,) = [i.spi for _, i in b.tun.pairs]
    assert spi_of(crosses(a, b, inner4(), first=True)) in [o.spi for o, _ in a.tun.pairs]
    assert spi_of(crosses(b, a, reply4(), first=True)) not in (None, first)
    run(sa, sb)
    # However the cores settle the two IKE SAs, both sides send on a pair the other has.
    for x, y, frame in ((a, b, inner4(2)), (b, a, reply4()), (a, b, inner4(3))):
        assert spi_of(crosses(x, y, frame)) in [i.spi for _, i in y.tun.pairs]
    assert len(sa.core.ike_sas("vx0")) == len(sb.core.ike_sas("vx0")) == 1
    assert a.tun.stats["esp_selector_drops"] == b.tun.stats["esp_selector_drops"] == 0
    assert a.dp.drops.get("esp_unknown_spi") is None and b.dp.drops.get("esp_unknown_spi") \
        is None


@pytest.mark.parametrize("kind", ["vxlan", "vxlanipsec"])
def test_crossing_initiations_never_leave_a_side_sending_on_a_pair_the_peer_lacks(kind):
    """Both IKE_SA_INITs cross and both IKE SAs come up (Open vSwitch's `vxlan` makes two
    CHILD_SAs in each, the second by CREATE_CHILD_SA); one IKE SA is then deleted. IKE
    messages are delivered one at a time, and once both IKE SAs are up on both sides, the
    side that took a message sends to the other after each: never on a pair the other
    cannot open yet (the IKE SA that goes is deleted only once the one that stays has all
    its CHILD_SAs, so the delete reaches the peer after the CREATE_CHILD_SA answer that
    completes them). (Before that, an IKE_AUTH responder's first pair may carry a packet
    its initiator cannot open yet, as with any IKEv2 responder: there is no other pair.)"""

    def settled(*sides: Side) -> bool:
        return all(i.state in ("established", "deleting") for s in sides
                   for i in s.core.ike_sas("vx0"))

    a, b, sa, sb = keyed(kind, who=None)
    sa.core.initiate("vx0", 0.0)
    sb.core.initiate("vx0", 0.0)
    resolved: set[int] = set()  # the sides whose neighbour discovery is done

    def send_back(sx: Side, sy: Side) -> None:
        if a.tun.sa_out is None or b.tun.sa_out is None or not settled(sa, sb):
            return
        # sy just took one of sx's messages: what it sends now, sx must open.
        crosses(sy.hv, sx.hv, reply4() if sy is sb else inner4(),
                first=id(sy) not in resolved)
        resolved.add(id(sy))

    one_by_one(sa, sb, send_back)
    assert len(resolved) == 2, "the tunnel never came up"
    assert len(sa.core.ike_sas("vx0")) == len(sb.core.ike_sas("vx0")) == 1
    assert a.dp.drops.get("esp_unknown_spi") is None and b.dp.drops.get("esp_unknown_spi") \
        is None


def test_a_late_second_ike_sa_replaces_the_first_only_once_it_has_all_its_child_sas():
    """a's IKE_AUTH is lost, so b's IKE SA comes up first (two CHILD_SAs, Open vSwitch's
    `vxlan`) and carries traffic; a's retransmission then completes a second IKE SA. When
    the first one loses (the lowest nonce), b, its initiator, deletes it only once the
    second has both CHILD_SAs: the delete, sent after b answered a's CREATE_CHILD_SA,
    reaches a after that answer, so b never sends on a pair a does not have yet. IKE
    messages go one at a time; after each, the side that took it sends to the other."""
    old_lost = 0
    for _ in range(40):
        a, b, sa, sb = keyed("vxlan", who=None)
        sa.core.initiate("vx0", 0.0)
        assert step(sa, sb) == 1 and step(sb, sa) == 1  # IKE_SA_INIT and its answer
        assert len(sa.core.datagrams_to_send()) == 1  # a's IKE_AUTH: lost
        sb.core.initiate("vx0", 0.0)
        run(sa, sb)  # b's IKE SA, both CHILD_SAs
        first = {i.ike_id for i in sb.core.ike_sas("vx0") if i.state == "established"}
        crosses(a, b, inner4(), first=True)
        crosses(b, a, reply4(), first=True)
        sa.core.on_timer(sa.core.next_deadline())  # a's IKE_AUTH again
        # After each message, the side that took it sends to the other.
        one_by_one(sa, sb, lambda sx, sy: crosses(sy.hv, sx.hv, reply4() if sy.hv.ip == B6
                                                  else inner4()), now=1.0)
        (left,) = sb.core.ike_sas("vx0")
        old_lost += left.ike_id not in first
        assert len(a.tun.pairs) == len(b.tun.pairs) == 2
    assert old_lost > 0  # the case above happened (it does about every other time)
