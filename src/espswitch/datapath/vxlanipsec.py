"""`vxlanipsec`: VXLAN tunnels whose packets are protected by ESP (RFC 4303).

A tunnel is keyed manually (its options hold the SA pair) or by IKEv2: then the port starts
without SAs ("connecting") and the daemon's IKE layer (`espswitch.vswitchd.ike`) installs
them with `install_child`, retires them with `remove_child` and `remove_all_children`; the
port itself does no I/O for IKE.

Outbound, each inner frame becomes UDP / VXLAN / frame, is sealed by the tunnel's outbound
SA (transport mode: ESP after the outer IPv4 header, next header 17; tunnel mode: a whole
inner IPv4/UDP/VXLAN packet inside ESP, next header 4) and optionally put in UDP/4500
(RFC 3948). Inbound, ESP to a local endpoint (IP protocol 50, or UDP/4500 that is not IKE)
is matched to its SA by SPI, decrypted, checked against the SA's selectors (RFC 4301 §5.2)
and only then handed to VXLAN decapsulation. A `vxlanipsec` tunnel never sends or accepts
plaintext VXLAN.

Per-packet work is bytes: a `struct` pack for the UDP/VXLAN header, one AEAD call, and the
outer IPv4 header patched from a template with an incremental checksum.
"""

from __future__ import annotations

import struct
import zlib
from typing import TYPE_CHECKING, ClassVar

from espswitch.datapath.counters import Counters
from espswitch.datapath.errors import PortError
from espswitch.datapath.ports import Port, register_port_type
from espswitch.datapath.tunnel import ip4_str
from espswitch.datapath.vxlan import TunnelPort, VxlanPort
from espswitch.ipsec.config import IPSEC_OPTIONS, IkeKeying, ManualKeying, parse_ipsec_options
from espswitch.ipsec.errors import DropReason, IpsecConfigError, SaRefused
from espswitch.ipsec.policy import UdpSelector
from espswitch.ipsec.sa import InboundSA, Mode, OutboundSA, SaParams
from espswitch.ipsec.sad import Sad

if TYPE_CHECKING:
    from espswitch.datapath.bridge import Bridge
    from espswitch.datapath.datapath import Datapath

ESP_PROTO = 50
NAT_T_PORT = 4500
RETIRED_KEEP = 60.0  # seconds a closed tunnel's SAs may be taken over by its reopened self
_UDP_VXLAN = struct.Struct("!HHHHII")  # UDP sport, dport, length, checksum; VXLAN flags, VNI
_UDP = struct.Struct("!HHHH")
_OUTER = struct.Struct("!BBHHHBBH4s4s")  # IPv4 header without options


class IpsecCounters(Counters):
    """Interface counters of a `vxlanipsec` port: the generic ones plus ESP drops by cause."""

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
    """The inbound side shared by every `vxlanipsec` tunnel of a datapath: SPI -> SA -> port."""

    def __init__(self, dp: Datapath) -> None:
        self.dp = dp
        self.sad = Sad()
        self.ports: dict[int, VxlanIpsecPort] = {}  # inbound SPI -> port
        # Interface name -> (when, outbound SA, inbound SA) of tunnels just closed.
        self.retired: dict[str, tuple[float, OutboundSA, InboundSA]] = {}
        # The daemon replaces this with the marks it stored before a restart.
        self.seq_marks = SeqMarks()
        dp.tunnels.register_ip_handler(ESP_PROTO, self._esp_input)

    @classmethod
    def of(cls, dp: Datapath) -> IpsecLayer:
        """The datapath's IPsec layer, created on first use."""
        layer = getattr(dp, "ipsec", None)
        if layer is None:
            layer = dp.ipsec = cls(dp)
        return layer

    def add(self, port: VxlanIpsecPort, sa: InboundSA) -> None:
        try:
            self.sad.add(sa)
        except IpsecConfigError:
            other = self.ports[sa.spi].name
            raise PortError(
                f"interface {port.name}: options:spi_in 0x{sa.spi:08x} is already used by "
                f"interface {other}"
            ) from None
        self.ports[sa.spi] = port
        if len(self.ports) == 1:
            self.dp.tunnels.register_udp_handler(NAT_T_PORT, self._nat_t_input,
                                                 "UDP-encapsulated ESP")

    def retire(self, name: str, sa_out: OutboundSA, sa_in: InboundSA) -> None:
        """Keep a closed tunnel's SAs a little while: a reconfiguration closes and reopens
        the port, and SAs whose parameters did not change must keep their sequence
        numbers and replay window (a restarted sequence would be dropped as replays)."""
        self.retired = {k: v for k, v in self.retired.items() if self.dp.now - v[0] < RETIRED_KEEP}
        self.retired[name] = (self.dp.now, sa_out, sa_in)

    def adopt(self, name: str) -> tuple[OutboundSA, InboundSA] | None:
        """The SAs a tunnel of this name had when it was closed moments ago, if any."""
        entry = self.retired.pop(name, None)
        if entry is None or self.dp.now - entry[0] >= RETIRED_KEEP:
            return None
        return entry[1], entry[2]

    def remove(self, sa: InboundSA) -> None:
        if self.ports.pop(sa.spi, None) is not None:
            self.sad.remove(sa.spi)
        if not self.ports:
            self.dp.tunnels.unregister_udp_handler(NAT_T_PORT)

    # -- inbound ----------------------------------------------------------------------------

    def _esp_input(self, bridge: Bridge, in_port: Port, frame: bytes, l3: int, ihl: int) -> bool:
        total = (frame[l3 + 2] << 8) | frame[l3 + 3]
        if total < ihl + 8 or l3 + total > len(frame) or frame[l3 + 6] & 0x3F or frame[l3 + 7]:
            in_port.stats.drop("rx_malformed")
            self.dp.count_drop("esp_malformed")
            return True
        self._deliver(in_port, frame, l3, frame[l3 + ihl : l3 + total], False)
        return True

    def _nat_t_input(self, bridge: Bridge, in_port: Port, frame: bytes, l3: int, l4: int) -> bool:
        end = l3 + ((frame[l3 + 2] << 8) | frame[l3 + 3])
        payload = frame[l4 + 8 : end]
        if len(payload) == 1 and payload[0] == 0xFF:
            return True  # NAT keepalive (RFC 3948 §2.3): nothing to do
        if len(payload) < 8 or payload[:4] == b"\0\0\0\0":
            return False  # IKE (non-ESP marker) or junk: the IKE daemon's business
        self._deliver(in_port, frame, l3, payload, True)
        return True

    def _deliver(self, in_port: Port, frame: bytes, l3: int, esp: bytes, encap: bool) -> None:
        spi = (esp[0] << 24) | (esp[1] << 16) | (esp[2] << 8) | esp[3]
        port = self.ports.get(spi)
        if port is None:
            self.sad.unknown_spi += 1
            in_port.stats.drop("rx_unknown_tunnel")
            self.dp.count_drop("esp_unknown_spi")
            if self.dp.drop_log_due():
                self.dp.log_rl(
                    f"ESP with unknown SPI 0x{spi:08x} from "
                    f"{ip4_str(frame[l3 + 12 : l3 + 16])}, dropped"
                )
            return
        port.input_esp(frame[l3 + 12 : l3 + 16], frame[l3 + 16 : l3 + 20], esp, encap)


@register_port_type("vxlanipsec")
class VxlanIpsecPort(VxlanPort):
    """A VXLAN tunnel protected by ESP: a manually keyed SA pair, or SA pairs from IKEv2."""

    OPTIONS: ClassVar[frozenset[str]] = TunnelPort.OPTIONS | IPSEC_OPTIONS
    COUNTERS = IpsecCounters

    def __init__(self, dp: Datapath, bridge: Bridge, name: str, options) -> None:
        super().__init__(dp, bridge, name, options)
        try:
            keying = parse_ipsec_options(self.options, remote_ip=self.remote_ip)
        except IpsecConfigError as e:
            raise PortError(f"interface {name}: {e}") from None
        self.keying = keying
        self.transform = keying.transform
        self.mode = keying.mode
        self.encap = keying.encapsulation
        # IKE-keyed: no SA until IKE installs one. `pairs` are the installed CHILD_SAs,
        # oldest first; the newest one's outbound SA protects what is sent, and every
        # inbound SA is accepted until IKE deletes it (a rekey keeps the old one a while).
        self.ike: IkeKeying | None = keying if isinstance(keying, IkeKeying) else None
        self.ike_error: str | None = None
        self.pairs: list[tuple[OutboundSA, InboundSA]] = []
        self._in_by_spi: dict[int, InboundSA] = {}
        # After a rekey: the new inbound SA whose first packet switches sending over to its pair.
        self._switch_on: InboundSA | None = None
        # Inbound SAs deleted by IKE that still open packets until (deadline, SA).
        self._lingering: list[tuple[float, InboundSA]] = []
        # Several IKE-keyed tunnels to the same remote endpoint (other VNIs) share one IKE SA
        # and one CHILD_SA, set up by the IKE layer: the leader holds the SAs, and hands
        # what it decrypts for another VNI to that follower; a follower seals with the
        # leader's outbound SA.
        self.leader: VxlanIpsecPort | None = None
        self.followers: dict[int, VxlanIpsecPort] = {}  # VNI -> follower (leader only)
        if isinstance(keying, ManualKeying):
            start = IpsecLayer.of(dp).seq_marks.start_for(ip4_str(self.remote_ip),
                                                           keying.outbound)
            self.sa_out: OutboundSA | None = OutboundSA(keying.outbound, now=dp.now,
                                                        seq_start=start)
            self.sa_in: InboundSA | None = InboundSA(keying.inbound, now=dp.now)
        else:
            self.sa_out = self.sa_in = None
        # UDP destination port of encapsulated ESP: 4500, or the port a NAT in front of the
        # peer mapped its 4500 to, as IKE saw it (RFC 3948 §3).
        self.encap_port = NAT_T_PORT
        # Tunnel mode: the peer's address in the inner IPv4 header, as it names itself in
        # the CHILD_SA's selectors (behind a NAT, not remote_ip); None: remote_ip.
        self.inner_remote: bytes | None = None
        self._outer_src = b"\0\0\0\0"
        self._outer_proto = ESP_PROTO
        self._outer_base = 0
        self._vni_word = 0
        self._udp_vxlan_len = 0

    # -- lifecycle --------------------------------------------------------------------------

    def open(self) -> None:
        self._layer = IpsecLayer.of(self.dp)
        if self.ike is not None:
            super().open()
            return
        old = self._layer.adopt(self.name)
        if old is not None:
            old_out, old_in = old
            if old_out.params == self.sa_out.params and not old_out.expired:
                self.sa_out = old_out
            if old_in.params == self.sa_in.params and not old_in.expired:
                self.sa_in = old_in
        self._layer.seq_marks.track(ip4_str(self.remote_ip), self.sa_out)
        self._layer.add(self, self.sa_in)
        try:
            super().open()
        except BaseException:
            self._layer.remove(self.sa_in)
            raise

    def close(self) -> None:
        super().close()
        if self.leader is not None and self.leader.followers.get(self.vni) is self:
            del self.leader.followers[self.vni]
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
        self._layer.retire(self.name, self.sa_out, self.sa_in)

    # -- IKE-keyed SAs (driven by espswitch.vswitchd.ike) ----------------------------------------

    def install_child(self, outbound: SaParams, inbound: SaParams, *,
                      encap: bool | None = None, encap_port: int | None = None,
                      inner_remote: bytes | None = None, rekey: bool = False) -> None:
        """Install a CHILD_SA pair; its inbound SA is accepted next to the ones already
        there (after a rekey the old one stays until `remove_child`).

        A fresh pair protects traffic at once. A rekey's new outbound SA is used only once
        the peer shows it has the pair (a packet arrives on the new inbound SA) or the old
        pair is deleted: the side that answers a rekey has the new SAs before the side
        that asked, and switching at once would drop what the other cannot open yet.
        Raises PortError if the inbound SPI is taken."""
        if self.ike is None:
            raise PortError(f"interface {self.name} is keyed manually")
        sa_in = InboundSA(inbound, now=self.dp.now)
        self._layer.add(self, sa_in)
        sa_out = OutboundSA(outbound, now=self.dp.now)
        self.pairs.append((sa_out, sa_in))
        self._in_by_spi[sa_in.spi] = sa_in
        if rekey and self.sa_out is not None and not self.sa_out.expired:
            self._switch_on = sa_in
        else:
            self.sa_out, self.sa_in = sa_out, sa_in
            self._switch_on = None
        self.transform = sa_out.transform
        if encap is not None and encap != self.encap:
            self.encap = encap
            self.rebuild_template()
        if encap_port is not None:
            self.encap_port = encap_port
        if inner_remote != self.inner_remote:
            self.inner_remote = inner_remote
            self.rebuild_template()
        self.ike_error = None
        for follower in self.followers.values():
            follower.follow(self)

    def follow(self, leader: VxlanIpsecPort | None) -> None:
        """Share `leader`'s SAs, sending as it does (UDP encapsulation and port, the peer's
        inner address, which a NAT may have set); None: key this tunnel by itself."""
        self.leader = leader
        if leader is None:
            return
        self.encap_port = leader.encap_port
        if (self.encap, self.inner_remote) != (leader.encap, leader.inner_remote):
            self.encap, self.inner_remote = leader.encap, leader.inner_remote
            self.rebuild_template()

    def adopt_child(self, sa_out: OutboundSA, sa_in: InboundSA) -> None:
        """Take over a live SA pair of this tunnel's previous port object (sequence numbers
        and replay window go on)."""
        self._layer.add(self, sa_in)
        self.pairs.append((sa_out, sa_in))
        self._in_by_spi[sa_in.spi] = sa_in
        self.sa_out, self.sa_in = sa_out, sa_in

    def release_child(self, spi_in: int) -> tuple[OutboundSA, InboundSA] | None:
        """Forget a pair without expiring it (it moves to another port object)."""
        for pair in self.pairs:
            if pair[1].spi == spi_in:
                self.pairs.remove(pair)
                self._in_by_spi.pop(spi_in, None)
                if self.sa_in is pair[1]:
                    self.sa_out, self.sa_in = self.pairs[-1] if self.pairs else (None, None)
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
                    self._lingering.append((self.dp.now + linger, sa_in))
                else:
                    self._drop_pair(sa_out, sa_in)
                if sa_in is self._switch_on:
                    self._switch_on = None
                if self.sa_out is sa_out or self.sa_in is sa_in:
                    self.sa_out, self.sa_in = self.pairs[-1] if self.pairs else (None, None)
                    self._switch_on = None
                return True
        return False

    def run(self, now: float) -> None:
        super().run(now)
        if self.ike is None and self.sa_out is not None:
            self._layer.seq_marks.track(ip4_str(self.remote_ip), self.sa_out)
        if self._lingering and self._lingering[0][0] <= now:
            for _, sa_in in [e for e in self._lingering if e[0] <= now]:
                sa_in.expire("deleted")
                self._in_by_spi.pop(sa_in.spi, None)
                self._layer.remove(sa_in)
            self._lingering = [e for e in self._lingering if e[0] > now]

    def _use_pair_of(self, sa_in: InboundSA) -> None:
        """Send with the pair whose inbound SA is `sa_in` (the peer has proved it has it)."""
        for pair in self.pairs:
            if pair[1] is sa_in:
                self.sa_out, self.sa_in = pair
        self._switch_on = None

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
        self._in_by_spi.pop(sa_in.spi, None)
        self._layer.remove(sa_in)

    def rebuild_template(self) -> None:
        super().rebuild_template()
        src = self.local_ip or b"\0\0\0\0"
        self._outer_src = src
        self._outer_proto = 17 if self.encap else ESP_PROTO
        self._vni_word = self.vni << 8
        # Sum of the header's 16-bit words with length, ID and checksum left at zero.
        self._outer_base = sum(
            struct.unpack(
                "!10H",
                _OUTER.pack(
                    0x45,
                    self.tos,
                    0,
                    0,
                    0x4000,
                    self.ttl,
                    self._outer_proto,
                    0,
                    src,
                    self.remote_ip,
                ),
            )
        )
        peer = self.remote_ip
        if self.mode is Mode.TUNNEL and self.inner_remote is not None:
            peer = self.inner_remote
            if peer != self.remote_ip:  # the inner header names the peer as it names itself
                self._tmpl[16:20] = peer
                self._csum_base = sum(struct.unpack("!10H", bytes(self._tmpl[:20])))
        self.selector = UdpSelector(src=peer, dst=src, dport=self.dst_port)

    # -- MTU ------------------------------------------------------------------------------------

    def outer_len(self, frame_len: int) -> int:
        """Bytes on the underlay (IP header onwards) for an inner frame of `frame_len`:
        the ESP overhead of this transform and mode is computed, not guessed."""
        payload = frame_len + 16 + (20 if self.mode is Mode.TUNNEL else 0)
        return 20 + (8 if self.encap else 0) + payload + self.transform.overhead(payload)

    # -- outbound -------------------------------------------------------------------------------

    def send(self, frames: list[bytes]) -> None:
        frames = self.routable(frames)
        if frames is None:
            return
        st = self.stats
        sa_out = self.sa_out if self.leader is None else self.leader.sa_out
        if sa_out is None:  # IKE has not installed an SA (yet): nothing leaves
            st["tx_dropped"] += len(frames)
            return
        seal = sa_out.encrypt
        tunnel = self.mode is Mode.TUNNEL
        protect = self._protect
        pkts = []
        nbytes = 0
        for frame in frames:
            try:
                pkts.append(protect(frame, seal, tunnel))
            except SaRefused:
                # Past the hard lifetime (or out of sequence numbers): counted, not sent.
                st["esp_expired_drops"] += 1
                st["tx_dropped"] += 1
                continue
            nbytes += len(frame)
        st["tx_packets"] += len(pkts)
        st["tx_bytes"] += nbytes
        if pkts:
            self.dp.tunnels.output_ipv4(self, pkts)

    def _protect(self, frame: bytes, seal, tunnel: bool) -> bytes:
        """One inner frame -> the outer IPv4 packet carrying it in ESP."""
        if tunnel:
            esp = seal(self.encapsulate(frame), 4)
        else:
            # Source port from the inner flow (RFC 7348 §5): MACs, then IPs and L4 ports.
            sport = 49152 | (zlib.crc32(frame[26:38], zlib.crc32(frame[0:14])) & 0x3FFF)
            esp = seal(
                _UDP_VXLAN.pack(
                    sport, self.dst_port, len(frame) + 16, 0, 0x08000000, self._vni_word
                )
                + frame,
                17,
            )
        total = len(esp) + (28 if self.encap else 20)
        ident = self._ip_id = (self._ip_id + 1) & 0xFFFF
        # The header checksum from the template's precomputed sum plus the two fields
        # that change per packet.
        s = self._outer_base + total + ident
        s = (s & 0xFFFF) + (s >> 16)
        s = (s & 0xFFFF) + (s >> 16)
        hdr = _OUTER.pack(
            0x45,
            self.tos,
            total,
            ident,
            0x4000,
            self.ttl,
            self._outer_proto,
            ~s & 0xFFFF,
            self._outer_src,
            self.remote_ip,
        )
        if self.encap:
            return hdr + _UDP.pack(NAT_T_PORT, self.encap_port, total - 20, 0) + esp
        return hdr + esp

    # -- inbound --------------------------------------------------------------------------------

    def input_esp(self, src: bytes, dst: bytes, esp: bytes, encap: bool) -> None:
        """An ESP packet with this tunnel's inbound SPI: decrypt, check selectors, decapsulate."""
        st = self.stats
        sa = self.sa_in
        if self.ike is not None:
            sa = self._in_by_spi.get((esp[0] << 24) | (esp[1] << 16) | (esp[2] << 8) | esp[3])
            if sa is None:  # removed a moment ago
                st.drop("esp_expired_drops")
                return
        result = sa.open(esp)
        if type(result) is not tuple:
            counter = _RX_COUNTER.get(result)
            if counter is not None:  # a dummy packet (RFC 4303 §2.6) is not an error
                st.drop(counter)
                if self.dp.drop_log_due():
                    self.dp.log_rl(
                        f"{self.name}: ESP from {ip4_str(src)} dropped: {result.description}"
                    )
            return
        if sa is self._switch_on:
            self._use_pair_of(sa)
        nh, payload = result
        sel = self.selector
        if self.mode is Mode.TUNNEL:
            if nh != 4 or not sel.match_tunnel(payload):
                st.drop("esp_selector_drops")
                return
            off = (payload[0] & 0x0F) * 4
            # match_tunnel checked the inner IPv4 header: the datagram ends at its length.
            payload = payload[: (payload[2] << 8) | payload[3]]
        else:
            if not sel.match_transport(src, dst, nh, payload):
                st.drop("esp_selector_drops")
                return
            off = 0
        # The inner UDP length must cover the UDP and VXLAN headers and an Ethernet header,
        # and end within what was decrypted (RFC 768; TFC padding may follow it).
        udp_len = (payload[off + 4] << 8) | payload[off + 5]
        if udp_len < 8 + 8 + 14 or off + udp_len > len(payload):
            st.drop("esp_selector_drops")
            return
        if off + udp_len != len(payload):
            payload = payload[: off + udp_len]
        off += 8
        if not payload[off] & 0x08:
            st.drop("esp_selector_drops")
            return
        to = self
        vni = (payload[off + 4] << 16) | (payload[off + 5] << 8) | payload[off + 6]
        if vni != self.vni:
            to = self.followers.get(vni)
            if to is None:
                st.drop("esp_selector_drops")
                return
        # rx_packets/rx_bytes are counted once, by the bridge, when `to` forwards the frame.
        self.dp.defer_rx(to, payload[off + 8 :])

    def input_vxlan(self, frame: bytes, offset: int, protected: bool) -> None:
        # Reached only by plaintext VXLAN from our remote_ip: never delivered.
        self.stats.drop("esp_plaintext_drops")
        if self.dp.drop_log_due():
            self.dp.log_rl(f"{self.name}: plaintext VXLAN from {ip4_str(self.remote_ip)} dropped")

    # -- state for the database and ovs-appctl ----------------------------------------------------

    @property
    def keyer(self) -> VxlanIpsecPort:
        """The port whose SAs protect this tunnel: its leader, or itself."""
        return self.leader if self.leader is not None else self

    def ipsec_state(self) -> str:
        if self.ike is not None:
            return "established" if self.keyer.sa_out is not None else "connecting"
        return "expired" if self.sa_out.expired or self.sa_in.expired else "manual"

    def status(self) -> dict[str, str]:
        st = super().status()
        st.update(
            ipsec_state=self.ipsec_state(),
            esp=self.transform.proposal,
            ipsec_mode=str(self.mode),
            ipsec_encapsulation="yes" if self.encap else "no",
        )
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

    def describe(self) -> str:
        return super().describe() + f", esp={self.transform.proposal}, mode={self.mode}"

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
            elif self.ike is not None and sa is not k.sa_out and sa is not k.sa_in:
                state = "rekeyed"  # replaced, kept until IKE deletes it
            else:
                state = "active"
            row: dict[str, object] = {
                "interface": self.name,
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
