"""The IKE_SA_INIT exchange (RFC 7296 §1.2, §2.6, §2.23): both roles.

Initiator: the request, retried with a COOKIE or another KE group when asked; the response
taken (keys derived, NAT detected, IKE_AUTH sent, moving to port 4500 behind a NAT), and
other differing responses kept as candidates whose IKE_AUTH response decides (§2.4).
Responder: the half-open SA limits, stateless cookies under load, the proposal choice and
the response. IKE_SA_INIT is unprotected: whatever is wrong with a message only drops it.
"""

from __future__ import annotations

import hashlib
import hmac as std_hmac
import struct
from typing import TYPE_CHECKING, Any

from espswitch.ike.addr import addr_bytes
from espswitch.ike.consts import NAT_T_PORT, Exchange, Flag, HashAlg, Notify, PayloadType, Protocol
from espswitch.ike.context import CoreContext
from espswitch.ike.crypto import DhKey, derive_ike_keys
from espswitch.ike.errors import ProtocolError
from espswitch.ike.events import Datagram
from espswitch.ike.fragment import open_fragment
from espswitch.ike.message import (
    AuthPayload,
    Header,
    IdPayload,
    KePayload,
    Message,
    NoncePayload,
    NotifyPayload,
    Payload,
    SaPayload,
    encode_message,
    parse_message,
)
from espswitch.ike.proposals import choose
from espswitch.ike.sas import ZERO_SPI, IkeSa, Request
from espswitch.ike.state import IkeState, Trigger, transition
from espswitch.ike.window import Window
from espswitch.packet.esp import NON_ESP_MARKER

if TYPE_CHECKING:
    from espswitch.ike.ike_auth import IkeAuth

__all__ = ["SIG_HASHES", "IkeSaInit", "notify_name", "parse_hashes"]

# Other IKE_SA_INIT responses tried next to the first one taken (§2.4: they are unprotected,
# so a spoofed or corrupted copy may arrive before the real one).
MAX_INIT_CANDIDATES = 3
SIG_HASHES = struct.pack("!HHH", HashAlg.SHA2_256, HashAlg.SHA2_384, HashAlg.SHA2_512)


class IkeSaInit:
    """IKE_SA_INIT for one core; `auth` continues with IKE_AUTH."""

    def __init__(self, ctx: CoreContext, window: Window, auth: IkeAuth) -> None:
        self.ctx, self.window, self.auth = ctx, window, auth

    # -- initiator -------------------------------------------------------------------------

    def initiate(self, sa: IkeSa, now: float) -> None:
        """Start the new IKE SA `sa` (IDLE) with its peer's first IKE proposal and group."""
        store = self.ctx.store
        sa.spi_i = store.new_ike_spi()
        store.by_spi[sa.spi_i] = sa
        sa.ni = self.ctx.nonce()
        sa.dh = DhKey(sa.peer.ike[0].dh[0])
        sa.state = transition(sa.state, Trigger.INITIATE)
        self._send_init(sa, now)

    def _send_init(self, sa: IkeSa, now: float) -> None:
        cfg = sa.peer
        payloads: list[Payload] = []
        if sa.cookie is not None:
            payloads.append(NotifyPayload(notify=Notify.COOKIE, data=sa.cookie))
        payloads += [
            SaPayload(proposals=tuple(s.to_proposal(i + 1, b"", first_group=sa.dh.group)
                                      for i, s in enumerate(cfg.ike))),
            KePayload(group=sa.dh.group, data=sa.dh.public),
            NoncePayload(nonce=sa.ni),
            *self._nat_notifies(sa, sa.spi_i, ZERO_SPI),
        ]
        if cfg.credentials.uses_certs:
            payloads.append(NotifyPayload(notify=Notify.SIGNATURE_HASH_ALGORITHMS,
                                          data=SIG_HASHES))
        if cfg.fragmentation:
            payloads.append(NotifyPayload(notify=Notify.IKEV2_FRAGMENTATION_SUPPORTED))
        msg = Message(spi_i=sa.spi_i, spi_r=ZERO_SPI, exchange=Exchange.IKE_SA_INIT,
                      flags=Flag.INITIATOR, mid=0, payloads=tuple(payloads))
        data = encode_message(msg)
        sa.init_request = data
        sa.next_mid = 1
        sa.outstanding = Request("init", 0, data, self._on_init_response_msg, None,
                                 now + cfg.retransmit_timeout, now, self._on_error)
        self.window.emit(sa, data, now)

    def _on_error(self, sa: IkeSa, req: Request, e: ProtocolError, now: float) -> None:
        self.ctx.close(sa, f"IKE SA setup failed: {e}", now)

    def _nat_notifies(self, sa: IkeSa, spi_i: bytes, spi_r: bytes) -> list[NotifyPayload]:
        src = nat_hash(spi_i, spi_r, sa.local)
        if sa.peer.encap:
            # Forcing UDP encapsulation: a source hash that cannot match makes both ends
            # believe in a NAT, as strongSwan's `encap = yes` does.
            src = self.ctx.rng(20)
        return [NotifyPayload(notify=Notify.NAT_DETECTION_SOURCE_IP, data=src),
                NotifyPayload(notify=Notify.NAT_DETECTION_DESTINATION_IP,
                              data=nat_hash(spi_i, spi_r, sa.remote))]

    def receive_response(self, h: Header, data: bytes, now: float) -> None:
        """An IKE_SA_INIT response: taken, kept as a candidate, or dropped (raises)."""
        sa = self.ctx.store.by_spi.get(h.spi_i)
        if sa is not None and sa.initiator and sa.state is IkeState.AUTH_SENT \
                and not h.from_initiator and h.mid == 0:
            self._init_response_candidate(sa, h, data, now)
            return
        if sa is None or not sa.initiator or sa.state is not IkeState.INIT_SENT \
                or h.from_initiator or h.mid != 0:
            raise ProtocolError("unexpected IKE_SA_INIT response")
        self._on_init_response(sa, h, data, now)

    def _on_init_response_msg(self, sa: IkeSa, msg: Message, ctx: Any, now: float) -> None:
        raise ProtocolError("IKE_SA_INIT responses are handled before decryption")

    def _on_init_response(self, sa: IkeSa, h: Header, data: bytes, now: float) -> None:
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
                self.ctx.close(sa, f"peer wants DH group {group}, which we do not offer", now)
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
            self.ctx.close(sa, f"peer refused IKE_SA_INIT: {notify_name(err.notify)}", now)
            return
        self._take_init_response(sa, h, msg, data, now)

    def _take_init_response(self, sa: IkeSa, h: Header, msg: Message, data: bytes,
                            now: float, child_spi: int | None = None) -> None:
        """Check an IKE_SA_INIT response, derive the keys and send IKE_AUTH (or raise,
        changing nothing)."""
        cfg = sa.peer
        sa_p, ke, nonce = msg.get(SaPayload), msg.get(KePayload), msg.get(NoncePayload)
        if sa_p is None or ke is None or nonce is None or h.spi_r == ZERO_SPI \
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
        self.ctx.set_keys(sa, derive_ike_keys(
            prf_id=chosen.prf, encr=chosen.encr, key_bits=chosen.key_bits, integ=chosen.integ,
            shared=shared, ni=sa.ni, nr=sa.nr, spi_i=sa.spi_i, spi_r=sa.spi_r))
        check_nat(sa, msg, sa.remote, sa.local)
        if msg.notify(Notify.SIGNATURE_HASH_ALGORITHMS):
            sa.peer_hashes = parse_hashes(msg.notify(Notify.SIGNATURE_HASH_ALGORITHMS).data)
        sa.frag_ok = cfg.fragmentation and \
            msg.notify(Notify.IKEV2_FRAGMENTATION_SUPPORTED) is not None
        if sa.encap and sa.local[1] != NAT_T_PORT:
            # RFC 7296 §2.23: with a NAT on the way, IKE_AUTH moves to port 4500.
            sa.local = (sa.local[0], NAT_T_PORT)
            sa.remote = (sa.remote[0], NAT_T_PORT)
        sa.state = transition(sa.state, Trigger.INIT_RESPONSE)
        self.auth.send_auth(sa, now, child_spi)

    def _init_response_candidate(self, sa: IkeSa, h: Header, data: bytes,
                                 now: float) -> None:
        """Another IKE_SA_INIT response after we took one (§2.4): the first may have been a
        spoofed or corrupted copy, so this one gets its own IKE_AUTH too; the IKE_AUTH
        response that decrypts and authenticates picks the real one (`pick_candidate`)."""
        if data == sa.init_response or any(c.init_response == data for c in sa.candidates):
            raise ProtocolError("IKE_SA_INIT response again")
        if len(sa.candidates) >= MAX_INIT_CANDIDATES:
            raise ProtocolError("too many different IKE_SA_INIT responses")
        msg = parse_message(data, None, h)
        if msg.error_notify() is not None or msg.notify(Notify.COOKIE) is not None:
            raise ProtocolError("IKE_SA_INIT refusal after a response was taken")
        alt = IkeSa(sa.uid, sa.peer, True, sa.created)
        alt.spi_i, alt.ni, alt.dh, alt.cookie = sa.spi_i, sa.ni, sa.dh, sa.cookie
        alt.init_request, alt.next_mid, alt.retries = sa.init_request, 1, sa.retries
        alt.state = IkeState.INIT_SENT
        # The same CHILD_SA SPI: the responder may answer any of the IKE_AUTH requests
        # with the same keys (a copy mangled outside the key material) from its cache.
        self._take_init_response(alt, h, msg, data, now, sa.first_child.spi_in)
        sa.candidates.append(alt)

    def pick_candidate(self, sa: IkeSa, h: Header, data: bytes,
                       now: float) -> tuple[IkeSa, Message | None]:
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
                msg = self.window.open(cand, h, data, now)
                if msg is None:
                    pending = cand
                    continue
                idr, auth = msg.get(IdPayload, initiator=False), msg.get(AuthPayload)
                if idr is not None and auth is not None:
                    self.auth.authenticate_peer(cand, msg, idr, auth, cand.init_response,
                                                cand.ni, cand.keys.sk_pr)
            except ProtocolError:
                continue
            for other in (sa, *sa.candidates):
                if other is not cand:
                    self.ctx.frags.discard((other, True), (other, False))
            sa.candidates = []
            self.ctx.store.by_spi[cand.spi_i] = cand
            return cand, msg
        if pending is not None:
            return pending, None
        raise ProtocolError("IKE_AUTH response that no IKE_SA_INIT response taken opens")

    # -- responder -------------------------------------------------------------------------

    def receive_request(self, h: Header, data: bytes, src: tuple[str, int],
                        dst: tuple[str, int], now: float) -> None:
        """An IKE_SA_INIT request: answered (a new half-open SA), refused or dropped."""
        ctx, store = self.ctx, self.ctx.store
        if h.spi_r != ZERO_SPI or h.mid != 0 or h.from_initiator is False:
            raise ProtocolError("bad IKE_SA_INIT request header")
        key = (src, h.spi_i)
        known = store.half_open.get(key)
        if known is not None:
            if known.init_request == data and known.last_resp is not None:
                ctx.counters["responses_resent"] += 1
                self.window.emit(known, known.last_resp, now)
                return
            raise ProtocolError("IKE_SA_INIT for an SPI already in use")
        peer = ctx.peer_for(src[0])
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
        n_half = len(store.half_open)
        if n_half >= ctx.settings.max_half_open or \
                len(store.by_spi) >= ctx.settings.max_ike_sas:
            ctx.counters["half_open_refused"] += 1
            raise ProtocolError("too many half-open IKE SAs")
        if n_half >= ctx.settings.cookie_threshold:
            expected = self._cookie(nonce.nonce, src, h.spi_i)
            first = msg.payloads[0] if msg.payloads else None
            if not (isinstance(first, NotifyPayload) and first.notify == Notify.COOKIE
                    and std_hmac.compare_digest(first.data, expected)):
                ctx.counters["cookies_sent"] += 1
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
        sa = store.new_sa(peer, initiator=False, now=now)
        sa.local, sa.remote = dst, src
        sa.spi_i, sa.spi_r = h.spi_i, store.new_ike_spi()
        sa.chosen, sa.dh, sa.ni, sa.nr = chosen, dh, nonce.nonce, ctx.nonce()
        ctx.set_keys(sa, derive_ike_keys(
            prf_id=chosen.prf, encr=chosen.encr, key_bits=chosen.key_bits, integ=chosen.integ,
            shared=shared, ni=sa.ni, nr=sa.nr, spi_i=sa.spi_i, spi_r=sa.spi_r))
        check_nat(sa, msg, src, dst)
        if msg.notify(Notify.SIGNATURE_HASH_ALGORITHMS):
            sa.peer_hashes = parse_hashes(msg.notify(Notify.SIGNATURE_HASH_ALGORITHMS).data)
        sa.state = transition(sa.state, Trigger.INIT_REQUEST)
        sa.init_request = data
        # NAT-D hashes the SPIs as they appear in this response's header (§2.23).
        payloads: list[Payload] = [
            SaPayload(proposals=(chosen.to_proposal(b""),)),
            KePayload(group=dh.group, data=dh.public),
            NoncePayload(nonce=sa.nr),
            NotifyPayload(notify=Notify.NAT_DETECTION_SOURCE_IP,
                          data=ctx.rng(20) if peer.encap else
                          nat_hash(sa.spi_i, sa.spi_r, dst)),
            NotifyPayload(notify=Notify.NAT_DETECTION_DESTINATION_IP,
                          data=nat_hash(sa.spi_i, sa.spi_r, src)),
        ]
        cr = peer.credentials.certreq()
        if cr is not None:
            payloads.append(cr)
            payloads.append(NotifyPayload(notify=Notify.SIGNATURE_HASH_ALGORITHMS,
                                          data=SIG_HASHES))
        sa.frag_ok = peer.fragmentation and \
            msg.notify(Notify.IKEV2_FRAGMENTATION_SUPPORTED) is not None
        if sa.frag_ok:
            payloads.append(NotifyPayload(notify=Notify.IKEV2_FRAGMENTATION_SUPPORTED))
        resp = encode_message(Message(spi_i=sa.spi_i, spi_r=sa.spi_r,
                                      exchange=Exchange.IKE_SA_INIT, flags=Flag.RESPONSE,
                                      mid=0, payloads=tuple(payloads)))
        sa.init_response = resp
        sa.last_resp, sa.last_resp_mid, sa.expect_mid = resp, 0, 1
        store.by_spi[sa.spi_r] = sa
        sa.half_open_key = key
        store.half_open[key] = sa
        self.window.emit(sa, resp, now)

    def _reply_plain(self, h: Header, src: tuple[str, int], dst: tuple[str, int],
                     notify: NotifyPayload) -> None:
        """A stateless IKE_SA_INIT answer (COOKIE, INVALID_KE_PAYLOAD, NO_PROPOSAL_CHOSEN)."""
        data = encode_message(Message(spi_i=h.spi_i, spi_r=ZERO_SPI,
                                      exchange=Exchange.IKE_SA_INIT, flags=Flag.RESPONSE,
                                      mid=0, payloads=(notify,)))
        if dst[1] == NAT_T_PORT:
            data = NON_ESP_MARKER + data
        self.ctx.out.append(Datagram(data=data, src=dst, dst=src))

    def _cookie(self, ni: bytes, src: tuple[str, int], spi_i: bytes) -> bytes:
        # RFC 7296 §2.6: <VersionIDofSecret> | Hash(Ni | IPi | SPIi | <secret>)
        return b"\x00\x01" + hashlib.sha256(
            ni + addr_bytes(src[0]) + spi_i + self.ctx.cookie_secret).digest()


def check_nat(sa: IkeSa, msg: Message, peer_addr: tuple[str, int],
              our_addr: tuple[str, int]) -> None:
    """NAT detection (§2.23): whether a NAT is in front of the peer, of us, or both."""
    srcs = [n.data for n in msg.all(NotifyPayload)
            if n.notify == Notify.NAT_DETECTION_SOURCE_IP]
    dst = msg.notify(Notify.NAT_DETECTION_DESTINATION_IP)
    if srcs:
        sa.nat_remote = nat_hash(sa.spi_i, sa.spi_r if sa.initiator else ZERO_SPI,
                                 peer_addr) not in srcs
    if dst is not None:
        sa.nat_local = dst.data != nat_hash(
            sa.spi_i, sa.spi_r if sa.initiator else ZERO_SPI, our_addr)


def nat_hash(spi_i: bytes, spi_r: bytes, addr: tuple[str, int]) -> bytes:
    """NAT_DETECTION_*_IP data: SHA-1(SPIi | SPIr | IP | port) (§2.23), the IP address
    being 4 bytes for IPv4 and 16 for IPv6."""
    return hashlib.sha1(spi_i + spi_r + addr_bytes(addr[0]) + struct.pack("!H", addr[1]),
                        usedforsecurity=False).digest()


def parse_hashes(data: bytes) -> frozenset[int]:
    """The hash algorithms of a SIGNATURE_HASH_ALGORITHMS notify (RFC 7427)."""
    return frozenset(struct.unpack_from("!H", data, i)[0] for i in range(0, len(data) - 1, 2))


def notify_name(n: int) -> str:
    """A notify type by its name, or its number when it has none."""
    try:
        return Notify(n).name
    except ValueError:
        return str(n)
