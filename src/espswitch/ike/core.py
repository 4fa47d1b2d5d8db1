"""The IKEv2 protocol core (RFC 7296), sans-IO.

`IkeCore` is fed datagrams (`receive_datagram`), commands (`initiate`, `rekey_child`,
`rekey_ike`, `delete_child`, `delete_ike`) and the time (`on_timer` at `next_deadline()`);
it produces datagrams (`datagrams_to_send()`) and events (`events()`). It never opens a
socket nor reads a clock: every entry point takes `now`, in seconds on any monotonic scale.

Each IKE SA moves only through `espswitch.ike.state.transition`. Hostile input never raises
out of `receive_datagram`: what a message did wrong is decided there (a `RemoteIkeError`,
counted and kept in `errors`) and the message is answered with a notify or dropped.

Collisions: crossing IKE_SA_INIT and crossing CHILD_SA or IKE SA rekeys all complete, and
the redundant SA (the one holding the lowest nonce) is deleted by the end that created it
(RFC 7296 §2.8.1, §2.8.2). An IKE SA replaced by a rekey is deleted by the rekey's
initiator, or goes by itself when nobody has deleted it within the retransmission give-up
time. IKE_SA_INIT responses are unprotected: one that fails its checks is dropped, and
when several differing ones arrive, each gets its own IKE_AUTH and the authenticated
IKE_AUTH response decides. INITIAL_CONTACT is sent when we hold no other IKE SA with the
peer, and on receipt the other IKE SAs with that identity are deleted at once.

IKE fragmentation (RFC 7383) is announced in IKE_SA_INIT; when both ends did, encrypted
messages too large for the peer's `fragment_size` leave as Encrypted Fragment messages and
fragments received are reassembled under the core's `FragmentLimits` (`espswitch.ike.
fragment` does both; here only which message IDs are expected, and the answer to a
retransmitted fragmented request, which is sent for its first fragment only, §2.6.1).
"""

from __future__ import annotations

import hashlib
import hmac as std_hmac
import os
import struct
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from espswitch.ike.auth import (
    Identity,
    check_auth,
    make_auth,
    signed_octets,
    verify_peer_cert,
)
from espswitch.ike.config import ChildConfig, CoreSettings, PeerConfig
from espswitch.ike.consts import (
    IKE_PORT,
    NAT_T_PORT,
    CertEncoding,
    Exchange,
    Flag,
    Group,
    HashAlg,
    Notify,
    PayloadType,
    Protocol,
)
from espswitch.ike.crypto import (
    DhKey,
    IkeKeys,
    SkCipher,
    derive_child_keymat,
    derive_ike_keys,
)
from espswitch.ike.errors import IkeError, LocalIkeError, ProtocolError, RemoteIkeError
from espswitch.ike.events import (
    ChildSaDeleted,
    ChildSaExpired,
    ChildSaInstalled,
    Datagram,
    Event,
    IkeSaDown,
    IkeSaUp,
)
from espswitch.ike.fragment import (
    Reassembler,
    fragment_message,
    max_message_len,
    open_fragment,
)
from espswitch.ike.message import (
    AuthPayload,
    CertPayload,
    DeletePayload,
    Header,
    IdPayload,
    KePayload,
    Message,
    NoncePayload,
    NotifyPayload,
    Payload,
    SaPayload,
    TrafficSelector,
    TsPayload,
    encode_message,
    parse_header,
    parse_inner,
    parse_message,
)
from espswitch.ike.proposals import Chosen, choose
from espswitch.ike.state import (
    INITIATOR_MAY_SEND,
    RESPONDER_ACCEPTS,
    IkeState,
    Trigger,
    transition,
)
from espswitch.ike.ts import narrow, resolve_dynamic, single_host, ts_subset
from espswitch.ipsec import parse_transform
from espswitch.packet.esp import NAT_KEEPALIVE, NON_ESP_MARKER
from espswitch.packet.ipv4 import ip_to_bytes

__all__ = ["ChildInfo", "IkeCore", "IkeSaInfo"]

_ZERO_SPI = bytes(8)
_NONCE_LEN = 32
_MAX_ERRORS = 64
# Other IKE_SA_INIT responses tried next to the first one taken (§2.4: they are unprotected,
# so a spoofed or corrupted copy may arrive before the real one).
_MAX_INIT_CANDIDATES = 3
_SIG_HASHES = struct.pack("!HHH", HashAlg.SHA2_256, HashAlg.SHA2_384, HashAlg.SHA2_512)
# Notifies in an IKE_AUTH response that fail only the CHILD_SA, not the IKE SA (§1.2).
_CHILD_ERRORS = frozenset({
    Notify.NO_PROPOSAL_CHOSEN, Notify.TS_UNACCEPTABLE, Notify.SINGLE_PAIR_REQUIRED,
    Notify.INTERNAL_ADDRESS_FAILURE, Notify.FAILED_CP_REQUIRED, Notify.INVALID_SELECTORS,
})


@dataclass(frozen=True, slots=True, kw_only=True)
class ChildInfo:
    """A CHILD_SA as `IkeCore.ike_sas()` shows it."""

    name: str
    spi_in: int
    spi_out: int
    mode: str
    transform: str
    state: str


@dataclass(frozen=True, slots=True, kw_only=True)
class IkeSaInfo:
    """An IKE SA as `IkeCore.ike_sas()` shows it."""

    ike_id: int
    peer: str
    state: str
    initiator: bool
    spi_i: bytes
    spi_r: bytes
    children: tuple[ChildInfo, ...]
    remote_id: str = ""  # the identity the peer authenticated as, shown as text
    fragmentation: bool = False  # both ends announced IKE fragmentation (RFC 7383)


class _Request:
    """Our outstanding request (window size 1) and its retransmission schedule."""

    __slots__ = ("ctx", "data", "deadline", "handler", "kind", "mid", "sent_at", "tries")

    def __init__(self, kind: str, mid: int, data: bytes | tuple[bytes, ...],
                 handler: Callable, ctx: Any,
                 deadline: float, sent_at: float) -> None:
        self.kind, self.mid, self.data = kind, mid, data
        self.handler, self.ctx = handler, ctx
        self.tries = 0
        self.deadline = deadline
        self.sent_at = sent_at


class _Child:
    """One CHILD_SA pair inside an IKE SA."""

    __slots__ = ("cfg", "chosen", "expire_at", "keymat_in", "keymat_out", "local_ts", "mode",
                 "nonces", "our_rekey", "peer_rekey", "rekey_at", "rekey_of", "remote_ts",
                 "spi_in", "spi_out", "state")

    def __init__(self, cfg: ChildConfig) -> None:
        self.cfg = cfg
        self.state = "installed"  # rekeying, rekeyed, deleting
        self.spi_in = self.spi_out = 0
        self.chosen: Chosen | None = None
        self.mode = cfg.mode
        self.local_ts: tuple[TrafficSelector, ...] = ()
        self.remote_ts: tuple[TrafficSelector, ...] = ()
        self.keymat_in = self.keymat_out = b""
        self.nonces: tuple[bytes, bytes] = (b"", b"")
        self.rekey_at = self.expire_at = 0.0
        self.rekey_of: int | None = None
        self.our_rekey: _Child | None = None  # the child our rekey of this one created
        self.peer_rekey: _Child | None = None  # the child the peer's rekey of this one made

    def __repr__(self) -> str:
        return f"<child {self.cfg.name} in=0x{self.spi_in:08x} out=0x{self.spi_out:08x}>"


class _IkeSa:
    """One IKE SA: its state, keys, message IDs, outstanding request and children."""

    def __init__(self, uid: int, peer: PeerConfig, initiator: bool, now: float) -> None:
        self.uid = uid
        self.peer = peer
        self.initiator = initiator  # the original initiator (I flag), after rekeys too
        self.state = IkeState.IDLE
        self.spi_i = self.spi_r = _ZERO_SPI
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
        self.outstanding: _Request | None = None
        self.queue: deque[tuple[str, Any]] = deque()
        self.children: list[_Child] = []
        self.nat_local = self.nat_remote = False
        self.frag_ok = False  # both announced IKEV2_FRAGMENTATION_SUPPORTED (RFC 7383)
        self.peer_hashes: frozenset[int] = frozenset()
        self.remote_identity: Identity | None = None
        self.rekey_at = 0.0
        self.close_after_response = ""
        self.half_open_key: tuple | None = None
        self.first_child: _Child | None = None
        self.rekeyed_at = 0.0  # when it entered REKEYED
        # Initiator in AUTH_SENT: the same IKE SA built from other IKE_SA_INIT responses,
        # each with its own IKE_AUTH out; the IKE_AUTH response decides which one is real.
        self.candidates: list[_IkeSa] = []
        # The IKE SA the peer's rekey of this one made while our own rekey was out (§2.8.2).
        self.crossing: _IkeSa | None = None
        self.born_of: _IkeSa | None = None  # the IKE SA this one replaced

    @property
    def our_spi(self) -> bytes:
        return self.spi_i if self.initiator else self.spi_r

    @property
    def encap(self) -> bool:
        return self.nat_local or self.nat_remote or self.peer.encap

    def __repr__(self) -> str:
        return f"<IKE SA #{self.uid} {self.peer.name} {self.state}>"


class IkeCore:
    """An IKEv2 endpoint for a set of peers; see the module docstring for the contract.

    `rng(n)` supplies random bytes (SPIs, nonces, IVs, jitter); `wallclock()`, when given,
    returns an aware datetime against which certificate validity is checked.
    """

    def __init__(self, peers: Iterable[PeerConfig], *, settings: CoreSettings | None = None,
                 rng: Callable[[int], bytes] = os.urandom,
                 wallclock: Callable[[], Any] | None = None) -> None:
        self.peers: dict[str, PeerConfig] = {}
        for p in peers:
            if p.name in self.peers:
                raise LocalIkeError(f"duplicate peer name {p.name!r}")
            self.peers[p.name] = p
        self.settings = settings or CoreSettings()
        self._rng = rng
        self._wallclock = wallclock
        self._sas: dict[bytes, _IkeSa] = {}
        self._half_open: dict[tuple, _IkeSa] = {}
        self._out: list[Datagram] = []
        self._events: deque[Event] = deque()
        self._uid = 0
        self._spis_in: set[int] = set()
        self._cookie_secret = rng(32)
        self._now = 0.0
        self.errors: deque[IkeError] = deque(maxlen=_MAX_ERRORS)
        self.counters: dict[str, int] = {
            "received": 0, "dropped": 0, "cookies_sent": 0, "retransmits": 0,
            "responses_resent": 0, "half_open_refused": 0,
        }
        self._frags = Reassembler(self.settings.fragments, self.counters)

    # == outputs =============================================================================

    def datagrams_to_send(self) -> list[Datagram]:
        """Return and forget the datagrams produced so far."""
        out, self._out = self._out, []
        return out

    def next_event(self) -> Event | None:
        """The oldest event not yet taken, or None."""
        return self._events.popleft() if self._events else None

    def events(self) -> list[Event]:
        """Return and forget every pending event."""
        out = list(self._events)
        self._events.clear()
        return out

    def add_peer(self, peer: PeerConfig) -> None:
        """Configure one more peer (a tunnel that was added while running)."""
        if peer.name in self.peers:
            raise LocalIkeError(f"duplicate peer name {peer.name!r}")
        self.peers[peer.name] = peer

    def remove_peer(self, peer: str, now: float) -> None:
        """Delete the peer's IKE SAs (INFORMATIONAL delete sent) and forget its config."""
        if peer not in self.peers:
            return
        try:
            self.delete_ike(peer, now)
        finally:
            del self.peers[peer]

    def ike_sas(self, peer: str | None = None) -> list[IkeSaInfo]:
        """The IKE SAs (not closed), optionally of one peer."""
        out = []
        for sa in self._all_sas():
            if peer is not None and sa.peer.name != peer:
                continue
            kids = tuple(ChildInfo(name=c.cfg.name, spi_in=c.spi_in, spi_out=c.spi_out,
                                   mode=c.mode, state=c.state,
                                   transform=c.chosen.esp_transform_name if c.chosen else "")
                         for c in sa.children)
            out.append(IkeSaInfo(ike_id=sa.uid, peer=sa.peer.name, state=str(sa.state),
                                 initiator=sa.initiator, spi_i=sa.spi_i, spi_r=sa.spi_r,
                                 children=kids, remote_id=str(sa.remote_identity or ""),
                                 fragmentation=sa.frag_ok))
        return out

    def next_deadline(self) -> float | None:
        """When `on_timer` must run next, or None when nothing is scheduled."""
        times = [t for sa in self._all_sas() for t in self._sa_deadlines(sa)]
        frag = self._frags.next_deadline()
        if frag is not None:
            times.append(frag)
        return min(times, default=None)

    # == commands ============================================================================

    def initiate(self, peer: str, now: float) -> None:
        """Start an IKE SA with `peer` (and its CHILD_SAs); nothing if one is up or coming."""
        self._now = now
        cfg = self._peer(peer)
        for sa in self._all_sas():
            if sa.peer is cfg and sa.initiator and sa.state in (
                    IkeState.INIT_SENT, IkeState.AUTH_SENT):
                return
            if sa.peer is cfg and sa.state is IkeState.ESTABLISHED:
                return
        sa = self._new_sa(cfg, initiator=True, now=now)
        sa.spi_i = self._new_ike_spi()
        self._sas[sa.spi_i] = sa
        sa.ni = self._rng(_NONCE_LEN)
        sa.dh = DhKey(cfg.ike[0].dh[0])
        sa.state = transition(sa.state, Trigger.INITIATE)
        self._send_init(sa, now)

    def rekey_child(self, peer: str, now: float, child: str | None = None) -> None:
        """Rekey a CHILD_SA of `peer` (the first one when `child` is None)."""
        self._now = now
        sa = self._established(peer)
        c = self._find_child(sa, child)
        if c.state == "installed":
            c.state = "rekey-queued"
            self._queue(sa, "rekey_child", c, now)
        self._pump(now)

    def rekey_ike(self, peer: str, now: float) -> None:
        """Rekey the IKE SA of `peer` with CREATE_CHILD_SA."""
        self._now = now
        self._queue(self._established(peer), "rekey_ike", None, now)
        self._pump(now)

    def delete_child(self, peer: str, now: float, child: str | None = None) -> None:
        """Delete a CHILD_SA of `peer` with an INFORMATIONAL exchange."""
        self._now = now
        sa = self._established(peer)
        c = self._find_child(sa, child)
        self._queue(sa, "delete_child", c, now)
        self._pump(now)

    def delete_ike(self, peer: str, now: float) -> None:
        """Delete every IKE SA with `peer` (their CHILD_SAs go with them)."""
        self._now = now
        for sa in self._all_sas():
            if sa.peer.name != peer:
                continue
            if sa.state in (IkeState.ESTABLISHED, IkeState.REKEYED):
                self._queue(sa, "delete_ike", None, now)
            elif sa.state is not IkeState.DELETING:
                self._close(sa, "deleted locally", now)
        self._pump(now)

    # == time ================================================================================

    def on_timer(self, now: float) -> None:
        """Run everything due at `now`: retransmissions, DPD, rekeys, expiries, keepalives."""
        self._now = now
        self._frags.expire(now)
        for sa in list(self._all_sas()):
            if sa.state is IkeState.CLOSED:
                continue
            req = sa.outstanding
            if req is not None and now >= req.deadline:
                self._retransmit(sa, req, now)
                if sa.state is IkeState.CLOSED:
                    continue
            if sa.state is IkeState.HALF_OPEN and \
                    now >= sa.created + self.settings.half_open_timeout:
                self._close(sa, "half-open SA timed out", now, quiet=True)
                continue
            if sa.state is IkeState.REKEYED and now >= sa.rekeyed_at + _give_up(sa.peer):
                # Replaced, and nobody deleted it (§2.8): say so once, then forget it.
                self._send_delete_once(sa, now)
                self._close(sa, "rekeyed", now)
                continue
            if sa.state is not IkeState.ESTABLISHED:
                continue
            if sa.outstanding is None and not sa.queue and \
                    now >= sa.last_recv + sa.peer.dpd_delay:
                self._queue(sa, "dpd", None, now)
            if sa.rekey_at and now >= sa.rekey_at:
                sa.rekey_at = 0.0
                self._queue(sa, "rekey_ike", None, now)
            for c in list(sa.children):
                if now >= c.expire_at and c.state != "deleting":
                    self._remove_child(sa, c)
                    c.state = "expired"
                    self._events.append(ChildSaExpired(
                        ike_id=sa.uid, peer=sa.peer.name, child=c.cfg.name,
                        spi_in=c.spi_in, spi_out=c.spi_out))
                    self._queue(sa, "delete_child", c, now)
                elif c.state == "installed" and now >= c.rekey_at:
                    c.state = "rekey-queued"
                    self._queue(sa, "rekey_child", c, now)
            if sa.nat_local and now >= sa.last_sent + sa.peer.keepalive_interval:
                self._out.append(Datagram(data=NAT_KEEPALIVE, src=(sa.local[0], NAT_T_PORT),
                                          dst=sa.remote))
                sa.last_sent = now
        self._pump(now)

    # == input ===============================================================================

    def receive_datagram(self, data: bytes, *, src: tuple[str, int], dst: tuple[str, int],
                         now: float) -> None:
        """Take one received UDP payload (from `src` to `dst`); never raises on bad input.

        On port 4500 the non-ESP marker is expected (ESP and keepalives are ignored here:
        the driver hands ESP to the ESP engine).
        """
        self._now = now
        self.counters["received"] += 1
        try:
            self._receive(bytes(data), src, dst, now)
        except ProtocolError as e:
            # The blame is decided here: whatever the message caused is the peer's.
            self.counters["dropped"] += 1
            self.errors.append(RemoteIkeError(str(e), notify=e.notify))
        self._pump(now)

    def _receive(self, data: bytes, src: tuple[str, int], dst: tuple[str, int],
                 now: float) -> None:
        if dst[1] == NAT_T_PORT:
            if data == NAT_KEEPALIVE or not data.startswith(NON_ESP_MARKER):
                return
            data = data[len(NON_ESP_MARKER):]
        h = parse_header(data)
        if h.exchange == Exchange.IKE_SA_INIT and not h.is_response:
            self._on_init_request(h, data, src, dst, now)
            return
        if h.exchange == Exchange.IKE_SA_INIT:
            sa = self._sas.get(h.spi_i)
            if sa is not None and sa.initiator and sa.state is IkeState.AUTH_SENT \
                    and not h.from_initiator and h.mid == 0:
                self._init_response_candidate(sa, h, data, now)
                return
            if sa is None or not sa.initiator or sa.state is not IkeState.INIT_SENT \
                    or h.from_initiator or h.mid != 0:
                raise ProtocolError("unexpected IKE_SA_INIT response")
            self._on_init_response(sa, h, data, now)
            return
        our_spi = h.spi_r if h.from_initiator else h.spi_i
        sa = self._sas.get(our_spi)
        if sa is None or sa.state is IkeState.CLOSED:
            raise ProtocolError("message for an unknown IKE SA")
        msg = None
        if sa.candidates and h.is_response:
            sa, msg = self._pick_candidate(sa, h, data, now)
            if msg is None:
                return  # a fragment, kept with the candidate whose keys open it
        if h.from_initiator == sa.initiator or (
                (sa.spi_i if h.from_initiator else sa.spi_r)
                != (h.spi_i if h.from_initiator else h.spi_r)):
            raise ProtocolError("IKE SPIs or roles do not match the SA")
        if msg is None:
            try:
                msg = self._open(sa, h, data, now)
            except ProtocolError as e:
                # Authenticated but malformed requests get an answer (§2.21.2); others
                # nothing.
                if e.notify and not h.is_response and h.mid == sa.expect_mid and sa.sk_out:
                    self._respond(sa, h.exchange, h.mid,
                                  [NotifyPayload(notify=e.notify, data=e.data)], now)
                raise
            if msg is None:
                return  # a fragment: the rest of its message is still to come
        if not msg.encrypted:
            raise ProtocolError("unencrypted message after IKE_SA_INIT")
        sa.last_recv = now
        if msg.is_response:
            req = sa.outstanding
            if req is None or msg.mid != req.mid:
                raise ProtocolError("response to no outstanding request")
            sa.outstanding = None
            try:
                req.handler(sa, msg, req.ctx, now)
            except ProtocolError as e:
                self._request_error(sa, req, e, now)
                raise
            return
        self._on_request(sa, msg, src, dst, now)

    def _open(self, sa: _IkeSa, h: Header, data: bytes, now: float) -> Message | None:
        """The message `data` carries, decrypted with `sa`'s keys; None for a fragment of a
        message that is not complete yet."""
        if h.next_payload != PayloadType.SKF:
            return parse_message(data, sa.sk_in, h)
        if not sa.frag_ok or sa.sk_in is None:
            raise ProtocolError("IKE fragment, but fragmentation was not negotiated")
        if h.is_response:
            if sa.outstanding is None or h.mid != sa.outstanding.mid:
                raise ProtocolError("IKE fragment of a response to no outstanding request")
        elif h.mid == sa.last_resp_mid and sa.last_resp is not None:
            # A retransmitted request: its first fragment, once authentic, has the response
            # sent again; the other fragments nothing (RFC 7383 §2.6.1).
            last = sa.last_resp[0] if isinstance(sa.last_resp, tuple) else sa.last_resp
            if h.exchange != last[18]:  # IKE_SA_INIT (never fragmented) or a forgery
                raise ProtocolError("IKE fragment of another exchange than the one answered")
            if self._frags.retransmitted(h, data, sa.sk_in):
                self.counters["responses_resent"] += 1
                self._emit(sa, sa.last_resp, now)
            return None
        elif h.mid != sa.expect_mid:
            raise ProtocolError("IKE fragment with an unexpected message ID")
        done = self._frags.add((sa, h.is_response), h, data, sa.sk_in, now)
        return parse_inner(h, *done) if done is not None else None

    # == IKE_SA_INIT ========================================================================

    def _send_init(self, sa: _IkeSa, now: float) -> None:
        cfg = sa.peer
        payloads: list[Payload] = []
        if sa.cookie is not None:
            payloads.append(NotifyPayload(notify=Notify.COOKIE, data=sa.cookie))
        payloads += [
            SaPayload(proposals=tuple(s.to_proposal(i + 1, b"", first_group=sa.dh.group)
                                      for i, s in enumerate(cfg.ike))),
            KePayload(group=sa.dh.group, data=sa.dh.public),
            NoncePayload(nonce=sa.ni),
            *self._nat_notifies(sa, sa.spi_i, _ZERO_SPI),
        ]
        if cfg.credentials.uses_certs:
            payloads.append(NotifyPayload(notify=Notify.SIGNATURE_HASH_ALGORITHMS,
                                          data=_SIG_HASHES))
        if cfg.fragmentation:
            payloads.append(NotifyPayload(notify=Notify.IKEV2_FRAGMENTATION_SUPPORTED))
        msg = Message(spi_i=sa.spi_i, spi_r=_ZERO_SPI, exchange=Exchange.IKE_SA_INIT,
                      flags=Flag.INITIATOR, mid=0, payloads=tuple(payloads))
        data = encode_message(msg)
        sa.init_request = data
        sa.next_mid = 1
        sa.outstanding = _Request("init", 0, data, self._on_init_response_msg, None,
                                  now + cfg.retransmit_timeout, now)
        self._emit(sa, data, now)

    def _nat_notifies(self, sa: _IkeSa, spi_i: bytes, spi_r: bytes) -> list[NotifyPayload]:
        src = _nat_hash(spi_i, spi_r, sa.local)
        if sa.peer.encap:
            # Forcing UDP encapsulation: a source hash that cannot match makes both ends
            # believe in a NAT, as strongSwan's `encap = yes` does.
            src = self._rng(20)
        return [NotifyPayload(notify=Notify.NAT_DETECTION_SOURCE_IP, data=src),
                NotifyPayload(notify=Notify.NAT_DETECTION_DESTINATION_IP,
                              data=_nat_hash(spi_i, spi_r, sa.remote))]

    def _check_nat(self, sa: _IkeSa, msg: Message, peer_addr: tuple[str, int],
                   our_addr: tuple[str, int]) -> None:
        srcs = [n.data for n in msg.all(NotifyPayload)
                if n.notify == Notify.NAT_DETECTION_SOURCE_IP]
        dst = msg.notify(Notify.NAT_DETECTION_DESTINATION_IP)
        if srcs:
            sa.nat_remote = _nat_hash(sa.spi_i, sa.spi_r if sa.initiator else _ZERO_SPI,
                                      peer_addr) not in srcs
        if dst is not None:
            sa.nat_local = dst.data != _nat_hash(
                sa.spi_i, sa.spi_r if sa.initiator else _ZERO_SPI, our_addr)

    def _on_init_request(self, h: Header, data: bytes, src: tuple[str, int],
                         dst: tuple[str, int], now: float) -> None:
        if h.spi_r != _ZERO_SPI or h.mid != 0 or h.from_initiator is False:
            raise ProtocolError("bad IKE_SA_INIT request header")
        key = (src, h.spi_i)
        known = self._half_open.get(key)
        if known is not None:
            if known.init_request == data and known.last_resp is not None:
                self.counters["responses_resent"] += 1
                self._emit(known, known.last_resp, now)
                return
            raise ProtocolError("IKE_SA_INIT for an SPI already in use")
        peer = self._peer_for(src[0])
        if peer is None:
            raise ProtocolError("IKE_SA_INIT from an unknown peer")
        try:
            msg = parse_message(data, None, h)
        except ProtocolError as e:
            if e.notify == Notify.UNSUPPORTED_CRITICAL_PAYLOAD:
                self._reply_plain(h, src, dst, NotifyPayload(notify=e.notify, data=e.data))
            raise
        sa_p, ke, nonce = msg.get(SaPayload), msg.get(KePayload), msg.get(NoncePayload)
        if sa_p is None or ke is None or nonce is None:
            raise ProtocolError("IKE_SA_INIT without SA, KE or Nonce")
        n_half = len(self._half_open)
        if n_half >= self.settings.max_half_open or len(self._sas) >= self.settings.max_ike_sas:
            self.counters["half_open_refused"] += 1
            raise ProtocolError("too many half-open IKE SAs")
        if n_half >= self.settings.cookie_threshold:
            expected = self._cookie(nonce.nonce, src, h.spi_i)
            first = msg.payloads[0] if msg.payloads else None
            if not (isinstance(first, NotifyPayload) and first.notify == Notify.COOKIE
                    and std_hmac.compare_digest(first.data, expected)):
                self.counters["cookies_sent"] += 1
                self._reply_plain(h, src, dst, NotifyPayload(notify=Notify.COOKIE,
                                                             data=expected))
                return
        try:
            chosen = choose(sa_p.proposals, peer.ike, protocol=Protocol.IKE)
        except ProtocolError as e:
            self._reply_plain(h, src, dst, NotifyPayload(notify=e.notify))
            raise
        if ke.group != chosen.dh:
            self._reply_plain(h, src, dst, NotifyPayload(
                notify=Notify.INVALID_KE_PAYLOAD, data=struct.pack("!H", chosen.dh)))
            raise ProtocolError("KE group is not the chosen one", notify=0)
        dh = DhKey(chosen.dh)
        shared = dh.shared(ke.data)
        sa = self._new_sa(peer, initiator=False, now=now)
        sa.local, sa.remote = dst, src
        sa.spi_i, sa.spi_r = h.spi_i, self._new_ike_spi()
        sa.chosen, sa.dh, sa.ni, sa.nr = chosen, dh, nonce.nonce, self._rng(_NONCE_LEN)
        self._set_keys(sa, derive_ike_keys(
            prf_id=chosen.prf, encr=chosen.encr, key_bits=chosen.key_bits, integ=chosen.integ,
            shared=shared, ni=sa.ni, nr=sa.nr, spi_i=sa.spi_i, spi_r=sa.spi_r))
        self._check_nat(sa, msg, src, dst)
        if msg.notify(Notify.SIGNATURE_HASH_ALGORITHMS):
            sa.peer_hashes = _parse_hashes(msg.notify(Notify.SIGNATURE_HASH_ALGORITHMS).data)
        sa.state = transition(sa.state, Trigger.INIT_REQUEST)
        sa.init_request = data
        # NAT-D hashes the SPIs as they appear in this response's header (§2.23).
        payloads: list[Payload] = [
            SaPayload(proposals=(chosen.to_proposal(b""),)),
            KePayload(group=dh.group, data=dh.public),
            NoncePayload(nonce=sa.nr),
            NotifyPayload(notify=Notify.NAT_DETECTION_SOURCE_IP,
                          data=self._rng(20) if peer.encap else
                          _nat_hash(sa.spi_i, sa.spi_r, dst)),
            NotifyPayload(notify=Notify.NAT_DETECTION_DESTINATION_IP,
                          data=_nat_hash(sa.spi_i, sa.spi_r, src)),
        ]
        cr = peer.credentials.certreq()
        if cr is not None:
            payloads.append(cr)
            payloads.append(NotifyPayload(notify=Notify.SIGNATURE_HASH_ALGORITHMS,
                                          data=_SIG_HASHES))
        sa.frag_ok = peer.fragmentation and \
            msg.notify(Notify.IKEV2_FRAGMENTATION_SUPPORTED) is not None
        if sa.frag_ok:
            payloads.append(NotifyPayload(notify=Notify.IKEV2_FRAGMENTATION_SUPPORTED))
        resp = encode_message(Message(spi_i=sa.spi_i, spi_r=sa.spi_r,
                                      exchange=Exchange.IKE_SA_INIT, flags=Flag.RESPONSE,
                                      mid=0, payloads=tuple(payloads)))
        sa.init_response = resp
        sa.last_resp, sa.last_resp_mid, sa.expect_mid = resp, 0, 1
        self._sas[sa.spi_r] = sa
        sa.half_open_key = key
        self._half_open[key] = sa
        self._emit(sa, resp, now)

    def _reply_plain(self, h: Header, src: tuple[str, int], dst: tuple[str, int],
                     notify: NotifyPayload) -> None:
        """A stateless IKE_SA_INIT answer (COOKIE, INVALID_KE_PAYLOAD, NO_PROPOSAL_CHOSEN)."""
        data = encode_message(Message(spi_i=h.spi_i, spi_r=_ZERO_SPI,
                                      exchange=Exchange.IKE_SA_INIT, flags=Flag.RESPONSE,
                                      mid=0, payloads=(notify,)))
        if dst[1] == NAT_T_PORT:
            data = NON_ESP_MARKER + data
        self._out.append(Datagram(data=data, src=dst, dst=src))

    def _cookie(self, ni: bytes, src: tuple[str, int], spi_i: bytes) -> bytes:
        # RFC 7296 §2.6: <VersionIDofSecret> | Hash(Ni | IPi | SPIi | <secret>)
        return b"\x00\x01" + hashlib.sha256(
            ni + ip_to_bytes(src[0]) + spi_i + self._cookie_secret).digest()

    def _on_init_response_msg(self, sa: _IkeSa, msg: Message, ctx: Any, now: float) -> None:
        raise ProtocolError("IKE_SA_INIT responses are handled before decryption")

    def _on_init_response(self, sa: _IkeSa, h: Header, data: bytes, now: float) -> None:
        """Unprotected, so anything wrong with it only means "not the real response": it is
        dropped (a `ProtocolError`) and we keep waiting, retransmitting our request."""
        msg = parse_message(data, None, h)
        cfg = sa.peer
        cookie = msg.notify(Notify.COOKIE)
        if cookie is not None:
            if sa.retries >= 4 or not 1 <= len(cookie.data) <= 64:
                raise ProtocolError("too many COOKIE requests")
            sa.retries += 1
            sa.cookie = cookie.data
            sa.state = transition(sa.state, Trigger.INIT_RETRY)
            self._send_init(sa, now)
            return
        inv = msg.notify(Notify.INVALID_KE_PAYLOAD)
        if inv is not None:
            group = struct.unpack("!H", inv.data)[0] if len(inv.data) == 2 else 0
            if sa.retries >= 4 or group == sa.dh.group or \
                    not any(group in s.dh for s in cfg.ike):
                self._close(sa, f"peer wants DH group {group}, which we do not offer", now)
                return
            sa.retries += 1
            sa.dh = DhKey(group)
            sa.state = transition(sa.state, Trigger.INIT_RETRY)
            self._send_init(sa, now)
            return
        err = msg.error_notify()
        if err is not None:
            if msg.get(SaPayload) is not None:
                # A refusal carries nothing else: this one was mangled on the way.
                raise ProtocolError("IKE_SA_INIT response with both an SA and an error")
            self._close(sa, f"peer refused IKE_SA_INIT: {_notify_name(err.notify)}", now)
            return
        self._take_init_response(sa, h, msg, data, now)

    def _take_init_response(self, sa: _IkeSa, h: Header, msg: Message, data: bytes,
                            now: float, child_spi: int | None = None) -> None:
        """Check an IKE_SA_INIT response, derive the keys and send IKE_AUTH (or raise,
        changing nothing)."""
        cfg = sa.peer
        sa_p, ke, nonce = msg.get(SaPayload), msg.get(KePayload), msg.get(NoncePayload)
        if sa_p is None or ke is None or nonce is None or h.spi_r == _ZERO_SPI \
                or len(sa_p.proposals) != 1:
            raise ProtocolError("IKE_SA_INIT response without SA, KE or Nonce")
        if msg.error_notify() is not None:
            raise ProtocolError("IKE_SA_INIT response with both an SA and an error")
        chosen = choose(sa_p.proposals, cfg.ike, protocol=Protocol.IKE)
        if chosen.dh != sa.dh.group or ke.group != sa.dh.group:
            raise ProtocolError("responder chose another DH group than our KE")
        shared = sa.dh.shared(ke.data)
        sa.outstanding = None
        sa.spi_r, sa.nr, sa.chosen = h.spi_r, nonce.nonce, chosen
        sa.init_response = data
        self._set_keys(sa, derive_ike_keys(
            prf_id=chosen.prf, encr=chosen.encr, key_bits=chosen.key_bits, integ=chosen.integ,
            shared=shared, ni=sa.ni, nr=sa.nr, spi_i=sa.spi_i, spi_r=sa.spi_r))
        self._check_nat(sa, msg, sa.remote, sa.local)
        if msg.notify(Notify.SIGNATURE_HASH_ALGORITHMS):
            sa.peer_hashes = _parse_hashes(msg.notify(Notify.SIGNATURE_HASH_ALGORITHMS).data)
        sa.frag_ok = cfg.fragmentation and \
            msg.notify(Notify.IKEV2_FRAGMENTATION_SUPPORTED) is not None
        if sa.encap and sa.local[1] != NAT_T_PORT:
            # RFC 7296 §2.23: with a NAT on the way, IKE_AUTH moves to port 4500.
            sa.local = (sa.local[0], NAT_T_PORT)
            sa.remote = (sa.remote[0], NAT_T_PORT)
        sa.state = transition(sa.state, Trigger.INIT_RESPONSE)
        self._send_auth(sa, now, child_spi)

    def _init_response_candidate(self, sa: _IkeSa, h: Header, data: bytes,
                                 now: float) -> None:
        """Another IKE_SA_INIT response after we took one (§2.4): the first may have been a
        spoofed or corrupted copy, so this one gets its own IKE_AUTH too; the IKE_AUTH
        response that decrypts and authenticates picks the real one (`_pick_candidate`)."""
        if data == sa.init_response or any(c.init_response == data for c in sa.candidates):
            raise ProtocolError("IKE_SA_INIT response again")
        if len(sa.candidates) >= _MAX_INIT_CANDIDATES:
            raise ProtocolError("too many different IKE_SA_INIT responses")
        msg = parse_message(data, None, h)
        if msg.error_notify() is not None or msg.notify(Notify.COOKIE) is not None:
            raise ProtocolError("IKE_SA_INIT refusal after a response was taken")
        alt = _IkeSa(sa.uid, sa.peer, True, sa.created)
        alt.spi_i, alt.ni, alt.dh, alt.cookie = sa.spi_i, sa.ni, sa.dh, sa.cookie
        alt.init_request, alt.next_mid, alt.retries = sa.init_request, 1, sa.retries
        alt.state = IkeState.INIT_SENT
        # The same CHILD_SA SPI: the responder may answer any of the IKE_AUTH requests
        # with the same keys (a copy mangled outside the key material) from its cache.
        self._take_init_response(alt, h, msg, data, now, sa.first_child.spi_in)
        sa.candidates.append(alt)

    def _pick_candidate(self, sa: _IkeSa, h: Header, data: bytes,
                        now: float) -> tuple[_IkeSa, Message | None]:
        """The IKE SA (of `sa` and its candidates) whose keys open this IKE_AUTH response
        and whose IKE_SA_INIT response the peer's AUTH signs, with the message; the others
        are dropped. A fragment is kept with every candidate whose keys open it (copies
        that differ outside the key exchange give several the same keys), and (candidate,
        None) returned until its message is complete."""
        pending = None
        for cand in (sa, *sa.candidates):
            req = cand.outstanding
            if cand.spi_r != h.spi_r or req is None or req.mid != h.mid:
                continue
            try:
                if h.next_payload == PayloadType.SKF:
                    open_fragment(h, data, cand.sk_in)  # not this one's fragment: raises
                msg = self._open(cand, h, data, now)
                if msg is None:
                    pending = cand
                    continue
                idr, auth = msg.get(IdPayload, initiator=False), msg.get(AuthPayload)
                if idr is not None and auth is not None:
                    self._authenticate_peer(cand, msg, idr, auth, cand.init_response,
                                            cand.ni, cand.keys.sk_pr)
            except ProtocolError:
                continue
            for other in (sa, *sa.candidates):
                if other is not cand:
                    self._frags.discard((other, True), (other, False))
            sa.candidates = []
            self._sas[cand.spi_i] = cand
            return cand, msg
        if pending is not None:
            return pending, None
        raise ProtocolError("IKE_AUTH response that no IKE_SA_INIT response taken opens")

    # == IKE_AUTH ============================================================================

    def _send_auth(self, sa: _IkeSa, now: float, child_spi: int | None = None) -> None:
        cfg = sa.peer
        creds = cfg.credentials
        idi = cfg.local_id.payload(initiator=True)
        octets = signed_octets(message=sa.init_request, peer_nonce=sa.nr, prf_id=sa.chosen.prf,
                               sk_p=sa.keys.sk_pi, id_payload=idi)
        payloads: list[Payload] = [idi]
        payloads += creds.cert_payloads()
        if not any(o.uid != sa.uid and o.peer is cfg for o in self._all_sas()):
            # §2.4: our first IKE SA with this peer; whatever it still holds of ours is stale.
            payloads.append(NotifyPayload(notify=Notify.INITIAL_CONTACT))
        if creds.uses_certs:
            payloads.append(creds.certreq())
        if cfg.remote_id is not None:
            payloads.append(cfg.remote_id.payload(initiator=False))
        payloads.append(make_auth(creds, octets, sa.chosen.prf, sa.peer_hashes))
        child = _Child(cfg.children[0])
        child.spi_in = self._new_child_spi() if child_spi is None else child_spi
        sa.first_child = child
        payloads += self._child_request_payloads(sa, child, pfs=False)
        self._request(sa, "auth", Exchange.IKE_AUTH, payloads, self._on_auth_response, child,
                      now)

    def _child_request_payloads(self, sa: _IkeSa, child: _Child, *, pfs: bool,
                                ts: tuple | None = None) -> list[Payload]:
        cfg = child.cfg
        specs = cfg.esp if pfs else tuple(replace(s, dh=()) for s in cfg.esp)
        spi = struct.pack("!I", child.spi_in)
        out: list[Payload] = []
        if cfg.mode == "transport":
            out.append(NotifyPayload(notify=Notify.USE_TRANSPORT_MODE))
        out.append(SaPayload(proposals=tuple(s.to_proposal(i + 1, spi)
                                             for i, s in enumerate(specs))))
        tsi, tsr = ts or self._our_ts(sa, cfg)
        out += [TsPayload(selectors=tsi, initiator=True),
                TsPayload(selectors=tsr, initiator=False)]
        return out

    def _our_ts(self, sa: _IkeSa, cfg: ChildConfig, *, local_addr: bytes | None = None,
                remote_addr: bytes | None = None) -> tuple[tuple, tuple]:
        local_addr = local_addr or ip_to_bytes(sa.local[0])
        remote_addr = remote_addr or ip_to_bytes(sa.remote[0])
        local = tuple(resolve_dynamic(t, local_addr) for t in cfg.local_ts)
        remote = tuple(resolve_dynamic(t, remote_addr) for t in cfg.remote_ts)
        return local, remote

    def _nat_ts(self, sa: _IkeSa, cfg: ChildConfig, theirs: tuple[TrafficSelector, ...],
                ours: tuple[TrafficSelector, ...]) -> tuple[tuple, tuple]:
        """Our (local, remote) selectors for a CHILD_SA, `dynamic` resolved.

        Through a NAT (RFC 7296 §2.23.1 for transport mode; host-to-host tunnel mode is the
        same case): a side behind the NAT names its own, private, address in its selectors,
        which the other side never sees on the wire; for `dynamic` selectors that address
        is taken from the selectors offered (`theirs` for the peer's side, `ours` for what
        the peer believes our address is). Selectors with explicit addresses are kept.
        """
        local_addr = remote_addr = None
        if sa.nat_remote:
            remote_addr = single_host(theirs)
        if sa.nat_local:
            local_addr = single_host(ours)
        return self._our_ts(sa, cfg, local_addr=local_addr, remote_addr=remote_addr)

    def _on_auth_response(self, sa: _IkeSa, msg: Message, child: _Child, now: float) -> None:
        cfg = sa.peer
        err = msg.error_notify()
        if err is not None and err.notify not in _CHILD_ERRORS:
            self._close(sa, f"peer refused IKE_AUTH: {_notify_name(err.notify)}", now)
            return
        idr, auth = msg.get(IdPayload, initiator=False), msg.get(AuthPayload)
        if idr is None or auth is None:
            raise ProtocolError("IKE_AUTH response without IDr or AUTH",
                                notify=Notify.AUTHENTICATION_FAILED)
        self._authenticate_peer(sa, msg, idr, auth, sa.init_response, sa.ni, sa.keys.sk_pr)
        sa.state = transition(sa.state, Trigger.AUTH_RESPONSE)
        self._initial_contact(sa, msg, now)
        self._ike_up(sa, now)
        if err is None:
            try:
                self._finish_child(sa, msg, child, sa.ni, sa.nr, None, now)
            except ProtocolError as e:
                # The responder installed what we refuse: tell it to delete its half.
                self.errors.append(RemoteIkeError(str(e), notify=e.notify))
                child.state = "failed"
                self._queue(sa, "delete_child", child, now)
        for extra in cfg.children[1:]:
            self._queue(sa, "create_child", extra, now)
        self._resolve_duplicates(sa, now)

    def _authenticate_peer(self, sa: _IkeSa, msg: Message, idp: IdPayload, auth: AuthPayload,
                           their_init: bytes, our_nonce: bytes, sk_p: bytes) -> None:
        cfg = sa.peer
        ident = Identity.from_payload(idp)
        # Names compared as RFC 5280 §7.1 and RFC 4518 say, not as bytes (identity.py).
        if cfg.remote_id is not None and not cfg.remote_id.matches(ident):
            raise ProtocolError(f"peer identity {ident} is not the configured "
                                f"{cfg.remote_id}", notify=Notify.AUTHENTICATION_FAILED)
        cert = None
        if cfg.credentials.uses_certs:
            certs = [c.data for c in msg.all(CertPayload)
                     if c.encoding == CertEncoding.X509_SIGNATURE]
            cert = verify_peer_cert(cfg.credentials, certs, self._wallclock)
            if not ident.matched_by_cert(cert):
                raise ProtocolError(f"peer certificate does not vouch for {ident}",
                                    notify=Notify.AUTHENTICATION_FAILED)
        octets = signed_octets(message=their_init, peer_nonce=our_nonce, prf_id=sa.chosen.prf,
                               sk_p=sk_p, id_payload=idp)
        check_auth(cfg.credentials, auth, octets, sa.chosen.prf, cert)
        sa.remote_identity = ident

    def _on_auth_request(self, sa: _IkeSa, msg: Message, now: float) -> list[Payload]:
        cfg = sa.peer
        idi, auth = msg.get(IdPayload, initiator=True), msg.get(AuthPayload)
        if idi is None or auth is None:
            raise ProtocolError("IKE_AUTH without IDi or AUTH",
                                notify=Notify.AUTHENTICATION_FAILED)
        self._authenticate_peer(sa, msg, idi, auth, sa.init_request, sa.nr, sa.keys.sk_pi)
        creds = cfg.credentials
        idr = cfg.local_id.payload(initiator=False)
        octets = signed_octets(message=sa.init_response, peer_nonce=sa.ni,
                               prf_id=sa.chosen.prf, sk_p=sa.keys.sk_pr, id_payload=idr)
        out: list[Payload] = [idr, *creds.cert_payloads()]
        out.append(make_auth(creds, octets, sa.chosen.prf, sa.peer_hashes))
        sa.state = transition(sa.state, Trigger.AUTH_REQUEST)
        self._drop_half_open(sa)
        self._initial_contact(sa, msg, now)
        child = None
        if msg.get(SaPayload) is not None:
            try:
                child, cp = self._respond_child(sa, msg, sa.ni, sa.nr, in_auth=True)
                out += cp
            except ProtocolError as e:
                if not e.notify:
                    raise
                out.append(NotifyPayload(notify=e.notify))
        self._ike_up(sa, now)
        if child is not None:
            self._install(sa, child, now)
        self._resolve_duplicates(sa, now)
        return out

    def _initial_contact(self, sa: _IkeSa, msg: Message, now: float) -> None:
        """INITIAL_CONTACT (§2.4): the peer holds no other IKE SA with us (it restarted), so
        ours with its identity are stale; they go now rather than at the next DPD."""
        if msg.notify(Notify.INITIAL_CONTACT) is None:
            return
        for other in self._all_sas():
            if other is not sa and other.remote_identity is not None and \
                    other.remote_identity.equivalent(sa.remote_identity) and \
                    other.state in (IkeState.ESTABLISHED, IkeState.REKEYED, IkeState.DELETING):
                # Tell it too, once: should the peer still hold this SA after all, it goes.
                self._send_delete_once(other, now)
                self._close(other, "peer restarted (INITIAL_CONTACT)", now)

    # == CHILD_SAs ==========================================================================

    def _respond_child(self, sa: _IkeSa, msg: Message, ni: bytes, nr: bytes, *,
                       in_auth: bool, shared: bytes | None = None,
                       cfg: ChildConfig | None = None) -> tuple[_Child, list[Payload]]:
        """Responder side of a CHILD_SA negotiation: choose, narrow, derive keys."""
        sa_p = msg.get(SaPayload)
        tsi, tsr = msg.get(TsPayload, initiator=True), msg.get(TsPayload, initiator=False)
        if sa_p is None or tsi is None or tsr is None:
            raise ProtocolError("CHILD_SA request without SA, TSi or TSr",
                                notify=Notify.INVALID_SYNTAX)
        ke = msg.get(KePayload)
        candidates = [cfg] if cfg is not None else list(sa.peer.children)
        last: ProtocolError | None = None
        for c in candidates:
            local, remote = self._nat_ts(sa, c, tsi.selectors, tsr.selectors)
            try:
                n_tsi = narrow(tsi.selectors, remote)
                n_tsr = narrow(tsr.selectors, local)
                chosen = choose(sa_p.proposals, c.esp, protocol=Protocol.ESP,
                                pfs_group=ke.group if ke is not None else None,
                                ignore_dh=in_auth)
            except ProtocolError as e:
                last = e
                continue
            transport = msg.notify(Notify.USE_TRANSPORT_MODE) is not None
            if c.mode == "transport" and not transport:
                last = ProtocolError("peer wants tunnel mode, we transport",
                                     notify=Notify.NO_PROPOSAL_CHOSEN)
                continue
            child = _Child(c)
            child.mode = "transport" if transport and c.mode == "transport" else "tunnel"
            child.chosen = chosen
            child.spi_out = struct.unpack("!I", chosen.spi)[0]
            child.spi_in = self._new_child_spi()
            child.local_ts, child.remote_ts = n_tsr, n_tsi
            child.nonces = (ni, nr)
            i2r, r2i = self._keymat(sa, chosen, ni, nr, shared)
            child.keymat_in, child.keymat_out = i2r, r2i
            out: list[Payload] = [SaPayload(proposals=(chosen.to_proposal(
                struct.pack("!I", child.spi_in)),))]
            out += [TsPayload(selectors=n_tsi, initiator=True),
                    TsPayload(selectors=n_tsr, initiator=False)]
            if child.mode == "transport":
                out.append(NotifyPayload(notify=Notify.USE_TRANSPORT_MODE))
            return child, out
        raise last or ProtocolError("no CHILD_SA configuration fits",
                                    notify=Notify.TS_UNACCEPTABLE)

    def _keymat(self, sa: _IkeSa, chosen: Chosen, ni: bytes, nr: bytes,
                shared: bytes | None) -> tuple[bytes, bytes]:
        n = parse_transform(chosen.esp_transform_name).keymat_len
        return derive_child_keymat(prf_id=sa.chosen.prf, sk_d=sa.keys.sk_d, ni=ni, nr=nr,
                                   length=n, shared=shared)

    def _finish_child(self, sa: _IkeSa, msg: Message, child: _Child, ni: bytes, nr: bytes,
                      shared: bytes | None, now: float) -> None:
        """Initiator side: check the responder's choice and install the CHILD_SA."""
        sa_p = msg.get(SaPayload)
        tsi, tsr = msg.get(TsPayload, initiator=True), msg.get(TsPayload, initiator=False)
        if sa_p is None or tsi is None or tsr is None or len(sa_p.proposals) != 1:
            raise ProtocolError("CHILD_SA response without SA, TSi or TSr")
        pfs = msg.get(KePayload)
        chosen = choose(sa_p.proposals, child.cfg.esp, protocol=Protocol.ESP,
                        pfs_group=pfs.group if pfs is not None else None,
                        ignore_dh=shared is None and pfs is None)
        if child.local_ts or child.remote_ts:
            local, remote = child.local_ts, child.remote_ts
        else:
            # What we offered, with the NAT's view of the responder's address replaced by
            # the one it names itself (transport mode behind a NAT, RFC 7296 §2.23.1).
            local, remote = self._nat_ts(sa, child.cfg, tsr.selectors, tsi.selectors)
        for t in tsi.selectors:
            if not any(ts_subset(t, x) for x in local):
                raise ProtocolError("responder widened TSi", notify=Notify.TS_UNACCEPTABLE)
        for t in tsr.selectors:
            if not any(ts_subset(t, x) for x in remote):
                raise ProtocolError("responder widened TSr", notify=Notify.TS_UNACCEPTABLE)
        child.mode = "transport" if msg.notify(Notify.USE_TRANSPORT_MODE) else "tunnel"
        if child.mode != child.cfg.mode and child.cfg.mode == "transport":
            raise ProtocolError("responder refused transport mode",
                                notify=Notify.NO_PROPOSAL_CHOSEN)
        child.chosen = chosen
        child.spi_out = struct.unpack("!I", chosen.spi)[0]
        child.local_ts, child.remote_ts = tsi.selectors, tsr.selectors
        child.nonces = (ni, nr)
        i2r, r2i = self._keymat(sa, chosen, ni, nr, shared)
        child.keymat_out, child.keymat_in = i2r, r2i
        self._install(sa, child, now)

    def _install(self, sa: _IkeSa, child: _Child, now: float) -> None:
        cfg = child.cfg
        jitter = int.from_bytes(self._rng(2), "big") / 65535 * 0.1
        child.rekey_at = now + cfg.rekey_time * (1 - jitter)
        child.expire_at = now + cfg.life_time
        child.state = "installed"
        sa.children.append(child)
        self._events.append(ChildSaInstalled(
            ike_id=sa.uid, peer=sa.peer.name, child=cfg.name, spi_in=child.spi_in,
            spi_out=child.spi_out, transform=child.chosen.esp_transform_name,
            keymat_in=child.keymat_in, keymat_out=child.keymat_out, mode=child.mode,
            local_ts=child.local_ts, remote_ts=child.remote_ts, encap=sa.encap,
            local_addr=sa.local, remote_addr=sa.remote, rekey_of=child.rekey_of))

    def _remove_child(self, sa: _IkeSa, child: _Child, reason: str | None = None) -> None:
        if child in sa.children:
            sa.children.remove(child)
            self._spis_in.discard(child.spi_in)
            if reason is not None:
                self._events.append(ChildSaDeleted(
                    ike_id=sa.uid, peer=sa.peer.name, child=child.cfg.name,
                    spi_in=child.spi_in, spi_out=child.spi_out, reason=reason))

    # -- CREATE_CHILD_SA, initiator ----------------------------------------------------------

    def _start_create_child(self, sa: _IkeSa, cfg: ChildConfig, now: float,
                            old: _Child | None = None) -> None:
        child = _Child(cfg)
        child.spi_in = self._new_child_spi()
        ni = self._rng(_NONCE_LEN)
        dh = DhKey(cfg.pfs_group) if cfg.pfs_group else None
        payloads: list[Payload] = []
        if old is not None:
            child.rekey_of = old.spi_in
            payloads.append(NotifyPayload(notify=Notify.REKEY_SA, protocol=Protocol.ESP,
                                          spi=struct.pack("!I", old.spi_in)))
            old.state = "rekeying"
        cp = self._child_request_payloads(
            sa, child, pfs=True, ts=(old.local_ts, old.remote_ts) if old else None)
        # Order of §1.3.1: [N(REKEY_SA)], SA, Ni, [KEi], TSi, TSr
        sa_idx = next(i for i, p in enumerate(cp) if isinstance(p, SaPayload))
        extra: list[Payload] = [NoncePayload(nonce=ni)]
        if dh is not None:
            extra.append(KePayload(group=dh.group, data=dh.public))
        payloads += cp[: sa_idx + 1] + extra + cp[sa_idx + 1 :]
        self._request(sa, "rekey_child" if old else "create_child", Exchange.CREATE_CHILD_SA,
                      payloads, self._on_create_child_response, (child, old, ni, dh), now)

    def _on_create_child_response(self, sa: _IkeSa, msg: Message, ctx: tuple,
                                  now: float) -> None:
        child, old, ni, dh = ctx
        err = msg.error_notify()
        if err is not None:
            self._spis_in.discard(child.spi_in)
            if old is not None and old in sa.children:
                if err.notify == Notify.CHILD_SA_NOT_FOUND:
                    self._remove_child(sa, old, "peer does not know it")
                    return
                # TEMPORARY_FAILURE (a collision) or a refusal: try again a bit later.
                old.state = "installed"
                old.rekey_at = now + 1.0 + self._rng(1)[0] / 64
            return
        nonce = msg.get(NoncePayload)
        if nonce is None:
            raise ProtocolError("CREATE_CHILD_SA response without Nonce")
        shared = None
        if dh is not None:
            ke = msg.get(KePayload)
            if ke is None or ke.group != dh.group:
                raise ProtocolError("CREATE_CHILD_SA response without our KE group")
            shared = dh.shared(ke.data)
        self._finish_child(sa, msg, child, ni, nonce.nonce, shared, now)
        if old is None:
            return
        old.our_rekey = child
        old.state = "rekeyed"
        peer_new = old.peer_rekey
        # §2.8.1: when both rekeyed, the SA made with the lowest nonce goes, closed by the
        # end that created it; the winner's creator deletes the old SA.
        if peer_new is not None and peer_new in sa.children and \
                min(child.nonces) < min(peer_new.nonces):
            self._queue(sa, "delete_child", child, now)
            return
        self._queue(sa, "delete_child", old, now)

    def _start_rekey_ike(self, sa: _IkeSa, now: float) -> None:
        cfg = sa.peer
        spi = self._new_ike_spi()
        ni = self._rng(_NONCE_LEN)
        dh = DhKey(sa.chosen.dh)
        props = tuple(s.to_proposal(i + 1, spi, first_group=dh.group)
                      for i, s in enumerate(cfg.ike))
        payloads: list[Payload] = [SaPayload(proposals=props), NoncePayload(nonce=ni),
                                   KePayload(group=dh.group, data=dh.public)]
        self._request(sa, "rekey_ike", Exchange.CREATE_CHILD_SA, payloads,
                      self._on_rekey_ike_response, (spi, ni, dh), now)

    def _on_rekey_ike_response(self, sa: _IkeSa, msg: Message, ctx: tuple, now: float) -> None:
        spi, ni, dh = ctx
        err = msg.error_notify()
        if err is not None:
            if sa.crossing is None:
                sa.rekey_at = now + 2.0 + self._rng(1)[0] / 32
            # Otherwise the peer's crossing rekey replaced the SA: its creator deletes it.
            return
        sa_p, nonce, ke = msg.get(SaPayload), msg.get(NoncePayload), msg.get(KePayload)
        if sa_p is None or nonce is None or ke is None or len(sa_p.proposals) != 1:
            raise ProtocolError("IKE rekey response without SA, Nonce or KE")
        chosen = choose(sa_p.proposals, sa.peer.ike, protocol=Protocol.IKE)
        if ke.group != dh.group or chosen.dh != dh.group or len(chosen.spi) != 8:
            raise ProtocolError("IKE rekey response with another group or a bad SPI")
        shared = dh.shared(ke.data)
        ours = self._rekeyed_ike(sa, chosen, shared, ni, nonce.nonce, spi, chosen.spi,
                                 initiator=True, now=now)
        theirs = sa.crossing
        if theirs is not None and theirs.state is IkeState.ESTABLISHED:
            self._settle_rekey_collision(sa, ours, theirs, now)
        else:
            # §2.8: the initiator of the rekey deletes the old IKE SA.
            self._queue(sa, "delete_ike", None, now)

    def _settle_rekey_collision(self, old: _IkeSa, ours: _IkeSa, theirs: _IkeSa,
                                now: float) -> None:
        """Both crossing IKE SA rekeys completed (§2.8.2): of the two new SAs, the one made
        with the lowest of the four nonces goes, deleted by the end that created it; the
        CHILD_SAs live on in the other, whose creator deletes the old SA."""
        if min(ours.ni, ours.nr) < min(theirs.ni, theirs.nr):
            loser, winner = ours, theirs
        else:
            loser, winner = theirs, ours
        self._adopt(winner, loser)
        loser.state = transition(loser.state, Trigger.REKEYED)
        loser.rekeyed_at = now
        if loser is ours:
            self._queue(loser, "delete_ike", None, now)
        else:
            self._queue(old, "delete_ike", None, now)

    def _adopt(self, new: _IkeSa, old: _IkeSa) -> None:
        """Move the CHILD_SAs of `old` to `new`, with the requests queued about them."""
        new.children += old.children
        old.children = []
        keep: deque[tuple[str, Any]] = deque()
        for kind, ctx in old.queue:
            if kind in ("create_child", "rekey_child", "delete_child"):
                self._queue(new, kind, ctx, self._now)
            else:
                keep.append((kind, ctx))
        old.queue = keep

    def _rekeyed_ike(self, old: _IkeSa, chosen: Chosen, shared: bytes, ni: bytes, nr: bytes,
                     spi_i: bytes, spi_r: bytes, *, initiator: bool, now: float) -> _IkeSa:
        """Make the IKE SA that replaces `old` (§2.18) and move the CHILD_SAs to it."""
        new = self._new_sa(old.peer, initiator=initiator, now=now)
        new.local, new.remote = old.local, old.remote
        new.nat_local, new.nat_remote = old.nat_local, old.nat_remote
        new.frag_ok = old.frag_ok  # negotiated once, in IKE_SA_INIT
        new.peer_hashes, new.remote_identity = old.peer_hashes, old.remote_identity
        new.spi_i, new.spi_r, new.ni, new.nr, new.chosen = spi_i, spi_r, ni, nr, chosen
        self._set_keys(new, derive_ike_keys(
            prf_id=chosen.prf, encr=chosen.encr, key_bits=chosen.key_bits, integ=chosen.integ,
            shared=shared, ni=ni, nr=nr, spi_i=spi_i, spi_r=spi_r, old_sk_d=old.keys.sk_d,
            old_prf=old.chosen.prf))
        new.state = transition(new.state, Trigger.BORN_FROM_REKEY)
        new.born_of = old
        self._adopt(new, old)
        self._sas[new.our_spi] = new
        old.state = transition(old.state, Trigger.REKEYED)
        old.rekeyed_at = now
        self._ike_up(new, now, rekey_of=old.uid)
        return new

    # == requests we answer =================================================================

    def _on_request(self, sa: _IkeSa, msg: Message, src: tuple[str, int],
                    dst: tuple[str, int], now: float) -> None:
        if msg.mid == sa.last_resp_mid and sa.last_resp is not None:
            self.counters["responses_resent"] += 1
            self._emit(sa, sa.last_resp, now)
            return
        if msg.mid != sa.expect_mid:
            raise ProtocolError("request with an unexpected message ID")
        action = RESPONDER_ACCEPTS.get((sa.state, msg.exchange))
        if action is None:
            raise ProtocolError(f"{msg.exchange} request in state {sa.state}")
        if (src, dst) != (sa.remote, sa.local) and msg.exchange == Exchange.IKE_AUTH:
            # The initiator moved to port 4500 (or a NAT mapped it anew): follow it.
            sa.remote, sa.local = src, dst
        if action != "process":
            self._respond(sa, msg.exchange, msg.mid, [NotifyPayload(notify=action)], now)
            return
        try:
            if msg.exchange == Exchange.IKE_AUTH:
                payloads = self._on_auth_request(sa, msg, now)
            elif msg.exchange == Exchange.CREATE_CHILD_SA:
                payloads = self._on_create_child_request(sa, msg, now)
            else:
                payloads = self._on_informational_request(sa, msg, now)
        except ProtocolError as e:
            if e.notify:
                self._respond(sa, msg.exchange, msg.mid, [NotifyPayload(notify=e.notify)], now)
            if msg.exchange == Exchange.IKE_AUTH:
                self._close(sa, f"IKE_AUTH failed: {e}", now)
            raise
        self._respond(sa, msg.exchange, msg.mid, payloads, now)
        if sa.close_after_response:
            self._close(sa, sa.close_after_response, now)

    def _on_create_child_request(self, sa: _IkeSa, msg: Message, now: float) -> list[Payload]:
        sa_p, nonce = msg.get(SaPayload), msg.get(NoncePayload)
        if sa_p is None or nonce is None:
            raise ProtocolError("CREATE_CHILD_SA without SA or Nonce",
                                notify=Notify.INVALID_SYNTAX)
        if any(p.protocol == Protocol.IKE for p in sa_p.proposals):
            return self._on_rekey_ike_request(sa, msg, nonce.nonce, now)
        ke = msg.get(KePayload)
        rekey = msg.notify(Notify.REKEY_SA)
        old = None
        if rekey is not None:
            if rekey.protocol != Protocol.ESP or len(rekey.spi) != 4:
                raise ProtocolError("bad REKEY_SA", notify=Notify.INVALID_SYNTAX)
            spi = struct.unpack("!I", rekey.spi)[0]
            old = next((c for c in sa.children if c.spi_out == spi), None)
            if old is None or old.state == "deleting":
                raise ProtocolError("rekey of an unknown CHILD_SA",
                                    notify=Notify.CHILD_SA_NOT_FOUND)
        nr = self._rng(_NONCE_LEN)
        shared = dh = None
        if ke is not None:
            if ke.group not in (Group.MODP2048, Group.MODP3072, Group.ECP256, Group.ECP384,
                                Group.CURVE25519):
                raise ProtocolError("unsupported PFS group", notify=Notify.NO_PROPOSAL_CHOSEN)
            dh = DhKey(ke.group)
            shared = dh.shared(ke.data)
        child, cp = self._respond_child(sa, msg, nonce.nonce, nr, in_auth=False, shared=shared,
                                        cfg=old.cfg if old else None)
        out: list[Payload] = [cp[0], NoncePayload(nonce=nr)]
        if dh is not None:
            out.append(KePayload(group=dh.group, data=dh.public))
        out += cp[1:]
        if old is not None:
            child.rekey_of = old.spi_in
            old.peer_rekey = child
            ours = old.our_rekey
            if old.state == "rekeyed" and ours is not None and ours in sa.children and \
                    min(ours.nonces) < min(child.nonces):
                # Our rekey finished first but made the redundant SA (§2.8.1).
                self._queue(sa, "delete_child", ours, now)
        self._install(sa, child, now)
        return out

    def _on_rekey_ike_request(self, sa: _IkeSa, msg: Message, ni: bytes,
                              now: float) -> list[Payload]:
        # Our own IKE SA rekey is out too: a crossing rekey. Both complete, and when ours
        # does, the redundant new SA goes (§2.8.2, `_settle_rekey_collision`).
        crossing = sa.outstanding is not None and sa.outstanding.kind == "rekey_ike"
        if not crossing and (sa.outstanding is not None or any(
                c.state in ("rekeying", "deleting") for c in sa.children)):
            raise ProtocolError("busy", notify=Notify.TEMPORARY_FAILURE)
        ke = msg.get(KePayload)
        sa_p = msg.get(SaPayload)
        chosen = choose(sa_p.proposals, sa.peer.ike, protocol=Protocol.IKE)
        if len(chosen.spi) != 8:
            raise ProtocolError("IKE rekey without an SPI", notify=Notify.INVALID_SYNTAX)
        if ke is None or ke.group != chosen.dh:
            raise ProtocolError("KE group mismatch", notify=Notify.INVALID_KE_PAYLOAD)
        dh = DhKey(chosen.dh)
        shared = dh.shared(ke.data)
        nr = self._rng(_NONCE_LEN)
        spi_r = self._new_ike_spi()
        new = self._rekeyed_ike(sa, chosen, shared, ni, nr, chosen.spi, spi_r,
                                initiator=False, now=now)
        if crossing:
            sa.crossing = new
        # What is left queued on the old SA (DPD, its own rekey) has no point any more.
        sa.queue.clear()
        return [SaPayload(proposals=(chosen.to_proposal(spi_r),)), NoncePayload(nonce=nr),
                KePayload(group=dh.group, data=dh.public)]

    def _on_informational_request(self, sa: _IkeSa, msg: Message,
                                  now: float) -> list[Payload]:
        ours: list[bytes] = []
        for d in msg.all(DeletePayload):
            if d.protocol == Protocol.IKE:
                old = sa.born_of
                if old is not None and old.crossing is sa and old.outstanding is not None \
                        and old.outstanding.kind == "rekey_ike":
                    # The peer settled a rekey collision (§2.8.2) before our rekey's
                    # response reached us: this new SA lost, ours will win. Its CHILD_SAs
                    # go back to the old SA, which hands them to ours when it completes.
                    self._adopt(old, sa)
                    sa.close_after_response = "rekeyed"
                    return []
                sa.close_after_response = "deleted by peer" if sa.state is not \
                    IkeState.REKEYED else "rekeyed"
                return []
            if d.protocol != Protocol.ESP:
                continue
            for raw in d.spis:
                if len(raw) != 4:
                    continue
                spi = struct.unpack("!I", raw)[0]
                child = next((c for c in sa.children if c.spi_out == spi), None)
                if child is None:
                    continue
                if child.state != "deleting":
                    ours.append(struct.pack("!I", child.spi_in))
                self._remove_child(sa, child, "deleted by peer")
        if ours:
            return [DeletePayload(protocol=Protocol.ESP, spis=tuple(ours))]
        return []

    # == requests we send ===================================================================

    def _queue(self, sa: _IkeSa, kind: str, ctx: Any, now: float) -> None:
        if (kind, ctx) not in sa.queue:
            sa.queue.append((kind, ctx))

    def _pump(self, now: float) -> None:
        """Start the next queued request of every SA that has none outstanding."""
        for sa in list(self._all_sas()):
            while sa.outstanding is None and sa.queue and sa.state is not IkeState.CLOSED:
                kind, ctx = sa.queue.popleft()
                if sa.state not in INITIATOR_MAY_SEND[kind]:
                    if kind == "rekey_child" and ctx.state == "rekey-queued":
                        ctx.state = "installed"
                    continue
                self._start(sa, kind, ctx, now)

    def _start(self, sa: _IkeSa, kind: str, ctx: Any, now: float) -> None:
        if kind == "create_child":
            self._start_create_child(sa, ctx, now)
        elif kind == "rekey_child":
            if ctx in sa.children and ctx.state == "rekey-queued":
                self._start_create_child(sa, ctx.cfg, now, old=ctx)
        elif kind == "rekey_ike":
            self._start_rekey_ike(sa, now)
        elif kind == "delete_child":
            if ctx in sa.children or ctx.state in ("expired", "failed"):
                ctx.state = "deleting"
                self._request(sa, kind, Exchange.INFORMATIONAL,
                              [DeletePayload(protocol=Protocol.ESP,
                                             spis=(struct.pack("!I", ctx.spi_in),))],
                              self._on_delete_child_response, ctx, now)
        elif kind == "delete_ike":
            if sa.state is not IkeState.DELETING:
                sa.state = transition(sa.state, Trigger.DELETE)
            self._request(sa, kind, Exchange.INFORMATIONAL,
                          [DeletePayload(protocol=Protocol.IKE)],
                          self._on_delete_ike_response, None, now)
        elif kind == "dpd":
            self._request(sa, kind, Exchange.INFORMATIONAL, [], self._on_dpd_response, None,
                          now)

    def _on_delete_child_response(self, sa: _IkeSa, msg: Message, child: _Child,
                                  now: float) -> None:
        rekeyed = child.our_rekey is not None or child.peer_rekey is not None
        self._remove_child(sa, child, "rekeyed" if rekeyed else "deleted")

    def _on_delete_ike_response(self, sa: _IkeSa, msg: Message, ctx: Any, now: float) -> None:
        self._close(sa, "rekeyed" if not sa.children else "deleted", now)

    def _on_dpd_response(self, sa: _IkeSa, msg: Message, ctx: Any, now: float) -> None:
        return

    def _request(self, sa: _IkeSa, kind: str, exchange: int, payloads: list[Payload],
                 handler: Callable, ctx: Any, now: float) -> None:
        mid = sa.next_mid
        sa.next_mid += 1
        data = self._encode(sa, exchange, mid, payloads, response=False)
        sa.outstanding = _Request(kind, mid, data, handler, ctx,
                                  now + sa.peer.retransmit_timeout, now)
        if kind == "dpd" and sa.peer.dpd_timeout is not None:
            sa.outstanding.deadline = min(sa.outstanding.deadline, now + sa.peer.dpd_timeout)
        self._emit(sa, data, now)

    def _send_delete_once(self, sa: _IkeSa, now: float,
                          notify: NotifyPayload | None = None) -> None:
        """An INFORMATIONAL Delete of `sa` that expects no answer (the SA is closed next)."""
        if sa.sk_out is None:
            return
        mid = sa.next_mid
        sa.next_mid += 1
        payloads: list[Payload] = [notify] if notify is not None else []
        payloads.append(DeletePayload(protocol=Protocol.IKE))
        self._emit(sa, self._encode(sa, Exchange.INFORMATIONAL, mid, payloads,
                                    response=False), now)

    def _request_error(self, sa: _IkeSa, req: _Request, e: ProtocolError, now: float) -> None:
        """A response we could not accept: what it means depends on the request."""
        if req.kind == "auth" and sa.sk_out is not None:
            # The responder thinks the SA is up (§2.21.2): tell it, once, then forget it.
            self._send_delete_once(sa, now, NotifyPayload(notify=Notify.AUTHENTICATION_FAILED))
            self._close(sa, f"IKE SA setup failed: {e}", now)
        elif req.kind in ("auth", "init"):
            self._close(sa, f"IKE SA setup failed: {e}", now)
        elif req.kind in ("create_child", "rekey_child"):
            child, old = req.ctx[0], req.ctx[1]
            self._spis_in.discard(child.spi_in)
            if old is not None and old.state == "rekeying":
                old.state = "installed"
                old.rekey_at = now + 5.0
        elif req.kind == "delete_ike":
            self._close(sa, "deleted", now)

    def _retransmit(self, sa: _IkeSa, req: _Request, now: float) -> None:
        cfg = sa.peer
        req.tries += 1
        # A liveness check has its own give-up time when the peer config sets one.
        dpd_end = req.sent_at + cfg.dpd_timeout if (
            req.kind == "dpd" and cfg.dpd_timeout is not None) else None
        if req.tries >= cfg.retransmit_tries or (dpd_end is not None and now >= dpd_end):
            sa.outstanding = None
            if req.kind == "delete_ike":
                self._close(sa, "deleted (no answer)", now)
            elif req.kind == "init":
                self._close(sa, "peer does not answer IKE_SA_INIT", now)
            else:
                self._close(sa, "peer dead: no answer to retransmissions", now)
            return
        self.counters["retransmits"] += 1
        req.deadline = now + cfg.retransmit_timeout * cfg.retransmit_base ** req.tries
        if dpd_end is not None:
            req.deadline = min(req.deadline, dpd_end)
        self._emit(sa, req.data, now)
        for cand in sa.candidates:
            if cand.outstanding is not None:
                self._emit(cand, cand.outstanding.data, now)

    def _respond(self, sa: _IkeSa, exchange: int, mid: int, payloads: list[Payload],
                 now: float) -> None:
        data = self._encode(sa, exchange, mid, payloads, response=True)
        sa.last_resp, sa.last_resp_mid = data, mid
        sa.expect_mid = mid + 1
        self._emit(sa, data, now)

    def _encode(self, sa: _IkeSa, exchange: int, mid: int, payloads: list[Payload], *,
                response: bool) -> bytes | tuple[bytes, ...]:
        """The message as one datagram, or as a tuple of fragments (RFC 7383) when both
        ends support them and it does not fit the peer's `fragment_size`."""
        flags = (Flag.INITIATOR if sa.initiator else 0) | (Flag.RESPONSE if response else 0)
        msg = Message(spi_i=sa.spi_i, spi_r=sa.spi_r, exchange=exchange, flags=flags, mid=mid,
                      payloads=tuple(payloads), encrypted=True)
        if sa.frag_ok:
            frags = fragment_message(msg, sa.sk_out, max_message_len(
                sa.peer.fragment_size, nat_t=sa.local[1] == NAT_T_PORT))
            if frags is not None:
                return frags
        return encode_message(msg, sa.sk_out)

    def _emit(self, sa: _IkeSa, data: bytes | tuple[bytes, ...], now: float) -> None:
        if isinstance(data, tuple):
            self.counters["fragments_sent"] += len(data)
        for d in (data if isinstance(data, tuple) else (data,)):
            if sa.local[1] == NAT_T_PORT:
                d = NON_ESP_MARKER + d
            self._out.append(Datagram(data=d, src=sa.local, dst=sa.remote))
        sa.last_sent = now

    # == SA bookkeeping =====================================================================

    def _new_sa(self, peer: PeerConfig, *, initiator: bool, now: float) -> _IkeSa:
        self._uid += 1
        return _IkeSa(self._uid, peer, initiator, now)

    def _set_keys(self, sa: _IkeSa, keys: IkeKeys) -> None:
        c = sa.chosen
        sa.keys = keys
        ski = SkCipher(encr=c.encr, enc_key=keys.sk_ei, integ=c.integ, integ_key=keys.sk_ai,
                       rng=self._rng)
        skr = SkCipher(encr=c.encr, enc_key=keys.sk_er, integ=c.integ, integ_key=keys.sk_ar,
                       rng=self._rng)
        sa.sk_out, sa.sk_in = (ski, skr) if sa.initiator else (skr, ski)

    def _ike_up(self, sa: _IkeSa, now: float, rekey_of: int | None = None) -> None:
        jitter = int.from_bytes(self._rng(2), "big") / 65535 * 0.1
        sa.rekey_at = now + sa.peer.ike_rekey_time * (1 - jitter)
        sa.last_recv = now
        self._events.append(IkeSaUp(
            ike_id=sa.uid, peer=sa.peer.name, local_addr=sa.local, remote_addr=sa.remote,
            local_id=str(sa.peer.local_id), remote_id=str(sa.remote_identity),
            spi_i=sa.spi_i, spi_r=sa.spi_r, initiator=sa.initiator, nat=sa.encap,
            rekey_of=rekey_of))

    def _resolve_duplicates(self, sa: _IkeSa, now: float) -> None:
        """Crossing initiations: of two IKE SAs with one peer, the one holding the lowest
        nonce goes (the rule §2.8.1 gives for rekeys), deleted by its initiator."""
        for other in self._all_sas():
            if other is sa or other.peer is not sa.peer or \
                    other.state is not IkeState.ESTABLISHED:
                continue
            loser = sa if min(sa.ni, sa.nr) < min(other.ni, other.nr) else other
            if loser.initiator:
                self._queue(loser, "delete_ike", None, now)

    def _close(self, sa: _IkeSa, reason: str, now: float, *, quiet: bool = False) -> None:
        if sa.state is IkeState.CLOSED:
            return
        sa.state = transition(sa.state, Trigger.CLOSE)
        sa.outstanding = None
        sa.queue.clear()
        sa.candidates = []
        for c in list(sa.children):
            self._remove_child(sa, c, reason)
        self._drop_half_open(sa)
        self._frags.discard((sa, True), (sa, False))
        for spi in (sa.spi_i, sa.spi_r):
            if self._sas.get(spi) is sa:
                del self._sas[spi]
        if not quiet:
            self._events.append(IkeSaDown(ike_id=sa.uid, peer=sa.peer.name, reason=reason))

    def _drop_half_open(self, sa: _IkeSa) -> None:
        if sa.half_open_key is not None and self._half_open.get(sa.half_open_key) is sa:
            del self._half_open[sa.half_open_key]
        sa.half_open_key = None

    def _sa_deadlines(self, sa: _IkeSa) -> list[float]:
        out = []
        if sa.outstanding is not None:
            out.append(sa.outstanding.deadline)
        if sa.state is IkeState.HALF_OPEN:
            out.append(sa.created + self.settings.half_open_timeout)
        if sa.state is IkeState.REKEYED:
            out.append(sa.rekeyed_at + _give_up(sa.peer))
        if sa.state is IkeState.ESTABLISHED:
            if sa.outstanding is None:
                out.append(sa.last_recv + sa.peer.dpd_delay)
            if sa.rekey_at:
                out.append(sa.rekey_at)
            for c in sa.children:
                if c.state == "installed":
                    out.append(c.rekey_at)
                out.append(c.expire_at)
            if sa.nat_local:
                out.append(sa.last_sent + sa.peer.keepalive_interval)
        if sa.queue and sa.outstanding is None:
            out.append(self._now)
        return out

    def _all_sas(self) -> list[_IkeSa]:
        seen: dict[int, _IkeSa] = {}
        for sa in self._sas.values():
            seen.setdefault(sa.uid, sa)
        return list(seen.values())

    def _peer(self, name: str) -> PeerConfig:
        try:
            return self.peers[name]
        except KeyError:
            raise LocalIkeError(f"no peer called {name!r}") from None

    def _peer_for(self, addr: str) -> PeerConfig | None:
        for p in self.peers.values():
            if p.remote_addr == addr:
                return p
        return None

    def _established(self, peer: str) -> _IkeSa:
        cfg = self._peer(peer)
        for sa in sorted(self._all_sas(), key=lambda s: -s.uid):
            if sa.peer is cfg and sa.state is IkeState.ESTABLISHED:
                return sa
        raise LocalIkeError(f"no established IKE SA with {peer}")

    def _find_child(self, sa: _IkeSa, name: str | None) -> _Child:
        for c in sa.children:
            if (name is None or c.cfg.name == name) and c.state in ("installed",
                                                                    "rekey-queued"):
                return c
        raise LocalIkeError(f"no CHILD_SA {name or ''} to act on with {sa.peer.name}")

    def _new_ike_spi(self) -> bytes:
        while True:
            spi = self._rng(8)
            if spi != _ZERO_SPI and spi not in self._sas:
                return spi

    def _new_child_spi(self) -> int:
        while True:
            spi = int.from_bytes(self._rng(4), "big")
            if spi >= 256 and spi not in self._spis_in:
                self._spis_in.add(spi)
                return spi


def _nat_hash(spi_i: bytes, spi_r: bytes, addr: tuple[str, int]) -> bytes:
    """NAT_DETECTION_*_IP data: SHA-1(SPIi | SPIr | IP | port) (§2.23)."""
    return hashlib.sha1(spi_i + spi_r + ip_to_bytes(addr[0]) + struct.pack("!H", addr[1]),
                        usedforsecurity=False).digest()


def _give_up(cfg: PeerConfig) -> float:
    """How long a request to `cfg` is retransmitted before we give up on it."""
    return sum(cfg.retransmit_timeout * cfg.retransmit_base ** k
               for k in range(cfg.retransmit_tries))


def _parse_hashes(data: bytes) -> frozenset[int]:
    return frozenset(struct.unpack_from("!H", data, i)[0] for i in range(0, len(data) - 1, 2))


def _notify_name(n: int) -> str:
    try:
        return Notify(n).name
    except ValueError:
        return str(n)

