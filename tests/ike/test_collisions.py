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


def test_initiation_whose_first_packet_was_lost_is_abandoned_when_the_peer_comes_up_first():
    # a's IKE_SA_INIT is lost (b was not listening yet); b initiates and its IKE SA comes
    # up with a as responder. a's own initiation must not come up seconds later as a second
    # IKE SA: its duplicate resolution would delete the IKE SA whose CHILD_SAs are in use.
    a, b, link = pair(children=(VXLAN_CHILD_A,))
    a.initiate("b", 0.0)
    link.drop = lambda data, sender: sender is a and len(link.wire) == 1
    link.run()
    assert len(link.wire) == 1  # a's IKE_SA_INIT, lost
    link.drop = lambda data, sender: False
    b.initiate("a", 0.1)
    link.run()
    link.advance(30.0)
    _one_pair_each(a, b)
    ups = [e for e in link.events[id(a)] if isinstance(e, IkeSaUp)]
    assert len(ups) == 1 and not ups[0].initiator
    down = [e for e in link.events[id(a)] if isinstance(e, IkeSaDown)]
    assert len(down) == 1 and down[0].reason.startswith("abandoned"), down
    assert not [e for e in link.events[id(a)] if isinstance(e, ChildSaDeleted)]
    assert a.ike_sas()[0].state == "established"


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


def _ike_rekey_crossing(a, b, link, now):
    """Start an IKE SA rekey on both sides at once; both requests are on the wire before
    either is delivered."""
    a.rekey_ike("b", now)
    b.rekey_ike("a", now)
    link.now = now
    link.run()


def test_simultaneous_ike_rekeys_20_times_both_complete_lowest_nonce_deleted():
    """§2.8.2: both rekeys complete; the new IKE SA holding the lowest of the four nonces
    is deleted by its creator, the CHILD_SAs end on the survivor, the old SA goes."""
    a, b, link = pair(children=(VXLAN_CHILD_A,))
    a.initiate("b", 0.0)
    link.run()
    kids_before = _live(a)[1]
    now = 1.0
    for _ in range(20):
        ups_a = len([e for e in link.events[id(a)] if isinstance(e, IkeSaUp)])
        ups_b = len([e for e in link.events[id(b)] if isinstance(e, IkeSaUp)])
        old = a.ike_sas()[0]
        _ike_rekey_crossing(a, b, link, now)
        link.advance(0.5)
        _one_pair_each(a, b)
        # A real crossing: each side made two new IKE SAs, both from the old one.
        new_a = [e for e in link.events[id(a)] if isinstance(e, IkeSaUp)][ups_a:]
        new_b = [e for e in link.events[id(b)] if isinstance(e, IkeSaUp)][ups_b:]
        assert len(new_a) == len(new_b) == 2, (new_a, new_b)
        assert {e.rekey_of for e in new_a} == {old.ike_id}
        survivor = a.ike_sas()[0]
        assert survivor.spi_i != old.spi_i and survivor.ike_id in {e.ike_id for e in new_a}
        # The CHILD_SAs moved, untouched (no CHILD_SA event at all).
        assert _live(a)[1] == kids_before and _live(b)[1] == [k[::-1] for k in kids_before]
        assert not [e for e in link.events[id(a)] if isinstance(e, ChildSaDeleted)]
        # No TEMPORARY_FAILURE back-off: nothing is pending afterwards but DPD and rekeys.
        assert not [s for s in a.ike_sas() + b.ike_sas() if s.state != "established"]
        now = link.now + 1.0
    # The survivor still works: a CHILD_SA rekey and a delete go through.
    a.rekey_child("b", link.now)
    link.run()
    _one_pair_each(a, b)
    a.delete_ike("b", link.now)
    link.run()
    assert a.ike_sas() == [] and b.ike_sas() == []


def test_simultaneous_ike_rekeys_who_deletes_what():
    """The redundant new SA is deleted by the end that created it, the old SA by the
    creator of the survivor; each side reports both as rekeyed, nothing else goes."""
    for _ in range(10):
        a, b, link = pair()
        a.initiate("b", 0.0)
        link.run()
        old = a.ike_sas()[0]
        deletes: list[tuple[bytes, object]] = []

        def watch(data, sender, deletes=deletes):
            if data[18] == 37 and not data[19] & 0x20:  # INFORMATIONAL requests
                deletes.append((data[:16], sender))
            return False
        link.drop = watch
        _ike_rekey_crossing(a, b, link, 1.0)
        link.advance(0.5)
        _one_pair_each(a, b)
        survivor = a.ike_sas()[0]
        ups = {c: [e for e in link.events[id(c)] if isinstance(e, IkeSaUp) and e.rekey_of]
               for c in (a, b)}
        made_by = {e.spi_i + e.spi_r: c for c in (a, b) for e in ups[c] if e.initiator}
        assert len(made_by) == 2
        (loser,) = [k for k in made_by if k != survivor.spi_i + survivor.spi_r]
        winner = survivor.spi_i + survivor.spi_r
        assert sorted(deletes, key=lambda d: d[0] == loser) == [
            (old.spi_i + old.spi_r, made_by[winner]), (loser, made_by[loser])]
        for c in (a, b):
            assert [e.reason for e in link.events[id(c)] if isinstance(e, IkeSaDown)] == [
                "rekeyed", "rekeyed"]


def test_simultaneous_ike_rekeys_with_lost_messages_keep_the_child_sas():
    """Crossing IKE SA rekeys on a lossy link: whichever end settles the collision first,
    and whatever is lost, both end on the same single IKE SA with the CHILD_SA pair."""
    import random
    for seed in range(40):
        rnd = random.Random(seed)
        a, b, link = pair(children=(VXLAN_CHILD_A,), retransmit_timeout=0.5,
                          retransmit_base=1.5, retransmit_tries=6, dpd_delay=100.0)
        a.initiate("b", 0.0)
        link.run()
        kids = _live(a)[1]
        link.drop = lambda data, sender, rnd=rnd: rnd.random() < 0.2
        link.now = 1.0
        a.rekey_ike("b", 1.0)
        b.rekey_ike("a", 1.0 + rnd.random() * 0.1)
        link.run()
        link.advance(40.0, step=0.5)
        link.drop = lambda data, sender: False
        link.advance(40.0, step=1.0)
        _one_pair_each(a, b)
        assert _live(a)[1] == kids, seed
        assert not [e for e in link.events[id(a)] + link.events[id(b)]
                    if isinstance(e, ChildSaDeleted)], seed


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


def test_dpd_timeout_declares_the_peer_dead_sooner_than_the_retransmissions():
    """With dpd_timeout, an unanswered liveness check gives up after that time (retransmitted
    meanwhile), not after the whole retransmission schedule (2 + 3.6 + ... = 44.7 s here)."""
    a, _b, link = pair(dpd_delay=2.0, dpd_timeout=6.0)
    a.initiate("b", 0.0)
    link.run()
    link.advance(5.0)  # answered liveness checks
    assert _live(a)[0]
    sent_by_a: list[float] = []

    def lose(data: bytes, sender: object) -> bool:
        if sender is a:
            sent_by_a.append(link.now)
        return True

    link.drop = lose
    down_at = None
    for _ in range(80):
        link.advance(0.25)
        if [e for e in link.events[id(a)] if isinstance(e, IkeSaDown)]:
            down_at = link.now
            break
    assert down_at is not None and sent_by_a
    assert abs(down_at - (sent_by_a[0] + 6.0)) <= 0.25, (sent_by_a, down_at)
    downs = [e for e in link.events[id(a)] if isinstance(e, IkeSaDown)]
    assert "dead" in downs[0].reason
    assert [e for e in link.events[id(a)] if isinstance(e, ChildSaDeleted)]
    # The check went out, then again 2 and 5.6 s later (the normal schedule, in 0.25 s ticks).
    gaps = [t - sent_by_a[0] for t in sent_by_a]
    assert len(gaps) == 3 and 2.0 <= gaps[1] <= 2.25 and 5.6 <= gaps[2] <= 5.85, gaps


def test_child_installed_events_never_show_keys():
    a, _b, link = pair()
    a.initiate("b", 0.0)
    link.run()
    ev = link.installed(a)[0]
    assert isinstance(ev, ChildSaInstalled)
    assert ev.keymat_in.hex() not in repr(ev) and "keymat" not in repr(ev)
