"""Two espswitch IKE cores against each other over an in-memory link."""

from __future__ import annotations

import pytest

from espswitch.ike import ChildConfig, Credentials, IkeCore, IkeSaUp, LocalIkeError
from espswitch.ike.state import IkeState
from espswitch.ipsec import InboundSA, OutboundSA

from .helpers import A_ADDR, B_ADDR, VXLAN_CHILD_A, Link, pair, peer

IKE_PROPOSALS = ["aes128gcm16-prfsha256-x25519", "aes256gcm16-prfsha384-ecp384",
                 "aes128-sha256-modp2048", "chacha20poly1305-prfsha256-x25519",
                 "aes256-sha512-prfsha512-ecp256", "aes128gcm16-prfsha256-modp3072"]


def _check_keys_pair(ev_a, ev_b):
    assert ev_a.spi_in == ev_b.spi_out and ev_a.spi_out == ev_b.spi_in
    assert ev_a.keymat_out == ev_b.keymat_in and ev_a.keymat_in == ev_b.keymat_out
    assert ev_a.keymat_in != ev_a.keymat_out
    # The ESP engine takes the events as they are: A protects, B unprotects.
    out = OutboundSA(ev_a.outbound_params())
    inb = InboundSA(ev_b.inbound_params())
    msg = b"hello through IKE keys"
    assert inb.decrypt(out.encrypt(msg, 17)) == (17, msg)


@pytest.mark.parametrize("ike", IKE_PROPOSALS)
def test_psk_tunnel_each_ike_proposal(ike):
    a, b, link = pair(ike_proposals=ike)
    a.initiate("b", 0.0)
    link.run()
    ia, ib = link.installed(a), link.installed(b)
    assert len(ia) == len(ib) == 1
    _check_keys_pair(ia[0], ib[0])
    assert ia[0].mode == "tunnel"
    assert [s.state for s in a.ike_sas()] == ["established"]
    assert [s.state for s in b.ike_sas()] == ["established"]


@pytest.mark.parametrize("esp", ["aes128gcm16", "aes256gcm16", "chacha20poly1305",
                                 "aes128-sha256", "aes256-sha256", "aes128-sha1"])
def test_transport_vxlan_selectors_each_esp(esp):
    child = ChildConfig(name="vx", local_ts="dynamic[udp]", remote_ts="dynamic[udp/4789]",
                        mode="transport", esp_proposals=esp)
    a, b, link = pair(children=(child,))
    a.initiate("b", 0.0)
    link.run()
    ia, ib = link.installed(a), link.installed(b)
    assert len(ia) == len(ib) == 1
    assert ia[0].mode == ib[0].mode == "transport"
    assert ia[0].transform == esp
    assert ia[0].remote_ts[0].ip_proto == 17 and ia[0].remote_ts[0].start_port == 4789
    assert ib[0].local_ts[0].start_port == 4789 and ib[0].local_ts[0].end_port == 4789
    _check_keys_pair(ia[0], ib[0])


def test_transport_refused_when_responder_wants_tunnel_gives_no_child():
    # a wants transport, b only tunnel: b answers without USE_TRANSPORT_MODE; a refuses.
    a = IkeCore([peer(A_ADDR, B_ADDR, "b", children=(VXLAN_CHILD_A,))])
    b = IkeCore([peer(B_ADDR, A_ADDR, "a", children=(ChildConfig(
        name="vx", local_ts="dynamic[udp]", remote_ts="dynamic[udp]"),))])
    link = Link(a, b)
    a.initiate("b", 0.0)
    link.run()
    assert not link.installed(a)
    assert not [c for s in a.ike_sas() for c in s.children]
    assert not [c for s in b.ike_sas() for c in s.children]


def test_ts_narrowing_responder_picks_intersection():
    wide = ChildConfig(name="c", local_ts="10.0.0.0/8", remote_ts="10.0.0.0/8")
    narrow_b = ChildConfig(name="c", local_ts="10.2.0.0/16", remote_ts="10.1.0.0/16")
    a = IkeCore([peer(A_ADDR, B_ADDR, "b", children=(wide,))])
    b = IkeCore([peer(B_ADDR, A_ADDR, "a", children=(narrow_b,))])
    link = Link(a, b)
    a.initiate("b", 0.0)
    link.run()
    (ev,) = link.installed(a)
    assert ev.local_ts[0].start_addr == bytes([10, 1, 0, 0])
    assert ev.local_ts[0].end_addr == bytes([10, 1, 255, 255])
    assert ev.remote_ts[0].start_addr == bytes([10, 2, 0, 0])


def test_wrong_psk_fails_both_sides():
    a = IkeCore([peer(A_ADDR, B_ADDR, "b")])
    b = IkeCore([peer(B_ADDR, A_ADDR, "a", credentials=Credentials(psk=b"other"))])
    link = Link(a, b)
    a.initiate("b", 0.0)
    link.run()
    assert not link.installed(a) and not link.installed(b)
    assert a.ike_sas() == [] and b.ike_sas() == []
    downs = [e for e in link.events[id(a)] if type(e).__name__ == "IkeSaDown"]
    assert downs and "AUTHENTICATION_FAILED" in downs[0].reason


def test_retransmission_backoff_and_cached_response():
    a, b, link = pair(retransmit_timeout=1.0, retransmit_base=2.0)
    lost = {"n": 0}

    def drop(data, sender):
        # Lose b's first IKE_AUTH response: a retransmits, b answers from its cache.
        if sender is b and data[18] == 35 and lost["n"] == 0:
            lost["n"] = 1
            return True
        return False

    link.drop = drop
    a.initiate("b", 0.0)
    link.run()
    assert not link.installed(a) and len(link.installed(b)) == 1
    assert a.next_deadline() == pytest.approx(1.0)
    link.advance(1.0)
    assert len(link.installed(a)) == 1
    assert len(link.installed(b)) == 1  # not installed twice
    assert b.counters["responses_resent"] == 1
    assert a.counters["retransmits"] == 1


def test_give_up_after_retries_reports_down():
    a, _b, link = pair(retransmit_timeout=0.5, retransmit_base=2.0, retransmit_tries=3)
    link.drop = lambda data, sender: True
    a.initiate("b", 0.0)
    link.run()
    link.advance(0.4)
    assert a.ike_sas()  # still trying
    link.advance(0.5 + 1.0 + 2.0)
    assert a.ike_sas() == []
    assert any(type(e).__name__ == "IkeSaDown" for e in link.events[id(a)])
    assert a.counters["retransmits"] == 2


def test_ike_sa_states_are_table_driven():
    a, b, link = pair()
    a.initiate("b", 0.0)
    assert a.ike_sas()[0].state == IkeState.INIT_SENT
    link.run()
    assert a.ike_sas()[0].state == IkeState.ESTABLISHED
    ups = [e for e in link.events[id(b)] if isinstance(e, IkeSaUp)]
    assert len(ups) == 1 and not ups[0].initiator


def test_a_peer_added_at_run_time_connects_and_its_removal_deletes_the_ike_sa():
    a = IkeCore([])
    b = IkeCore([peer(B_ADDR, A_ADDR, "a")])
    link = Link(a, b)
    a.add_peer(peer(A_ADDR, B_ADDR, "b"))
    with pytest.raises(LocalIkeError, match="duplicate"):
        a.add_peer(peer(A_ADDR, B_ADDR, "b"))
    a.initiate("b", 0.0)
    link.run()
    assert [s.state for s in b.ike_sas()] == ["established"]
    a.remove_peer("b", 1.0)
    link.run()
    assert "b" not in a.peers
    assert b.ike_sas() == []  # the INFORMATIONAL delete reached the other side


@pytest.mark.parametrize(("option", "value"), [("ike", "aes128gcm16-prfsha256-nosuchgroup"),
                                                ("remote_name", "@@@ ===")])
def test_ike_option_syntax_is_checked_when_the_tunnel_is_configured(option, value):
    from espswitch.ike.options import parse_ipsec_options
    from espswitch.ipsec import IpsecConfigError

    with pytest.raises(IpsecConfigError, match=f"options:{option}"):
        parse_ipsec_options({"psk": "swordfish", option: value})
