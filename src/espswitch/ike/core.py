"""The IKEv2 protocol core (RFC 7296), sans-IO.

`IkeCore` is fed datagrams (`receive_datagram`), commands (`initiate`, `rekey_child`,
`rekey_ike`, `delete_child`, `delete_ike`) and the time (`on_timer` at `next_deadline()`);
it produces datagrams (`datagrams_to_send()`) and events (`events()`). It never opens a
socket nor reads a clock: every entry point takes `now`, in seconds on any monotonic scale.

Each IKE SA moves only through `espswitch.ike.state.transition`, each CHILD_SA only through
`espswitch.ike.state.child_transition`. Hostile input never raises
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
fragment` does both; `espswitch.ike.window` only which message IDs are expected, and the
answer to a retransmitted fragmented request, which is sent for its first fragment only,
§2.6.1).

The work is split by exchange, each module around the shared SA store (`sas`) and context
(`context`): `sa_init` (IKE_SA_INIT: cookies, NAT detection), `ike_auth` (IKE_AUTH:
identities, certificates), `create_child` (CREATE_CHILD_SA: CHILD_SAs, selectors, rekeys
and their collisions), `informational` (deletes, liveness checks) and `window` (message IDs,
retransmission, fragments). This module is the one entry point: it routes what arrives,
runs the timers and decides the blame.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from espswitch.ike.config import CoreSettings, PeerConfig
from espswitch.ike.consts import NAT_T_PORT, Exchange
from espswitch.ike.context import CoreContext
from espswitch.ike.create_child import CreateChildSa
from espswitch.ike.errors import LocalIkeError, ProtocolError, RemoteIkeError
from espswitch.ike.events import Datagram, Event
from espswitch.ike.ike_auth import IkeAuth
from espswitch.ike.informational import Informational
from espswitch.ike.message import Message, NotifyPayload, Payload, parse_header
from espswitch.ike.sa_init import IkeSaInit
from espswitch.ike.sas import ChildSa, IkeSa
from espswitch.ike.state import RESPONDER_ACCEPTS, ChildState, IkeState
from espswitch.ike.ts import format_ts
from espswitch.ike.window import Window, give_up_time
from espswitch.packet.esp import NAT_KEEPALIVE, NON_ESP_MARKER

__all__ = ["ChildInfo", "IkeCore", "IkeSaInfo"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ChildInfo:
    """A CHILD_SA as `IkeCore.ike_sas()` shows it."""

    name: str
    spi_in: int
    spi_out: int
    mode: str
    transform: str
    state: str
    local_ts: str = ""  # the negotiated selectors, strongSwan-like (`192.0.2.1/32[17/4789]`)
    remote_ts: str = ""


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


class IkeCore:
    """An IKEv2 endpoint for a set of peers; see the module docstring for the contract.

    `rng(n)` supplies random bytes (SPIs, nonces, IVs, jitter); `wallclock()`, when given,
    returns an aware datetime against which certificate validity is checked.
    """

    def __init__(self, peers: Iterable[PeerConfig], *, settings: CoreSettings | None = None,
                 rng: Callable[[int], bytes] = os.urandom,
                 wallclock: Callable[[], Any] | None = None) -> None:
        ctx = self._ctx = CoreContext(settings or CoreSettings(), rng, wallclock)
        # The context's own objects, under the names the core has always had.
        self.peers: dict[str, PeerConfig] = ctx.peers
        self.errors, self.counters = ctx.errors, ctx.counters
        self._frags, self._store = ctx.frags, ctx.store
        for p in peers:
            self.add_peer(p)
        # One handler per exchange around the shared store; the window starts their
        # queued requests and carries every message.
        self._window = Window(ctx)
        self._children = CreateChildSa(ctx, self._window)
        self._info = Informational(ctx, self._window, self._children.ike_rekey)
        self._auth = IkeAuth(ctx, self._window, self._children)
        self._init = IkeSaInit(ctx, self._window, self._auth)

    @property
    def settings(self) -> CoreSettings:
        """The limits of the core (may be replaced while running)."""
        return self._ctx.settings

    @settings.setter
    def settings(self, value: CoreSettings) -> None:
        self._ctx.settings = value

    # == outputs =============================================================================

    def datagrams_to_send(self) -> list[Datagram]:
        """Return and forget the datagrams produced so far."""
        out, self._ctx.out = self._ctx.out, []
        return out

    def next_event(self) -> Event | None:
        """The oldest event not yet taken, or None."""
        events = self._ctx.events
        return events.popleft() if events else None

    def events(self) -> list[Event]:
        """Return and forget every pending event."""
        out = list(self._ctx.events)
        self._ctx.events.clear()
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
                                   mode=c.mode, state=str(c.state),
                                   transform=c.chosen.esp_transform_name if c.chosen else "",
                                   local_ts=" ".join(map(format_ts, c.local_ts or ())),
                                   remote_ts=" ".join(map(format_ts, c.remote_ts or ())))
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
        self._ctx.now = now
        cfg = self._ctx.peer(peer)
        for sa in self._all_sas():
            if sa.peer is cfg and sa.initiator and sa.state in (
                    IkeState.INIT_SENT, IkeState.AUTH_SENT):
                return
            if sa.peer is cfg and sa.state is IkeState.ESTABLISHED:
                return
        self._init.initiate(self._store.new_sa(cfg, initiator=True, now=now), now)

    def rekey_child(self, peer: str, now: float, child: str | None = None) -> None:
        """Rekey a CHILD_SA of `peer` (the first one when `child` is None)."""
        self._ctx.now = now
        sa = self._established(peer)
        self._children.request_rekey(sa, _find_child(sa, child))
        self._window.pump(now)

    def rekey_ike(self, peer: str, now: float) -> None:
        """Rekey the IKE SA of `peer` with CREATE_CHILD_SA."""
        self._ctx.now = now
        self._window.queue(self._established(peer), "rekey_ike", None)
        self._window.pump(now)

    def delete_child(self, peer: str, now: float, child: str | None = None) -> None:
        """Delete a CHILD_SA of `peer` with an INFORMATIONAL exchange."""
        self._ctx.now = now
        sa = self._established(peer)
        self._window.queue(sa, "delete_child", _find_child(sa, child))
        self._window.pump(now)

    def delete_ike(self, peer: str, now: float) -> None:
        """Delete every IKE SA with `peer` (their CHILD_SAs go with them)."""
        self._ctx.now = now
        for sa in self._all_sas():
            if sa.peer.name != peer:
                continue
            if sa.state in (IkeState.ESTABLISHED, IkeState.REKEYED):
                self._window.queue(sa, "delete_ike", None)
            elif sa.state is not IkeState.DELETING:
                self._ctx.close(sa, "deleted locally", now)
        self._window.pump(now)

    # == time ================================================================================

    def on_timer(self, now: float) -> None:
        """Run everything due at `now`: retransmissions, DPD, rekeys, expiries, keepalives."""
        ctx, window = self._ctx, self._window
        ctx.now = now
        self._frags.expire(now)
        for sa in list(self._all_sas()):
            if sa.state is IkeState.CLOSED:
                continue
            req = sa.outstanding
            if req is not None and now >= req.deadline:
                window.retransmit(sa, req, now)
                if sa.state is IkeState.CLOSED:
                    continue
            if sa.state is IkeState.HALF_OPEN and \
                    now >= sa.created + self.settings.half_open_timeout:
                ctx.close(sa, "half-open SA timed out", now, quiet=True)
                continue
            if sa.state is IkeState.REKEYED and now >= sa.rekeyed_at + give_up_time(sa.peer):
                # Replaced, and nobody deleted it (§2.8): say so once, then forget it.
                window.send_delete_once(sa, now)
                ctx.close(sa, "rekeyed", now)
                continue
            if sa.state is not IkeState.ESTABLISHED:
                continue
            if sa.outstanding is None and not sa.queue and \
                    now >= sa.last_recv + sa.peer.dpd_delay:
                window.queue(sa, "dpd", None)
            if sa.rekey_at and now >= sa.rekey_at:
                sa.rekey_at = 0.0
                window.queue(sa, "rekey_ike", None)
            self._children.on_timer(sa, now)
            if sa.nat_local and now >= sa.last_sent + sa.peer.keepalive_interval:
                ctx.out.append(Datagram(data=NAT_KEEPALIVE, src=(sa.local[0], NAT_T_PORT),
                                        dst=sa.remote))
                sa.last_sent = now
        self._auth.settle_duplicates(now)
        window.pump(now)

    # == input ===============================================================================

    def receive_datagram(self, data: bytes, *, src: tuple[str, int], dst: tuple[str, int],
                         now: float) -> None:
        """Take one received UDP payload (from `src` to `dst`); never raises on bad input.

        On port 4500 the non-ESP marker is expected (ESP and keepalives are ignored here:
        the driver hands ESP to the ESP engine).
        """
        self._ctx.now = now
        self.counters["received"] += 1
        try:
            self._receive(bytes(data), src, dst, now)
        except ProtocolError as e:
            # The blame is decided here: whatever the message caused is the peer's.
            self.counters["dropped"] += 1
            self.errors.append(RemoteIkeError(str(e), notify=e.notify))
        self._auth.settle_duplicates(now)
        self._window.pump(now)

    def _receive(self, data: bytes, src: tuple[str, int], dst: tuple[str, int],
                 now: float) -> None:
        if dst[1] == NAT_T_PORT:
            if data == NAT_KEEPALIVE or not data.startswith(NON_ESP_MARKER):
                return
            data = data[len(NON_ESP_MARKER):]
        h = parse_header(data)
        if h.exchange == Exchange.IKE_SA_INIT and not h.is_response:
            self._init.receive_request(h, data, src, dst, now)
            return
        if h.exchange == Exchange.IKE_SA_INIT:
            self._init.receive_response(h, data, now)
            return
        our_spi = h.spi_r if h.from_initiator else h.spi_i
        sa = self._store.by_spi.get(our_spi)
        if sa is None or sa.state is IkeState.CLOSED:
            raise ProtocolError("message for an unknown IKE SA")
        msg = None
        if sa.candidates and h.is_response:
            sa, msg = self._init.pick_candidate(sa, h, data, now)
            if msg is None:
                return  # a fragment, kept with the candidate whose keys open it
        if h.from_initiator == sa.initiator or (
                (sa.spi_i if h.from_initiator else sa.spi_r)
                != (h.spi_i if h.from_initiator else h.spi_r)):
            raise ProtocolError("IKE SPIs or roles do not match the SA")
        if msg is None:
            try:
                msg = self._window.open(sa, h, data, now)
            except ProtocolError as e:
                # Authenticated but malformed requests get an answer (§2.21.2); others
                # nothing.
                if e.notify and not h.is_response and h.mid == sa.expect_mid and sa.sk_out:
                    self._window.refuse(sa, h, e.notify, e.data, now)
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
                self._window.response_error(sa, req, e, now)
                raise
            return
        self._on_request(sa, msg, src, dst, now)

    def _on_request(self, sa: IkeSa, msg: Message, src: tuple[str, int],
                    dst: tuple[str, int], now: float) -> None:
        """The peer's request to `sa`: routed to its exchange, answered, or refused."""
        if not self._window.new_request(sa, msg, now):
            return
        action = RESPONDER_ACCEPTS.get((sa.state, msg.exchange))
        if action is None:
            raise ProtocolError(f"{msg.exchange} request in state {sa.state}")
        if (src, dst) != (sa.remote, sa.local) and msg.exchange == Exchange.IKE_AUTH:
            # The initiator moved to port 4500 (or a NAT mapped it anew): follow it.
            sa.remote, sa.local = src, dst
        if action != "process":
            self._window.respond(sa, msg.exchange, msg.mid, [NotifyPayload(notify=action)], now)
            return
        try:
            payloads: list[Payload]
            if msg.exchange == Exchange.IKE_AUTH:
                payloads = self._auth.on_request(sa, msg, now)
            elif msg.exchange == Exchange.CREATE_CHILD_SA:
                payloads = self._children.on_request(sa, msg, now)
            else:
                payloads = self._info.on_request(sa, msg, now)
        except ProtocolError as e:
            if e.notify:
                self._window.respond(sa, msg.exchange, msg.mid,
                                     [NotifyPayload(notify=e.notify)], now)
            if msg.exchange == Exchange.IKE_AUTH:
                self._ctx.close(sa, f"IKE_AUTH failed: {e}", now)
            raise
        self._window.respond(sa, msg.exchange, msg.mid, payloads, now)
        if sa.close_after_response:
            self._ctx.close(sa, sa.close_after_response, now)

    # == SA bookkeeping =====================================================================

    def _sa_deadlines(self, sa: IkeSa) -> list[float]:
        out = []
        if sa.outstanding is not None:
            out.append(sa.outstanding.deadline)
        if sa.state is IkeState.HALF_OPEN:
            out.append(sa.created + self.settings.half_open_timeout)
        if sa.state is IkeState.REKEYED:
            out.append(sa.rekeyed_at + give_up_time(sa.peer))
        if sa.state is IkeState.ESTABLISHED:
            if sa.outstanding is None:
                out.append(sa.last_recv + sa.peer.dpd_delay)
            if sa.rekey_at:
                out.append(sa.rekey_at)
            for c in sa.children:
                if c.state is ChildState.INSTALLED:
                    out.append(c.rekey_at)
                out.append(c.expire_at)
            if sa.nat_local:
                out.append(sa.last_sent + sa.peer.keepalive_interval)
            if sa.duplicate_of is not None:
                out.append(sa.duplicate_until)
        if sa.queue and sa.outstanding is None:
            out.append(self._ctx.now)
        return out

    def _all_sas(self) -> list[IkeSa]:
        return self._store.all()

    def _established(self, peer: str) -> IkeSa:
        return self._store.established(self._ctx.peer(peer))


def _find_child(sa: IkeSa, name: str | None) -> ChildSa:
    """The first installed CHILD_SA of `sa` (called `name`, when given) to act on."""
    for c in sa.children:
        if (name is None or c.cfg.name == name) and c.state in (ChildState.INSTALLED,
                                                                ChildState.REKEY_QUEUED):
            return c
    raise LocalIkeError(f"no CHILD_SA {name or ''} to act on with {sa.peer.name}")
