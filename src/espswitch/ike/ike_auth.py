"""The IKE_AUTH exchange (RFC 7296 §1.2, §2.15, §2.4): both roles.

Identities and their AUTH payloads (PSK or certificates, `espswitch.ike.auth` computes and
checks them), the first CHILD_SA carried along (negotiated by `create_child`), the IKE SA
up, INITIAL_CONTACT, and the IKE SA left over by crossing initiations.
"""

from __future__ import annotations

from espswitch.ike.auth import Identity, check_auth, make_auth, signed_octets, verify_peer_cert
from espswitch.ike.consts import CertEncoding, Exchange, Notify
from espswitch.ike.context import CoreContext
from espswitch.ike.create_child import CreateChildSa
from espswitch.ike.errors import ProtocolError, RemoteIkeError
from espswitch.ike.message import (
    AuthPayload,
    CertPayload,
    IdPayload,
    Message,
    NotifyPayload,
    Payload,
    SaPayload,
)
from espswitch.ike.sa_init import notify_name
from espswitch.ike.sas import ChildSa, IkeSa, Request
from espswitch.ike.state import ChildTrigger, IkeState, Trigger, transition
from espswitch.ike.window import Window

__all__ = ["IkeAuth"]

# Seconds an IKE SA left over by crossing initiations waits for the one that stays to have
# all its CHILD_SAs before it is deleted anyway (settle_duplicates).
DUPLICATE_GRACE = 5.0

# Notifies in an IKE_AUTH response that fail only the CHILD_SA, not the IKE SA (§1.2).
CHILD_ERRORS = frozenset({
    Notify.NO_PROPOSAL_CHOSEN, Notify.TS_UNACCEPTABLE, Notify.SINGLE_PAIR_REQUIRED,
    Notify.INTERNAL_ADDRESS_FAILURE, Notify.FAILED_CP_REQUIRED, Notify.INVALID_SELECTORS,
})


class IkeAuth:
    """IKE_AUTH for one core; `children` negotiates the CHILD_SA it carries."""

    def __init__(self, ctx: CoreContext, window: Window, children: CreateChildSa) -> None:
        self.ctx, self.window, self.children = ctx, window, children

    # -- initiator -------------------------------------------------------------------------

    def send_auth(self, sa: IkeSa, now: float, child_spi: int | None = None) -> None:
        """Our IKE_AUTH request, with the peer's first CHILD_SA (inbound SPI `child_spi`
        when given: a candidate's, see `IkeSaInit.pick_candidate`)."""
        cfg = sa.peer
        creds = cfg.credentials
        idi = cfg.local_id.payload(initiator=True)
        octets = signed_octets(message=sa.init_request, peer_nonce=sa.nr, prf_id=sa.chosen.prf,
                               sk_p=sa.keys.sk_pi, id_payload=idi)
        payloads: list[Payload] = [idi]
        payloads += creds.cert_payloads()
        if not any(o.uid != sa.uid and o.peer is cfg for o in self.ctx.store.all()):
            # §2.4: our first IKE SA with this peer; whatever it still holds of ours is stale.
            payloads.append(NotifyPayload(notify=Notify.INITIAL_CONTACT))
        if creds.uses_certs:
            payloads.append(creds.certreq())
        if cfg.remote_id is not None:
            payloads.append(cfg.remote_id.payload(initiator=False))
        payloads.append(make_auth(creds, octets, sa.chosen.prf, sa.peer_hashes))
        child = ChildSa(cfg.children[0])
        child.spi_in = self.ctx.store.new_child_spi() if child_spi is None else child_spi
        sa.first_child = child
        payloads += self.children.request_payloads(sa, child, pfs=False)
        self.window.request(sa, "auth", Exchange.IKE_AUTH, payloads, self._on_auth_response,
                            child, now, self._on_error)

    def _on_auth_response(self, sa: IkeSa, msg: Message, child: ChildSa, now: float) -> None:
        cfg = sa.peer
        err = msg.error_notify()
        if err is not None and err.notify not in CHILD_ERRORS:
            self.ctx.close(sa, f"peer refused IKE_AUTH: {notify_name(err.notify)}", now)
            return
        idr, auth = msg.get(IdPayload, initiator=False), msg.get(AuthPayload)
        if idr is None or auth is None:
            raise ProtocolError("IKE_AUTH response without IDr or AUTH",
                                notify=Notify.AUTHENTICATION_FAILED)
        self.authenticate_peer(sa, msg, idr, auth, sa.init_response, sa.ni, sa.keys.sk_pr)
        sa.state = transition(sa.state, Trigger.AUTH_RESPONSE)
        self._initial_contact(sa, msg, now)
        self.ctx.ike_up(sa, now)
        if err is None:
            try:
                self.children.finish_child(sa, msg, child, sa.ni, sa.nr, None, now)
            except ProtocolError as e:
                # The responder installed what we refuse: tell it to delete its half.
                self.ctx.errors.append(RemoteIkeError(str(e), notify=e.notify))
                child.fire(ChildTrigger.REFUSE)
                self.window.queue(sa, "delete_child", child)
        for extra in cfg.children[1:]:
            self.window.queue(sa, "create_child", extra)
        self._resolve_duplicates(sa, now)

    def _on_error(self, sa: IkeSa, req: Request, e: ProtocolError, now: float) -> None:
        if sa.sk_out is not None:
            # The responder thinks the SA is up (§2.21.2): tell it, once, then forget it.
            self.window.send_delete_once(
                sa, now, NotifyPayload(notify=Notify.AUTHENTICATION_FAILED))
        self.ctx.close(sa, f"IKE SA setup failed: {e}", now)

    # -- both ------------------------------------------------------------------------------

    def authenticate_peer(self, sa: IkeSa, msg: Message, idp: IdPayload, auth: AuthPayload,
                          their_init: bytes, our_nonce: bytes, sk_p: bytes) -> None:
        """Check the peer's identity, certificate and AUTH; ProtocolError if any fails."""
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
            cert = verify_peer_cert(cfg.credentials, certs, self.ctx.wallclock)
            if not ident.matched_by_cert(cert):
                raise ProtocolError(f"peer certificate does not vouch for {ident}",
                                    notify=Notify.AUTHENTICATION_FAILED)
        octets = signed_octets(message=their_init, peer_nonce=our_nonce, prf_id=sa.chosen.prf,
                               sk_p=sk_p, id_payload=idp)
        check_auth(cfg.credentials, auth, octets, sa.chosen.prf, cert)
        sa.remote_identity = ident

    # -- responder -------------------------------------------------------------------------

    def on_request(self, sa: IkeSa, msg: Message, now: float) -> list[Payload]:
        """The peer's IKE_AUTH request: the payloads of our response (or ProtocolError)."""
        cfg = sa.peer
        idi, auth = msg.get(IdPayload, initiator=True), msg.get(AuthPayload)
        if idi is None or auth is None:
            raise ProtocolError("IKE_AUTH without IDi or AUTH",
                                notify=Notify.AUTHENTICATION_FAILED)
        self.authenticate_peer(sa, msg, idi, auth, sa.init_request, sa.nr, sa.keys.sk_pi)
        creds = cfg.credentials
        idr = cfg.local_id.payload(initiator=False)
        octets = signed_octets(message=sa.init_response, peer_nonce=sa.ni,
                               prf_id=sa.chosen.prf, sk_p=sa.keys.sk_pr, id_payload=idr)
        out: list[Payload] = [idr, *creds.cert_payloads()]
        out.append(make_auth(creds, octets, sa.chosen.prf, sa.peer_hashes))
        sa.state = transition(sa.state, Trigger.AUTH_REQUEST)
        self.ctx.store.drop_half_open(sa)
        self._initial_contact(sa, msg, now)
        child = None
        if msg.get(SaPayload) is not None:
            try:
                child, cp = self.children.respond_child(sa, msg, sa.ni, sa.nr, in_auth=True)
                out += cp
            except ProtocolError as e:
                if not e.notify:
                    raise
                out.append(NotifyPayload(notify=e.notify))
        self.ctx.ike_up(sa, now)
        if child is not None:
            self.ctx.install(sa, child, now)
        self._resolve_duplicates(sa, now)
        return out

    def _initial_contact(self, sa: IkeSa, msg: Message, now: float) -> None:
        """INITIAL_CONTACT (§2.4): the peer holds no other IKE SA with us (it restarted), so
        ours with its identity are stale; they go now rather than at the next DPD."""
        if msg.notify(Notify.INITIAL_CONTACT) is None:
            return
        for other in self.ctx.store.all():
            # An IKE SA begun after this one was cannot be what a restart left behind: the
            # peer asserted INITIAL_CONTACT when it began this one, and an IKE_AUTH it
            # retransmitted late (crossing initiations) still carries it.
            if other.created >= sa.created:
                continue
            if other is not sa and other.remote_identity is not None and \
                    other.remote_identity.equivalent(sa.remote_identity) and \
                    other.state in (IkeState.ESTABLISHED, IkeState.REKEYED, IkeState.DELETING):
                # Tell it too, once: should the peer still hold this SA after all, it goes.
                self.window.send_delete_once(other, now)
                self.ctx.close(other, "peer restarted (INITIAL_CONTACT)", now)

    def _resolve_duplicates(self, sa: IkeSa, now: float) -> None:
        """Crossing initiations: of two IKE SAs with one peer, the one holding the lowest
        nonce goes (the rule §2.8.1 gives for rekeys), deleted by its initiator.

        Our own initiation still waiting for its IKE_SA_INIT response (lost, or the peer was
        not listening yet) is abandoned instead: once it came up late, deleting the older
        IKE SA would take CHILD_SAs in use with it while the new ones are still being made.
        The peer forgets its half-open SA, if it made one, by itself."""
        for other in list(self.ctx.store.all()):
            if other is not sa and other.peer is sa.peer and other.initiator and \
                    other.state is IkeState.INIT_SENT:
                self.ctx.close(other, f"abandoned: IKE SA #{sa.uid} with the peer is up", now)
        for other in self.ctx.store.all():
            if other is sa or other.peer is not sa.peer or \
                    other.state is not IkeState.ESTABLISHED:
                continue
            loser = sa if min(sa.ni, sa.nr) < min(other.ni, other.nr) else other
            if loser.initiator:
                loser.duplicate_of = other if loser is sa else sa
                loser.duplicate_until = now + DUPLICATE_GRACE
        self.settle_duplicates(now)

    def settle_duplicates(self, now: float) -> None:
        """Delete each IKE SA left over by crossing initiations (we are its initiator) once
        the one that stays has a CHILD_SA for each of its own, or DUPLICATE_GRACE after
        the crossing. Deleting it first would take pairs in use while the peer still
        installs their replacements: a CREATE_CHILD_SA we answered is installed on our
        side before the peer has it, and the delete, sent after that answer, reaches the
        peer after it too."""
        for sa in self.ctx.store.all():
            stays = sa.duplicate_of
            if stays is None:
                continue
            if sa.state is not IkeState.ESTABLISHED or \
                    stays.state not in (IkeState.ESTABLISHED, IkeState.REKEYED):
                sa.duplicate_of = None  # gone already, or the one to stay is going
                continue
            have = {c.cfg.name for c in stays.children}
            # REKEYED: the one that stays was rekeyed, its CHILD_SAs moved to its successor.
            if stays.state is IkeState.REKEYED or \
                    {c.cfg.name for c in sa.children} <= have or now >= sa.duplicate_until:
                sa.duplicate_of = None
                self.window.queue(sa, "delete_ike", None)
