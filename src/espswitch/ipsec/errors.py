"""The errors of the ESP engine.

Two kinds, as in h11 and pyca/cryptography: a *local* error is the caller's mistake or our
own limit (a bad key length, an SA that may not send any more); a *remote* error is about a
received packet, and says only which counter it went to. Received-packet errors never carry
packet contents or key material.
"""

from __future__ import annotations

import enum


class IpsecError(Exception):
    """Base class of every error the ESP engine raises."""


class LocalIpsecError(IpsecError):
    """Something on our side: configuration, or an SA that refuses to protect more."""


class IpsecConfigError(LocalIpsecError, ValueError):
    """A bad SA parameter (unknown transform, key length, SPI, window size, ...)."""


class SaRefused(LocalIpsecError):
    """An outbound SA refused a packet: sequence numbers exhausted or hard lifetime passed."""

    def __init__(self, reason: DropReason) -> None:
        super().__init__(reason.description)
        self.reason = reason


class RemoteIpsecError(IpsecError):
    """Something about a packet that was received."""


class DropReason(enum.IntEnum):
    """Why a packet was dropped; each value is one counter."""

    UNKNOWN_SPI = 0
    REPLAYED = 1
    TOO_OLD = 2
    AUTH_FAILED = 3
    BAD_PADDING = 4
    MALFORMED = 5
    EXPIRED = 6
    SEQ_EXHAUSTED = 7
    DUMMY = 8

    @property
    def counter(self) -> str:
        """The name of the counter this reason increments."""
        return _COUNTER_NAMES[self]

    @property
    def description(self) -> str:
        """A short human sentence for logs and tools."""
        return _DESCRIPTIONS[self]


_COUNTER_NAMES = {
    DropReason.UNKNOWN_SPI: "unknown_spi",
    DropReason.REPLAYED: "replayed",
    DropReason.TOO_OLD: "too_old",
    DropReason.AUTH_FAILED: "auth_failed",
    DropReason.BAD_PADDING: "bad_padding",
    DropReason.MALFORMED: "malformed",
    DropReason.EXPIRED: "expired",
    DropReason.SEQ_EXHAUSTED: "seq_exhausted",
    DropReason.DUMMY: "dummy",
}

_DESCRIPTIONS = {
    DropReason.UNKNOWN_SPI: "no SA for this SPI",
    DropReason.REPLAYED: "sequence number already received (replay)",
    DropReason.TOO_OLD: "sequence number left of the replay window",
    DropReason.AUTH_FAILED: "integrity check failed",
    DropReason.BAD_PADDING: "bad ESP padding or pad length",
    DropReason.MALFORMED: "malformed ESP packet",
    DropReason.EXPIRED: "SA past its hard lifetime",
    DropReason.SEQ_EXHAUSTED: "sequence numbers exhausted: the SA must be rekeyed",
    DropReason.DUMMY: "dummy packet (next header 59) discarded",
}


class EspDrop(RemoteIpsecError):
    """A received ESP packet was dropped; `reason` names the counter it went to."""

    __slots__ = ("reason",)

    def __init__(self, reason: DropReason) -> None:
        super().__init__(reason.description)
        self.reason = reason
