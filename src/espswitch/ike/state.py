"""The IKE SA and CHILD_SA state machines: one transition table each (h11's _state.py shape).

Every state change of an IKE SA goes through `transition`, and every state change of a
CHILD_SA through `child_transition` (`ChildSa.fire`); a (state, trigger) pair missing from
its table is an error. `RESPONDER_ACCEPTS` says which request exchanges are processed in
which state, and what happens to the others; `INITIATOR_MAY_SEND` which requests of our own
may start.
"""

from __future__ import annotations

import enum

from espswitch.ike.consts import Exchange, Notify
from espswitch.ike.errors import LocalIkeError, ProtocolError

__all__ = [
    "CHILD_TRANSITIONS",
    "INITIATOR_MAY_SEND",
    "RESPONDER_ACCEPTS",
    "TRANSITIONS",
    "ChildState",
    "ChildTrigger",
    "IkeState",
    "Trigger",
    "child_transition",
    "transition",
]


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


class ChildState(enum.StrEnum):
    """Where a CHILD_SA is (the values are what ike/show prints)."""

    NEW = "new"  # being negotiated: not installed yet
    INSTALLED = "installed"
    REKEY_QUEUED = "rekey-queued"  # our rekey of it waits for its turn in the window
    REKEYING = "rekeying"  # our rekey request is out
    REKEYED = "rekeyed"  # our rekey completed: it is replaced, awaiting its delete
    DELETING = "deleting"  # our delete request is out (or about to be)
    EXPIRED = "expired"  # its hard lifetime passed: removed, the peer is told
    FAILED = "failed"  # the responder installed what we refused: the peer is told


class ChildTrigger(enum.StrEnum):
    """What moves a CHILD_SA."""

    INSTALL = "install"
    REFUSE = "refuse"  # the responder's choice did not pass our checks
    QUEUE_REKEY = "queue-rekey"  # its rekey time came, or ike/rekey asked
    DROP_REKEY = "drop-rekey"  # the queued rekey cannot start: the IKE SA is not up
    START_REKEY = "start-rekey"
    REKEY_FAILED = "rekey-failed"  # refused, TEMPORARY_FAILURE or a bad response: later
    REKEY_DONE = "rekey-done"
    EXPIRE = "expire"
    DELETE = "delete"


C, CT = ChildState, ChildTrigger

CHILD_TRANSITIONS: dict[tuple[ChildState, ChildTrigger], ChildState] = {
    (C.NEW, CT.INSTALL): C.INSTALLED,
    (C.NEW, CT.REFUSE): C.FAILED,
    (C.INSTALLED, CT.QUEUE_REKEY): C.REKEY_QUEUED,
    (C.REKEY_QUEUED, CT.DROP_REKEY): C.INSTALLED,
    (C.REKEY_QUEUED, CT.START_REKEY): C.REKEYING,
    (C.REKEYING, CT.REKEY_FAILED): C.INSTALLED,
    (C.REKEYING, CT.REKEY_DONE): C.REKEYED,
    # It expired (and was removed) while our rekey of it was out; the rekey completed.
    (C.EXPIRED, CT.REKEY_DONE): C.REKEYED,
    **{(s, CT.EXPIRE): C.EXPIRED
       for s in (C.INSTALLED, C.REKEY_QUEUED, C.REKEYING, C.REKEYED)},
    **{(s, CT.DELETE): C.DELETING
       for s in (C.INSTALLED, C.REKEY_QUEUED, C.REKEYED, C.EXPIRED, C.FAILED)},
}


def child_transition(state: ChildState, trigger: ChildTrigger) -> ChildState:
    """The next CHILD_SA state; LocalIkeError when the table has no entry (a bug of ours:
    nothing the peer sends moves a CHILD_SA where the table does not allow)."""
    try:
        return CHILD_TRANSITIONS[state, trigger]
    except KeyError:
        raise LocalIkeError(f"CHILD_SA: {trigger} is not allowed in state {state}") from None
