"""A tunnel's protection: clear, or ESP (RFC 4303) with its SA pairs, SPI demux and
selectors, and the interface through which the IKE layer installs CHILD_SAs.

Outbound, a protection turns a batch of inner frames into the IP packets that carry them,
using its port's encapsulation (`push`) and underlay (`packet`, `l4`): clear puts the
underlay header in front of the encapsulated frame; ESP seals the encapsulated frame
(transport mode, next header = the encapsulation's protocol) or a whole inner IP packet of
the underlay's family (tunnel mode, next header 4 or 41), optionally in UDP/4500 (RFC
3948), behind an underlay header of protocol 50 (17). Over IPv6 the UDP checksums (the
encapsulation's, ESP-in-UDP's) are computed by the underlay: the sealed UDP is UDP over
IPv6 once opened, and a peer's stack may check it.

Inbound, clear tunnels get their frames from the tunnel layer's encapsulation demux; ESP to
a local endpoint (IP protocol 50, or UDP/4500 that is not IKE) is matched to its tunnel by
SPI (`IpsecLayer`), opened, checked against the SA's selectors (RFC 4301 §5.2), and only
then decapsulated. A protected tunnel never sends or accepts plaintext. A drop is a counted,
returned reason; nothing of a dropped packet is kept.

A tunnel is keyed manually (its options hold the SA pair) or by IKEv2: then it starts
without SAs ("connecting") and the daemon's IKE layer installs them with `install_child`,
retires them with `remove_child` and `remove_all_children`; the protection does no I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

from espswitch.datapath.counters import Counters
from espswitch.datapath.errors import PortError
from espswitch.datapath.fast import is_compiled, make_inbound_sa, make_outbound_sa
from espswitch.datapath.tunnel import ip_str
from espswitch.ike.options import IPSEC_OPTIONS, IkeKeying, ManualKeying, parse_ipsec_options
from espswitch.ipsec.errors import DropReason, IpsecConfigError, SaRefused
from espswitch.ipsec.policy import Selector
from espswitch.ipsec.sa import InboundSA, Mode, OutboundSA, SaParams
from espswitch.ipsec.sad import Sad

if TYPE_CHECKING:
    from espswitch.datapath.bridge import Bridge
    from espswitch.datapath.context import PortContext
    from espswitch.datapath.ports import Port
    from espswitch.datapath.tunnel_layer import TunnelLayer
    from espswitch.datapath.tunnel_port import TunnelPort

ESP_PROTO = 50
NH_IPV4 = 4
NH_IPV6 = 41
NAT_T_PORT = 4500
RETIRED_KEEP = 60.0  # seconds a closed tunnel's SAs may be taken over by its reopened self
_UDP = struct.Struct("!HHHH")
#: ((source port lo, hi), (destination port lo, hi)) an inbound SA's selectors allow
PortRanges = tuple[tuple[int, int], tuple[int, int]]


class Clear:
    """No protection: the encapsulated frame goes out as it is."""

    OPTIONS: ClassVar[frozenset[str]] = frozenset()
    COUNTERS: ClassVar[type[Counters]] = Counters

    def __init__(self, port: TunnelPort) -> None:
        self.port = port

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def run(self, now: float) -> None:
        pass

    def rebuild(self) -> None:
        """The route changed: nothing of a clear tunnel depends on it."""

    def overhead(self, l4_len: int) -> int:
        """Bytes this protection adds to `l4_len` bytes of encapsulated frame."""
        return 0

    def protect(self, frames: list[bytes]) -> tuple[list[bytes], int]:
        """The IPv4 packets that carry `frames`, and the inner bytes they carry."""
        port = self.port
        push = port.encapsulation.push
        header = port.underlay.header
        proto = port.encapsulation.PROTO
        out = []
        if port.underlay.V6:
            packet = port.underlay.packet
            for frame in frames:
                out.append(packet(proto, push(frame)))
            return out, sum(map(len, frames))
        for frame in frames:
            l4 = push(frame)
            out.append(header(proto, len(l4)) + l4)
        return out, sum(map(len, frames))

    def input_clear(self, frame: bytes) -> None:
        """An inner frame that arrived unprotected for this tunnel."""
        self.port.ctx.defer_rx(self.port, frame)

    def status(self) -> dict[str, str]:
        return {}

    def describe(self) -> list[str]:
        return []


class IpsecCounters(Counters):
    """Interface counters of a protected tunnel: the generic ones plus ESP drops by cause."""

    NAMES = (
        *Counters.NAMES,
        "esp_auth_failures",
        "esp_replay_drops",
        "esp_plaintext_drops",
        "esp_selector_drops",
        "esp_malformed",
        "esp_expired_drops",
    )
    DROP_CAUSES: ClassVar[dict[str, str]] = {
        **Counters.DROP_CAUSES,
        "esp_auth_failures": "rx_dropped",
        "esp_replay_drops": "rx_dropped",
        "esp_plaintext_drops": "rx_dropped",
        "esp_selector_drops": "rx_dropped",
        "esp_malformed": "rx_dropped",
        "esp_expired_drops": "rx_dropped",
    }


# Which interface counter each ESP drop reason goes to.
_RX_COUNTER = {
    DropReason.AUTH_FAILED: "esp_auth_failures",
    DropReason.REPLAYED: "esp_replay_drops",
    DropReason.TOO_OLD: "esp_replay_drops",
    DropReason.BAD_PADDING: "esp_malformed",
    DropReason.MALFORMED: "esp_malformed",
    DropReason.EXPIRED: "esp_expired_drops",
}


SEQ_RESERVE = 1 << 20  # sequence numbers reserved ahead of use for a manually keyed SA
MAX_MARKS = 4096  # SAs remembered; the least recently used is forgotten past that
ANY_PEER = "*"  # a mark stored before marks named the peer (it applies to every peer)

SaKey = tuple[str, int, str]  # (peer address, SPI, transform): the SA as the peer knows it


class SeqMarks:
    """Where manually keyed outbound SAs start, so that their sequence numbers never go
    back (sans-IO).

    A manually keyed SA is installed again, with the same keys, each time the daemon starts,
    and each time an option changes and changes back (spi_out 0x1001 -> 0x1003 -> 0x1001).
    Starting its sequence numbers at 1 again would make the peer, whose replay window is
    far ahead, drop everything as replays until the count caught up (RFC 4303 §3.4.3). So
    every SA the daemon has used is remembered by what names it at the peer (the peer's
    address, the SPI, the transform), with blocks of `SEQ_RESERVE` sequence numbers
    reserved ahead of use; the daemon stores the end of each reservation (the mark)
    durably, and an SA installed again starts at its mark, past anything it sent. A restart
    costs at most one reservation of the 2^32 sequence numbers. A new key under the same
    SPI starts at the mark too: harmless, and nothing about keys needs to be kept. Nothing
    secret is kept: peer, SPI, transform, number.
    """

    def __init__(self, marks: dict[SaKey, int] | None = None) -> None:
        self.marks: dict[SaKey, int] = dict(marks or {})  # SA -> first seq to use
        self.dirty = False

    def start_for(self, peer: str, params: SaParams) -> int:
        """The first sequence number of a new outbound SA to `peer`."""
        proposal = params.transform.proposal
        mark = max(self.marks.get((peer, params.spi, proposal), 1),
                   self.marks.get((ANY_PEER, params.spi, proposal), 1))
        seq_max = (1 << 64) - 1 if params.transform.esn else (1 << 32) - 1
        return max(1, min(mark, seq_max))

    def track(self, peer: str, sa: OutboundSA) -> None:
        """Reserve further ahead once `sa` has used half of its reservation."""
        key = (peer, sa.spi, sa.transform.proposal)
        mark = self.marks.get(key)
        if mark is None or sa.seq + SEQ_RESERVE // 2 > mark:
            self.marks.pop(key, None)  # re-inserted last: the dict is in order of use
            self.marks[key] = max(mark or 0, sa.seq + 1 + SEQ_RESERVE)
            while len(self.marks) > MAX_MARKS:
                del self.marks[next(iter(self.marks))]
            self.dirty = True


class IpsecLayer:
    """The inbound side shared by every protected tunnel: SPI -> SA -> tunnel."""

    def __init__(self, ctx: PortContext) -> None:
        self.ctx = ctx
        self.tunnels: TunnelLayer = ctx.tunnels
        self.sad = Sad()
        self.protections: dict[int, EspProtection] = {}  # inbound SPI -> tunnel's ESP
        # Interface name -> (when, outbound SA, inbound SA) of tunnels just closed.
        self.retired: dict[str, tuple[float, OutboundSA, InboundSA]] = {}
        # The daemon replaces this with the marks it stored before a restart.
        self.seq_marks = SeqMarks()
        self.tunnels.register_ip_handler(ESP_PROTO, self._esp_input)

    @classmethod
    def of(cls, ctx: PortContext) -> IpsecLayer:
        """The datapath's IPsec layer (kept by its tunnel layer), created on first use."""
        layer = ctx.tunnels.ipsec
        if layer is None:
            layer = ctx.tunnels.ipsec = cls(ctx)
        return layer

    def add(self, esp: EspProtection, sa: InboundSA) -> None:
        try:
            self.sad.add(sa)
        except IpsecConfigError:
            other = self.protections[sa.spi].port.name
            raise PortError(
                f"interface {esp.port.name}: options:spi_in 0x{sa.spi:08x} is already used by "
                f"interface {other}"
            ) from None
        self.protections[sa.spi] = esp
        self.ctx.fast_changed()
        if len(self.protections) == 1:
            self.tunnels.register_udp_handler(NAT_T_PORT, self._nat_t_input,
                                              "UDP-encapsulated ESP")

    def retire(self, name: str, sa_out: OutboundSA, sa_in: InboundSA) -> None:
        """Keep a closed tunnel's SAs a little while: a reconfiguration closes and reopens
        the port, and SAs whose parameters did not change must keep their sequence
        numbers and replay window (a restarted sequence would be dropped as replays)."""
        now = self.ctx.now
        self.retired = {k: v for k, v in self.retired.items() if now - v[0] < RETIRED_KEEP}
        self.retired[name] = (now, sa_out, sa_in)

    def adopt(self, name: str) -> tuple[OutboundSA, InboundSA] | None:
        """The SAs a tunnel of this name had when it was closed moments ago, if any."""
        entry = self.retired.pop(name, None)
        if entry is None or self.ctx.now - entry[0] >= RETIRED_KEEP:
            return None
        return entry[1], entry[2]

    def remove(self, sa: InboundSA) -> None:
        if self.protections.pop(sa.spi, None) is not None:
            self.sad.remove(sa.spi)
            self.ctx.fast_changed()
        if not self.protections:
            self.tunnels.unregister_udp_handler(NAT_T_PORT)

    # -- inbound ----------------------------------------------------------------------------

    def _esp_input(self, bridge: Bridge, in_port: Port, frame: bytes, l3: int, l4: int,
                   end: int) -> bool:
        if end < l4 + 8 or end > len(frame) or (
                frame[l3] >> 4 == 4 and (frame[l3 + 6] & 0x3F or frame[l3 + 7])):
            in_port.stats.drop("rx_malformed")
            self.ctx.count_drop("esp_malformed")
            return True
        self._deliver(in_port, frame, l3, frame[l4:end], False)
        return True

    def _nat_t_input(self, bridge: Bridge, in_port: Port, frame: bytes, l3: int, l4: int,
                     end: int) -> bool:
        # The outer UDP checksum is not checked, over IPv6 either: ESP's ICV covers more.
        payload = frame[l4 + 8 : end]
        if len(payload) == 1 and payload[0] == 0xFF:
            return True  # NAT keepalive (RFC 3948 §2.3): nothing to do
        if len(payload) < 8 or payload[:4] == b"\0\0\0\0":
            return False  # IKE (non-ESP marker) or junk: the IKE daemon's business
        self._deliver(in_port, frame, l3, payload, True)
        return True

    def _deliver(self, in_port: Port, frame: bytes, l3: int, esp: bytes, encap: bool) -> None:
        spi = (esp[0] << 24) | (esp[1] << 16) | (esp[2] << 8) | esp[3]
        if frame[l3] >> 4 == 4:
            src, dst = frame[l3 + 12 : l3 + 16], frame[l3 + 16 : l3 + 20]
        else:
            src, dst = frame[l3 + 8 : l3 + 24], frame[l3 + 24 : l3 + 40]
        protection = self.protections.get(spi)
        if protection is None:
            self.sad.unknown_spi += 1
            in_port.stats.drop("rx_unknown_tunnel")
            ctx = self.ctx
            ctx.count_drop("esp_unknown_spi")
            if ctx.drop_log_due():
                ctx.log_rl(f"ESP with unknown SPI 0x{spi:08x} from {ip_str(src)}, dropped")
            return
        protection.input_esp(src, dst, esp, encap)


class EspProtection:
    """ESP for one tunnel: a manually keyed SA pair, or SA pairs from IKEv2."""

    OPTIONS: ClassVar[frozenset[str]] = IPSEC_OPTIONS
    COUNTERS: ClassVar[type[Counters]] = IpsecCounters

    def __init__(self, port: TunnelPort, options: Mapping[str, str]) -> None:
        self.port = port
        self.ctx = port.ctx
        remote_ip = port.underlay.remote_ip
        try:
            keying = parse_ipsec_options(options, remote_ip=remote_ip)
        except IpsecConfigError as e:
            raise PortError(f"interface {port.name}: {e}") from None
        self.keying = keying
        self.transform = keying.transform
        self.mode = keying.mode
        self.encap = keying.encapsulation  # ESP in UDP/4500
        # IKE-keyed: no SA until IKE installs one. `pairs` are the installed CHILD_SAs,
        # oldest first; the newest one's outbound SA protects what is sent, and every
        # inbound SA is accepted until IKE deletes it (a rekey keeps the old one a while).
        self.ike: IkeKeying | None = keying if isinstance(keying, IkeKeying) else None
        self.ike_error: str | None = None
        self.pairs: list[tuple[OutboundSA, InboundSA]] = []
        self._in_by_spi: dict[int, InboundSA] = {}
        # CHILD_SAs whose selectors do not cover what the tunnel sends (Open vSwitch's
        # "in" CHILD_SA of a VXLAN or Geneve tunnel: UDP to our port only): by inbound SPI.
        # They open what arrives, and never protect what leaves.
        self._receive_only: set[int] = set()
        # Inbound SAs whose selectors are narrower than the tunnel's own (a UDP source or
        # destination port range): inbound SPI -> ((source lo, hi), (destination lo, hi)).
        self._rx_ports: dict[int, PortRanges] = {}
        # After a rekey: the new inbound SA whose first packet switches sending over to its pair.
        self._switch_on: InboundSA | None = None
        # Whether the peer is known to have the pair in use (see install_child).
        self._out_confirmed = False
        # Inbound SAs deleted by IKE that still open packets until (deadline, SA).
        self._lingering: list[tuple[float, InboundSA]] = []
        # Several IKE-keyed tunnels to the same remote endpoint (other keys) share one IKE SA
        # and one CHILD_SA, set up by the IKE layer: the leader holds the SAs, and hands
        # what it decrypts for another key to that follower; a follower seals with the
        # leader's outbound SA.
        self.leader: TunnelPort | None = None
        self.followers: dict[int, TunnelPort] = {}  # key (VNI) -> follower (leader only)
        self._layer = IpsecLayer.of(self.ctx)
        if isinstance(keying, ManualKeying):
            start = self._layer.seq_marks.start_for(ip_str(remote_ip), keying.outbound)
            fast = self.ctx.fast_path
            self.sa_out: OutboundSA | None = make_outbound_sa(
                keying.outbound, now=self.ctx.now, seq_start=start, fast=fast)
            self.sa_in: InboundSA | None = make_inbound_sa(keying.inbound, now=self.ctx.now,
                                                           fast=fast)
        else:
            self.sa_out = self.sa_in = None
        # UDP destination port of encapsulated ESP: 4500, or the port a NAT in front of the
        # peer mapped its 4500 to, as IKE saw it (RFC 3948 §3).
        self.encap_port = NAT_T_PORT
        # Tunnel mode: the peer's address in the inner IP header, as it names itself in
        # the CHILD_SA's selectors (behind a NAT, not remote_ip); None: remote_ip.
        self.inner_remote: bytes | None = None
        self.selector: Selector | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def open(self) -> None:
        if self.ike is not None:
            return
        old = self._layer.adopt(self.port.name)
        if old is not None:
            old_out, old_in = old
            if old_out.params == self.sa_out.params and not old_out.expired:
                self.sa_out = old_out
            if old_in.params == self.sa_in.params and not old_in.expired:
                self.sa_in = old_in
        self._layer.seq_marks.track(ip_str(self.port.underlay.remote_ip), self.sa_out)
        self._layer.add(self, self.sa_in)

    def close(self) -> None:
        port = self.port
        if self.leader is not None:
            lead = self.leader.esp
            if lead.followers.get(port.encapsulation.key) is port:
                del lead.followers[port.encapsulation.key]
        self.leader = None
        if self.ike is not None:
            # The SAs stay in `pairs`: if IKE goes on with the same peer (the interface was
            # reconfigured), they move to the new port object with `adopt_child`.
            for _, sa_in in self.pairs:
                self._layer.remove(sa_in)
            for _, sa_in in self._lingering:
                self._layer.remove(sa_in)
            self._lingering = []
            return
        self._layer.remove(self.sa_in)
        self._layer.retire(port.name, self.sa_out, self.sa_in)

    def run(self, now: float) -> None:
        if self.ike is None and self.sa_out is not None:
            self._layer.seq_marks.track(ip_str(self.port.underlay.remote_ip), self.sa_out)
        if self._lingering and self._lingering[0][0] <= now:
            for _, sa_in in [e for e in self._lingering if e[0] <= now]:
                sa_in.expire("deleted")
                self._forget(sa_in.spi)
                self._layer.remove(sa_in)
                self.ctx.fast_changed()
            self._lingering = [e for e in self._lingering if e[0] > now]

    def rebuild(self) -> None:
        """The local address or the peer's inner address changed: new selectors."""
        u = self.port.underlay
        src = u.local_ip or bytes(16 if u.V6 else 4)
        peer = u.remote_ip
        if self.mode is Mode.TUNNEL and self.inner_remote is not None:
            peer = self.inner_remote  # the inner header names the peer as it names itself
        enc = self.port.encapsulation
        self.selector = Selector(src=peer, dst=src, proto=enc.PROTO, dport=enc.dst_port)
        self.ctx.fast_changed()

    # -- IKE-keyed SAs (driven by espswitch.vswitchd.ike) ----------------------------------------

    def install_child(self, outbound: SaParams, inbound: SaParams, *,
                      encap: bool | None = None, encap_port: int | None = None,
                      inner_remote: bytes | None = None, rekey: bool = False,
                      sends: bool = True, rx_ports: PortRanges | None = None,
                      confirmed: bool = False) -> None:
        """Install a CHILD_SA pair; its inbound SA is accepted next to the ones already
        there (after a rekey the old one stays until `remove_child`).

        `sends=False`: the pair's selectors do not cover what this tunnel sends (Open
        vSwitch's selectors give a VXLAN or Geneve tunnel one CHILD_SA for UDP to the
        peer's port and one for UDP to ours): its inbound SA opens packets, its outbound
        SA is never used. `rx_ports`: the UDP ports the inbound SA's selectors allow, when
        narrower than the tunnel's (checked after decryption, RFC 4301 §5.2).

        A fresh pair protects traffic at once. A rekey's new outbound SA is used only once
        the peer shows it has the pair (a packet arrives on the new inbound SA) or the old
        pair is deleted: the side that answers a rekey has the new SAs before the side
        that asked, and switching at once would drop what the other cannot open yet.
        `confirmed`: the peer has this pair for sure (we asked for it); it is switched to
        at once when the pair in use is not (crossing initiations: the first pair came
        from answering the peer's IKE_AUTH, which the peer has not finished yet).
        Raises PortError if the inbound SPI is taken."""
        if self.ike is None:
            raise PortError(f"interface {self.port.name} is keyed manually")
        now = self.ctx.now
        fast = self.ctx.fast_path
        sa_in = make_inbound_sa(inbound, now=now, fast=fast)
        self._layer.add(self, sa_in)
        sa_out = make_outbound_sa(outbound, now=now, fast=fast)
        self.pairs.append((sa_out, sa_in))
        self._in_by_spi[sa_in.spi] = sa_in
        if rx_ports is not None:
            self._rx_ports[sa_in.spi] = rx_ports
        if not sends:
            self._receive_only.add(sa_in.spi)
        elif rekey and self.sa_out is not None and not self.sa_out.expired and (
                self._out_confirmed or not confirmed):
            self._switch_on = sa_in
        else:
            self.sa_out, self.sa_in = sa_out, sa_in
            self._switch_on = None
            self._out_confirmed = confirmed
        self.transform = sa_out.transform
        if encap is not None and encap != self.encap:
            self.encap = encap
        if encap_port is not None:
            self.encap_port = encap_port
        if inner_remote != self.inner_remote:
            self.inner_remote = inner_remote
            self.rebuild()
        self.ike_error = None
        for follower in self.followers.values():
            follower.esp.follow(self.port)
        self.ctx.fast_changed()  # which inbound SA switches sending over may have changed

    def follow(self, leader: TunnelPort | None) -> None:
        """Share `leader`'s SAs, sending as it does (UDP encapsulation and port, the peer's
        inner address, which a NAT may have set); None: key this tunnel by itself."""
        self.leader = leader
        self.ctx.fast_changed()
        if leader is None:
            return
        lead = leader.esp
        self.encap_port = lead.encap_port
        if (self.encap, self.inner_remote) != (lead.encap, lead.inner_remote):
            self.encap, self.inner_remote = lead.encap, lead.inner_remote
            self.rebuild()

    def adopt_child(self, sa_out: OutboundSA, sa_in: InboundSA, sends: bool = True,
                    rx_ports: PortRanges | None = None) -> None:
        """Take over a live SA pair of this tunnel's previous port object (sequence numbers
        and replay window go on); `sends` and `rx_ports` as `child_role` gave them."""
        self._layer.add(self, sa_in)
        self.pairs.append((sa_out, sa_in))
        self._in_by_spi[sa_in.spi] = sa_in
        if rx_ports is not None:
            self._rx_ports[sa_in.spi] = rx_ports
        if sends:
            self.sa_out, self.sa_in = sa_out, sa_in
        else:
            self._receive_only.add(sa_in.spi)
        self.ctx.fast_changed()

    def child_role(self, spi_in: int) -> tuple[bool, PortRanges | None]:
        """(whether the pair of inbound SPI `spi_in` protects what is sent, the ports its
        inbound SA allows): what `install_child` was told, for `adopt_child`."""
        return spi_in not in self._receive_only, self._rx_ports.get(spi_in)

    def _newest_sending(self) -> tuple[OutboundSA | None, InboundSA | None]:
        """The newest installed pair that protects what is sent, or (None, None)."""
        for sa_out, sa_in in reversed(self.pairs):
            if sa_in.spi not in self._receive_only:
                return sa_out, sa_in
        return None, None

    def _forget(self, spi_in: int) -> None:
        self._in_by_spi.pop(spi_in, None)
        self._receive_only.discard(spi_in)
        self._rx_ports.pop(spi_in, None)

    def release_child(self, spi_in: int) -> tuple[OutboundSA, InboundSA] | None:
        """Forget a pair without expiring it (it moves to another port object)."""
        for pair in self.pairs:
            if pair[1].spi == spi_in:
                self.pairs.remove(pair)
                self._forget(spi_in)
                self.ctx.fast_changed()
                if self.sa_in is pair[1]:
                    self.sa_out, self.sa_in = self._newest_sending()
                return pair
        return None

    def remove_child(self, spi_in: int, linger: float = 0.0) -> bool:
        """Remove the CHILD_SA pair whose inbound SPI is `spi_in`; False if there is none.

        With `linger`, the inbound SA still opens packets for that many seconds (those the
        peer sent before it processed the same delete), while nothing is sent on the pair.
        """
        for i, (sa_out, sa_in) in enumerate(self.pairs):
            if sa_in.spi == spi_in:
                del self.pairs[i]
                if linger > 0 and self.pairs:
                    sa_out.expire("deleted")
                    self._lingering.append((self.ctx.now + linger, sa_in))
                else:
                    self._drop_pair(sa_out, sa_in)
                if sa_in is self._switch_on:
                    self._switch_on = None
                if self.sa_out is sa_out or self.sa_in is sa_in:
                    self.sa_out, self.sa_in = self._newest_sending()
                    self._switch_on = None
                    self._out_confirmed = False
                self.ctx.fast_changed()
                return True
        return False

    def _use_pair_of(self, sa_in: InboundSA) -> None:
        """Send with the pair whose inbound SA is `sa_in` (the peer has proved it has it)."""
        for pair in self.pairs:
            if pair[1] is sa_in:
                self.sa_out, self.sa_in = pair
                self._out_confirmed = True
        self._switch_on = None
        self.ctx.fast_changed()  # the switching SA may now go through the fast path

    def remove_all_children(self, keep: frozenset[int] = frozenset()) -> list[int]:
        """Remove every CHILD_SA pair but those whose inbound SPI is in `keep` (the IKE SA
        went down); returns the inbound SPIs removed."""
        gone = [sa_in.spi for _, sa_in in self.pairs if sa_in.spi not in keep]
        for spi in gone:
            self.remove_child(spi)
        return gone

    def child_sas(self) -> list[tuple[OutboundSA, InboundSA]]:
        """The installed CHILD_SA pairs, oldest first."""
        return list(self.pairs)

    def _drop_pair(self, sa_out: OutboundSA, sa_in: InboundSA) -> None:
        sa_out.expire("deleted")
        sa_in.expire("deleted")
        self._forget(sa_in.spi)
        self._layer.remove(sa_in)

    # -- outbound -------------------------------------------------------------------------------

    def overhead(self, l4_len: int) -> int:
        """ESP bytes (and UDP/4500, and tunnel mode's inner IP header) added to `l4_len`
        bytes of encapsulated frame: computed for this transform and mode, not guessed."""
        payload = l4_len + (self.port.underlay.OVERHEAD if self.mode is Mode.TUNNEL else 0)
        return (8 if self.encap else 0) + payload - l4_len + self.transform.overhead(payload)

    def protect(self, frames: list[bytes]) -> tuple[list[bytes], int]:
        """The IPv4 ESP packets that carry `frames`, and the inner bytes they carry; what
        the SA refuses is counted."""
        port = self.port
        st = port.stats
        sa_out = self.sa_out if self.leader is None else self.leader.esp.sa_out
        if sa_out is None:  # IKE has not installed an SA (yet): nothing leaves
            st["tx_dropped"] += len(frames)
            return [], 0
        seal = sa_out.encrypt
        push = port.encapsulation.push
        proto = port.encapsulation.PROTO
        u = port.underlay
        header = u.header
        tunnel = self.mode is Mode.TUNNEL
        inner_dst = self.inner_remote
        encap = self.encap
        if u.V6:
            return self._protect6(frames, seal, push, proto, tunnel, inner_dst, encap)
        pkts = []
        nbytes = 0
        for frame in frames:
            l4 = push(frame)
            try:
                if tunnel:
                    esp = seal(header(proto, len(l4), dst=inner_dst) + l4, NH_IPV4)
                else:
                    esp = seal(l4, proto)
            except SaRefused:
                # Past the hard lifetime (or out of sequence numbers): counted, not sent.
                st["esp_expired_drops"] += 1
                st["tx_dropped"] += 1
                continue
            nbytes += len(frame)
            # The outer packet is atomic (DF): its ID only has to be unique enough
            # (RFC 6864 §4.2), so it is the sequence number's low 16 bits, which the
            # compiled pipeline can write without sharing the tunnel's counter.
            ident = (esp[6] << 8) | esp[7]
            if encap:
                pkts.append(header(17, len(esp) + 8, df=True, ident=ident)
                            + _UDP.pack(NAT_T_PORT, self.encap_port, len(esp) + 8, 0) + esp)
            else:
                pkts.append(header(ESP_PROTO, len(esp), df=True, ident=ident) + esp)
        return pkts, nbytes

    def _protect6(self, frames: list[bytes], seal, push, proto: int, tunnel: bool,
                  inner_dst: bytes | None, encap: bool) -> tuple[list[bytes], int]:
        """`protect` over IPv6: the UDP inside ESP and ESP-in-UDP carry their checksums."""
        st = self.port.stats
        u = self.port.underlay
        packet, l4sum = u.packet, u.l4
        pkts = []
        nbytes = 0
        for frame in frames:
            l4 = push(frame)
            try:
                if tunnel:
                    esp = seal(packet(proto, l4, dst=inner_dst), NH_IPV6)
                else:
                    esp = seal(l4sum(proto, l4), proto)
            except SaRefused:
                st["esp_expired_drops"] += 1
                st["tx_dropped"] += 1
                continue
            nbytes += len(frame)
            if encap:
                pkts.append(packet(17, _UDP.pack(NAT_T_PORT, self.encap_port, len(esp) + 8, 0)
                                   + esp))
            else:
                pkts.append(packet(ESP_PROTO, esp))
        return pkts, nbytes

    # -- inbound --------------------------------------------------------------------------------

    def input_esp(self, src: bytes, dst: bytes, esp: bytes, encap: bool) -> None:
        """An ESP packet with this tunnel's inbound SPI: open, check selectors, decapsulate."""
        port = self.port
        st = port.stats
        sa = self.sa_in
        if self.ike is not None:
            sa = self._in_by_spi.get((esp[0] << 24) | (esp[1] << 16) | (esp[2] << 8) | esp[3])
            if sa is None:  # removed a moment ago
                st.drop("esp_expired_drops")
                return
        result = sa.open(esp)
        if type(result) is not tuple:
            self.count_open_drop(result, src)
            return
        self.input_opened(sa, src, dst, result[0], result[1])

    def count_open_drop(self, result: DropReason, src: bytes) -> None:
        """Count a packet its inbound SA did not open (the SA counted it already)."""
        port = self.port
        counter = _RX_COUNTER.get(result)
        if counter is not None:  # a dummy packet (RFC 4303 §2.6) is not an error
            port.stats.drop(counter)
            if self.ctx.drop_log_due():
                self.ctx.log_rl(
                    f"{port.name}: ESP from {ip_str(src)} dropped: {result.description}")

    def input_opened(self, sa: InboundSA, src: bytes, dst: bytes, nh: int,
                     payload: bytes) -> None:
        """What `input_esp` does once `sa` opened a packet: selectors, then decapsulation.
        The compiled receive pipeline hands up here what it opened but does not finish."""
        port = self.port
        st = port.stats
        if sa is self._switch_on:
            self._use_pair_of(sa)
        sel = self.selector
        if self.mode is Mode.TUNNEL:
            if nh != port.underlay.NH_INNER or not sel.match_tunnel(payload):
                st.drop("esp_selector_drops")
                return
            if nh == NH_IPV4:
                l4 = (payload[0] & 0x0F) * 4
                # match_tunnel checked the inner IPv4 header: the datagram ends at its length.
                end = (payload[2] << 8) | payload[3]
            else:
                l4, end = 40, 40 + ((payload[4] << 8) | payload[5])
        else:
            if not sel.match_transport(src, dst, nh, payload):
                st.drop("esp_selector_drops")
                return
            l4, end = 0, len(payload)
        if self._rx_ports:
            ports = self._rx_ports.get(sa.spi)
            if ports is not None and not _ports_match(ports, payload, l4, end):
                st.drop("esp_selector_drops")
                return
        # The encapsulation checks its own header (the inner UDP length must hold it and an
        # Ethernet header, and end within what was decrypted; TFC padding may follow).
        found = port.encapsulation.pop(payload, l4, end)
        if type(found) is str:
            st.drop("esp_selector_drops")
            return
        key, start, stop = found
        to = port
        if key != port.encapsulation.key:
            to = self.followers.get(key)
            if to is None:
                st.drop("esp_selector_drops")
                return
        # rx_packets/rx_bytes are counted once, by the bridge, when `to` forwards the frame.
        self.ctx.defer_rx(to, payload[start:stop])

    def input_clear(self, frame: bytes) -> None:
        """Plaintext from our remote endpoint: never delivered."""
        self.port.stats.drop("esp_plaintext_drops")
        if self.ctx.drop_log_due():
            self.ctx.log_rl(f"{self.port.name}: plaintext from "
                            f"{ip_str(self.port.underlay.remote_ip)} dropped")

    def fast_inbound(self, spi: int) -> InboundSA | None:
        """The inbound SA `input_esp` opens packets with SPI `spi` with, if the compiled
        receive pipeline may open them in its place: not the SA whose first packet
        switches sending over (`_use_pair_of` is the slow path's), not in tunnel mode."""
        if self.mode is Mode.TUNNEL:
            return None
        sa = self.sa_in if self.ike is None else self._in_by_spi.get(spi)
        if sa is None or sa is self._switch_on or sa.spi != spi or spi in self._rx_ports:
            return None  # (the compiled pipeline checks the tunnel's selector only)
        return sa

    def fast_outbound(self) -> OutboundSA | None:
        """The outbound SA `protect` seals with, if the compiled transmit pipeline may seal
        in its place: transport mode, ESP straight in IPv4 or IPv6 (not in UDP)."""
        if self.mode is Mode.TUNNEL or self.encap:
            return None
        return self.sa_out if self.leader is None else self.leader.esp.sa_out

    # -- state for the database and ovs-appctl ----------------------------------------------------

    @property
    def keyer(self) -> EspProtection:
        """The protection whose SAs protect this tunnel: its leader's, or its own."""
        return self.leader.esp if self.leader is not None else self

    def ipsec_state(self) -> str:
        if self.ike is not None:
            return "established" if self.keyer.sa_out is not None else "connecting"
        return "expired" if self.sa_out.expired or self.sa_in.expired else "manual"

    def status(self) -> dict[str, str]:
        st = {
            "ipsec_state": self.ipsec_state(),
            "esp": self.transform.proposal,
            "ipsec_mode": str(self.mode),
            "ipsec_encapsulation": "yes" if self.encap else "no",
        }
        k = self.keyer
        if k.sa_out is not None and k.sa_in is not None:
            st.update(spi_out=f"0x{k.sa_out.spi:08x}", spi_in=f"0x{k.sa_in.spi:08x}")
        if self.ike is not None:
            st["ipsec_keying"] = "ikev2"
            if self.leader is not None:
                st["ike_shared_with"] = self.leader.name
            if self.ike_error and k.sa_out is None:
                st["ike_error"] = self.ike_error
        return st

    def engine(self) -> str:
        """Which ESP engine the tunnel's SAs use: "compiled" (the fast path's, OpenSSL EVP)
        or "python" (cryptography); "none" before IKE installed any."""
        sa = self.keyer.sa_out
        if sa is None:
            return "none"
        return "compiled" if is_compiled(sa) else "python"

    def describe(self) -> list[str]:
        return [f"esp={self.transform.proposal}", f"mode={self.mode}",
                f"esp_engine={self.engine()}"]

    def _receive_only_sa(self, sa: OutboundSA | InboundSA) -> bool:
        """Whether `sa` belongs to a receive-only pair of the keying tunnel (the newest one
        for its selectors: older ones are rekeyed)."""
        k = self.keyer
        pair = next((p for p in k.pairs if sa in p), None)
        if pair is None or pair[1].spi not in k._receive_only:
            return False
        later = k.pairs[k.pairs.index(pair) + 1:]
        return not any(p[1].spi in k._receive_only and k._rx_ports.get(p[1].spi)
                       == k._rx_ports.get(pair[1].spi) for p in later)

    def sa_rows(self) -> list[dict[str, object]]:
        """Every SA of this tunnel for ipsec/show: no key material, ever."""
        rows = []
        if self.ike is None:
            sas: list[OutboundSA | InboundSA] = [self.sa_out, self.sa_in]
        else:
            sas = [sa for pair in self.keyer.pairs for sa in pair]
        k = self.keyer
        for sa in sas:
            if sa.expired:
                state = "expired"
            elif self.ike is not None and sa is not k.sa_out and sa is not k.sa_in and \
                    not self._receive_only_sa(sa):
                state = "rekeyed"  # replaced, kept until IKE deletes it
            else:
                state = "active"
            row: dict[str, object] = {
                "interface": self.port.name,
                "direction": sa.direction,
                "spi": f"0x{sa.spi:08x}",
                "esp": self.transform.proposal,
                "mode": str(self.mode),
                "encapsulation": "udp/4500" if self.encap else "none",
                "keying": "manual" if self.ike is None else "ikev2",
                "state": state,
                **sa.counters(),
                "lifetime_left": sa.lifetime_left() or "unlimited",
            }
            if self.leader is not None:
                row["shared_with"] = self.leader.name  # the same SA, counted there too
            seq = sa.seq if isinstance(sa, OutboundSA) else sa.window.top
            row["seq"] = seq & 0xFFFFFFFF
            if self.transform.esn:
                row["esn_high"] = seq >> 32
            if isinstance(sa, InboundSA):
                row["replay_window"] = sa.window.size
            rows.append(row)
        return rows


def _ports_match(ports: PortRanges, payload: bytes, l4: int, end: int) -> bool:
    """Whether the UDP header at `payload[l4:end]` has ports within `ports`."""
    if end - l4 < 8:
        return False
    (slo, shi), (dlo, dhi) = ports
    sport = payload[l4] << 8 | payload[l4 + 1]
    dport = payload[l4 + 2] << 8 | payload[l4 + 3]
    return slo <= sport <= shi and dlo <= dport <= dhi
