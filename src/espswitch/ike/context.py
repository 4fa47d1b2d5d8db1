"""What every part of the IKE core shares: the SA store, the configuration, the outputs
(datagrams, events, errors, counters) and the few steps more than one exchange takes
(keys of a new IKE SA, an IKE SA up or closed, a CHILD_SA installed or removed)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from espswitch.ike.config import CoreSettings, PeerConfig
from espswitch.ike.crypto import IkeKeys, SkCipher
from espswitch.ike.errors import IkeError, LocalIkeError
from espswitch.ike.events import (
    ChildSaDeleted,
    ChildSaInstalled,
    Datagram,
    Event,
    IkeSaDown,
    IkeSaUp,
)
from espswitch.ike.fragment import Reassembler
from espswitch.ike.sas import ChildSa, IkeSa, SaStore
from espswitch.ike.state import ChildTrigger, IkeState, Trigger, transition

__all__ = ["MAX_ERRORS", "NONCE_LEN", "CoreContext"]

NONCE_LEN = 32
MAX_ERRORS = 64


class CoreContext:
    """The state one `IkeCore` shares with its exchange handlers (see the module doc)."""

    def __init__(self, settings: CoreSettings, rng: Callable[[int], bytes],
                 wallclock: Callable[[], Any] | None) -> None:
        self.peers: dict[str, PeerConfig] = {}
        self.settings = settings
        self.rng = rng
        self.wallclock = wallclock
        self.store = SaStore(rng)
        self.out: list[Datagram] = []
        self.events: deque[Event] = deque()
        self.errors: deque[IkeError] = deque(maxlen=MAX_ERRORS)
        self.counters: dict[str, int] = {
            "received": 0, "dropped": 0, "cookies_sent": 0, "retransmits": 0,
            "responses_resent": 0, "half_open_refused": 0,
        }
        self.frags = Reassembler(settings.fragments, self.counters)
        self.cookie_secret = rng(32)
        self.now = 0.0  # the time of the current entry point

    def peer(self, name: str) -> PeerConfig:
        """The configured peer called `name`; LocalIkeError if there is none."""
        try:
            return self.peers[name]
        except KeyError:
            raise LocalIkeError(f"no peer called {name!r}") from None

    def peer_for(self, addr: str) -> PeerConfig | None:
        """The configured peer at remote address `addr`, if any."""
        for p in self.peers.values():
            if p.remote_addr == addr:
                return p
        return None

    def nonce(self) -> bytes:
        """A fresh nonce of ours."""
        return self.rng(NONCE_LEN)

    def set_keys(self, sa: IkeSa, keys: IkeKeys) -> None:
        """Give `sa` its keys and the SK ciphers of both directions."""
        c = sa.chosen
        sa.keys = keys
        ski = SkCipher(encr=c.encr, enc_key=keys.sk_ei, integ=c.integ, integ_key=keys.sk_ai,
                       rng=self.rng)
        skr = SkCipher(encr=c.encr, enc_key=keys.sk_er, integ=c.integ, integ_key=keys.sk_ar,
                       rng=self.rng)
        sa.sk_out, sa.sk_in = (ski, skr) if sa.initiator else (skr, ski)

    def ike_up(self, sa: IkeSa, now: float, rekey_of: int | None = None) -> None:
        """`sa` is established: schedule its rekey and say so."""
        jitter = int.from_bytes(self.rng(2), "big") / 65535 * 0.1
        sa.rekey_at = now + sa.peer.ike_rekey_time * (1 - jitter)
        sa.last_recv = now
        self.events.append(IkeSaUp(
            ike_id=sa.uid, peer=sa.peer.name, local_addr=sa.local, remote_addr=sa.remote,
            local_id=str(sa.peer.local_id), remote_id=str(sa.remote_identity),
            spi_i=sa.spi_i, spi_r=sa.spi_r, initiator=sa.initiator, nat=sa.encap,
            rekey_of=rekey_of))

    def install(self, sa: IkeSa, child: ChildSa, now: float, *, initiator: bool = False,
                ) -> None:
        """Install a negotiated CHILD_SA in `sa`, with its rekey and expiry times;
        `initiator`: we asked for it (the peer installed it before it answered)."""
        cfg = child.cfg
        jitter = int.from_bytes(self.rng(2), "big") / 65535 * 0.1
        child.rekey_at = now + cfg.rekey_time * (1 - jitter)
        child.expire_at = now + cfg.life_time
        child.fire(ChildTrigger.INSTALL)
        sa.children.append(child)
        self.events.append(ChildSaInstalled(
            ike_id=sa.uid, peer=sa.peer.name, child=cfg.name, spi_in=child.spi_in,
            spi_out=child.spi_out, transform=child.chosen.esp_transform_name,
            keymat_in=child.keymat_in, keymat_out=child.keymat_out, mode=child.mode,
            local_ts=child.local_ts, remote_ts=child.remote_ts, encap=sa.encap,
            local_addr=sa.local, remote_addr=sa.remote, rekey_of=child.rekey_of,
            initiator=initiator))

    def remove_child(self, sa: IkeSa, child: ChildSa, reason: str | None = None) -> None:
        """Take `child` out of `sa` (and say so when a `reason` is given)."""
        if child in sa.children:
            sa.children.remove(child)
            self.store.spis_in.discard(child.spi_in)
            if reason is not None:
                self.events.append(ChildSaDeleted(
                    ike_id=sa.uid, peer=sa.peer.name, child=child.cfg.name,
                    spi_in=child.spi_in, spi_out=child.spi_out, reason=reason))

    def close(self, sa: IkeSa, reason: str, now: float, *, quiet: bool = False) -> None:
        """Close `sa` and its CHILD_SAs and forget it (IkeSaDown unless `quiet`)."""
        if sa.state is IkeState.CLOSED:
            return
        sa.state = transition(sa.state, Trigger.CLOSE)
        sa.outstanding = None
        sa.queue.clear()
        sa.candidates = []
        for c in list(sa.children):
            self.remove_child(sa, c, reason)
        self.store.drop_half_open(sa)
        self.frags.discard((sa, True), (sa, False))
        self.store.forget(sa)
        if not quiet:
            self.events.append(IkeSaDown(ike_id=sa.uid, peer=sa.peer.name, reason=reason))
