"""The tunnel layer: what the datapath does for tunnels that is not per port.

Inbound, `receive()` gets every IPv4 frame addressed to a tunnel endpoint
(`Bridge.local_ips`), reassembles outer fragments (RFC 4303 §3.4.1), and dispatches by IP
protocol (`register_ip_handler`: ESP registers 50) and UDP destination port
(`register_udp_handler`: each encapsulation's port, and 4500 for ESP in UDP). A clear
tunnel's packets are found by (encapsulation port, remote address, key) and handed to
`TunnelPort.input_clear`.

Outbound, `output_ipv4()` resolves a tunnel's next hop in the neighbour cache (ARP, with a
bounded queue while it resolves) and sends through the egress bridge.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from espswitch.datapath.encap import ENCAPSULATIONS, UDP
from espswitch.datapath.errors import PortError
from espswitch.datapath.ipfrag import Reassembler
from espswitch.datapath.tunnel import FOUND, MISSING, ip4_str

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
ARP_REQ_HDR = b"\x08\x06\x00\x01\x08\x00\x06\x04\x00\x01"
ARP_HDR = b"\x00\x01\x08\x00\x06\x04"

# (bridge, in_port, frame, l3_offset, ihl) -> consumed?
IpHandler = Callable[["Bridge", "Port", bytes, int, int], bool]
# (bridge, in_port, frame, l3_offset, l4_offset) -> consumed?
UdpHandler = Callable[["Bridge", "Port", bytes, int, int], bool]


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
                f"(same remote_ip {ip4_str(key[0])}, key {enc.key} and {where})"
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
        return handler(bridge, in_port, frame, 14, (vihl & 15) * 4)

    def _fragment(self, bridge: Bridge, in_port: Port, frame: bytes, handler: IpHandler) -> bool:
        """A fragment of an ESP or UDP packet: held until its datagram is whole."""
        done = self.ipfrag.add(frame, 14, self.dp.now)
        if done is None:
            return True  # held, or dropped and counted
        whole, fragments = done
        if not handler(bridge, in_port, whole, 14, (whole[14] & 15) * 4):
            # Not for a tunnel (UDP to another port, IKE's for one): the fragments go on
            # through the bridge as they came, for the kernel to reassemble.
            self._bypass = True
            try:
                bridge.process(in_port, fragments, False)
            finally:
                self._bypass = False
        return True

    def _udp_input(self, bridge: Bridge, in_port: Port, frame: bytes, l3: int, ihl: int) -> bool:
        l4 = l3 + ihl
        if len(frame) < l4 + 8:
            return False
        handler = self.udp_handlers.get((frame[l4 + 2] << 8) | frame[l4 + 3])
        if handler is None:
            return False
        return handler(bridge, in_port, frame, l3, l4)

    def _udp_encap_input(self, demux: tuple[int, int], encap: str, bridge: Bridge,
                         in_port: Port, frame: bytes, l3: int, l4: int) -> bool:
        return self._encap_input(demux, encap, bridge, in_port, frame, l3, l4)

    def _ip_encap_input(self, demux: tuple[int, int], encap: str, bridge: Bridge,
                        in_port: Port, frame: bytes, l3: int, ihl: int) -> bool:
        total = (frame[l3 + 2] << 8) | frame[l3 + 3]
        if total < ihl or l3 + total > len(frame):
            in_port.stats.drop("rx_malformed")
            self.dp.count_drop(f"{encap}_malformed")
            return True
        return self._encap_input(demux, encap, bridge, in_port, frame, l3, l3 + ihl)

    def _encap_input(self, demux: tuple[int, int], encap: str, bridge: Bridge,
                     in_port: Port, frame: bytes, l3: int, l4: int) -> bool:
        end = l3 + ((frame[l3 + 2] << 8) | frame[l3 + 3])
        found = ENCAPSULATIONS[encap].pop(frame, l4, min(end, len(frame)))
        if type(found) is str:
            in_port.stats.drop("rx_malformed")
            self.dp.count_drop(f"{encap}_{found}")
            return True
        key, start, stop = found
        port = self.endpoints[demux].get((frame[l3 + 12 : l3 + 16], key))
        if port is None:
            in_port.stats.drop("rx_unknown_tunnel")
            self.dp.count_drop(f"{encap}_unknown_tunnel")
            if self.dp.drop_log_due():
                self.dp.log_rl(
                    f"{bridge.name}: {encap} from {ip4_str(frame[l3 + 12 : l3 + 16])} with "
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
        dp = self.dp
        dp.neigh.learn(bridge.name, spa, sha, dp.now)
        key = (bridge.name, spa)
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
                    self.output_ipv4(port, pkts)
        return True

    # --- outbound -----------------------------------------------------------------------
    def output_ipv4(self, port: TunnelPort, pkts: list[bytes]) -> None:
        """Send IPv4 packets built by `port` to its next hop through its egress bridge."""
        dp = self.dp
        u = port.underlay
        bridge = u.egress_bridge
        internal = u.egress_port
        if bridge is None or internal is None:
            port.stats.drop("tx_no_route", len(pkts))
            return
        state, mac = dp.neigh.lookup(bridge.name, u.nexthop, dp.now)
        if state == FOUND:
            eth = mac + internal.mac + ETH_IPV4
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

    def send_arp(self, bridge: Bridge, internal: Port, sip: bytes, tip: bytes) -> None:
        smac = internal.mac
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
            port = next((p for p in self.ports if p.underlay.egress_bridge is bridge), None)
            if bridge is None or port is None or port.underlay.egress_port is None:
                del self.arp_tries[key]
                dp.neigh.pending.pop(key, None)
                continue
            tries[1] = now
            tries[2] += 1
            self.send_arp(bridge, port.underlay.egress_port, port.underlay.local_ip, key[1])
