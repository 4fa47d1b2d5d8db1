"""The CREATE_CHILD_SA exchange (RFC 7296 §1.3, §2.8, §2.9, §2.17, §2.18): both roles.

`CreateChildSa`: CHILD_SAs (also the first one, which IKE_AUTH carries): proposals, traffic
selectors (narrowed, and through a NAT, §2.23.1), keying material, timed and requested
rekeys, expiry, and crossing CHILD_SA rekeys (§2.8.1: the SA made with the lowest nonce
goes). `IkeRekey`: the IKE SA rekey, which moves the CHILD_SAs to the new IKE SA, and
crossing IKE SA rekeys (§2.8.2). Every CHILD_SA state change is a `ChildTrigger`.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import replace
from typing import Any

from espswitch.ike.addr import addr_bytes
from espswitch.ike.config import ChildConfig
from espswitch.ike.consts import Exchange, Group, Notify, Protocol
from espswitch.ike.context import CoreContext
from espswitch.ike.crypto import DhKey, derive_child_keymat, derive_ike_keys
from espswitch.ike.errors import ProtocolError
from espswitch.ike.events import ChildSaExpired
from espswitch.ike.message import (
    KePayload,
    Message,
    NoncePayload,
    NotifyPayload,
    Payload,
    SaPayload,
    TrafficSelector,
    TsPayload,
)
from espswitch.ike.proposals import Chosen, choose
from espswitch.ike.sas import ChildSa, IkeSa, Request
from espswitch.ike.state import ChildState, ChildTrigger, IkeState, Trigger, transition
from espswitch.ike.ts import narrow, resolve_dynamic, single_host, ts_subset
from espswitch.ike.window import Window
from espswitch.ipsec import parse_transform

__all__ = ["CreateChildSa", "IkeRekey"]

PFS_GROUPS = (Group.MODP2048, Group.MODP3072, Group.ECP256, Group.ECP384, Group.CURVE25519)


class CreateChildSa:
    """CHILD_SAs of one core: their negotiation, rekeys and expiry; `ike_rekey` takes the
    CREATE_CHILD_SA requests that rekey the IKE SA."""

    def __init__(self, ctx: CoreContext, window: Window) -> None:
        self.ctx, self.window = ctx, window
        self.ike_rekey = IkeRekey(ctx, window)
        window.register("create_child", self._start_create)
        window.register("rekey_child", self._start_rekey, self._rekey_refused)
        window.register("rekey_ike", self.ike_rekey.start)

    # -- commands and timers ---------------------------------------------------------------

    def request_rekey(self, sa: IkeSa, child: ChildSa) -> None:
        """Queue our rekey of `child` (nothing if one is already queued or out)."""
        if child.state is ChildState.INSTALLED:
            child.fire(ChildTrigger.QUEUE_REKEY)
            self.window.queue(sa, "rekey_child", child)

    def on_timer(self, sa: IkeSa, now: float) -> None:
        """Expire the CHILD_SAs of `sa` past their life time, queue the rekeys due."""
        for c in list(sa.children):
            if now >= c.expire_at and c.state is not ChildState.DELETING:
                self.ctx.remove_child(sa, c)
                c.fire(ChildTrigger.EXPIRE)
                self.ctx.events.append(ChildSaExpired(
                    ike_id=sa.uid, peer=sa.peer.name, child=c.cfg.name,
                    spi_in=c.spi_in, spi_out=c.spi_out))
                self.window.queue(sa, "delete_child", c)
            elif c.state is ChildState.INSTALLED and now >= c.rekey_at:
                self.request_rekey(sa, c)

    def _rekey_refused(self, sa: IkeSa, child: ChildSa) -> None:
        if child.state is ChildState.REKEY_QUEUED:
            child.fire(ChildTrigger.DROP_REKEY)

    # -- selectors and keys ----------------------------------------------------------------

    def request_payloads(self, sa: IkeSa, child: ChildSa, *, pfs: bool,
                         ts: tuple | None = None) -> list[Payload]:
        """[N(USE_TRANSPORT_MODE)], SA, TSi, TSr of our request for `child`."""
        cfg = child.cfg
        specs = cfg.esp if pfs else tuple(replace(s, dh=()) for s in cfg.esp)
        spi = struct.pack("!I", child.spi_in)
        out: list[Payload] = []
        if cfg.mode == "transport":
            out.append(NotifyPayload(notify=Notify.USE_TRANSPORT_MODE))
        out.append(SaPayload(proposals=tuple(s.to_proposal(i + 1, spi)
                                             for i, s in enumerate(specs))))
        tsi, tsr = ts or _our_ts(sa, cfg)
        out += [TsPayload(selectors=tsi, initiator=True),
                TsPayload(selectors=tsr, initiator=False)]
        return out

    def respond_child(self, sa: IkeSa, msg: Message, ni: bytes, nr: bytes, *,
                      in_auth: bool, shared: bytes | None = None,
                      cfg: ChildConfig | None = None) -> tuple[ChildSa, list[Payload]]:
        """Responder side of a CHILD_SA negotiation: choose, narrow, derive keys."""
        sa_p = msg.get(SaPayload)
        tsi, tsr = msg.get(TsPayload, initiator=True), msg.get(TsPayload, initiator=False)
        if sa_p is None or tsi is None or tsr is None:
            raise ProtocolError("CHILD_SA request without SA, TSi or TSr",
                                notify=Notify.INVALID_SYNTAX)
        ke = msg.get(KePayload)
        candidates = [cfg] if cfg is not None else list(sa.peer.children)
        if len(candidates) > 1:
            # The configuration whose selectors hold all of the offered ones comes first:
            # a peer's CHILD_SA for UDP to our port must not be narrowed into ours for UDP
            # to its port (Open vSwitch's two CHILD_SAs of a VXLAN tunnel).
            candidates.sort(key=lambda c: not _holds(sa, c, tsi.selectors, tsr.selectors))
        last: ProtocolError | None = None
        for c in candidates:
            local, remote = _nat_ts(sa, c, tsi.selectors, tsr.selectors)
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
            child = ChildSa(c)
            child.mode = "transport" if transport and c.mode == "transport" else "tunnel"
            child.chosen = chosen
            child.spi_out = struct.unpack("!I", chosen.spi)[0]
            child.spi_in = self.ctx.store.new_child_spi()
            child.local_ts, child.remote_ts = n_tsr, n_tsi
            child.nonces = (ni, nr)
            i2r, r2i = _keymat(sa, chosen, ni, nr, shared)
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

    def finish_child(self, sa: IkeSa, msg: Message, child: ChildSa, ni: bytes, nr: bytes,
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
            local, remote = _nat_ts(sa, child.cfg, tsr.selectors, tsi.selectors)
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
        i2r, r2i = _keymat(sa, chosen, ni, nr, shared)
        child.keymat_out, child.keymat_in = i2r, r2i
        self.ctx.install(sa, child, now, initiator=True)

    # -- initiator -------------------------------------------------------------------------

    def _start_create(self, sa: IkeSa, cfg: ChildConfig, now: float) -> None:
        self._start_create_child(sa, cfg, now)

    def _start_rekey(self, sa: IkeSa, old: ChildSa, now: float) -> None:
        if old in sa.children and old.state is ChildState.REKEY_QUEUED:
            self._start_create_child(sa, old.cfg, now, old=old)

    def _start_create_child(self, sa: IkeSa, cfg: ChildConfig, now: float,
                            old: ChildSa | None = None) -> None:
        child = ChildSa(cfg)
        child.spi_in = self.ctx.store.new_child_spi()
        ni = self.ctx.nonce()
        dh = DhKey(cfg.pfs_group) if cfg.pfs_group else None
        payloads: list[Payload] = []
        if old is not None:
            child.rekey_of = old.spi_in
            payloads.append(NotifyPayload(notify=Notify.REKEY_SA, protocol=Protocol.ESP,
                                          spi=struct.pack("!I", old.spi_in)))
            old.fire(ChildTrigger.START_REKEY)
        cp = self.request_payloads(
            sa, child, pfs=True, ts=(old.local_ts, old.remote_ts) if old else None)
        # Order of §1.3.1: [N(REKEY_SA)], SA, Ni, [KEi], TSi, TSr
        sa_idx = next(i for i, p in enumerate(cp) if isinstance(p, SaPayload))
        extra: list[Payload] = [NoncePayload(nonce=ni)]
        if dh is not None:
            extra.append(KePayload(group=dh.group, data=dh.public))
        payloads += cp[: sa_idx + 1] + extra + cp[sa_idx + 1 :]
        self.window.request(sa, "rekey_child" if old else "create_child",
                            Exchange.CREATE_CHILD_SA, payloads, self._on_response,
                            (child, old, ni, dh), now, self._on_error)

    def _on_response(self, sa: IkeSa, msg: Message, ctx: tuple, now: float) -> None:
        child, old, ni, dh = ctx
        err = msg.error_notify()
        if err is not None:
            self.ctx.store.spis_in.discard(child.spi_in)
            if old is not None and old in sa.children:
                if err.notify == Notify.CHILD_SA_NOT_FOUND:
                    self.ctx.remove_child(sa, old, "peer does not know it")
                    return
                # TEMPORARY_FAILURE (a collision) or a refusal: try again a bit later.
                old.fire(ChildTrigger.REKEY_FAILED)
                old.rekey_at = now + 1.0 + self.ctx.rng(1)[0] / 64
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
        self.finish_child(sa, msg, child, ni, nonce.nonce, shared, now)
        if old is None:
            return
        old.our_rekey = child
        old.fire(ChildTrigger.REKEY_DONE)
        peer_new = old.peer_rekey
        # §2.8.1: when both rekeyed, the SA made with the lowest nonce goes, closed by the
        # end that created it; the winner's creator deletes the old SA.
        if peer_new is not None and peer_new in sa.children and \
                min(child.nonces) < min(peer_new.nonces):
            self.window.queue(sa, "delete_child", child)
            return
        self.window.queue(sa, "delete_child", old)

    def _on_error(self, sa: IkeSa, req: Request, e: ProtocolError, now: float) -> None:
        child, old = req.ctx[0], req.ctx[1]
        self.ctx.store.spis_in.discard(child.spi_in)
        if old is not None and old.state is ChildState.REKEYING:
            old.fire(ChildTrigger.REKEY_FAILED)
            old.rekey_at = now + 5.0

    # -- responder -------------------------------------------------------------------------

    def on_request(self, sa: IkeSa, msg: Message, now: float) -> list[Payload]:
        """The peer's CREATE_CHILD_SA request (a new or rekeyed CHILD_SA, or an IKE SA
        rekey): the payloads of our response (or ProtocolError)."""
        sa_p, nonce = msg.get(SaPayload), msg.get(NoncePayload)
        if sa_p is None or nonce is None:
            raise ProtocolError("CREATE_CHILD_SA without SA or Nonce",
                                notify=Notify.INVALID_SYNTAX)
        if any(p.protocol == Protocol.IKE for p in sa_p.proposals):
            return self.ike_rekey.on_request(sa, msg, nonce.nonce, now)
        ke = msg.get(KePayload)
        rekey = msg.notify(Notify.REKEY_SA)
        old = None
        if rekey is not None:
            if rekey.protocol != Protocol.ESP or len(rekey.spi) != 4:
                raise ProtocolError("bad REKEY_SA", notify=Notify.INVALID_SYNTAX)
            spi = struct.unpack("!I", rekey.spi)[0]
            old = next((c for c in sa.children if c.spi_out == spi), None)
            if old is None or old.state is ChildState.DELETING:
                raise ProtocolError("rekey of an unknown CHILD_SA",
                                    notify=Notify.CHILD_SA_NOT_FOUND)
        nr = self.ctx.nonce()
        shared = dh = None
        if ke is not None:
            if ke.group not in PFS_GROUPS:
                raise ProtocolError("unsupported PFS group", notify=Notify.NO_PROPOSAL_CHOSEN)
            dh = DhKey(ke.group)
            shared = dh.shared(ke.data)
        child, cp = self.respond_child(sa, msg, nonce.nonce, nr, in_auth=False, shared=shared,
                                       cfg=old.cfg if old else None)
        out: list[Payload] = [cp[0], NoncePayload(nonce=nr)]
        if dh is not None:
            out.append(KePayload(group=dh.group, data=dh.public))
        out += cp[1:]
        if old is not None:
            child.rekey_of = old.spi_in
            old.peer_rekey = child
            ours = old.our_rekey
            if old.state is ChildState.REKEYED and ours is not None and \
                    ours in sa.children and min(ours.nonces) < min(child.nonces):
                # Our rekey finished first but made the redundant SA (§2.8.1).
                self.window.queue(sa, "delete_child", ours)
        self.ctx.install(sa, child, now)
        return out


class IkeRekey:
    """The IKE SA rekey (§2.18) with CREATE_CHILD_SA, and its collisions (§2.8.2)."""

    def __init__(self, ctx: CoreContext, window: Window) -> None:
        self.ctx, self.window = ctx, window

    def start(self, sa: IkeSa, _ctx: Any, now: float) -> None:
        """Send our rekey of `sa`: a new SPI, nonce and KE of the same group."""
        cfg = sa.peer
        spi = self.ctx.store.new_ike_spi()
        ni = self.ctx.nonce()
        dh = DhKey(sa.chosen.dh)
        props = tuple(s.to_proposal(i + 1, spi, first_group=dh.group)
                      for i, s in enumerate(cfg.ike))
        payloads: list[Payload] = [SaPayload(proposals=props), NoncePayload(nonce=ni),
                                   KePayload(group=dh.group, data=dh.public)]
        self.window.request(sa, "rekey_ike", Exchange.CREATE_CHILD_SA, payloads,
                            self._on_response, (spi, ni, dh), now)

    def _on_response(self, sa: IkeSa, msg: Message, ctx: tuple, now: float) -> None:
        spi, ni, dh = ctx
        err = msg.error_notify()
        if err is not None:
            if sa.crossing is None:
                sa.rekey_at = now + 2.0 + self.ctx.rng(1)[0] / 32
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
            self._settle_collision(sa, ours, theirs, now)
        else:
            # §2.8: the initiator of the rekey deletes the old IKE SA.
            self.window.queue(sa, "delete_ike", None)

    def _settle_collision(self, old: IkeSa, ours: IkeSa, theirs: IkeSa, now: float) -> None:
        """Both crossing IKE SA rekeys completed (§2.8.2): of the two new SAs, the one made
        with the lowest of the four nonces goes, deleted by the end that created it; the
        CHILD_SAs live on in the other, whose creator deletes the old SA."""
        if min(ours.ni, ours.nr) < min(theirs.ni, theirs.nr):
            loser, winner = ours, theirs
        else:
            loser, winner = theirs, ours
        self.adopt(winner, loser)
        loser.state = transition(loser.state, Trigger.REKEYED)
        loser.rekeyed_at = now
        if loser is ours:
            self.window.queue(loser, "delete_ike", None)
        else:
            self.window.queue(old, "delete_ike", None)

    def adopt(self, new: IkeSa, old: IkeSa) -> None:
        """Move the CHILD_SAs of `old` to `new`, with the requests queued about them."""
        new.children += old.children
        old.children = []
        keep: deque[tuple[str, Any]] = deque()
        for kind, ctx in old.queue:
            if kind in ("create_child", "rekey_child", "delete_child"):
                self.window.queue(new, kind, ctx)
            else:
                keep.append((kind, ctx))
        old.queue = keep

    def _rekeyed_ike(self, old: IkeSa, chosen: Chosen, shared: bytes, ni: bytes, nr: bytes,
                     spi_i: bytes, spi_r: bytes, *, initiator: bool, now: float) -> IkeSa:
        """Make the IKE SA that replaces `old` (§2.18) and move the CHILD_SAs to it."""
        new = self.ctx.store.new_sa(old.peer, initiator=initiator, now=now)
        new.local, new.remote = old.local, old.remote
        new.nat_local, new.nat_remote = old.nat_local, old.nat_remote
        new.frag_ok = old.frag_ok  # negotiated once, in IKE_SA_INIT
        new.peer_hashes, new.remote_identity = old.peer_hashes, old.remote_identity
        new.spi_i, new.spi_r, new.ni, new.nr, new.chosen = spi_i, spi_r, ni, nr, chosen
        self.ctx.set_keys(new, derive_ike_keys(
            prf_id=chosen.prf, encr=chosen.encr, key_bits=chosen.key_bits, integ=chosen.integ,
            shared=shared, ni=ni, nr=nr, spi_i=spi_i, spi_r=spi_r, old_sk_d=old.keys.sk_d,
            old_prf=old.chosen.prf))
        new.state = transition(new.state, Trigger.BORN_FROM_REKEY)
        new.born_of = old
        self.adopt(new, old)
        self.ctx.store.by_spi[new.our_spi] = new
        old.state = transition(old.state, Trigger.REKEYED)
        old.rekeyed_at = now
        self.ctx.ike_up(new, now, rekey_of=old.uid)
        return new

    def on_request(self, sa: IkeSa, msg: Message, ni: bytes, now: float) -> list[Payload]:
        """The peer's rekey of `sa`: the payloads of our response (or ProtocolError)."""
        # Our own IKE SA rekey is out too: a crossing rekey. Both complete, and when ours
        # does, the redundant new SA goes (§2.8.2, `_settle_collision`).
        crossing = sa.outstanding is not None and sa.outstanding.kind == "rekey_ike"
        if not crossing and (sa.outstanding is not None or any(
                c.state in (ChildState.REKEYING, ChildState.DELETING) for c in sa.children)):
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
        nr = self.ctx.nonce()
        spi_r = self.ctx.store.new_ike_spi()
        new = self._rekeyed_ike(sa, chosen, shared, ni, nr, chosen.spi, spi_r,
                                initiator=False, now=now)
        if crossing:
            sa.crossing = new
        # What is left queued on the old SA (DPD, its own rekey) has no point any more.
        sa.queue.clear()
        return [SaPayload(proposals=(chosen.to_proposal(spi_r),)), NoncePayload(nonce=nr),
                KePayload(group=dh.group, data=dh.public)]


def _our_ts(sa: IkeSa, cfg: ChildConfig, *, local_addr: bytes | None = None,
            remote_addr: bytes | None = None) -> tuple[tuple, tuple]:
    local_addr = local_addr or addr_bytes(sa.local[0])
    remote_addr = remote_addr or addr_bytes(sa.remote[0])
    local = tuple(resolve_dynamic(t, local_addr) for t in cfg.local_ts)
    remote = tuple(resolve_dynamic(t, remote_addr) for t in cfg.remote_ts)
    return local, remote


def _nat_ts(sa: IkeSa, cfg: ChildConfig, theirs: tuple[TrafficSelector, ...],
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
    return _our_ts(sa, cfg, local_addr=local_addr, remote_addr=remote_addr)


def _holds(sa: IkeSa, cfg: ChildConfig, tsi: tuple[TrafficSelector, ...],
           tsr: tuple[TrafficSelector, ...]) -> bool:
    """Whether `cfg`'s selectors hold every offered one without narrowing (TSi the
    initiator's side, ours the responder's)."""
    local, remote = _nat_ts(sa, cfg, tsi, tsr)
    return all(any(ts_subset(t, x) for x in remote) for t in tsi) and \
        all(any(ts_subset(t, x) for x in local) for t in tsr)


def _keymat(sa: IkeSa, chosen: Chosen, ni: bytes, nr: bytes,
            shared: bytes | None) -> tuple[bytes, bytes]:
    n = parse_transform(chosen.esp_transform_name).keymat_len
    return derive_child_keymat(prf_id=sa.chosen.prf, sk_d=sa.keys.sk_d, ni=ni, nr=nr,
                               length=n, shared=shared)
