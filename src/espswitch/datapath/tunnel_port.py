"""Tunnel ports, composed of three parts: an underlay, an encapsulation and a protection.

    TunnelPort = Ipv4Underlay | Ipv6Underlay (addresses, route, outer header)
               x Encapsulation (VXLAN today: key, UDP port, push/pop, registered by name)
               x Protection (Clear, or EspProtection: SA pairs, SPI demux, selectors, IKE)

An interface type names one combination (`register_tunnel_type`): `vxlan` is VXLAN in the
clear, `vxlanipsec` VXLAN that is never anything but ESP-protected. The port itself does
what is common: options, MTU (the sum of the three overheads; the VMs' devices are lowered
to what fits), too-big inner packets (ICMP "fragmentation needed" or fragments for IPv4,
ICMPv6 Packet Too Big for IPv6; the outer packet is never fragmented), status and the
send/receive plumbing. It sees the datapath through a `PortContext` only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from espswitch.datapath.devices import device_mtu, set_device_mtu
from espswitch.datapath.encap import ENCAPSULATIONS
from espswitch.datapath.errors import PortError
from espswitch.datapath.ports import Port, TapPort, register_port_type
from espswitch.datapath.protection import Clear, EspProtection
from espswitch.datapath.underlay import Ipv4Underlay, make_underlay
from espswitch.packet.errors import PacketError
from espswitch.packet.icmp import build_frag_needed
from espswitch.packet.icmpv6 import build_packet_too_big
from espswitch.packet.ipv4 import fragment_ipv4

if TYPE_CHECKING:
    from espswitch.datapath.bridge import Bridge
    from espswitch.datapath.context import PortContext
    from espswitch.datapath.protection import PortRanges
    from espswitch.ike.options import IkeKeying
    from espswitch.ipsec.sa import InboundSA, Mode, OutboundSA, SaParams

DEFAULT_UNDERLAY_MTU = 1500
ETH_IPV4 = b"\x08\x00"
ETH_IPV6 = b"\x86\xdd"


class TunnelPort(Port):
    """One tunnel interface: underlay x encapsulation x protection."""

    #: the encapsulation's registered name
    ENCAP: ClassVar[str] = "vxlan"
    #: True: always ESP (IKE or manual keys); False: clear
    PROTECTED: ClassVar[bool] = False

    #: the largest inner frame that fits the underlay MTU (set from the egress device)
    max_frame: int = DEFAULT_UNDERLAY_MTU - 36
    underlay_mtu: int = DEFAULT_UNDERLAY_MTU

    def __init__(self, ctx: PortContext, bridge: Bridge, name: str,
                 options: Mapping[str, str]) -> None:
        super().__init__(ctx, bridge, name, options)
        self.underlay = make_underlay(ctx, self.TYPE, name, self.options)
        self.encapsulation = ENCAPSULATIONS[self.ENCAP](name, self.options)
        self.esp: EspProtection | None = None
        if self.PROTECTED:
            self.esp = EspProtection(self, self.options)
            self.protection: Clear | EspProtection = self.esp
        else:
            self.protection = Clear(self)

    @staticmethod
    def options_for(protected: bool, encap: str) -> frozenset[str]:
        """Every option a tunnel of this encapsulation and protection takes."""
        extra = EspProtection.OPTIONS if protected else frozenset()
        return Ipv4Underlay.OPTIONS | ENCAPSULATIONS[encap].OPTIONS | extra

    # -- lifecycle ------------------------------------------------------------------------------

    def open(self) -> None:
        tunnels = self.ctx.tunnels
        # A protected tunnel takes its clear packets too: to count them as plaintext drops.
        tunnels.add_endpoint(self)
        try:
            self.protection.open()
        except BaseException:
            tunnels.remove_endpoint(self)
            raise
        tunnels.add_port(self)

    def close(self) -> None:
        self.ctx.tunnels.remove_port(self)
        self.ctx.tunnels.remove_endpoint(self)
        self.protection.close()

    def run(self, now: float) -> None:
        self.protection.run(now)

    def resolve(self) -> None:
        """Find the route again, then what depends on it (selectors, MTU)."""
        self.underlay.resolve()
        self.protection.rebuild()
        egress = self.underlay.egress_port
        if egress is not None:
            self.underlay_mtu = egress.mtu() or DEFAULT_UNDERLAY_MTU
        self.max_frame = self._largest_frame(self.underlay_mtu)
        self.adjust_mtus()

    # -- MTU ------------------------------------------------------------------------------------

    def outer_len(self, frame_len: int) -> int:
        """Bytes on the underlay (IP header onwards) for an inner frame of `frame_len`: the
        sum of the three parts' overheads (ESP's depends on the length, for its padding)."""
        l4 = self.encapsulation.overhead + frame_len
        return self.underlay.OVERHEAD + l4 + self.protection.overhead(l4)

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
            # An operator's mtu_request wins (too-big frames are then fragmented or
            # answered with ICMP by `fit`).
            if isinstance(port, TapPort) and port.dev is not None \
                    and port.mtu_request is None:
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
        """ICMP "fragmentation needed" back to the sender if DF is set, else fragments;
        for IPv6 (never fragmented on the way, RFC 8200 §5) ICMPv6 Packet Too Big.

        The outer packet is never fragmented: a receiver would have to reassemble it
        before it could even check the tunnel's integrity.
        """
        st = self.stats
        if frame[12:14] == ETH_IPV6:
            return self._too_big6(frame)
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
            self.ctx.defer_rx(self, frame[6:12] + frame[0:6] + ETH_IPV4 + icmp)
            return []
        try:
            pieces = fragment_ipv4(ip, mtu)
        except PacketError:
            st.drop("tx_too_big")
            return []
        return [frame[:14] + p for p in pieces]

    def _too_big6(self, frame: bytes) -> list[bytes]:
        """ICMPv6 Packet Too Big with the tunnel MTU back to the sender (RFC 4443 §3.2,
        path MTU discovery RFC 8201), sent as if from the packet's destination."""
        self.stats.drop("tx_too_big")
        ip = frame[14:]
        # Never about a packet from an unspecified or multicast source (RFC 4443 §2.4 e):
        # there is nobody to tell. A multicast destination cannot be the answer's source.
        if len(ip) < 40 or ip[0] >> 4 != 6 or ip[8:24] == bytes(16) or ip[8] == 0xFF \
                or ip[24] == 0xFF:
            return []
        try:
            icmp = build_packet_too_big(ip, self.inner_mtu, ip[24:40])
        except (PacketError, ValueError):
            return []
        self.ctx.defer_rx(self, frame[6:12] + frame[0:6] + ETH_IPV6 + icmp)
        return []

    # -- traffic --------------------------------------------------------------------------------

    def routable(self, frames: list[bytes]) -> list[bytes] | None:
        """The batch to send, cut to the tunnel MTU (`fit`); None, counted, when the
        tunnel has no route."""
        if self.underlay.stale():
            self.resolve()
        if self.underlay.egress_bridge is None:
            self.stats.drop("tx_no_route", len(frames))
            return None
        if max(map(len, frames)) > self.max_frame:
            frames = self.fit(frames)
        return frames

    def send(self, frames: list[bytes]) -> None:
        frames = self.routable(frames)
        if not frames:
            return
        pkts, nbytes = self.protection.protect(frames)
        if pkts:
            st = self.stats
            st["tx_packets"] += len(pkts)
            st["tx_bytes"] += nbytes
            self.ctx.tunnels.output_ip(self, pkts)

    def input_clear(self, frame: bytes) -> None:
        """An inner frame that arrived without ESP for this tunnel's address and key."""
        self.protection.input_clear(frame)

    def input_esp(self, src: bytes, dst: bytes, esp: bytes, encap: bool) -> None:
        """An ESP packet for this tunnel's inbound SPI (protected tunnels only)."""
        self.esp.input_esp(src, dst, esp, encap)

    # -- state ----------------------------------------------------------------------------------

    def status(self) -> dict[str, str]:
        return {**self.underlay.status(), "tunnel_mtu": str(self.inner_mtu),
                **self.protection.status()}

    def link_state(self) -> str:
        return "up" if self.underlay.egress_bridge is not None else "down"

    def describe(self) -> str:
        words = (self.underlay.describe() + self.encapsulation.describe()
                 + self.protection.describe())
        return f"{self.TYPE}: {', '.join(words)}"

    # -- what the IKE layer and ovs-appctl read of a tunnel --------------------------------------

    @property
    def remote_ip(self) -> bytes:
        return self.underlay.remote_ip

    @property
    def local_ip(self) -> bytes | None:
        return self.underlay.local_ip

    @property
    def route_problem(self) -> str:
        return self.underlay.problem

    @property
    def vni(self) -> int:
        return self.encapsulation.key

    @property
    def dst_port(self) -> int:
        return self.encapsulation.dst_port


class IpsecTunnelPort(TunnelPort):
    """A tunnel type that is always ESP-protected: its protection's IKE interface,
    forwarded (the IKE layer drives tunnels, not their parts)."""

    PROTECTED = True
    esp: EspProtection

    @property
    def ike(self) -> IkeKeying | None:
        return self.esp.ike

    @property
    def ike_error(self) -> str | None:
        return self.esp.ike_error

    @ike_error.setter
    def ike_error(self, value: str | None) -> None:
        self.esp.ike_error = value

    @property
    def sa_out(self) -> OutboundSA | None:
        return self.esp.sa_out

    @property
    def sa_in(self) -> InboundSA | None:
        return self.esp.sa_in

    @property
    def pairs(self) -> list[tuple[OutboundSA, InboundSA]]:
        return self.esp.pairs

    @property
    def mode(self) -> Mode:
        return self.esp.mode

    @property
    def encap(self) -> bool:
        return self.esp.encap

    @property
    def leader(self) -> TunnelPort | None:
        return self.esp.leader

    @property
    def followers(self) -> dict[int, TunnelPort]:
        return self.esp.followers

    @followers.setter
    def followers(self, value: dict[int, TunnelPort]) -> None:
        self.esp.followers = value

    def install_child(self, outbound: SaParams, inbound: SaParams, **kw: Any) -> None:
        self.esp.install_child(outbound, inbound, **kw)

    def follow(self, leader: TunnelPort | None) -> None:
        self.esp.follow(leader)

    def adopt_child(self, sa_out: OutboundSA, sa_in: InboundSA, sends: bool = True,
                    rx_ports: PortRanges | None = None) -> None:
        self.esp.adopt_child(sa_out, sa_in, sends, rx_ports)

    def release_child(self, spi_in: int) -> tuple[OutboundSA, InboundSA] | None:
        return self.esp.release_child(spi_in)

    def remove_child(self, spi_in: int, linger: float = 0.0) -> bool:
        return self.esp.remove_child(spi_in, linger)

    def remove_all_children(self, keep: frozenset[int] = frozenset()) -> list[int]:
        return self.esp.remove_all_children(keep)

    def child_sas(self) -> list[tuple[OutboundSA, InboundSA]]:
        return self.esp.child_sas()

    def ipsec_state(self) -> str:
        return self.esp.ipsec_state()

    def sa_rows(self) -> list[dict[str, object]]:
        return self.esp.sa_rows()


#: Options that key a tunnel: any of them on an ordinary `vxlan`, `geneve` or `gre` tunnel
#: makes it ESP-protected (as Open vSwitch's IPsec does with psk, remote_cert, remote_name).
KEYING_OPTIONS = ("psk", "remote_cert", "remote_name", "spi_out", "spi_in", "esp_key_out",
                  "esp_key_in")


def keyed(options: Mapping[str, str]) -> bool:
    """Whether `options` key the tunnel (manually or by IKEv2): then it is protected."""
    return any(options.get(o) for o in KEYING_OPTIONS)


def register_tunnel_type(type_name: str, encap: str, protected: bool,
                         ipsec_optional: bool = False) -> type[TunnelPort]:
    """Register `Interface.type` `type_name` as a tunnel of encapsulation `encap`, protected
    by ESP or clear. The class made here adds no behaviour, only which parts compose it.

    With `ipsec_optional` (Open vSwitch's own tunnel types) the type is clear unless its
    options key it (`keyed`): then the port made is the protected variant, of the same
    type name, that never sends or accepts plaintext."""
    base = IpsecTunnelPort if protected else TunnelPort
    cls = type(f"{type_name.capitalize()}Port", (base,), {
        "ENCAP": encap, "PROTECTED": protected,
        "OPTIONS": TunnelPort.options_for(protected, encap),
        "COUNTERS": (EspProtection if protected else Clear).COUNTERS,
        "__doc__": f"`{type_name}`: {encap} over IPv4 or IPv6, "
                   f"{'always ESP-protected' if protected else 'clear'}.",
    })
    register_port_type(type_name)(cls)
    if ipsec_optional:
        variant = type(f"{type_name.capitalize()}IpsecPort", (IpsecTunnelPort,), {
            "ENCAP": encap, "PROTECTED": True, "TYPE": type_name,
            "OPTIONS": TunnelPort.options_for(True, encap),
            "COUNTERS": EspProtection.COUNTERS,
            "__doc__": f"`{type_name}` with IPsec options: {encap} over IPv4 or IPv6, "
                       "ESP-protected (manual keys or IKEv2).",
        })
        cls.OPTIONS = variant.OPTIONS  # the IPsec options are known, only refused unkeyed
        cls.variant = classmethod(_ipsec_variant(variant))  # type: ignore[method-assign]
    return cls


def _ipsec_variant(variant: type[TunnelPort]):
    """`Port.variant` of a type whose options may key it: the protected class when they do;
    IPsec options on a tunnel they do not key are a configuration error."""

    def pick(cls: type[Port], options: Mapping[str, str]) -> type[Port]:
        if keyed(options):
            return variant
        stray = sorted(o for o in EspProtection.OPTIONS if options.get(o))
        if stray:
            raise PortError(
                f"options:{stray[0]} is an IPsec option, but nothing keys this "
                f"{cls.TYPE} tunnel: set options:psk, remote_cert or remote_name (IKEv2), "
                "or spi_out, spi_in, esp_key_out and esp_key_in (manual keys)")
        return cls

    return pick


VxlanPort = register_tunnel_type("vxlan", "vxlan", protected=False, ipsec_optional=True)
VxlanIpsecPort = register_tunnel_type("vxlanipsec", "vxlan", protected=True)
GenevePort = register_tunnel_type("geneve", "geneve", protected=False, ipsec_optional=True)
GrePort = register_tunnel_type("gre", "gre", protected=False, ipsec_optional=True)
