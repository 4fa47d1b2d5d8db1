"""Configuration of the IKE core: one `PeerConfig` per remote peer, with its CHILD_SAs."""

from __future__ import annotations

from dataclasses import dataclass, field

from espswitch.ike.addr import canonical, is_v6
from espswitch.ike.auth import Credentials, Identity
from espswitch.ike.consts import Protocol
from espswitch.ike.errors import IkeConfigError
from espswitch.ike.fragment import DEFAULT_FRAGMENT_SIZE, MIN_FRAGMENT_SIZE, FragmentLimits
from espswitch.ike.message import TrafficSelector
from espswitch.ike.proposals import ProposalSpec, parse_proposals
from espswitch.ike.ts import parse_ts

__all__ = ["ChildConfig", "CoreSettings", "PeerConfig"]


def _ts_tuple(v: object) -> tuple[TrafficSelector, ...]:
    if isinstance(v, str):
        v = [x for x in v.split(",") if x.strip()]
    out = tuple(parse_ts(x) if isinstance(x, str) else x for x in v)  # type: ignore[union-attr]
    if not out:
        raise IkeConfigError("a CHILD_SA needs at least one traffic selector on each side")
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class ChildConfig:
    """One CHILD_SA: selectors (strongSwan syntax or TrafficSelector), mode, ESP proposals.

    `rekey_time` is when the CHILD_SA is rekeyed; `life_time` (default 110 % of it) is when
    it expires if the rekey did not happen.
    """

    name: str = "child"
    local_ts: tuple[TrafficSelector, ...] | str = "dynamic"
    remote_ts: tuple[TrafficSelector, ...] | str = "dynamic"
    mode: str = "tunnel"
    esp_proposals: str = "aes128gcm16"
    rekey_time: float = 3600.0
    life_time: float | None = None
    esp: tuple[ProposalSpec, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "local_ts", _ts_tuple(self.local_ts))
        object.__setattr__(self, "remote_ts", _ts_tuple(self.remote_ts))
        if self.mode not in ("tunnel", "transport"):
            raise IkeConfigError(f"mode must be tunnel or transport, not {self.mode!r}")
        object.__setattr__(self, "esp", parse_proposals(self.esp_proposals, Protocol.ESP))
        if self.rekey_time <= 0:
            raise IkeConfigError("rekey_time must be positive")
        if self.life_time is None:
            object.__setattr__(self, "life_time", self.rekey_time * 1.1)
        if self.life_time < self.rekey_time:
            raise IkeConfigError("life_time must not be shorter than rekey_time")

    @property
    def pfs_group(self) -> int | None:
        """The DH group for CREATE_CHILD_SA (PFS), or None."""
        spec = self.esp[0]
        return spec.dh[0] if spec.dh else None


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerConfig:
    """One remote peer (an OVS tunnel, a swanctl connection): addresses, identities,
    credentials, IKE proposals, CHILD_SAs and timers (seconds).

    A liveness check (DPD) goes out after `dpd_delay` seconds without a message from the
    peer. It is retransmitted like any request; the peer is declared dead (its SAs closed)
    when the retransmissions give up, or after `dpd_timeout` seconds when that is set.

    `fragmentation` announces IKE fragmentation (RFC 7383); when the peer does too,
    messages after IKE_SA_INIT that would make an IP datagram longer than `fragment_size`
    bytes go as fragments of at most that size.
    """

    name: str
    local_addr: str
    remote_addr: str
    credentials: Credentials
    local_id: Identity | str | None = None
    remote_id: Identity | str | None = None
    ike_proposals: str = "aes128gcm16-prfsha256-x25519"
    children: tuple[ChildConfig, ...] = (ChildConfig(),)
    ike_rekey_time: float = 14400.0
    dpd_delay: float = 30.0
    dpd_timeout: float | None = None
    encap: bool = False
    remote_port: int = 500
    retransmit_timeout: float = 2.0
    retransmit_base: float = 1.8
    retransmit_tries: int = 5
    keepalive_interval: float = 20.0
    fragmentation: bool = True
    fragment_size: int = DEFAULT_FRAGMENT_SIZE
    ike: tuple[ProposalSpec, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        for name in ("local_addr", "remote_addr"):
            try:
                # One spelling per address: the core compares them as text.
                object.__setattr__(self, name, canonical(getattr(self, name)))
            except ValueError:
                raise IkeConfigError(f"{name} must be an IPv4 or IPv6 address") from None
        if is_v6(self.local_addr) != is_v6(self.remote_addr):
            raise IkeConfigError("local_addr and remote_addr must be of one family "
                                 "(both IPv4 or both IPv6)")
        if self.local_id is None:
            object.__setattr__(self, "local_id", Identity.parse(self.local_addr))
        elif isinstance(self.local_id, str):
            object.__setattr__(self, "local_id", Identity.parse(self.local_id))
        if isinstance(self.remote_id, str):
            object.__setattr__(self, "remote_id", Identity.parse(self.remote_id))
        if self.credentials.uses_certs and self.credentials.cert is not None and not \
                self.local_id.matched_by_cert(self.credentials.cert):
            raise IkeConfigError(f"our certificate does not vouch for {self.local_id}")
        object.__setattr__(self, "ike", parse_proposals(self.ike_proposals, Protocol.IKE))
        if not self.children:
            raise IkeConfigError("a peer needs at least one CHILD_SA")
        if len({c.name for c in self.children}) != len(self.children):
            raise IkeConfigError("CHILD_SA names must be unique within a peer")
        for n in ("ike_rekey_time", "dpd_delay", "retransmit_timeout", "keepalive_interval"):
            if getattr(self, n) <= 0:
                raise IkeConfigError(f"{n} must be positive")
        if self.retransmit_tries < 1:
            raise IkeConfigError("retransmit_tries must be at least 1")
        if self.dpd_timeout is not None and self.dpd_timeout <= 0:
            raise IkeConfigError("dpd_timeout must be positive")
        if not MIN_FRAGMENT_SIZE <= self.fragment_size <= 65535:
            raise IkeConfigError(f"fragment_size must be {MIN_FRAGMENT_SIZE} to 65535 bytes")

    def child(self, name: str) -> ChildConfig:
        """The CHILD_SA configuration called `name`."""
        for c in self.children:
            if c.name == name:
                return c
        raise IkeConfigError(f"peer {self.name} has no CHILD_SA {name!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class CoreSettings:
    """Limits of the responder: cookies above `cookie_threshold` half-open SAs (RFC 7296
    §2.6), at most `max_half_open` of them, each dropped after `half_open_timeout`; and of
    IKE fragment reassembly (`fragments`, RFC 7383)."""

    cookie_threshold: int = 32
    max_half_open: int = 1024
    half_open_timeout: float = 30.0
    max_ike_sas: int = 4096
    fragments: FragmentLimits = field(default_factory=FragmentLimits)

    def __post_init__(self) -> None:
        if self.cookie_threshold < 0 or self.max_half_open < 1 or self.max_ike_sas < 1:
            raise IkeConfigError("bad core limits")
