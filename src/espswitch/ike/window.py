"""The request window of the IKE core (RFC 7296 §2.1-§2.3), once for every exchange.

Window size 1: each IKE SA has at most one request of ours out (`IkeSa.outstanding`), the
others wait in `IkeSa.queue` as (kind, context) and are started by `pump` through the
starter each exchange module registered for its kinds. Requests are retransmitted with
exponential back-off until the peer's `retransmit_tries` run out; the last response we
sent is kept and sent again for a retransmitted request. Messages leave here encoded, as
fragments (RFC 7383) when both ends support them and they do not fit, and arrive here to
be decrypted and reassembled (`open`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from espswitch.ike.addr import is_v6
from espswitch.ike.config import PeerConfig
from espswitch.ike.consts import NAT_T_PORT, Exchange, Flag, PayloadType, Protocol
from espswitch.ike.context import CoreContext
from espswitch.ike.errors import ProtocolError
from espswitch.ike.events import Datagram
from espswitch.ike.fragment import fragment_message, max_message_len
from espswitch.ike.message import (
    DeletePayload,
    Header,
    Message,
    NotifyPayload,
    Payload,
    encode_message,
    parse_inner,
    parse_message,
)
from espswitch.ike.sas import IkeSa, Request
from espswitch.ike.state import INITIATOR_MAY_SEND, IkeState
from espswitch.packet.esp import NON_ESP_MARKER

__all__ = ["Starter", "Window", "give_up_time"]

# start(sa, context, now): send the request of one kind (or nothing, if it lost its point).
Starter = Callable[[IkeSa, Any, float], None]
# refused(sa, context): a queued request of this kind that the IKE SA's state cannot send.
Refused = Callable[[IkeSa, Any], None]


class Window:
    """Requests out and responses back for every IKE SA of one core."""

    def __init__(self, ctx: CoreContext) -> None:
        self.ctx = ctx
        self._starters: dict[str, Starter] = {}
        self._refused: dict[str, Refused] = {}

    def register(self, kind: str, start: Starter, refused: Refused | None = None) -> None:
        """Have `start` send the queued requests of `kind` (and `refused` hear of those the
        IKE SA's state does not allow, `INITIATOR_MAY_SEND`)."""
        self._starters[kind] = start
        if refused is not None:
            self._refused[kind] = refused

    # -- requests we send ------------------------------------------------------------------

    def queue(self, sa: IkeSa, kind: str, ctx: Any) -> None:
        """Queue a request of `kind` on `sa` (once: the same request is not queued twice)."""
        if (kind, ctx) not in sa.queue:
            sa.queue.append((kind, ctx))

    def pump(self, now: float) -> None:
        """Start the next queued request of every SA that has none outstanding."""
        for sa in list(self.ctx.store.all()):
            while sa.outstanding is None and sa.queue and sa.state is not IkeState.CLOSED:
                kind, ctx = sa.queue.popleft()
                if sa.state not in INITIATOR_MAY_SEND[kind]:
                    refused = self._refused.get(kind)
                    if refused is not None:
                        refused(sa, ctx)
                    continue
                self._starters[kind](sa, ctx, now)

    def request(self, sa: IkeSa, kind: str, exchange: int, payloads: list[Payload],
                handler: Callable, ctx: Any, now: float,
                on_error: Callable | None = None) -> None:
        """Send a request and keep it outstanding until `handler` has its response."""
        mid = sa.next_mid
        sa.next_mid += 1
        data = self.encode(sa, exchange, mid, payloads, response=False)
        sa.outstanding = Request(kind, mid, data, handler, ctx,
                                 now + sa.peer.retransmit_timeout, now, on_error)
        if kind == "dpd" and sa.peer.dpd_timeout is not None:
            sa.outstanding.deadline = min(sa.outstanding.deadline, now + sa.peer.dpd_timeout)
        self.emit(sa, data, now)

    def send_delete_once(self, sa: IkeSa, now: float,
                         notify: NotifyPayload | None = None) -> None:
        """An INFORMATIONAL Delete of `sa` that expects no answer (the SA is closed next)."""
        if sa.sk_out is None:
            return
        mid = sa.next_mid
        sa.next_mid += 1
        payloads: list[Payload] = [notify] if notify is not None else []
        payloads.append(DeletePayload(protocol=Protocol.IKE))
        self.emit(sa, self.encode(sa, Exchange.INFORMATIONAL, mid, payloads,
                                  response=False), now)

    def response_error(self, sa: IkeSa, req: Request, e: ProtocolError, now: float) -> None:
        """A response to `req` we could not accept: what it means is the request's."""
        if req.on_error is not None:
            req.on_error(sa, req, e, now)

    def retransmit(self, sa: IkeSa, req: Request, now: float) -> None:
        """`req` is due again: send it once more, or give up on the peer."""
        cfg = sa.peer
        req.tries += 1
        # A liveness check has its own give-up time when the peer config sets one.
        dpd_end = req.sent_at + cfg.dpd_timeout if (
            req.kind == "dpd" and cfg.dpd_timeout is not None) else None
        if req.tries >= cfg.retransmit_tries or (dpd_end is not None and now >= dpd_end):
            sa.outstanding = None
            if req.kind == "delete_ike":
                self.ctx.close(sa, "deleted (no answer)", now)
            elif req.kind == "init":
                self.ctx.close(sa, "peer does not answer IKE_SA_INIT", now)
            else:
                self.ctx.close(sa, "peer dead: no answer to retransmissions", now)
            return
        self.ctx.counters["retransmits"] += 1
        req.deadline = now + cfg.retransmit_timeout * cfg.retransmit_base ** req.tries
        if dpd_end is not None:
            req.deadline = min(req.deadline, dpd_end)
        self.emit(sa, req.data, now)
        for cand in sa.candidates:
            if cand.outstanding is not None:
                self.emit(cand, cand.outstanding.data, now)

    # -- requests we answer ----------------------------------------------------------------

    def new_request(self, sa: IkeSa, msg: Message, now: float) -> bool:
        """Whether `msg` is the next request to process; a retransmitted one has our last
        response sent again (False). ProtocolError for another message ID."""
        if msg.mid == sa.last_resp_mid and sa.last_resp is not None:
            self.ctx.counters["responses_resent"] += 1
            self.emit(sa, sa.last_resp, now)
            return False
        if msg.mid != sa.expect_mid:
            raise ProtocolError("request with an unexpected message ID")
        return True

    def respond(self, sa: IkeSa, exchange: int, mid: int, payloads: list[Payload],
                now: float) -> None:
        """Send (and keep, for retransmitted requests) our response to request `mid`."""
        data = self.encode(sa, exchange, mid, payloads, response=True)
        sa.last_resp, sa.last_resp_mid = data, mid
        sa.expect_mid = mid + 1
        self.emit(sa, data, now)

    def refuse(self, sa: IkeSa, h: Header, notify: int, data: bytes, now: float) -> None:
        """Answer the request `h` with an error notify."""
        self.respond(sa, h.exchange, h.mid, [NotifyPayload(notify=notify, data=data)], now)

    # -- the wire --------------------------------------------------------------------------

    def open(self, sa: IkeSa, h: Header, data: bytes, now: float) -> Message | None:
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
            if self.ctx.frags.retransmitted(h, data, sa.sk_in):
                self.ctx.counters["responses_resent"] += 1
                self.emit(sa, sa.last_resp, now)
            return None
        elif h.mid != sa.expect_mid:
            raise ProtocolError("IKE fragment with an unexpected message ID")
        done = self.ctx.frags.add((sa, h.is_response), h, data, sa.sk_in, now)
        return parse_inner(h, *done) if done is not None else None

    def encode(self, sa: IkeSa, exchange: int, mid: int, payloads: list[Payload], *,
               response: bool) -> bytes | tuple[bytes, ...]:
        """The message as one datagram, or as a tuple of fragments (RFC 7383) when both
        ends support them and it does not fit the peer's `fragment_size`."""
        flags = (Flag.INITIATOR if sa.initiator else 0) | (Flag.RESPONSE if response else 0)
        msg = Message(spi_i=sa.spi_i, spi_r=sa.spi_r, exchange=exchange, flags=flags, mid=mid,
                      payloads=tuple(payloads), encrypted=True)
        if sa.frag_ok:
            frags = fragment_message(msg, sa.sk_out, max_message_len(
                sa.peer.fragment_size, nat_t=sa.local[1] == NAT_T_PORT,
                v6=is_v6(sa.local[0])))
            if frags is not None:
                return frags
        return encode_message(msg, sa.sk_out)

    def emit(self, sa: IkeSa, data: bytes | tuple[bytes, ...], now: float) -> None:
        """Send one message (or its fragments) of `sa`, with the non-ESP marker on 4500."""
        if isinstance(data, tuple):
            self.ctx.counters["fragments_sent"] += len(data)
        for d in (data if isinstance(data, tuple) else (data,)):
            if sa.local[1] == NAT_T_PORT:
                d = NON_ESP_MARKER + d
            self.ctx.out.append(Datagram(data=d, src=sa.local, dst=sa.remote))
        sa.last_sent = now


def give_up_time(cfg: PeerConfig) -> float:
    """How long a request to `cfg` is retransmitted before we give up on it."""
    return sum(cfg.retransmit_timeout * cfg.retransmit_base ** k
               for k in range(cfg.retransmit_tries))
