"""Traffic selectors: strongSwan's syntax (`10.1.0.0/24`, `192.0.2.1/32[udp/4789]`,
`2001:db8::/64[gre]`, `dynamic[udp]`), intersection and narrowing (RFC 7296 §2.9).

An IPv4 selector is a TS_IPV4_ADDR_RANGE, an IPv6 one a TS_IPV6_ADDR_RANGE (16-byte
addresses); `dynamic` takes the family of the tunnel endpoint that replaces it. Selectors
of different families never intersect."""

from __future__ import annotations

import ipaddress

from espswitch.ike.consts import Notify, TsType
from espswitch.ike.errors import IkeConfigError, ProtocolError
from espswitch.ike.message import TrafficSelector

__all__ = ["format_ts", "intersect", "narrow", "parse_ts", "resolve_dynamic", "single_host",
           "ts_subset"]

_PROTOS = {"any": 0, "icmp": 1, "tcp": 6, "udp": 17, "esp": 50, "gre": 47}
#: A placeholder address range meaning "this tunnel endpoint", replaced at negotiation.
DYNAMIC = b"\xff\xff\xff\xfe"


def parse_ts(text: str) -> TrafficSelector:
    """Parse one selector; `dynamic` stands for the tunnel endpoint address."""
    s = text.strip()
    proto, sport, eport = 0, 0, 65535
    if "[" in s:
        if not s.endswith("]"):
            raise IkeConfigError(f"bad traffic selector {text!r}")
        s, spec = s[:-1].split("[", 1)
        p, _, port = spec.partition("/")
        p = p.strip().lower()
        if p.isdigit():
            proto = int(p)
        elif p in _PROTOS:
            proto = _PROTOS[p]
        else:
            raise IkeConfigError(f"unknown protocol {p!r} in traffic selector {text!r}")
        if port and port not in ("%any", "any"):
            lo, _, hi = port.partition("-")
            try:
                sport, eport = int(lo), int(hi or lo)
            except ValueError:
                raise IkeConfigError(f"bad port in traffic selector {text!r}") from None
    s = s.strip() or "dynamic"
    if s == "dynamic":
        start, end = DYNAMIC, DYNAMIC
    else:
        try:
            net = ipaddress.ip_network(s, strict=False)
        except ValueError:
            raise IkeConfigError(f"bad address in traffic selector {text!r}") from None
        start, end = net.network_address.packed, net.broadcast_address.packed
    ts_type = TsType.IPV6_ADDR_RANGE if len(start) == 16 else TsType.IPV4_ADDR_RANGE
    try:
        return TrafficSelector(ts_type=ts_type, ip_proto=proto, start_port=sport, end_port=eport,
                               start_addr=start, end_addr=end)
    except ValueError as e:
        raise IkeConfigError(f"bad traffic selector {text!r}: {e}") from None


def resolve_dynamic(ts: TrafficSelector, addr: bytes) -> TrafficSelector:
    """Replace the `dynamic` placeholder by a tunnel endpoint address (4 or 16 bytes: the
    selector takes its family)."""
    if ts.start_addr == DYNAMIC and ts.end_addr == DYNAMIC:
        ts_type = TsType.IPV6_ADDR_RANGE if len(addr) == 16 else TsType.IPV4_ADDR_RANGE
        return TrafficSelector(ts_type=ts_type, ip_proto=ts.ip_proto,
                               start_port=ts.start_port, end_port=ts.end_port,
                               start_addr=addr, end_addr=addr)
    return ts


def single_host(selectors: tuple[TrafficSelector, ...]) -> bytes | None:
    """The one host address the selectors name, if every one of them names that host."""
    hosts = {t.start_addr for t in selectors}
    if len(hosts) == 1 and all(t.start_addr == t.end_addr for t in selectors):
        return hosts.pop()
    return None


def intersect(a: TrafficSelector, b: TrafficSelector) -> TrafficSelector | None:
    """The common part of two selectors, or None."""
    if a.ts_type != b.ts_type:
        return None
    if a.ip_proto and b.ip_proto and a.ip_proto != b.ip_proto:
        return None
    proto = a.ip_proto or b.ip_proto
    sp, ep = max(a.start_port, b.start_port), min(a.end_port, b.end_port)
    sa, ea = max(a.start_addr, b.start_addr), min(a.end_addr, b.end_addr)
    if sp > ep or sa > ea:
        return None
    return TrafficSelector(ts_type=a.ts_type, ip_proto=proto, start_port=sp, end_port=ep,
                           start_addr=sa, end_addr=ea)


def ts_subset(a: TrafficSelector, b: TrafficSelector) -> bool:
    """True when `a` lies within `b`."""
    return intersect(a, b) == a


def narrow(offered: tuple[TrafficSelector, ...],
           ours: tuple[TrafficSelector, ...]) -> tuple[TrafficSelector, ...]:
    """Responder narrowing: every non-empty intersection, in the offered order.

    Raises ProtocolError(TS_UNACCEPTABLE) when nothing is left.
    """
    out: list[TrafficSelector] = []
    for o in offered:
        for c in ours:
            x = intersect(o, c)
            if x is not None and x not in out:
                out.append(x)
    if not out:
        raise ProtocolError("traffic selectors unacceptable", notify=Notify.TS_UNACCEPTABLE)
    return tuple(out)


def format_ts(ts: TrafficSelector) -> str:
    """strongSwan-like text for logs and tests: `10.1.0.0/24[udp/4789]`,
    `2001:db8::1/128[47]`."""
    s, e = ipaddress.ip_address(ts.start_addr), ipaddress.ip_address(ts.end_addr)
    nets = list(ipaddress.summarize_address_range(s, e)) if s <= e else []
    text = str(nets[0]) if len(nets) == 1 else f"{s}..{e}"
    if ts.ip_proto or ts.start_port or ts.end_port != 65535:
        port = ""
        if ts.start_port or ts.end_port != 65535:
            port = "/" + (str(ts.start_port) if ts.start_port == ts.end_port
                          else f"{ts.start_port}-{ts.end_port}")
        text += f"[{ts.ip_proto}{port}]"
    return text
