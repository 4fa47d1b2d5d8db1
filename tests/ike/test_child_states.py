"""The CHILD_SA state table (`espswitch.ike.state.CHILD_TRANSITIONS`): every transition in it
is reached by some sequence of messages and commands, and nothing else moves a CHILD_SA."""

from __future__ import annotations

import itertools

import pytest

import espswitch.ike.sas as sas_module
from espswitch.ike import ChildConfig, ChildSaExpired, IkeCore, LocalIkeError
from espswitch.ike.sas import ChildSa
from espswitch.ike.state import CHILD_TRANSITIONS, ChildState, ChildTrigger, child_transition

from .helpers import A_ADDR, B_ADDR, Link, pair, peer

CHILD = ChildConfig(name="c", rekey_time=10.0, life_time=12.0)
LATER = 20.0  # past the first CHILD_SA's life time, before DPD or any give-up


def _held(core: IkeCore) -> list:
    """What `core` would send, kept back from the link."""
    return core.datagrams_to_send()


def _deliver(datagrams: list, to: IkeCore, now: float) -> None:
    for d in datagrams:
        to.receive_datagram(d.data, src=d.src, dst=d.dst, now=now)


def _up(**kw: object) -> tuple[IkeCore, IkeCore]:
    a, b, link = pair(children=(CHILD,), **kw)
    a.initiate("b", 0.0)
    link.run()
    assert [s.state for s in a.ike_sas()] == ["established"], list(a.errors)
    return a, b


def _child_states(core: IkeCore) -> list[str]:
    return [c.state for s in core.ike_sas() for c in s.children]


def installed_expires_and_is_deleted() -> None:
    """Nothing rekeyed it in time (the clock jumped): installed -> expired -> deleting."""
    a, _b = _up()
    a.on_timer(LATER)
    assert [type(e) for e in a.events() if isinstance(e, ChildSaExpired)] == [ChildSaExpired]


def queued_rekey_expires() -> None:
    """A rekey waiting behind another request when the life time ends."""
    a, _b = _up()
    a.rekey_ike("b", 1.0)  # out, never answered
    _held(a)
    a.rekey_child("b", 1.0)
    assert _child_states(a) == ["rekey-queued"]
    a.on_timer(LATER)
    assert _child_states(a) == []


def rekey_out_when_it_expires_then_completes() -> None:
    """Our rekey is out when the life time ends; its response comes after all."""
    a, b = _up()
    a.rekey_child("b", 1.0)
    request = _held(a)
    assert _child_states(a) == ["rekeying"]
    a.on_timer(LATER)  # expired (and removed); the rekey is retransmitted
    _held(a)
    _deliver(request, b, LATER)
    _deliver(_held(b), a, LATER)
    assert _child_states(a) == ["installed"]


def rekeyed_expires_before_its_delete() -> None:
    """Replaced by our rekey, its delete waits behind an IKE SA rekey; the life time ends."""
    a, b = _up()
    a.rekey_child("b", 1.0)
    child_rekey = _held(a)
    a.rekey_ike("b", 1.0)  # queued behind the CHILD_SA rekey
    _deliver(child_rekey, b, 1.0)
    _deliver(_held(b), a, 1.0)  # done: the IKE SA rekey goes out, the delete waits
    _held(a)
    assert sorted(_child_states(a)) == ["installed", "rekeyed"]
    a.on_timer(LATER)
    assert _child_states(a) == []


def queued_rekey_deleted_first() -> None:
    """A delete queued before a rekey of the same CHILD_SA: the rekey finds it deleting."""
    a, b = _up()
    a.rekey_ike("b", 1.0)
    ike_rekey = _held(a)
    a.delete_child("b", 1.0)
    a.rekey_child("b", 1.0)
    _deliver(ike_rekey, b, 1.0)
    _deliver(_held(b), a, 1.0)  # the IKE SA rekey done: the delete starts, then nothing
    assert _child_states(a) == ["deleting"]


def refused_rekey_is_retried_later() -> None:
    """The peer answers our CHILD_SA rekey with TEMPORARY_FAILURE (it is deleting)."""
    a, b = _up()
    a.rekey_child("b", 1.0)
    child_rekey = _held(a)
    b.delete_ike("a", 1.0)
    _held(b)
    _deliver(child_rekey, b, 1.0)
    _deliver(_held(b), a, 1.0)
    assert _child_states(a) == ["installed"]


def refused_first_child_is_deleted() -> None:
    """IKE_AUTH: the responder installed a tunnel-mode CHILD_SA where we want transport."""
    a = IkeCore([peer(A_ADDR, B_ADDR, "b", children=(ChildConfig(name="c", mode="transport"),))])
    b = IkeCore([peer(B_ADDR, A_ADDR, "a", children=(ChildConfig(name="c", mode="tunnel"),))])
    link = Link(a, b)
    a.initiate("b", 0.0)
    link.run()
    assert [s.state for s in a.ike_sas()] == ["established"]
    assert _child_states(a) == [] and _child_states(b) == []


def rekey_dropped_when_its_ike_sa_was_replaced() -> None:
    """Crossing IKE SA rekeys where the peer deletes the SA its rekey made and refuses
    ours: a CHILD_SA rekey queued on that SA goes back to the replaced IKE SA, which cannot
    send it (§2.8.2)."""
    a, b = _up()
    a.rekey_ike("b", 1.0)
    ours = _held(a)  # R1: held back
    b.rekey_ike("a", 1.0)
    _deliver(_held(b), a, 1.0)  # the peer's rekey crosses ours: a new IKE SA on each side
    _deliver(_held(a), b, 1.0)  # b's rekey done: b deletes its old SA
    _held(b)  # (that delete never reaches a)
    a.rekey_ike("b", 1.5)  # on the new SA: out, never answered
    _held(a)
    a.rekey_child("b", 1.5)  # queued behind it
    assert _child_states(a) == ["rekey-queued"]
    b.delete_ike("a", 2.0)  # b deletes the new SA too (its old one is being deleted)
    _deliver(_held(b), a, 2.0)  # the CHILD_SAs and the queued rekey go back to the old SA
    _held(a)
    _deliver(ours, b, 2.0)  # refused: b's old SA is going
    _deliver(_held(b), a, 2.0)
    assert _child_states(a) == ["installed"]


SCENARIOS = [installed_expires_and_is_deleted, queued_rekey_expires,
             rekey_out_when_it_expires_then_completes, rekeyed_expires_before_its_delete,
             queued_rekey_deleted_first, refused_rekey_is_retried_later,
             refused_first_child_is_deleted, rekey_dropped_when_its_ike_sa_was_replaced]


def test_every_transition_in_the_table_is_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: set[tuple[ChildState, ChildTrigger]] = set()

    def recording(state: ChildState, trigger: ChildTrigger) -> ChildState:
        seen.add((state, trigger))
        return child_transition(state, trigger)

    monkeypatch.setattr(sas_module, "child_transition", recording)
    a, _b, link = pair(children=(CHILD,))  # the everyday ones: set up, rekey, delete
    a.initiate("b", 0.0)
    link.run()
    link.advance(30.0, step=0.5)
    a.delete_child("b", link.now)
    link.run()
    for scenario in SCENARIOS:
        scenario()
    assert seen == set(CHILD_TRANSITIONS), (set(CHILD_TRANSITIONS) - seen,
                                            seen - set(CHILD_TRANSITIONS))


def test_nothing_else_moves_a_child_sa() -> None:
    for state, trigger in itertools.product(ChildState, ChildTrigger):
        if (state, trigger) in CHILD_TRANSITIONS:
            assert child_transition(state, trigger) is CHILD_TRANSITIONS[state, trigger]
        else:
            with pytest.raises(LocalIkeError):
                child_transition(state, trigger)
    child = ChildSa(CHILD)
    with pytest.raises(AttributeError):
        child.state = ChildState.INSTALLED  # type: ignore[misc]
    assert child.state is ChildState.NEW
