"""The tunnel layer: what the datapath does for tunnels that is not per port.

Inbound, `receive()` gets every IPv4 frame addressed to a tunnel endpoint
(`Bridge.local_ips`), reassembles outer fragments (RFC 4303 §3.4.1), and dispatches by IP
protocol (`register_ip_handler`: ESP registers 50) and UDP destination port
(`register_udp_handler`: each encapsulation's port, and 4500 for ESP in UDP). A clear
tunnel's packets are found by (encapsulation port, remote address, key) and handed to
`TunnelPort.input_clear`. `receive6()` does the same for IPv6 frames, with the same
handlers: they get the offsets of the IP header, the L4 header and the datagram's end, and
read the addresses by the IP version.

IPv6 specifics. Extension headers are not walked: a tunnel packet behind one (other than
a Fragment header right after the fixed header) goes to the kernel like any packet that
is not a tunnel's. Outer fragments are reassembled as IPv4's are (ipfrag.py, `add6`): a
sender whose tunnel MTU exceeds the path (Linux's VXLAN over IPv6 with a large MTU)
fragments at the source. The outer UDP checksum is verified when it is not zero (as Open
vSwitch does); zero is accepted for tunnels, as RFC 6935 and RFC 6936 allow (Linux VXLAN
and Geneve send zero when configured with udp6zerocsumtx).

Outbound, `output_ip()` resolves a tunnel's next hop in the neighbour cache (ARP for IPv4,
a Neighbor Solicitation for IPv6, with a bounded queue while it resolves) and sends through
the egress bridge. The kernel, which owns the bridge's internal port and its addresses,
answers ARP and neighbour solicitations for them; the tunnel layer learns neighbours
from the ARP and ND messages that cross the bridge.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from espswitch.datapath.encap import ENCAPSULATIONS, UDP
from espswitch.datapath.errors import PortError
from espswitch.datapath.ipfrag import Reassembler
from espswitch.datapath.tunnel import FOUND, MISSING, ip_str
from espswitch.packet.checksum import ipv6_pseudo_header_sum, ones_complement_sum
from espswitch.packet.icmpv6 import build_neighbor_solicitation, parse_nd

if TYPE_CHECKING:
    from espswitch.datapath.bridge import Bridge
    from espswitch.datapath.datapath import Datapath
    from espswitch.datapath.ports import Port
    from espswitch.datapath.protection import IpsecLayer
    from espswitch.datapath.tunnel_port import TunnelPort

QUEUE_MAX = 64  # frames waiting for one next hop's MAC
ARP_RETRY = 1.0
ARP_TRIES = 3
ETH_IPV4 = b"\x08\x00"
ETH_IPV6 = b"\x86\xdd"
IPV6_FRAGMENT = 44
ICMPV6 = 58
ARP_REQ_HDR = b"\x08\x06\x00\x01\x08\x00\x06\x04\x00\x01"
ARP_HDR = b"\x00\x01\x08\x00\x06\x04"

# (bridge, in_port, frame, l3 offset, l4 offset, end) -> consumed? `end` is where the IP
# datagram ends by its header (IPv4 total length, IPv6 payload length), unchecked for
# IPv4 (each handler judges it), within the frame for IPv6. frame[l3] >> 4 is the version.
IpHandler = Callable[["Bridge", "Port", bytes, int, int, int], bool]
UdpHandler = Callable[["Bridge", "Port", bytes, int, int, int], bool]


def ip_src(frame: bytes, l3: int) -> bytes:
    """The source address of the IPv4 or IPv6 header at `l3`."""
    if frame[l3] >> 4 == 4:
        return frame[l3 + 12 : l3 + 16]
    return frame[l3 + 8 : l3 + 24]


class TunnelLayer:
    """Everything the datapath does for tunnels that is not per port."""

    def __init__(self, dp: Datapath) -> None:
        self.dp = dp
        self.ports: list[TunnelPort] = []
        self.ip_handlers: dict[int, IpHandler] = {17: self._udp_input}
        self.udp_handlers: dict[int, UdpHandler] = {}
        self.udp_owners: dict[int, str] = {}  # UDP port -> what listens there
        # (IP protocol, UDP port or 0) -> (remote_ip, key) -> the tunnel there
        self.endpoints: dict[tuple[int, int], dict[tuple[bytes, int], TunnelPort]] = {}
        # (bridge name, next hop) -> [(port, ipv4 packet)]
        self.queues: dict[tuple[str, bytes], list[tuple[TunnelPort, bytes]]] = {}
        # (bridge name, next hop) -> [first try, last try, tries]
        self.arp_tries: dict[tuple[str, bytes], list] = {}
        self.ready: list[tuple[str, bytes]] = []
        self.route_seq = -1
        # Outer fragments of tunnel packets are reassembled here (RFC 4303 §3.4.1).
        self.ipfrag = Reassembler(dp.count_drop)
        # ESP's SPI demux (protection.IpsecLayer), made when the first protected tunnel is.
        self.ipsec: IpsecLayer | None = None
        self._bypass = False

    # --- registration -------------------------------------------------------------------
    def register_ip_handler(self, proto: int, handler: IpHandler) -> None:
        self.ip_handlers[proto] = handler

    def register_udp_handler(self, dport: int, handler: UdpHandler, owner: str = "") -> None:
        """Take UDP `dport` for `owner` (an encapsulation's name); one owner per port."""
        self.udp_handlers[dport] = handler
        self.udp_owners[dport] = owner

    def unregister_udp_handler(self, dport: int) -> None:
        self.udp_handlers.pop(dport, None)
        self.udp_owners.pop(dport, None)

    def check_udp_port(self, name: str, dport: int, owner: str) -> None:
        """Raise PortError if `dport` is taken by something other than `owner`."""
        other = self.udp_owners.get(dport, owner)
        if other != owner:
            raise PortError(f"interface {name}: options:dst_port {dport} is already used by "
                            f"{other}")

    def add_endpoint(self, port: TunnelPort) -> None:
        """Receive clear packets of `port`'s encapsulation (its UDP port, or its IP
        protocol) and key from its remote address."""
        enc = port.encapsulation
        demux = (enc.PROTO, enc.dst_port)
        if enc.PROTO == UDP:
            owner = f"{enc.NAME} tunnels"
            self.check_udp_port(port.name, enc.dst_port, owner)
        table = self.endpoints.setdefault(demux, {})
        key = (port.underlay.remote_ip, enc.key)
        other = table.get(key)
        if other is not None and other is not port:
            where = f"dst_port {enc.dst_port}" if enc.PROTO == UDP else f"type {port.TYPE}"
            raise PortError(
                f"interface {port.name} duplicates tunnel {other.name} "
                f"(same remote_ip {ip_str(key[0])}, key {enc.key} and {where})"
            )
        table[key] = port
        if enc.PROTO == UDP:
            if enc.dst_port not in self.udp_handlers:
                self.register_udp_handler(
                    enc.dst_port, partial(self._udp_encap_input, demux, enc.NAME), owner)
        elif enc.PROTO not in self.ip_handlers:
            self.register_ip_handler(enc.PROTO, partial(self._ip_encap_input, demux, enc.NAME))

    def remove_endpoint(self, port: TunnelPort) -> None:
        enc = port.encapsulation
        demux = (enc.PROTO, enc.dst_port)
        table = self.endpoints.get(demux)
        key = (port.underlay.remote_ip, enc.key)
        if table is not None and table.get(key) is port:
            del table[key]
            if not table:
                del self.endpoints[demux]
                if enc.PROTO == UDP:
                    self.unregister_udp_handler(enc.dst_port)
                else:
                    self.ip_handlers.pop(enc.PROTO, None)

    def add_port(self, port: TunnelPort) -> None:
        self.ports.append(port)
        port.resolve()
        self.update_local_ips()

    def remove_port(self, port: TunnelPort) -> None:
        if port in self.ports:
            self.ports.remove(port)
        for key, q in list(self.queues.items()):
            self.queues[key] = [e for e in q if e[0] is not port]
        self.update_local_ips()

    def update_local_ips(self) -> None:
        per_bridge: dict[str, set[bytes]] = {}
        for p in self.ports:
            u = p.underlay
            if u.egress_bridge is not None and u.local_ip is not None:
                per_bridge.setdefault(u.egress_bridge.name, set()).add(u.local_ip)
        for b in self.dp.bridges.values():
            b.local_ips = frozenset(per_bridge.get(b.name, ()))
        self.dp.fast_changed()

    # --- inbound ------------------------------------------------------------------------
    def receive(self, bridge: Bridge, in_port: Port, frame: bytes) -> bool:
        """An IPv4 frame to a local tunnel endpoint: True if the tunnel layer took it."""
        if len(frame) < 34 or self._bypass:
            return False
        vihl = frame[14]
        if vihl >> 4 != 4:
            return False
        handler = self.ip_handlers.get(frame[23])
        if handler is None:
            return False
        if frame[20] & 0x3F or frame[21]:
            return self._fragment(bridge, in_port, frame, handler)
        return handler(bridge, in_port, frame, 14, 14 + (vihl & 15) * 4,
                       14 + ((frame[16] << 8) | frame[17]))

    def receive6(self, bridge: Bridge, in_port: Port, frame: bytes) -> bool:
        """An IPv6 frame to a local tunnel endpoint: True if the tunnel layer took it."""
        if len(frame) < 54 or self._bypass or frame[14] >> 4 != 6:
            return False
        nh = frame[20]
        if nh == IPV6_FRAGMENT:
            return self._fragment6(bridge, in_port, frame)
        handler = self.ip_handlers.get(nh)
        if handler is None:
            return False
        end = 54 + ((frame[18] << 8) | frame[19])
        if end > len(frame):
            in_port.stats.drop("rx_malformed")
            self.dp.count_drop("ipv6_malformed")
            return True
        return handler(bridge, in_port, frame, 14, 54, end)

    def _fragment6(self, bridge: Bridge, in_port: Port, frame: bytes) -> bool:
        """An outer IPv6 fragment of ESP, GRE or UDP: held until its datagram is whole,
        then handled as IPv4's are (`_fragment`); others go to the kernel."""
        if len(frame) < 62:
            return False
        handler = self.ip_handlers.get(frame[54])
        if handler is None:
            return False
        done = self.ipfrag.add6(frame, 14, self.dp.now)
        if done is None:
            return True  # held, or dropped and counted
        whole, fragments = done
        self._reassembled(bridge, in_port, handler, whole, fragments, 54,
                          54 + ((whole[18] << 8) | whole[19]))
        return True

    def _fragment(self, bridge: Bridge, in_port: Port, frame: bytes, handler: IpHandler) -> bool:
        """A fragment of an ESP or UDP packet: held until its datagram is whole."""
        done = self.ipfrag.add(frame, 14, self.dp.now)
        if done is None:
            return True  # held, or dropped and counted
        whole, fragments = done
        self._reassembled(bridge, in_port, handler, whole, fragments,
                          14 + (whole[14] & 15) * 4, 14 + ((whole[16] << 8) | whole[17]))
        return True

    def _reassembled(self, bridge: Bridge, in_port: Port, handler: IpHandler, whole: bytes,
                     fragments: list[bytes], l4: int, end: int) -> None:
        """A datagram made whole from outer fragments (IPv4 or IPv6), to its handler."""
        if not handler(bridge, in_port, whole, 14, l4, end):
            # Not for a tunnel (UDP to another port, IKE's for one): the fragments go on
            # through the bridge as they came, for the kernel to reassemble.
            self._bypass = True
            try:
                bridge.process(in_port, fragments, False)
            finally:
                self._bypass = False

    def _udp_input(self, bridge: Bridge, in_port: Port, frame: bytes, l3: int, l4: int,
                   end: int) -> bool:
        if len(frame) < l4 + 8:
            return False
        handler = self.udp_handlers.get((frame[l4 + 2] << 8) | frame[l4 + 3])
        if handler is None:
            return False
        return handler(bridge, in_port, frame, l3, l4, end)

    def _udp_encap_input(self, demux: tuple[int, int], encap: str, bridge: Bridge,
                         in_port: Port, frame: bytes, l3: int, l4: int, end: int) -> bool:
        if frame[l3] >> 4 == 6 and (frame[l4 + 6] or frame[l4 + 7]):
            # Over IPv6, a UDP checksum that is not zero is checked (module docstring).
            ulen = (frame[l4 + 4] << 8) | frame[l4 + 5]
            if ulen >= 8 and l4 + ulen <= end and ones_complement_sum(
                    memoryview(frame)[l4 : l4 + ulen],
                    ipv6_pseudo_header_sum(frame[l3 + 8 : l3 + 24], frame[l3 + 24 : l3 + 40],
                                           17, ulen)) != 0xFFFF:
                in_port.stats.drop("rx_malformed")
                self.dp.count_drop(f"{encap}_bad_checksum")
                return True
        return self._encap_input(demux, encap, bridge, in_port, frame, l3, l4, end)

    def _ip_encap_input(self, demux: tuple[int, int], encap: str, bridge: Bridge,
                        in_port: Port, frame: bytes, l3: int, l4: int, end: int) -> bool:
        if end < l4 or end > len(frame):
            in_port.stats.drop("rx_malformed")
            self.dp.count_drop(f"{encap}_malformed")
            return True
        return self._encap_input(demux, encap, bridge, in_port, frame, l3, l4, end)

    def _encap_input(self, demux: tuple[int, int], encap: str, bridge: Bridge,
                     in_port: Port, frame: bytes, l3: int, l4: int, end: int) -> bool:
        found = ENCAPSULATIONS[encap].pop(frame, l4, min(end, len(frame)))
        if type(found) is str:
            in_port.stats.drop("rx_malformed")
            self.dp.count_drop(f"{encap}_{found}")
            return True
        key, start, stop = found
        src = ip_src(frame, l3)
        port = self.endpoints[demux].get((src, key))
        if port is None:
            in_port.stats.drop("rx_unknown_tunnel")
            self.dp.count_drop(f"{encap}_unknown_tunnel")
            if self.dp.drop_log_due():
                self.dp.log_rl(
                    f"{bridge.name}: {encap} from {ip_str(src)} with "
                    f"key {key} matches no tunnel, dropped"
                )
            return True
        port.input_clear(frame[start:stop])
        return True

    def snoop_arp(self, bridge: Bridge, frame: bytes) -> None:
        """Learn tunnel neighbours from ARP crossing a bridge that has endpoints."""
        if not bridge.local_ips or len(frame) < 42 or frame[14:20] != ARP_HDR:
            return
        sha = frame[22:28]
        spa = frame[28:32]
        if spa == b"\0\0\0\0" or sha[0] & 1 or spa in bridge.local_ips:
            return
        self._snooped(bridge, spa, sha)

    def snoop_nd(self, bridge: Bridge, frame: bytes) -> None:
        """Learn tunnel neighbours from IPv6 neighbour discovery crossing a bridge that has
        endpoints: an advertisement's target, a solicitation's sender (RFC 4861 §7.2.3)."""
        if not bridge.local_ips or len(frame) < 78 or frame[20] != ICMPV6 \
                or frame[54] not in (135, 136) or frame[6] & 1:
            return
        found = parse_nd(memoryview(frame)[14:])
        if found is None:
            return
        _typ, ip, mac = found
        if mac is None or mac[0] & 1 or ip == bytes(16) or ip in bridge.local_ips:
            return
        self._snooped(bridge, ip, mac)

    def _snooped(self, bridge: Bridge, ip: bytes, mac: bytes) -> None:
        """A neighbour seen in ARP or ND: learned, and what waited for it released."""
        dp = self.dp
        dp.neigh.learn(bridge.name, ip, mac, dp.now)
        key = (bridge.name, ip)
        self.arp_tries.pop(key, None)
        if key in self.queues:
            self.ready.append(key)

    def learned(self, bridge: str, ip: bytes) -> None:
        """Called after tnl/neigh/set: release what waited for that neighbour."""
        key = (bridge, ip)
        self.arp_tries.pop(key, None)
        if key in self.queues:
            self.ready.append(key)

    def flush_ready(self) -> bool:
        """Send the frames whose next hop just became known; True if any work was done."""
        if not self.ready:
            return False
        keys, self.ready = self.ready, []
        for key in keys:
            q = self.queues.pop(key, None)
            if not q:
                continue
            by_port: dict[TunnelPort, list[bytes]] = {}
            for port, pkt in q:
                by_port.setdefault(port, []).append(pkt)
            for port, pkts in by_port.items():
                if port in self.ports:
                    self.output_ip(port, pkts)
        return True

    # --- outbound -----------------------------------------------------------------------
    def output_ip(self, port: TunnelPort, pkts: list[bytes]) -> None:
        """Send IP packets (of the underlay's family) built by `port` to its next hop
        through its egress bridge."""
        dp = self.dp
        u = port.underlay
        bridge = u.egress_bridge
        internal = u.egress_port
        if bridge is None or internal is None:
            port.stats.drop("tx_no_route", len(pkts))
            return
        state, mac = dp.neigh.lookup(bridge.name, u.nexthop, dp.now)
        if state == FOUND:
            eth = mac + internal.mac + u.ETHERTYPE
            bridge.output_known(internal, [eth + p for p in pkts], mac)
            return
        key = (bridge.name, u.nexthop)
        q = self.queues.setdefault(key, [])
        room = QUEUE_MAX - len(q)
        if room < len(pkts):
            port.stats.drop("tx_neigh_drops", len(pkts) - max(room, 0))
        for p in pkts[: max(room, 0)]:
            q.append((port, p))
        if state == MISSING:
            dp.neigh.set_pending(bridge.name, u.nexthop, dp.now)
            self.arp_tries[key] = [dp.now, dp.now, 1]
            self.send_arp(bridge, internal, u.local_ip, u.nexthop)

    output_ipv4 = output_ip  # its name before IPv6

    def send_arp(self, bridge: Bridge, internal: Port, sip: bytes, tip: bytes) -> None:
        """Ask for `tip`'s MAC from the internal port: ARP for IPv4, a Neighbor
        Solicitation for IPv6."""
        smac = internal.mac
        if len(tip) == 16:
            dmac, ns = build_neighbor_solicitation(sip or bytes(16), tip, smac)
            frame = dmac + smac + ETH_IPV6 + ns
        else:
            frame = b"\xff" * 6 + smac + ARP_REQ_HDR + smac + sip + b"\0" * 6 + tip
        bridge.process(internal, [frame], False)

    # --- housekeeping -------------------------------------------------------------------
    def run(self, now: float) -> None:
        dp = self.dp
        if self.ipfrag.pending:
            self.ipfrag.expire(now)
        if dp.routes.seq != self.route_seq:
            self.route_seq = dp.routes.seq
            for p in self.ports:
                p.resolve()
            self.update_local_ips()
        for key, tries in list(self.arp_tries.items()):
            if now - tries[1] < ARP_RETRY:
                continue
            if tries[2] >= ARP_TRIES:
                del self.arp_tries[key]
                dp.neigh.pending.pop(key, None)
                for port, _pkt in self.queues.pop(key, ()):
                    port.stats.drop("tx_neigh_drops")
                continue
            bridge = dp.bridges.get(key[0])
            # A tunnel of the next hop's family: its local address is the request's source.
            v6 = len(key[1]) == 16
            port = next((p for p in self.ports if p.underlay.egress_bridge is bridge
                         and p.underlay.V6 is v6), None)
            if bridge is None or port is None or port.underlay.egress_port is None:
                del self.arp_tries[key]
                dp.neigh.pending.pop(key, None)
                continue
            tries[1] = now
            tries[2] += 1
            self.send_arp(bridge, port.underlay.egress_port, port.underlay.local_ip, key[1])
