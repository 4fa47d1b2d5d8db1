"""Collisions between two cores: crossing IKE_SA_INIT, simultaneous CHILD_SA and IKE SA
rekeys (RFC 7296 §2.8.1), and the lifecycle exchanges (delete, DPD, timed rekeys)."""

from __future__ import annotations

from espswitch.ike import ChildSaDeleted, ChildSaExpired, ChildSaInstalled, IkeSaDown, IkeSaUp

from .helpers import VXLAN_CHILD_A, pair


def _live(core):
    """(established IKE SAs, installed CHILD_SA (spi_in, spi_out) pairs)."""
    sas = [s for s in core.ike_sas() if s.state == "established"]
    kids = [(c.spi_in, c.spi_out) for s in sas for c in s.children]
    return sas, kids


def _one_pair_each(a, b):
    sas_a, kids_a = _live(a)
    sas_b, kids_b = _live(b)
    assert len(sas_a) == len(sas_b) == 1, (a.ike_sas(), b.ike_sas())
    assert len(a.ike_sas()) == len(b.ike_sas()) == 1
    assert sas_a[0].spi_i == sas_b[0].spi_i and sas_a[0].spi_r == sas_b[0].spi_r
    assert len(kids_a) == len(kids_b) == 1
    assert kids_a[0] == kids_b[0][::-1]


def test_crossing_initiations_20_times():
    for _ in range(20):
        a, b, link = pair(children=(VXLAN_CHILD_A,))
        a.initiate("b", 0.0)
        b.initiate("a", 0.0)
        link.run()
        link.advance(1.0)
        # Both IKE SAs came up on both sides before one was removed: a real crossing.
        assert len([e for e in link.events[id(a)] if isinstance(e, IkeSaUp)]) == 2
        _one_pair_each(a, b)
        # The survivor's CHILD_SA is the one installed last and not deleted on each side.
        inst = {e.spi_in for e in link.installed(a)}
        gone = {e.spi_in for e in link.events[id(a)] if isinstance(e, ChildSaDeleted)}
        assert len(inst - gone) == 1


def test_initiate_is_idempotent_while_connecting_or_up():
    a, b, link = pair()
    a.initiate("b", 0.0)
    a.initiate("b", 0.0)
    link.run()
    a.initiate("b", 1.0)
    link.run()
    _one_pair_each(a, b)


def test_simultaneous_child_rekeys_20_times():
    for _ in range(20):
        a, b, link = pair(children=(VXLAN_CHILD_A,))
        a.initiate("b", 0.0)
        link.run()
        a.rekey_child("b", 1.0)
        b.rekey_child("a", 1.0)
        link.run()
        link.advance(1.0)
        _one_pair_each(a, b)
        # Each side installed two new CHILD_SAs (theirs and ours) and kept exactly one.
        assert len(link.installed(a)) == 3 and len(link.installed(b)) == 3
        (spi_in, _spi_out) = _live(a)[1][0]
        assert spi_in != link.installed(a)[0].spi_in


def test_simultaneous_ike_rekeys_end_with_one_ike_sa():
    a, b, link = pair()
    a.initiate("b", 0.0)
    link.run()
    a.rekey_ike("b", 1.0)
    b.rekey_ike("a", 1.0)
    link.run()
    link.advance(10.0)
    _one_pair_each(a, b)
    assert any(e.rekey_of is not None for e in link.events[id(a)] if isinstance(e, IkeSaUp))


def test_timed_rekeys_keep_one_pair_and_delete_expired_ones():
    from espswitch.ike import ChildConfig
    child = ChildConfig(name="c", rekey_time=10.0, life_time=12.0)
    a, b, link = pair(children=(child,), ike_rekey_time=25.0, dpd_delay=5.0)
    a.initiate("b", 0.0)
    link.run()
    link.advance(60.0, step=0.5)
    _one_pair_each(a, b)
    assert len(link.installed(a)) >= 6  # rekeyed about every 9-10 s
    assert not [e for e in link.events[id(a)] if isinstance(e, ChildSaExpired)]
    assert [e for e in link.events[id(a)] if isinstance(e, IkeSaUp) and e.rekey_of]


def test_delete_child_and_ike_from_either_side():
    a, b, link = pair()
    a.initiate("b", 0.0)
    link.run()
    b.delete_child("a", 1.0)
    link.run()
    assert _live(a)[1] == [] and _live(b)[1] == []
    assert [e.reason for e in link.events[id(a)] if isinstance(e, ChildSaDeleted)] == [
        "deleted by peer"]
    b.delete_ike("a", 2.0)
    link.run()
    assert a.ike_sas() == [] and b.ike_sas() == []
    assert [e.reason for e in link.events[id(a)] if isinstance(e, IkeSaDown)] == [
        "deleted by peer"]


def test_dpd_declares_a_silent_peer_dead():
    a, _b, link = pair(dpd_delay=2.0, retransmit_timeout=0.5, retransmit_base=2.0,
                      retransmit_tries=3)
    a.initiate("b", 0.0)
    link.run()
    link.advance(5.0)  # answered liveness checks
    assert _live(a)[0]
    link.drop = lambda data, sender: True
    link.advance(2.0 + 0.5 + 1.0 + 2.0 + 0.5)
    downs = [e for e in link.events[id(a)] if isinstance(e, IkeSaDown)]
    assert downs and "dead" in downs[0].reason
    assert [e for e in link.events[id(a)] if isinstance(e, ChildSaDeleted)]


def test_child_installed_events_never_show_keys():
    a, _b, link = pair()
    a.initiate("b", 0.0)
    link.run()
    ev = link.installed(a)[0]
    assert isinstance(ev, ChildSaInstalled)
    assert ev.keymat_in.hex() not in repr(ev) and "keymat" not in repr(ev)
