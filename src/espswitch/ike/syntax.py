"""Checks of IKE option syntax for the layer below (`espswitch.ipsec.config`), installed there
on import so that bad `ike`, `esp` and `remote_name` values reach `Interface.error`."""

from __future__ import annotations

from espswitch.ike.auth import Identity
from espswitch.ike.consts import Protocol
from espswitch.ike.errors import IkeConfigError
from espswitch.ike.proposals import parse_proposals
from espswitch.ipsec.config import set_ike_syntax_check


def check(what: str, text: str) -> str | None:
    """The problem with `text` as an IKE proposal, ESP proposal or identity, or None."""
    try:
        if what == "identity":
            Identity.parse(text)
        else:
            parse_proposals(text, Protocol.IKE if what == "ike" else Protocol.ESP)
    except IkeConfigError as e:
        return str(e)
    return None


set_ike_syntax_check(check)
