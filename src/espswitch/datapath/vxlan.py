"""Native tunneling: the tunnel layer (demux, neighbour resolution) and the `vxlan` port.

Two seams for tunnel types built on top (issue 4's `vxlanipsec`):

* outbound, `VxlanPort.send()` turns each frame into an IPv4 packet with `encapsulate()`,
  passes it through `wrap_ipv4()` (identity here; ESP protection in a subclass) and hands the
  result to `TunnelLayer.output_ipv4()`, which resolves the next hop and adds Ethernet;
* inbound, `TunnelLayer.receive()` gets every IPv4 frame addressed to a tunnel endpoint
  (`Bridge.local_ips`) and dispatches by IP protocol (`register_ip_handler`) and UDP
  destination port (`register_udp_handler`); VXLAN's handler finds the port by
  (source IP, VNI) and calls `VxlanPort.input_vxlan(frame, offset, protected=False)`.
"""

from __future__ import annotations

import ipaddress
import struct
import zlib
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, ClassVar

from espswitch.datapath.devices import device_mtu, set_device_mtu
from espswitch.datapath.errors import PortError
from espswitch.datapath.ipfrag import Reassembler
from espswitch.datapath.ports import Port, TapPort, register_port_type
from espswitch.datapath.tunnel import FOUND, MISSING, ip4, ip4_str
from espswitch.packet.errors import PacketError
from espswitch.packet.icmp import build_frag_needed
from espswitch.packet.ipv4 import fragment_ipv4
from espswitch.values import parse_uint

if TYPE_CHECKING:
    from espswitch.datapath.bridge import Bridge
    from espswitch.datapath.datapath import Datapath

QUEUE_MAX = 64  # frames waiting for one next hop's MAC
ARP_RETRY = 1.0
ARP_TRIES = 3
VXLAN_PORT = 4789
# UDP ports a tunnel may not use: the daemon's own protocols listen there.
RESERVED_UDP_PORTS = {500: "IKE", 4500: "IKE and UDP-encapsulated ESP (NAT-T)"}
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
DEFAULT_UNDERLAY_MTU = 1500
ETH_IPV4 = b"\x08\x00"
ARP_REQ_HDR = b"\x08\x06\x00\x01\x08\x00\x06\x04\x00\x01"
ARP_HDR = b"\x00\x01\x08\x00\x06\x04"
_pack_into = struct.pack_into

# (bridge, in_port, frame, l3_offset, ihl) -> consumed?
IpHandler = Callable[["Bridge", Port, bytes, int, int], bool]
# (bridge, in_port, frame, l3_offset, l4_offset) -> consumed?
UdpHandler = Callable[["Bridge", Port, bytes, int, int], bool]


class TunnelLayer:
    """Everything the datapath does for tunnels that is not per port."""

    def __init__(self, dp: Datapath) -> None:
        self.dp = dp
        self.ports: list[TunnelPort] = []
        self.ip_handlers: dict[int, IpHandler] = {17: self._udp_input}
        self.udp_handlers: dict[int, UdpHandler] = {}
        self.udp_owners: dict[int, str] = {}  # UDP port -> what listens there
        # dst_port -> (remote_ip, vni) -> port
        self.vxlan: dict[int, dict[tuple[bytes, int], VxlanPort]] = {}
        # (bridge name, next hop) -> [(port, ipv4 packet)]
        self.queues: dict[tuple[str, bytes], list[tuple[TunnelPort, bytes]]] = {}
        # (bridge name, next hop) -> [first try, last try, tries]
        self.arp_tries: dict[tuple[str, bytes], list] = {}
        self.ready: list[tuple[str, bytes]] = []
        self.route_seq = -1
        # Outer fragments of tunnel packets are reassembled here (RFC 4303 §3.4.1).
        self.ipfrag = Reassembler(dp.count_drop)
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

    def add_vxlan(self, port: VxlanPort) -> None:
        self.check_udp_port(port.name, port.dst_port, "vxlan tunnels")
        table = self.vxlan.setdefault(port.dst_port, {})
        key = (port.remote_ip, port.vni)
        other = table.get(key)
        if other is not None and other is not port:
            raise PortError(
                f"interface {port.name} duplicates tunnel {other.name} "
                f"(same remote_ip {ip4_str(port.remote_ip)}, key {port.vni} and "
                f"dst_port {port.dst_port})"
            )
        table[key] = port
        if port.dst_port not in self.udp_handlers:
            self.register_udp_handler(port.dst_port, partial(self._vxlan_input, port.dst_port),
                                      "vxlan tunnels")

    def remove_vxlan(self, port: VxlanPort) -> None:
        table = self.vxlan.get(port.dst_port)
        if table is not None and table.get((port.remote_ip, port.vni)) is port:
            del table[(port.remote_ip, port.vni)]
            if not table:
                del self.vxlan[port.dst_port]
                self.unregister_udp_handler(port.dst_port)

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
            if p.egress_bridge is not None and p.local_ip is not None:
                per_bridge.setdefault(p.egress_bridge.name, set()).add(p.local_ip)
        for b in self.dp.bridges.values():
            b.local_ips = frozenset(per_bridge.get(b.name, ()))

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

    def _vxlan_input(
        self, dport: int, bridge: Bridge, in_port: Port, frame: bytes, l3: int, l4: int
    ) -> bool:
        off = l4 + 8
        # The UDP length must hold VXLAN and an Ethernet header and end in the frame; what
        # follows it (Ethernet padding) is not part of the inner frame.
        end = l4 + ((frame[l4 + 4] << 8) | frame[l4 + 5])
        if end < off + 8 + 14 or end > len(frame) or not frame[off] & 0x08:
            in_port.stats.drop("rx_malformed")
            self.dp.count_drop("vxlan_malformed")
            return True
        if end != len(frame):
            frame = frame[:end]
        vni = (frame[off + 4] << 16) | (frame[off + 5] << 8) | frame[off + 6]
        port = self.vxlan[dport].get((frame[l3 + 12 : l3 + 16], vni))
        if port is None:
            in_port.stats.drop("rx_unknown_tunnel")
            self.dp.count_drop("vxlan_unknown_tunnel")
            if self.dp.drop_log_due():
                self.dp.log_rl(
                    f"{bridge.name}: VXLAN from {ip4_str(frame[l3 + 12 : l3 + 16])} with VNI "
                    f"{vni} matches no tunnel, dropped"
                )
            return True
        port.input_vxlan(frame, off + 8, False)
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
        bridge = port.egress_bridge
        internal = port.egress_port
        if bridge is None or internal is None:
            port.stats.drop("tx_no_route", len(pkts))
            return
        state, mac = dp.neigh.lookup(bridge.name, port.nexthop, dp.now)
        if state == FOUND:
            eth = mac + internal.mac + ETH_IPV4
            bridge.output_known(internal, [eth + p for p in pkts], mac)
            return
        key = (bridge.name, port.nexthop)
        q = self.queues.setdefault(key, [])
        room = QUEUE_MAX - len(q)
        if room < len(pkts):
            port.stats.drop("tx_neigh_drops", len(pkts) - max(room, 0))
        for p in pkts[: max(room, 0)]:
            q.append((port, p))
        if state == MISSING:
            dp.neigh.set_pending(bridge.name, port.nexthop, dp.now)
            self.arp_tries[key] = [dp.now, dp.now, 1]
            self.send_arp(bridge, internal, port.local_ip, port.nexthop)

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
            port = next((p for p in self.ports if p.egress_bridge is bridge), None)
            if bridge is None or port is None or port.egress_port is None:
                del self.arp_tries[key]
                dp.neigh.pending.pop(key, None)
                continue
            tries[1] = now
            tries[2] += 1
            self.send_arp(bridge, port.egress_port, port.local_ip, key[1])


def _parse_int(name: str, opt: str, text: str, lo: int, hi: int) -> int:
    v = parse_uint(text)
    if v is None:
        raise PortError(f"interface {name}: options:{opt} '{text}' is not a number "
                        "(decimal or 0x hexadecimal digits)")
    if not lo <= v <= hi:
        raise PortError(f"interface {name}: options:{opt}={text} is out of range ({lo} to {hi})")
    return v


def _not_unicast(addr: bytes) -> str | None:
    """Why `addr` cannot be a tunnel endpoint, or None if it can."""
    a = ipaddress.IPv4Address(addr)
    if a.is_unspecified:
        return "the unspecified address"
    if a == _BROADCAST:
        return "the broadcast address"
    if a.is_multicast:
        return "a multicast address"
    if a.is_loopback:
        return "a loopback address"
    if a.is_reserved:
        return "a reserved address (240.0.0.0/4)"
    return None


def _parse_ip(name: str, opt: str, text: str) -> bytes:
    try:
        return ip4(text)
    except ValueError:
        raise PortError(
            f"interface {name}: options:{opt} '{text}' is not an IPv4 address"
        ) from None


class TunnelPort(Port):
    """Common part of IPv4 tunnels: options, route resolution, status."""

    OPTIONS: ClassVar[frozenset[str]] = frozenset(
        {"remote_ip", "local_ip", "key", "dst_port", "ttl", "tos", "df_default"}
    )
    DEFAULT_DST_PORT: ClassVar[int] = VXLAN_PORT

    def __init__(self, dp, bridge, name, options) -> None:
        super().__init__(dp, bridge, name, options)
        o = self.options
        if "remote_ip" not in o:
            raise PortError(f"{self.TYPE} interface {name} needs options:remote_ip")
        self.remote_ip = _parse_ip(name, "remote_ip", o["remote_ip"])
        self.local_ip_opt = _parse_ip(name, "local_ip", o["local_ip"]) if "local_ip" in o else None
        for opt, addr in (("remote_ip", self.remote_ip), ("local_ip", self.local_ip_opt)):
            problem = _not_unicast(addr) if addr is not None else None
            if problem:
                raise PortError(f"interface {name}: options:{opt} {ip4_str(addr)} is {problem}, "
                                "not a tunnel endpoint")
        if self.remote_ip in dp.routes.local_addresses():
            raise PortError(f"interface {name}: options:remote_ip {ip4_str(self.remote_ip)} is "
                            "an address of this hypervisor; it must be the peer's")
        self.vni = _parse_int(name, "key", o.get("key", "0"), 0, (1 << 24) - 1)
        self.dst_port = _parse_int(
            name, "dst_port", o.get("dst_port", str(self.DEFAULT_DST_PORT)), 1, 65535
        )
        if self.dst_port in RESERVED_UDP_PORTS:
            raise PortError(
                f"interface {name}: options:dst_port {self.dst_port} is "
                f"{RESERVED_UDP_PORTS[self.dst_port]}'s port; choose another "
                f"(the default is {self.DEFAULT_DST_PORT})")
        self.ttl = _parse_int(name, "ttl", o.get("ttl", "64"), 1, 255)
        self.tos = _parse_int(name, "tos", o.get("tos", "0"), 0, 255)
        df = o.get("df_default", "true").lower()
        if df not in ("true", "false"):
            raise PortError(f"interface {name}: options:df_default must be true or false")
        self.df = df == "true"
        # Resolved from the route table by resolve().
        self.route = None
        self.egress_bridge: Bridge | None = None
        self.egress_port: Port | None = None
        self.local_ip: bytes | None = None
        self.nexthop: bytes = self.remote_ip
        self.route_problem = "not resolved yet"
        self._route_seq = -1

    def resolve(self) -> None:
        """Find the route, egress bridge, local address and next hop of this tunnel."""
        dp = self.dp
        self._route_seq = dp.routes.seq
        self.egress_bridge = self.egress_port = self.route = None
        self.local_ip = self.local_ip_opt
        route = dp.routes.lookup(self.remote_ip)
        local = dp.routes.local_addresses()
        if self.remote_ip in local:
            self.route_problem = (f"remote_ip {ip4_str(self.remote_ip)} is an address of this "
                                  "hypervisor")
        elif local and self.local_ip_opt is not None and self.local_ip_opt not in local:
            # Not an error: the address may be added later; until then nothing is sent.
            self.route_problem = (f"local_ip {ip4_str(self.local_ip_opt)} is not an address "
                                  "of this hypervisor")
        elif route is None:
            self.route_problem = f"no route to {ip4_str(self.remote_ip)}"
        else:
            self.route = route
            found = dp.internal_port(route.dev)
            if found is None:
                self.route_problem = (
                    f"the route to {ip4_str(self.remote_ip)} leaves through {route.dev}, "
                    "which is not a bridge's internal port"
                )
            elif self.local_ip is None and not (route.src or dp.routes.source_for(route.dev)):
                self.route_problem = f"{route.dev} has no IPv4 address to use as local_ip"
            else:
                self.egress_bridge, self.egress_port = found
                if self.local_ip is None:
                    self.local_ip = route.src or dp.routes.source_for(route.dev)
                self.nexthop = route.gw or self.remote_ip
                self.route_problem = ""
        self.rebuild_template()

    def rebuild_template(self) -> None:
        """Recompute precomputed headers after the local address changed."""

    def status(self) -> dict[str, str]:
        st = {}
        if self.route is not None:
            st["tunnel_egress_iface"] = self.route.dev
            port = self.dp.ports.get(self.route.dev)
            st["tunnel_egress_iface_carrier"] = (
                "up" if port is not None and port.link_state() == "up" else "down"
            )
        if self.route_problem:
            st["tunnel_problem"] = self.route_problem
        return st

    def link_state(self) -> str:
        return "up" if self.egress_bridge is not None else "down"

    def describe(self) -> str:
        parts = []
        if self.local_ip_opt:
            parts.append(f"local_ip={ip4_str(self.local_ip_opt)}")
        parts.append(f"remote_ip={ip4_str(self.remote_ip)}")
        if self.vni:
            parts.append(f"key={self.vni}")
        if self.dst_port != self.DEFAULT_DST_PORT:
            parts.append(f"dst_port={self.dst_port}")
        return f"{self.TYPE}: {', '.join(parts)}"

    def wrap_ipv4(self, pkts: list[bytes]) -> list[bytes]:
        """Seam: transform the batch of IPv4 packets before it leaves (ESP goes here)."""
        return pkts


@register_port_type("vxlan")
class VxlanPort(TunnelPort):
    """VXLAN (RFC 7348) over IPv4, encapsulated from a precomputed header template."""

    #: the largest inner frame that fits the underlay MTU (set from the egress device)
    max_frame: int = DEFAULT_UNDERLAY_MTU - 36
    underlay_mtu: int = DEFAULT_UNDERLAY_MTU

    def open(self) -> None:
        self._ip_id = 0
        self._tmpl = bytearray(36)
        self._csum_base = 0
        self.dp.tunnels.add_vxlan(self)
        self.dp.tunnels.add_port(self)

    def close(self) -> None:
        self.dp.tunnels.remove_vxlan(self)
        self.dp.tunnels.remove_port(self)

    def rebuild_template(self) -> None:
        src = self.local_ip or b"\0\0\0\0"
        t = bytearray(36)
        # IPv4: version/IHL, TOS, total length*, ID*, flags (DF), TTL, UDP, checksum*, src, dst
        struct.pack_into(
            "!BBHHHBBH4s4s",
            t,
            0,
            0x45,
            self.tos,
            0,
            0,
            0x4000 if self.df else 0,
            self.ttl,
            17,
            0,
            src,
            self.remote_ip,
        )
        # UDP: source port*, destination port, length*, checksum 0 (allowed over IPv4)
        struct.pack_into("!HHHH", t, 20, 0, self.dst_port, 0, 0)
        # VXLAN: I flag, VNI
        struct.pack_into("!II", t, 28, 0x08000000, self.vni << 8)
        self._tmpl = t
        words = struct.unpack("!10H", bytes(t[:20]))
        self._csum_base = sum(words)  # the patched words are zero in the template
        if self.egress_port is not None:
            self.underlay_mtu = device_mtu(self.egress_port.name) or DEFAULT_UNDERLAY_MTU
        self.max_frame = self._largest_frame(self.underlay_mtu)

    def resolve(self) -> None:
        super().resolve()
        self.adjust_mtus()

    def status(self) -> dict[str, str]:
        return {**super().status(), "tunnel_mtu": str(self.inner_mtu)}

    # --- MTU --------------------------------------------------------------------------------
    def outer_len(self, frame_len: int) -> int:
        """Bytes on the underlay (IP header onwards) for an inner frame of `frame_len`."""
        return 36 + frame_len

    def _largest_frame(self, mtu: int) -> int:
        # Encryption padding makes the overhead step: search near the first estimate.
        frame = mtu - self.outer_len(0) - 16
        while self.outer_len(frame + 1) <= mtu:
            frame += 1
        while frame > 0 and self.outer_len(frame) > mtu:
            frame -= 1
        return frame

    @property
    def inner_mtu(self) -> int:
        """The IP MTU a VM behind this tunnel can use without fragmentation."""
        return self.max_frame - 14

    def adjust_mtus(self) -> None:
        """Lower the MTU of the bridge's tap and internal devices to what the tunnel carries,
        so that VMs never send a frame the underlay cannot take (OVS leaves this to users)."""
        mtu = self.inner_mtu
        for port in self.bridge.ports:
            if isinstance(port, TapPort) and port.dev is not None:
                current = device_mtu(port.name)
                if current is not None and current > mtu:
                    set_device_mtu(port.name, mtu)

    def fit(self, frames: list[bytes]) -> list[bytes]:
        """The frames with each one too big for the tunnel replaced by what can be sent."""
        max_frame = self.max_frame
        out: list[bytes] = []
        for f in frames:
            if len(f) <= max_frame:
                out.append(f)
            else:
                out.extend(self._too_big(f))
        return out

    def _too_big(self, frame: bytes) -> list[bytes]:
        """ICMP "fragmentation needed" back to the sender if DF is set, else fragments.

        The outer packet is never fragmented: a receiver would have to reassemble it
        before it could even check the tunnel's integrity.
        """
        st = self.stats
        if frame[12:14] != ETH_IPV4 or len(frame) < 34:
            st.drop("tx_too_big")
            return []
        ip = frame[14:]
        mtu = self.inner_mtu
        if ip[6] & 0x40:  # DF: path MTU discovery (RFC 1191) across the tunnel
            st.drop("tx_too_big")
            try:
                icmp = build_frag_needed(ip, mtu, ip[16:20])
            except (PacketError, ValueError):
                return []
            self.dp.defer_rx(self, frame[6:12] + frame[0:6] + ETH_IPV4 + icmp)
            return []
        try:
            pieces = fragment_ipv4(ip, mtu)
        except PacketError:
            st.drop("tx_too_big")
            return []
        return [frame[:14] + p for p in pieces]

    def encapsulate(self, frame: bytes) -> bytes:
        """The IPv4/UDP/VXLAN packet that carries `frame`."""
        hdr = bytearray(self._tmpl)
        total = 36 + len(frame)
        ident = self._ip_id = (self._ip_id + 1) & 0xFFFF
        s = self._csum_base + total + ident
        s = (s & 0xFFFF) + (s >> 16)
        s = (s & 0xFFFF) + (s >> 16)
        # Source port from the inner flow: MACs, then IPs and L4 ports when present.
        h = zlib.crc32(frame[26:38], zlib.crc32(frame[0:14]))
        _pack_into("!HH", hdr, 2, total, ident)
        _pack_into("!H", hdr, 10, ~s & 0xFFFF)
        _pack_into("!H", hdr, 20, 49152 | (h & 0x3FFF))
        _pack_into("!H", hdr, 24, total - 20)
        hdr += frame
        return bytes(hdr)

    def routable(self, frames: list[bytes]) -> list[bytes] | None:
        """The batch to send, cut to the tunnel MTU (`fit`); None, counted, when the
        tunnel has no route."""
        if self._route_seq != self.dp.routes.seq:
            self.resolve()
        if self.egress_bridge is None:
            self.stats.drop("tx_no_route", len(frames))
            return None
        if max(map(len, frames)) > self.max_frame:
            frames = self.fit(frames)
        return frames

    def send(self, frames: list[bytes]) -> None:
        frames = self.routable(frames)
        if frames is None:
            return
        st = self.stats
        st["tx_packets"] += len(frames)
        st["tx_bytes"] += sum(map(len, frames))
        enc = self.encapsulate
        pkts = self.wrap_ipv4([enc(f) for f in frames])
        if pkts:
            self.dp.tunnels.output_ipv4(self, pkts)

    def input_vxlan(self, frame: bytes, offset: int, protected: bool) -> None:
        """Seam: a VXLAN packet for this tunnel; the inner frame starts at `offset`.

        `protected` says whether it arrived inside ESP; a `vxlanipsec` subclass refuses
        unprotected ones.
        """
        self.dp.defer_rx(self, frame[offset:])
