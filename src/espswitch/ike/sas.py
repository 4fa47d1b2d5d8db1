"""The shared SA store of the IKE core: IKE SAs, their CHILD_SAs and outstanding requests.

Every exchange module (`sa_init`, `ike_auth`, `create_child`, `informational`) and the
request window (`window`) work on these objects; `SaStore` finds them by SPI and hands out
fresh SPIs. Nothing here sends or decides anything.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from espswitch.ike.auth import Identity
from espswitch.ike.config import ChildConfig, PeerConfig
from espswitch.ike.consts import IKE_PORT
from espswitch.ike.crypto import DhKey, IkeKeys, SkCipher
from espswitch.ike.errors import LocalIkeError
from espswitch.ike.message import TrafficSelector
from espswitch.ike.proposals import Chosen
from espswitch.ike.state import ChildState, ChildTrigger, IkeState, child_transition

__all__ = ["ZERO_SPI", "ChildSa", "IkeSa", "Request", "SaStore"]

ZERO_SPI = bytes(8)


class Request:
    """Our outstanding request (window size 1) and its retransmission schedule.

    `handler(sa, msg, ctx, now)` takes the response; `on_error(sa, self, error, now)`, when
    given, is told of a response that could not be accepted."""

    __slots__ = ("ctx", "data", "deadline", "handler", "kind", "mid", "on_error", "sent_at",
                 "tries")

    def __init__(self, kind: str, mid: int, data: bytes | tuple[bytes, ...],
                 handler: Callable, ctx: Any,
                 deadline: float, sent_at: float, on_error: Callable | None = None) -> None:
        self.kind, self.mid, self.data = kind, mid, data
        self.handler, self.ctx = handler, ctx
        self.on_error = on_error
        self.tries = 0
        self.deadline = deadline
        self.sent_at = sent_at


class ChildSa:
    """One CHILD_SA pair inside an IKE SA. Its state changes only by `fire` (the table of
    `espswitch.ike.state`)."""

    __slots__ = ("_state", "cfg", "chosen", "expire_at", "keymat_in", "keymat_out", "local_ts",
                 "mode", "nonces", "our_rekey", "peer_rekey", "rekey_at", "rekey_of",
                 "remote_ts", "spi_in", "spi_out")

    def __init__(self, cfg: ChildConfig) -> None:
        self.cfg = cfg
        self._state = ChildState.NEW
        self.spi_in = self.spi_out = 0
        self.chosen: Chosen | None = None
        self.mode = cfg.mode
        self.local_ts: tuple[TrafficSelector, ...] = ()
        self.remote_ts: tuple[TrafficSelector, ...] = ()
        self.keymat_in = self.keymat_out = b""
        self.nonces: tuple[bytes, bytes] = (b"", b"")
        self.rekey_at = self.expire_at = 0.0
        self.rekey_of: int | None = None
        self.our_rekey: ChildSa | None = None  # the child our rekey of this one created
        self.peer_rekey: ChildSa | None = None  # the child the peer's rekey of this one made

    @property
    def state(self) -> ChildState:
        """Where the CHILD_SA is; read-only (see `fire`)."""
        return self._state

    def fire(self, trigger: ChildTrigger) -> None:
        """Move the CHILD_SA by `trigger`; LocalIkeError if its state does not allow it."""
        self._state = child_transition(self._state, trigger)

    def __repr__(self) -> str:
        return f"<child {self.cfg.name} in=0x{self.spi_in:08x} out=0x{self.spi_out:08x}>"


class IkeSa:
    """One IKE SA: its state, keys, message IDs, outstanding request and children."""

    def __init__(self, uid: int, peer: PeerConfig, initiator: bool, now: float) -> None:
        self.uid = uid
        self.peer = peer
        self.initiator = initiator  # the original initiator (I flag), after rekeys too
        self.state = IkeState.IDLE
        self.spi_i = self.spi_r = ZERO_SPI
        self.local = (peer.local_addr, IKE_PORT)
        self.remote = (peer.remote_addr, peer.remote_port)
        self.created = now
        self.last_recv = now
        self.last_sent = now
        self.chosen: Chosen | None = None
        self.keys: IkeKeys | None = None
        self.sk_in: SkCipher | None = None
        self.sk_out: SkCipher | None = None
        self.ni = self.nr = b""
        self.dh: DhKey | None = None
        self.init_request = self.init_response = b""
        self.cookie: bytes | None = None
        self.retries = 0
        self.next_mid = 0
        self.expect_mid = 0
        self.last_resp_mid = -1
        self.last_resp: bytes | tuple[bytes, ...] | None = None  # a tuple: fragments
        self.outstanding: Request | None = None
        self.queue: deque[tuple[str, Any]] = deque()
        self.children: list[ChildSa] = []
        self.nat_local = self.nat_remote = False
        self.frag_ok = False  # both announced IKEV2_FRAGMENTATION_SUPPORTED (RFC 7383)
        self.peer_hashes: frozenset[int] = frozenset()
        self.remote_identity: Identity | None = None
        self.rekey_at = 0.0
        self.close_after_response = ""
        self.half_open_key: tuple | None = None
        self.first_child: ChildSa | None = None
        self.rekeyed_at = 0.0  # when it entered REKEYED
        # Initiator in AUTH_SENT: the same IKE SA built from other IKE_SA_INIT responses,
        # each with its own IKE_AUTH out; the IKE_AUTH response decides which one is real.
        self.candidates: list[IkeSa] = []
        # The IKE SA the peer's rekey of this one made while our own rekey was out (§2.8.2).
        self.crossing: IkeSa | None = None
        self.born_of: IkeSa | None = None  # the IKE SA this one replaced
        # Crossing initiations left this one over: we delete it once `duplicate_of` has
        # every CHILD_SA it has, or at `duplicate_until` (IkeAuth.settle_duplicates).
        self.duplicate_of: IkeSa | None = None
        self.duplicate_until = 0.0

    @property
    def our_spi(self) -> bytes:
        """Our SPI of the pair: the one the peer addresses us by."""
        return self.spi_i if self.initiator else self.spi_r

    @property
    def encap(self) -> bool:
        """Whether ESP and IKE go in UDP/4500 (a NAT seen, or forced by the config)."""
        return self.nat_local or self.nat_remote or self.peer.encap

    def __repr__(self) -> str:
        return f"<IKE SA #{self.uid} {self.peer.name} {self.state}>"


class SaStore:
    """The IKE SAs by our SPI, the half-open ones by (source, SPIi), and the inbound CHILD_SA
    SPIs in use; `rng(n)` supplies the random SPIs."""

    def __init__(self, rng: Callable[[int], bytes]) -> None:
        self.by_spi: dict[bytes, IkeSa] = {}
        self.half_open: dict[tuple, IkeSa] = {}
        self.spis_in: set[int] = set()
        self._rng = rng
        self._uid = 0

    def new_sa(self, peer: PeerConfig, *, initiator: bool, now: float) -> IkeSa:
        """A new IKE SA (in IDLE, not stored yet) with the next unique id."""
        self._uid += 1
        return IkeSa(self._uid, peer, initiator, now)

    def all(self) -> list[IkeSa]:
        """Every stored IKE SA once, oldest first."""
        seen: dict[int, IkeSa] = {}
        for sa in self.by_spi.values():
            seen.setdefault(sa.uid, sa)
        return list(seen.values())

    def drop_half_open(self, sa: IkeSa) -> None:
        """Forget `sa` as a half-open SA (authenticated, or closed)."""
        if sa.half_open_key is not None and self.half_open.get(sa.half_open_key) is sa:
            del self.half_open[sa.half_open_key]
        sa.half_open_key = None

    def forget(self, sa: IkeSa) -> None:
        """Remove `sa` from the store (it is closed)."""
        self.drop_half_open(sa)
        for spi in (sa.spi_i, sa.spi_r):
            if self.by_spi.get(spi) is sa:
                del self.by_spi[spi]

    def established(self, peer: PeerConfig) -> IkeSa:
        """The newest ESTABLISHED IKE SA with `peer`; LocalIkeError if there is none."""
        for sa in sorted(self.all(), key=lambda s: -s.uid):
            if sa.peer is peer and sa.state is IkeState.ESTABLISHED:
                return sa
        raise LocalIkeError(f"no established IKE SA with {peer.name}")

    def new_ike_spi(self) -> bytes:
        """An IKE SPI of ours not in use."""
        while True:
            spi = self._rng(8)
            if spi != ZERO_SPI and spi not in self.by_spi:
                return spi

    def new_child_spi(self) -> int:
        """An inbound CHILD_SA SPI not in use (and not reserved), now taken."""
        while True:
            spi = int.from_bytes(self._rng(4), "big")
            if spi >= 256 and spi not in self.spis_in:
                self.spis_in.add(spi)
                return spi
