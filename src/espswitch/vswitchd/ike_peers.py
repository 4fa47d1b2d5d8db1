"""The IKE peers of espswitchd: which IKE-keyed ports the core knows, and how.

One IKE peer per remote endpoint: the leader, the tunnel that already leads or else the
first by name; the other tunnels to that endpoint (other VNIs) follow it and share its IKE
SA and CHILD_SA when their IKE settings agree (`PeerSync.sync`). A port replaced by one
with the same IKE settings (another option changed) keeps its SAs; one whose IKE settings
change gets a new peer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import ovs.vlog

from espswitch.datapath.encap import GRE as GRE_PROTO
from espswitch.datapath.errors import PortError
from espswitch.datapath.tunnel import ip_str
from espswitch.datapath.tunnel_port import IpsecTunnelPort
from espswitch.ike import ChildConfig, Credentials, IkeCore, IkeError, PeerConfig
from espswitch.ipsec.sa import Lifetime
from espswitch.vswitchd.ike_certs import CERT_OPTIONS, Certificates, subject_of

if TYPE_CHECKING:
    from espswitch.datapath import Datapath

__all__ = ["DPD_TIMEOUT_MIN", "RETRY", "IkePeer", "PeerSync", "command"]

vlog = ovs.vlog.Vlog("ike")

RETRY = 10.0  # seconds between attempts while a tunnel has no IKE SA
# A liveness check unanswered for dpd_delay seconds, and at least this long, means the
# peer is dead (it is retransmitted meanwhile).
DPD_TIMEOUT_MIN = 10.0


@dataclass
class IkePeer:
    """One IKE-keyed port as the core knows it."""

    cfg: PeerConfig
    port: IpsecTunnelPort
    local_ip: bytes
    next_try: float = 0.0
    last_error: str | None = None
    # rekey_packets/rekey_bytes, and the outbound SPI whose volume rekey was started
    soft: Lifetime = field(default_factory=Lifetime)
    rekey_asked: int | None = None


class PeerSync:
    """The core's peers kept in step with the datapath's IKE-keyed ports; `changed` says
    that a port's IKE state (SAs, errors) changed since the daemon last wrote it back."""

    def __init__(self, dp: Datapath, core: IkeCore, certs: Certificates) -> None:
        self.dp, self.core, self.certs = dp, core, certs
        self.peers: dict[str, IkePeer] = {}
        self.changed = False
        self._oc_key: tuple = ()

    def sync(self, now: float) -> None:
        """Make the core's peers match the IKE-keyed ports of the datapath."""
        want = {p.name: p for p in self.dp.ports.values()
                if isinstance(p, IpsecTunnelPort) and p.ike is not None}
        oc = self.certs.other_config()
        # Other paths, or files that changed since they were loaded (`Certificates.epoch`).
        oc_key = (*(oc.get(k) for k in CERT_OPTIONS), self.certs.epoch)
        certs_changed, self._oc_key = oc_key != self._oc_key, oc_key
        # One IKE peer per remote endpoint: its leader, the tunnel that already leads or else
        # the first by name; the other tunnels to that endpoint (other VNIs) follow it and
        # share its IKE SA and CHILD_SA.
        groups: dict[bytes, list[str]] = {}
        for name in sorted(want):
            groups.setdefault(want[name].remote_ip, []).append(name)
        leads: dict[str, list[str]] = {}
        for names in groups.values():
            lead = next((n for n in names if n in self.peers), names[0])
            leads[lead] = [n for n in names if n != lead]
        for name in [n for n in self.peers if n not in leads]:
            self.drop(name, now)
        for name in leads:
            port = want[name]
            p = self.peers.get(name)
            if p is not None and p.port is port and p.local_ip == port.local_ip and not (
                    certs_changed and p.cfg.credentials.uses_certs):
                continue
            if port.local_ip is None:
                if p is not None:
                    self.drop(name, now)
                port.ike_error = port.route_problem or "no local_ip: no route to remote_ip"
                continue
            try:
                cfg = self._peer_config(port)
            except (IkeError, PortError, OSError, ValueError) as e:
                if p is not None:
                    self.drop(name, now)
                if port.ike_error != str(e):
                    vlog.warn(f"{name}: {e}")
                port.ike_error = str(e)
                continue
            if p is not None and p.cfg == cfg:
                # The same tunnel in a new port object (another option changed): its SAs
                # move over with their sequence numbers and replay windows.
                old, p.port, p.local_ip = p.port, port, port.local_ip
                p.soft = Lifetime(packets=port.ike.rekey_packets, bytes=port.ike.rekey_bytes)
                if old is not port:
                    self._move_children(old, port)
                continue
            if p is not None:
                self.drop(name, now)
            self.core.add_peer(cfg)
            ike = port.ike
            soft = Lifetime(packets=ike.rekey_packets, bytes=ike.rekey_bytes)
            self.peers[name] = IkePeer(cfg=cfg, port=port, local_ip=port.local_ip, soft=soft)
            vlog.info(f"{name}: IKEv2 with {cfg.remote_addr} from {cfg.local_addr} "
                      f"({'certificates' if cfg.credentials.uses_certs else 'PSK'}, "
                      f"ike={cfg.ike_proposals}, esp={ike.esp}, mode={port.mode})")
            self.changed = True
        self._link_followers(want, leads)

    def _link_followers(self, want: dict[str, IpsecTunnelPort],
                        leads: dict[str, list[str]]) -> None:
        """Point each follower at its leader when their IKE settings agree; a follower
        whose settings differ stays `connecting`, with the reason in status:ike_error."""
        for lead, names in leads.items():
            leader = want[lead]
            leader.follow(None)
            leader.followers = {}
            p = self.peers.get(lead)
            for name in names:
                port = want[name]
                port.followers = {}
                error = self._follow_error(port, leader, p)
                if error is None:
                    port.follow(leader)
                    leader.followers[port.vni] = port
                    if port.ike_error is not None:
                        port.ike_error = None
                        self.changed = True
                    continue
                port.follow(None)
                if port.ike_error != error:
                    vlog.warn(f"{name}: {error}")
                    port.ike_error = error
                    self.changed = True

    def _follow_error(self, port: IpsecTunnelPort, leader: IpsecTunnelPort,
                      p: IkePeer | None) -> str | None:
        """Why `port` cannot share the IKE SA of `leader` (same remote_ip), or None."""
        lead = leader.name
        if p is None or p.port is not leader:
            return f"shares remote_ip with IKE-keyed interface {lead}, which is not keyed"
        if port.TYPE != leader.TYPE:
            return (f"shares remote_ip with IKE-keyed interface {lead}, a {leader.TYPE} "
                    f"tunnel: one IKE SA keys both, so they must be of one type")
        if port.local_ip != leader.local_ip or port.dst_port != leader.dst_port:
            return (f"shares remote_ip with IKE-keyed interface {lead} but not its local_ip "
                    "and dst_port")
        try:
            cfg = self._peer_config(port)
        except (IkeError, PortError, OSError, ValueError) as e:
            return str(e)
        if replace(cfg, name=p.cfg.name) != p.cfg:
            return (f"shares remote_ip with IKE-keyed interface {lead}, whose IKE and ESP "
                    "options (psk or certificates, ike, esp, ipsec_mode, rekey and dpd "
                    "settings, ipsec_encapsulation) differ: one IKE SA keys both, so they "
                    "must agree")
        return None

    def _peer_config(self, port: IpsecTunnelPort) -> PeerConfig:
        ike = port.ike
        local, remote = ip_str(port.local_ip), ip_str(port.remote_ip)
        children = tuple(
            ChildConfig(name=name, mode=str(port.mode), esp_proposals=ike.esp,
                        local_ts=local_ts, remote_ts=remote_ts, rekey_time=ike.rekey_time)
            for name, local_ts, remote_ts in child_selectors(port))
        if ike.psk is not None:
            creds = Credentials(psk=ike.psk)
            local_id, remote_id = local, ike.remote_name or remote
        else:
            creds, remote_subject = self.certs.for_remote(ike.remote_cert)
            local_id = subject_of(creds.cert)
            remote_id = ike.remote_name or remote_subject
        return PeerConfig(
            name=port.name, local_addr=local, remote_addr=remote, credentials=creds,
            local_id=local_id, remote_id=remote_id, ike_proposals=ike.ike,
            children=children, ike_rekey_time=ike.ike_rekey_time, dpd_delay=ike.dpd_delay,
            dpd_timeout=max(ike.dpd_delay, DPD_TIMEOUT_MIN), encap=port.encap)

    def drop(self, name: str, now: float) -> None:
        """Forget the peer of interface `name`: its IKE SAs deleted, its CHILD_SAs removed."""
        p = self.peers.pop(name)
        command(self.core.remove_peer, name, now)
        p.port.remove_all_children()
        vlog.info(f"{name}: IKE peer {p.cfg.remote_addr} removed")
        self.changed = True

    def _move_children(self, old: IpsecTunnelPort, new: IpsecTunnelPort) -> None:
        for sa_out, sa_in in old.child_sas():
            if sa_out.expired or sa_in.expired:
                continue
            sends, rx_ports = old.esp.child_role(sa_in.spi)
            old.release_child(sa_in.spi)
            try:
                new.adopt_child(sa_out, sa_in, sends, rx_ports)
            except PortError as e:
                vlog.warn(f"{new.name}: {e}")



def child_selectors(port: IpsecTunnelPort) -> list[tuple[str, str, str]]:
    """The CHILD_SAs an IKE-keyed tunnel negotiates: (name, local_ts, remote_ts), `dynamic`
    being each tunnel endpoint (an IPv4 or an IPv6 address, as the underlay's: the
    selectors are then TS_IPV4_ADDR_RANGE or TS_IPV6_ADDR_RANGE).

    `vxlanipsec`: one CHILD_SA for UDP between the two endpoints, any ports: it carries
    VXLAN both ways (each side's source port is a hash of the inner flow), and the datapath
    narrows what it accepts to UDP to dst_port after decryption. Open vSwitch's own types
    take the selectors ovs-monitor-ipsec gives them, so that a peer configured by it (or
    as it would) agrees: `gre` one CHILD_SA for IP protocol 47 between the endpoints;
    `vxlan` and `geneve` two, UDP to the peer's dst_port ("out", which protects what this
    side sends) and UDP to ours ("in", which protects what the peer sends)."""
    enc = port.encapsulation
    if port.TYPE == "vxlanipsec":
        return [("vxlan", "dynamic[udp]", "dynamic[udp]")]
    if enc.PROTO == GRE_PROTO:
        return [("gre", "dynamic[gre]", "dynamic[gre]")]
    udp_port = f"dynamic[udp/{enc.dst_port}]"
    return [("out", "dynamic[udp]", udp_port), ("in", udp_port, "dynamic[udp]")]


def child_in_use(core: IkeCore, name: str, port: IpsecTunnelPort) -> str | None:
    """The name of the CHILD_SA whose pair protects what `port` (peer `name`) sends: the one
    a CHILD_SA rekey is about (a VXLAN or Geneve tunnel also has a receive-only one)."""
    sa_in = port.sa_in
    if sa_in is None:
        return None
    return next((c.name for s in core.ike_sas(name) for c in s.children
                 if c.spi_in == sa_in.spi), None)


def command(fn: Callable[..., None], name: str, now: float, *args: object) -> str | None:
    """Run a core command for peer `name`; its error as text, or None."""
    try:
        fn(name, now, *args)
    except IkeError as e:
        return str(e)
    return None
