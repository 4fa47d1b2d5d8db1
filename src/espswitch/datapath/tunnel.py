"""Native tunneling state: the route table and the neighbour cache (sans-IO).

Both answer lookups without I/O, age entries in `run(now)` and bump `seq` on every change,
which the tunnel ports compare to know when to resolve their route again.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

FOUND = "found"
PENDING = "pending"
MISSING = "missing"

NEIGH_AGE = 900.0  # seconds, as OVS's tnl-neigh-cache
NEIGH_MAX = 4096


def ip4(text: str) -> bytes:
    """Parse a dotted IPv4 address into 4 bytes; ValueError if it is not one."""
    return ipaddress.IPv4Address(text).packed


def ip_addr(text: str) -> bytes:
    """Parse an IPv4 (4 bytes) or IPv6 (16 bytes) address; ValueError if it is neither."""
    return ipaddress.ip_address(text).packed


def ip_str(raw: bytes) -> str:
    """An address of 4 or 16 bytes as text (RFC 5952 form for IPv6)."""
    return str(ipaddress.ip_address(bytes(raw)))


# Every caller formats what may now be either family.
ip4_str = ip_str


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """One route: prefix/plen out of device `dev`, optional gateway and source; IPv6 when
    `v6` (the prefix is then a 128-bit number, the addresses 16 bytes)."""

    prefix: int
    plen: int
    dev: str
    gw: bytes | None = None
    src: bytes | None = None
    user: bool = False
    v6: bool = False

    def matches(self, addr: int) -> bool:
        if self.plen == 0:
            return True
        shift = (128 if self.v6 else 32) - self.plen
        return (addr >> shift) == (self.prefix >> shift)

    def text(self) -> str:
        net = (ipaddress.IPv6Network if self.v6 else ipaddress.IPv4Network)(
            (self.prefix, self.plen))
        s = f"{net} dev {self.dev}"
        if self.gw:
            s += f" GW {ip_str(self.gw)}"
        if self.src:
            s += f" SRC {ip_str(self.src)}"
        return s


def parse_prefix(text: str) -> tuple[int, int, bool]:
    """'10.0.0.0/24' or '2001:db8::/32' (or a bare address: a host route) ->
    (int prefix, plen, IPv6?); ValueError if bad."""
    net = ipaddress.ip_network(text, strict=False)
    return int(net.network_address), net.prefixlen, net.version == 6


def usable_source(addr: bytes) -> bool:
    """Whether a local address may be a tunnel's source: not an IPv6 link-local one (a
    tunnel endpoint is global or unique local)."""
    return len(addr) == 4 or not (addr[0] == 0xFE and addr[1] & 0xC0 == 0x80)


class RouteTable:
    """Kernel routes (replaced wholesale by `set_system`) plus user routes (ovs/route/add)."""

    def __init__(self) -> None:
        self.system: list[Route] = []
        self.user: list[Route] = []
        # device name -> its addresses (4 bytes for IPv4, 16 for IPv6), from the kernel
        self.addresses: dict[str, list[bytes]] = {}
        self._local: frozenset[bytes] = frozenset()
        self.seq = 0
        self._sorted: list[Route] = []

    def _changed(self) -> None:
        self.seq += 1
        # User routes win over kernel routes of the same length.
        routes = self.user + self.system
        self._sorted = sorted(routes, key=lambda r: -r.plen)

    def set_system(self, routes: list[Route], addresses: dict[str, list[bytes]]) -> bool:
        """Replace the kernel's view; return True if anything changed."""
        if routes == self.system and addresses == self.addresses:
            return False
        self.system = list(routes)
        self.addresses = {k: list(v) for k, v in addresses.items()}
        self._local = frozenset(a for addrs in self.addresses.values() for a in addrs)
        self._changed()
        return True

    def local_addresses(self) -> frozenset[bytes]:
        """Every address of this hypervisor (empty until the kernel's view is read)."""
        return self._local

    def add(self, prefix: str, dev: str, gw: str | None = None) -> Route:
        """A user route; ValueError if the prefix or gateway is bad or of two families."""
        p, plen, v6 = parse_prefix(prefix)
        gwb = ip_addr(gw) if gw else None
        if gwb is not None and (len(gwb) == 16) != v6:
            raise ValueError(f"gateway {gw} is not of the family of {prefix}")
        src = self.source_for(dev, v6)
        route = Route(prefix=p, plen=plen, dev=dev, gw=gwb, src=src, user=True, v6=v6)
        self.user = [r for r in self.user if (r.prefix, r.plen, r.v6) != (p, plen, v6)] + [route]
        self._changed()
        return route

    def delete(self, prefix: str) -> bool:
        p, plen, v6 = parse_prefix(prefix)
        before = len(self.user)
        self.user = [r for r in self.user if (r.prefix, r.plen, r.v6) != (p, plen, v6)]
        if len(self.user) == before:
            return False
        self._changed()
        return True

    def source_for(self, dev: str, v6: bool = False) -> bytes | None:
        """The first address of `dev` of the family that may be a tunnel's source."""
        size = 16 if v6 else 4
        for a in self.addresses.get(dev, ()):
            if len(a) == size and usable_source(a):
                return a
        return None

    def device_of(self, addr: bytes) -> str | None:
        """The device that owns the local address `addr`."""
        for dev, addrs in self.addresses.items():
            if addr in addrs:
                return dev
        return None

    def lookup(self, dst: bytes) -> Route | None:
        """The longest prefix of `dst`'s family (4 or 16 bytes) that holds it."""
        a = int.from_bytes(dst, "big")
        v6 = len(dst) == 16
        for r in self._sorted:
            if r.v6 is v6 and r.matches(a):
                return r
        return None

    def show(self) -> str:
        """As OVS's ovs/route/show: kernel routes ("Cached"), then user routes; IPv4 first."""
        lines = ["Route Table:"]
        for r in sorted(self.system, key=lambda r: (r.v6, -r.plen, r.prefix)):
            lines.append(f"Cached: {r.text()}")
        for r in sorted(self.user, key=lambda r: (r.v6, -r.plen, r.prefix)):
            lines.append(f"User: {r.text()}")
        return "\n".join(lines) + "\n"


class NeighborCache:
    """(bridge, IP) -> MAC, learned from ARP or neighbour discovery or set by hand; entries
    expire. IPv4 keys are 4 bytes, IPv6 ones 16."""

    def __init__(self, age: float = NEIGH_AGE) -> None:
        self.age = age
        self.entries: dict[tuple[str, bytes], tuple[bytes, float]] = {}
        self.pending: dict[tuple[str, bytes], float] = {}
        self.seq = 0

    def lookup(self, bridge: str, ip: bytes, now: float) -> tuple[str, bytes | None]:
        e = self.entries.get((bridge, ip))
        if e is not None and e[1] > now:
            return FOUND, e[0]
        if (bridge, ip) in self.pending:
            return PENDING, None
        return MISSING, None

    def learn(self, bridge: str, ip: bytes, mac: bytes, now: float) -> bool:
        """Record a mapping; return True if it is new or changed."""
        key = (bridge, ip)
        self.pending.pop(key, None)
        old = self.entries.get(key)
        if old is None and len(self.entries) >= NEIGH_MAX:
            return False
        self.entries[key] = (mac, now + self.age)
        if old is None or old[0] != mac:
            self.seq += 1
            return True
        if old[1] <= now:
            self.seq += 1  # found again after it expired: lookups answer differently
        return False

    def set_pending(self, bridge: str, ip: bytes, now: float) -> None:
        self.pending[(bridge, ip)] = now

    def flush(self) -> None:
        self.entries.clear()
        self.pending.clear()
        self.seq += 1

    def run(self, now: float) -> list[tuple[str, bytes]]:
        """Expire entries; return the keys whose entry went away."""
        gone = [k for k, e in self.entries.items() if e[1] <= now]
        for k in gone:
            del self.entries[k]
        if gone:
            self.seq += 1
        return gone

    def show(self, now: float) -> str:
        lines = [f"{'IP':<46}{'MAC':<20}Bridge", "=" * 74]
        for (bridge, ip), (mac, _exp) in sorted(self.entries.items(),
                                                key=lambda e: (len(e[0][1]), e[0])):
            mac_s = ":".join(f"{b:02x}" for b in mac)
            lines.append(f"{ip_str(ip):<46}{mac_s:<20}{bridge}")
        return "\n".join(lines) + "\n"
