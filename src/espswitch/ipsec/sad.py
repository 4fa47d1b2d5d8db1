"""The security association database: inbound SAs found by SPI (RFC 4301 §4.4.2)."""

from __future__ import annotations

import struct
from collections.abc import Iterator

from espswitch.ipsec.errors import DropReason, EspDrop, IpsecConfigError
from espswitch.ipsec.sa import InboundSA

_U32 = struct.Struct("!I")


class Sad:
    """Inbound SAs by SPI, with the drops that happen before an SA is known."""

    __slots__ = ("_by_spi", "malformed", "unknown_spi")

    def __init__(self) -> None:
        self._by_spi: dict[int, InboundSA] = {}
        self.unknown_spi = 0
        self.malformed = 0

    def add(self, sa: InboundSA) -> None:
        """Install an inbound SA; its SPI must not be in use."""
        if sa.spi in self._by_spi:
            raise IpsecConfigError(f"SPI 0x{sa.spi:08x} is already in use by another SA")
        self._by_spi[sa.spi] = sa

    def remove(self, spi: int) -> InboundSA | None:
        """Remove and return the SA with this SPI, if any."""
        return self._by_spi.pop(spi, None)

    def get(self, spi: int) -> InboundSA | None:
        """The SA with this SPI, or None."""
        return self._by_spi.get(spi)

    def __len__(self) -> int:
        return len(self._by_spi)

    def __iter__(self) -> Iterator[InboundSA]:
        return iter(self._by_spi.values())

    def lookup(self, esp: bytes | bytearray | memoryview) -> InboundSA:
        """Return the SA for an ESP packet's SPI; count and raise EspDrop when there is none."""
        if len(esp) < 8:
            self.malformed += 1
            raise EspDrop(DropReason.MALFORMED)
        sa = self._by_spi.get(_U32.unpack_from(esp, 0)[0])
        if sa is None:
            self.unknown_spi += 1
            raise EspDrop(DropReason.UNKNOWN_SPI)
        return sa

    def decrypt(self, esp: bytes | bytearray | memoryview) -> tuple[InboundSA, int, bytes]:
        """Find the SA by SPI and decrypt: returns (sa, next_header, payload) or raises EspDrop."""
        sa = self.lookup(esp)
        nh, payload = sa.decrypt(esp)
        return sa, nh, payload
