"""A tunnel's underlay: IPv4 or IPv6 between `local_ip` and `remote_ip`.

The underlay parses the address options and `ttl`, `tos`, `df_default`; resolves the route
(egress bridge and internal port, local address, next hop) from the route table; and puts
the IP header in front of what the encapsulation and the protection built. `make_underlay`
picks the family from `remote_ip`; `local_ip` must be of the same family.

IPv4 headers come from a template with a precomputed checksum (two fields change per
packet). IPv6 headers (RFC 8200) have no checksum, but UDP over IPv6 must carry one (§8.1;
RFC 6935 lets tunnels send zero, which not every receiver accepts: Linux's VXLAN refuses it
unless told otherwise), so `packet()` computes it over the IPv6 pseudo header; `ttl` is the
hop limit, `tos` the traffic class, and `df_default` has no meaning (IPv6 routers never
fragment; espswitch never fragments an outer packet either). Sending (neighbour lookup,
Ethernet) is the tunnel layer's `output_ip`.
"""

from __future__ import annotations

import ipaddress
import struct
from array import array
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

from espswitch.datapath.encap import parse_option_int
from espswitch.datapath.errors import PortError
from espswitch.datapath.tunnel import ip_str
from espswitch.packet.checksum import ipv6_pseudo_header_sum, ones_complement_sum

if TYPE_CHECKING:
    from espswitch.datapath.bridge import Bridge
    from espswitch.datapath.context import PortContext
    from espswitch.datapath.ports import Port
    from espswitch.datapath.tunnel import Route

_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")  # an IPv4 header without options
_IPV6 = struct.Struct("!IHBB16s16s")
_WORDS = struct.Struct("!10H")
_U16 = struct.Struct("!H")
UDP = 17
ETH_IPV4 = b"\x08\x00"
ETH_IPV6 = b"\x86\xdd"


def not_unicast(addr: bytes) -> str | None:
    """Why `addr` (4 or 16 bytes) cannot be a tunnel endpoint, or None if it can."""
    a = ipaddress.ip_address(addr)
    if a.is_unspecified:
        return "the unspecified address"
    if a == _BROADCAST:
        return "the broadcast address"
    if a.is_multicast:
        return "a multicast address"
    if a.is_loopback:
        return "a loopback address"
    if a.version == 4 and a.is_reserved:
        return "a reserved address (240.0.0.0/4)"
    if a.version == 6 and a.is_link_local:
        return "a link-local address (it names no single link here)"
    if a.version == 6 and a.ipv4_mapped is not None:
        return "an IPv4-mapped address (use the IPv4 address itself)"
    return None


def _parse_ip(name: str, opt: str, text: str) -> bytes:
    try:
        addr = ipaddress.ip_address(text.strip()).packed
    except ValueError:
        raise PortError(
            f"interface {name}: options:{opt} '{text}' is not an IPv4 or IPv6 address"
        ) from None
    problem = not_unicast(addr)
    if problem:
        raise PortError(f"interface {name}: options:{opt} {text} is {problem}, "
                        "not a tunnel endpoint")
    return addr


def make_underlay(ctx: PortContext, kind: str, name: str,
                  options: Mapping[str, str]) -> Ipv4Underlay | Ipv6Underlay:
    """The underlay of `remote_ip`'s family; PortError for bad or mixed addresses."""
    if "remote_ip" not in options:
        raise PortError(f"{kind} interface {name} needs options:remote_ip")
    remote = _parse_ip(name, "remote_ip", options["remote_ip"])
    local = _parse_ip(name, "local_ip", options["local_ip"]) if "local_ip" in options else None
    if local is not None and len(local) != len(remote):
        raise PortError(
            f"interface {name}: options:local_ip {options['local_ip']} and options:remote_ip "
            f"{options['remote_ip']} are of different families (both IPv4 or both IPv6)")
    cls = Ipv6Underlay if len(remote) == 16 else Ipv4Underlay
    return cls(ctx, kind, name, options, remote, local)


class Ipv4Underlay:
    """IPv4 endpoints, the route between them, and the headers that carry tunnel packets."""

    OPTIONS: ClassVar[frozenset[str]] = frozenset(
        {"remote_ip", "local_ip", "ttl", "tos", "df_default"})
    OVERHEAD: ClassVar[int] = 20
    V6: ClassVar[bool] = False
    #: the EtherType of what this underlay sends
    ETHERTYPE: ClassVar[bytes] = ETH_IPV4
    #: ESP's next header for a whole inner packet of this family (tunnel mode)
    NH_INNER: ClassVar[int] = 4
    FAMILY: ClassVar[str] = "IPv4"

    def __init__(self, ctx: PortContext, kind: str, name: str, options: Mapping[str, str],
                 remote_ip: bytes | None = None, local_ip: bytes | None = None) -> None:
        self.ctx = ctx
        if remote_ip is None:  # made directly, not by make_underlay
            if "remote_ip" not in options:
                raise PortError(f"{kind} interface {name} needs options:remote_ip")
            remote_ip = _parse_ip(name, "remote_ip", options["remote_ip"])
            if "local_ip" in options:
                local_ip = _parse_ip(name, "local_ip", options["local_ip"])
        self.remote_ip = remote_ip
        self.local_ip_opt = local_ip
        if self.remote_ip in ctx.routes.local_addresses():
            raise PortError(f"interface {name}: options:remote_ip {ip_str(self.remote_ip)} is "
                            "an address of this hypervisor; it must be the peer's")
        self.ttl = parse_option_int(name, "ttl", options.get("ttl", "64"), 1, 255)
        self.tos = parse_option_int(name, "tos", options.get("tos", "0"), 0, 255)
        df = options.get("df_default", "true").lower()
        if df not in ("true", "false"):
            raise PortError(f"interface {name}: options:df_default must be true or false")
        self.df = df == "true"
        # Resolved from the route table by resolve().
        self.route: Route | None = None
        self.egress_bridge: Bridge | None = None
        self.egress_port: Port | None = None
        self.local_ip: bytes | None = None
        self.nexthop: bytes = self.remote_ip
        self.problem = "not resolved yet"
        self.route_seq = -1
        # The IPv4 ID counter, one unsigned short in an array: the compiled transmit
        # pipeline counts in the same place (fast/tables.py) for clear tunnels.
        self.ip_ids = array("H", [0])
        self._bases: dict[tuple[int, bool, bytes], int] = {}

    # -- the route ---------------------------------------------------------------------------

    def resolve(self) -> None:
        """Find the route, egress bridge, local address and next hop to `remote_ip`."""
        ctx = self.ctx
        routes = ctx.routes
        self.route_seq = routes.seq
        self.egress_bridge = self.egress_port = self.route = None
        self.local_ip = self.local_ip_opt
        self._bases.clear()
        route = routes.lookup(self.remote_ip)
        local = routes.local_addresses()
        if self.remote_ip in local:
            self.problem = f"remote_ip {ip_str(self.remote_ip)} is an address of this hypervisor"
        elif local and self.local_ip_opt is not None and self.local_ip_opt not in local:
            # Not an error: the address may be added later; until then nothing is sent.
            self.problem = (f"local_ip {ip_str(self.local_ip_opt)} is not an address of this "
                            "hypervisor")
        elif route is None:
            self.problem = f"no route to {ip_str(self.remote_ip)}"
        else:
            self.route = route
            found = ctx.internal_port(route.dev)
            source = route.src or routes.source_for(route.dev, self.V6)
            if found is None:
                self.problem = (
                    f"the route to {ip_str(self.remote_ip)} leaves through {route.dev}, "
                    "which is not a bridge's internal port")
            elif self.local_ip is None and not source:
                self.problem = f"{route.dev} has no {self.FAMILY} address to use as local_ip"
            else:
                self.egress_bridge, self.egress_port = found
                if self.local_ip is None:
                    self.local_ip = source
                self.nexthop = route.gw or self.remote_ip
                self.problem = ""

    def stale(self) -> bool:
        """True when the route table changed since the last `resolve()`."""
        return self.route_seq != self.ctx.routes.seq

    # -- headers ------------------------------------------------------------------------------

    def _base(self, proto: int, df: bool, dst: bytes) -> int:
        """Sum of the header's 16-bit words with length, ID and checksum at zero."""
        key = (proto, df, dst)
        base = self._bases.get(key)
        if base is None:
            base = self._bases[key] = sum(_WORDS.unpack(_IPV4.pack(
                0x45, self.tos, 0, 0, 0x4000 if df else 0, self.ttl, proto, 0,
                self.local_ip or b"\0\0\0\0", dst)))
        return base

    def header(self, proto: int, payload_len: int, *, df: bool | None = None,
               dst: bytes | None = None, ident: int | None = None) -> bytes:
        """The IPv4 header for `payload_len` bytes of protocol `proto` to `remote_ip` (or
        `dst`), with `df_default` (or `df`); the identification from the tunnel's counter,
        or `ident`."""
        df = self.df if df is None else df
        dst = self.remote_ip if dst is None else dst
        total = 20 + payload_len
        if ident is None:
            ids = self.ip_ids
            ident = ids[0] = (ids[0] + 1) & 0xFFFF
        # The checksum from the precomputed sum plus the two fields that change.
        s = self._base(proto, df, dst) + total + ident
        s = (s & 0xFFFF) + (s >> 16)
        s = (s & 0xFFFF) + (s >> 16)
        return _IPV4.pack(0x45, self.tos, total, ident, 0x4000 if df else 0, self.ttl, proto,
                          ~s & 0xFFFF, self.local_ip or b"\0\0\0\0", dst)

    def l4(self, proto: int, l4: bytes, dst: bytes | None = None) -> bytes:
        """`l4` as it must travel to `remote_ip` (or `dst`): over IPv4 as it is (a zero
        UDP checksum is allowed and RFC 7348 recommends it)."""
        return l4

    def packet(self, proto: int, l4: bytes, *, df: bool | None = None,
               dst: bytes | None = None) -> bytes:
        """The whole IP packet carrying `l4` of protocol `proto` (see `header`)."""
        return self.header(proto, len(l4), df=df, dst=dst) + l4

    def template(self, proto: int, df: bool) -> bytes:
        """The IPv4 header to `remote_ip` with total length, identification and checksum
        zero: what the compiled transmit pipeline completes per packet."""
        return _IPV4.pack(0x45, self.tos, 0, 0, 0x4000 if df else 0, self.ttl, proto, 0,
                          self.local_ip or b"\0\0\0\0", self.remote_ip)

    # -- state --------------------------------------------------------------------------------

    def status(self) -> dict[str, str]:
        st = {}
        if self.route is not None:
            st["tunnel_egress_iface"] = self.route.dev
            port = self.ctx.port(self.route.dev)
            st["tunnel_egress_iface_carrier"] = (
                "up" if port is not None and port.link_state() == "up" else "down")
        if self.problem:
            st["tunnel_problem"] = self.problem
        return st

    def describe(self) -> list[str]:
        words = []
        if self.local_ip_opt:
            words.append(f"local_ip={ip_str(self.local_ip_opt)}")
        words.append(f"remote_ip={ip_str(self.remote_ip)}")
        return words


class Ipv6Underlay(Ipv4Underlay):
    """IPv6 endpoints: the route and neighbour as for IPv4, a 40-byte header, and the UDP
    checksum over the IPv6 pseudo header."""

    OVERHEAD: ClassVar[int] = 40
    V6: ClassVar[bool] = True
    ETHERTYPE: ClassVar[bytes] = ETH_IPV6
    NH_INNER: ClassVar[int] = 41
    FAMILY: ClassVar[str] = "IPv6"

    def _word(self) -> int:
        # Version, traffic class; flow label 0 (the UDP source port already spreads flows).
        return (6 << 28) | (self.tos << 20)

    def header(self, proto: int, payload_len: int, *, df: bool | None = None,
               dst: bytes | None = None, ident: int | None = None) -> bytes:
        """The IPv6 header for `payload_len` bytes of next header `proto` to `remote_ip`
        (or `dst`); `df` and `ident` have no meaning over IPv6 (no fragmentation on the
        way, no identification outside a Fragment header)."""
        return _IPV6.pack(self._word(), payload_len, proto, self.ttl,
                          self.local_ip or bytes(16), self.remote_ip if dst is None else dst)

    def l4(self, proto: int, l4: bytes, dst: bytes | None = None) -> bytes:
        """`l4` with its UDP checksum computed over the IPv6 pseudo header (mandatory,
        RFC 8200 §8.1); other protocols as they are."""
        if proto != UDP:
            return l4
        src = self.local_ip or bytes(16)
        dst = self.remote_ip if dst is None else dst
        # The checksum field is zero as pushed: the sum covers the segment as it is.
        s = ones_complement_sum(l4, ipv6_pseudo_header_sum(src, dst, UDP, len(l4)))
        buf = bytearray(l4)
        _U16.pack_into(buf, 6, (~s & 0xFFFF) or 0xFFFF)
        return bytes(buf)

    def packet(self, proto: int, l4: bytes, *, df: bool | None = None,
               dst: bytes | None = None) -> bytes:
        return self.header(proto, len(l4), dst=dst) + self.l4(proto, l4, dst)

    def template(self, proto: int, df: bool) -> bytes:
        """The IPv6 header to `remote_ip` with payload length zero: what the compiled
        transmit pipeline completes per packet (`df` has no meaning over IPv6)."""
        return self.header(proto, 0)
