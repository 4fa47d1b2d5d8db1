"""The IKE SA state machine: the one transition table (h11's _state.py shape).

Every state change of an IKE SA goes through `transition`; a (state, trigger) pair missing
from the table is a protocol error. `RESPONDER_ACCEPTS` says which request exchanges are
processed in which state, and what happens to the others.
"""

from __future__ import annotations

import enum

from espswitch.ike.consts import Exchange, Notify
from espswitch.ike.errors import ProtocolError

__all__ = ["RESPONDER_ACCEPTS", "IkeState", "Trigger", "transition"]


class IkeState(enum.StrEnum):
    """Where an IKE SA is."""

    IDLE = "idle"
    INIT_SENT = "init-sent"  # initiator: IKE_SA_INIT request out
    AUTH_SENT = "auth-sent"  # initiator: IKE_AUTH request out
    HALF_OPEN = "half-open"  # responder: IKE_SA_INIT answered, IKE_AUTH awaited
    ESTABLISHED = "established"
    REKEYED = "rekeyed"  # replaced by a new IKE SA (or lost a rekey collision), awaiting delete
    DELETING = "deleting"  # our delete request is out
    CLOSED = "closed"


class Trigger(enum.StrEnum):
    """What moves an IKE SA."""

    INITIATE = "initiate"
    INIT_RETRY = "init-retry"  # COOKIE or INVALID_KE_PAYLOAD: IKE_SA_INIT again
    INIT_RESPONSE = "init-response"
    AUTH_RESPONSE = "auth-response"
    INIT_REQUEST = "init-request"
    AUTH_REQUEST = "auth-request"
    BORN_FROM_REKEY = "born-from-rekey"
    REKEYED = "rekeyed"
    DELETE = "delete"
    CLOSE = "close"


S, T = IkeState, Trigger

TRANSITIONS: dict[tuple[IkeState, Trigger], IkeState] = {
    (S.IDLE, T.INITIATE): S.INIT_SENT,
    (S.IDLE, T.INIT_REQUEST): S.HALF_OPEN,
    (S.IDLE, T.BORN_FROM_REKEY): S.ESTABLISHED,
    (S.INIT_SENT, T.INIT_RETRY): S.INIT_SENT,
    (S.INIT_SENT, T.INIT_RESPONSE): S.AUTH_SENT,
    (S.AUTH_SENT, T.AUTH_RESPONSE): S.ESTABLISHED,
    (S.HALF_OPEN, T.AUTH_REQUEST): S.ESTABLISHED,
    (S.ESTABLISHED, T.REKEYED): S.REKEYED,
    # §2.8.2: the peer's crossing rekey replaced the SA first, then ours completes too.
    (S.REKEYED, T.REKEYED): S.REKEYED,
    (S.ESTABLISHED, T.DELETE): S.DELETING,
    (S.REKEYED, T.DELETE): S.DELETING,
    **{(s, T.CLOSE): S.CLOSED for s in S if s is not S.CLOSED},
}

# (state, request exchange) -> "process", or the notify to refuse it with. Missing: dropped.
RESPONDER_ACCEPTS: dict[tuple[IkeState, int], str | int] = {
    (S.HALF_OPEN, Exchange.IKE_AUTH): "process",
    (S.ESTABLISHED, Exchange.CREATE_CHILD_SA): "process",
    (S.ESTABLISHED, Exchange.INFORMATIONAL): "process",
    (S.REKEYED, Exchange.INFORMATIONAL): "process",
    (S.REKEYED, Exchange.CREATE_CHILD_SA): Notify.TEMPORARY_FAILURE,
    (S.DELETING, Exchange.INFORMATIONAL): "process",
    (S.DELETING, Exchange.CREATE_CHILD_SA): Notify.TEMPORARY_FAILURE,
    (S.AUTH_SENT, Exchange.INFORMATIONAL): "process",
}

# The states in which we may start each kind of request of our own.
INITIATOR_MAY_SEND: dict[str, frozenset[IkeState]] = {
    "create_child": frozenset({S.ESTABLISHED}),
    "rekey_child": frozenset({S.ESTABLISHED}),
    "rekey_ike": frozenset({S.ESTABLISHED}),
    "delete_child": frozenset({S.ESTABLISHED, S.REKEYED}),
    "delete_ike": frozenset({S.ESTABLISHED, S.REKEYED, S.DELETING}),
    "dpd": frozenset({S.ESTABLISHED}),
}


def transition(state: IkeState, trigger: Trigger) -> IkeState:
    """The next state; ProtocolError when the table has no entry."""
    try:
        return TRANSITIONS[state, trigger]
    except KeyError:
        raise ProtocolError(f"{trigger} is not allowed in state {state}") from None
