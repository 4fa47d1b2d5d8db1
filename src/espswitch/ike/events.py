"""What the IKE core tells its driver: datagrams to send and events.

Events are frozen, slotted, keyword-only dataclasses; keys never appear in their reprs.
`ChildSaInstalled` carries everything the ESP engine needs (`inbound_params()`,
`outbound_params()` build `espswitch.ipsec.SaParams`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from espswitch.ike.addr import addr_bytes
from espswitch.ike.message import TrafficSelector
from espswitch.ipsec import SaParams, parse_transform
from espswitch.ipsec.sa import Mode

__all__ = [
    "ChildSaDeleted",
    "ChildSaExpired",
    "ChildSaInstalled",
    "Datagram",
    "Event",
    "IkeSaDown",
    "IkeSaUp",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Datagram:
    """A UDP datagram to send: payload (with the non-ESP marker on port 4500) and ends."""

    data: bytes = field(repr=False)
    src: tuple[str, int]
    dst: tuple[str, int]


@dataclass(frozen=True, slots=True, kw_only=True)
class IkeSaUp:
    """An IKE SA is established (or replaced one in a rekey: `rekey_of` is the old id)."""

    ike_id: int
    peer: str
    local_addr: tuple[str, int]
    remote_addr: tuple[str, int]
    local_id: str
    remote_id: str
    spi_i: bytes
    spi_r: bytes
    initiator: bool
    nat: bool
    rekey_of: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class IkeSaDown:
    """An IKE SA is gone: `reason` says why (deleted, rekeyed, peer dead, failed: ...)."""

    ike_id: int
    peer: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ChildSaInstalled:
    """A CHILD_SA pair to install in the ESP engine.

    `keymat_in`/`keymat_out` are in the ESP engine's KEYMAT order (encryption key, salt,
    integrity key). With `encap`, ESP travels in UDP between `local_addr` and
    `remote_addr` (ports included, RFC 3948). `rekey_of` names the inbound SPI of the
    CHILD_SA this one replaces. `initiator`: we asked for this CHILD_SA, so the peer
    installed it before it answered (as responder, the peer may not have it yet).
    """

    ike_id: int
    peer: str
    child: str
    spi_in: int
    spi_out: int
    transform: str
    keymat_in: bytes = field(repr=False)
    keymat_out: bytes = field(repr=False)
    mode: str
    local_ts: tuple[TrafficSelector, ...]
    remote_ts: tuple[TrafficSelector, ...]
    encap: bool
    local_addr: tuple[str, int]
    remote_addr: tuple[str, int]
    rekey_of: int | None = None
    initiator: bool = False

    def inbound_params(self, replay_window: int = 1024) -> SaParams:
        """The ESP engine's parameters for the inbound SA."""
        return SaParams(spi=self.spi_in, transform=parse_transform(self.transform),
                        keymat=self.keymat_in, mode=Mode(self.mode),
                        replay_window=replay_window,
                        tunnel_src=addr_bytes(self.remote_addr[0]),
                        tunnel_dst=addr_bytes(self.local_addr[0]))

    def outbound_params(self) -> SaParams:
        """The ESP engine's parameters for the outbound SA."""
        return SaParams(spi=self.spi_out, transform=parse_transform(self.transform),
                        keymat=self.keymat_out, mode=Mode(self.mode),
                        tunnel_src=addr_bytes(self.local_addr[0]),
                        tunnel_dst=addr_bytes(self.remote_addr[0]))


@dataclass(frozen=True, slots=True, kw_only=True)
class ChildSaDeleted:
    """A CHILD_SA pair is gone (deleted by either side, rekeyed, or its IKE SA went)."""

    ike_id: int
    peer: str
    child: str
    spi_in: int
    spi_out: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ChildSaExpired:
    """A CHILD_SA reached its hard lifetime without being rekeyed; it is removed."""

    ike_id: int
    peer: str
    child: str
    spi_in: int
    spi_out: int


Event = IkeSaUp | IkeSaDown | ChildSaInstalled | ChildSaDeleted | ChildSaExpired
