"""Errors raised by the wire-format parsers.

Everything a parser finds wrong with received bytes is a :class:`PacketError`; a caller's
mistake (a VNI out of range, a bad MTU) is a plain :class:`ValueError`. ``PacketError``
subclasses ``ValueError`` so that code which only cares about "bad input" can catch one type.
"""

from __future__ import annotations

__all__ = ["PacketError", "TruncatedPacket"]


class PacketError(ValueError):
    """Received bytes do not form a valid packet; the message says ``malformed packet: <what>``."""

    def __init__(self, what: str) -> None:
        super().__init__(f"malformed packet: {what}")
        self.what = what


class TruncatedPacket(PacketError):
    """The buffer ends before a header or a length field says it should."""
