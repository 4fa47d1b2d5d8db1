"""Inbound selector checks (RFC 4301 §5.2): what a decrypted packet may be.

A tunnel's SA protects exactly one kind of traffic: its encapsulation's packets from the
remote endpoint to the local one: UDP to the tunnel's port from any source port (VXLAN,
Geneve), or an IP protocol such as GRE. A packet that authenticates but carries anything
else is dropped and counted.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

UDP = 17
# The 16-bit words of an IPv4 header of 4*i bytes, for its checksum.
_HALVES = tuple(struct.Struct(f"!{2 * i}H") for i in range(16))


@dataclass(frozen=True, slots=True, kw_only=True)
class Selector:
    """Protocol `proto` from `src` to `dst` (addresses as 4 bytes, or 16 for IPv6); for
    UDP, to port `dport` from any port."""

    src: bytes
    dst: bytes
    proto: int = UDP
    dport: int = 0

    def match_transport(self, outer_src: bytes, outer_dst: bytes, next_header: int,
                        payload: bytes) -> bool:
        """Transport mode: the outer addresses, ESP's next header and the UDP header."""
        if next_header != self.proto or outer_src != self.src or outer_dst != self.dst:
            return False
        return self.proto != UDP or (len(payload) >= 8
                                     and (payload[2] << 8 | payload[3]) == self.dport)

    def match_tunnel(self, inner: bytes) -> bool:
        """Tunnel mode: a sound inner IPv4 header (version, header length, total length
        within what was decrypted, checksum; no fragment) and, for UDP, its port. With IPv6
        selectors, a sound inner IPv6 header (version, payload length within what was
        decrypted, the protocol as next header: no extension header) and the port."""
        n = len(inner)
        if len(self.src) == 16:
            if n < 48 or inner[0] >> 4 != 6 or inner[6] != self.proto:
                return False
            if 40 + (inner[4] << 8 | inner[5]) > n or (inner[4] << 8 | inner[5]) < 8:
                return False
            if inner[8:24] != self.src or inner[24:40] != self.dst:
                return False
            return self.proto != UDP or (inner[42] << 8 | inner[43]) == self.dport
        if n < 28 or inner[0] >> 4 != 4 or inner[9] != self.proto:
            return False
        if inner[6] & 0x3F or inner[7]:
            return False  # a fragment's ports cannot be checked (RFC 4301 §7)
        l4 = (inner[0] & 0x0F) * 4
        total = inner[2] << 8 | inner[3]
        if l4 < 20 or not l4 + 8 <= total <= n:
            return False
        if inner[12:16] != self.src or inner[16:20] != self.dst:
            return False
        if self.proto == UDP and (inner[l4 + 2] << 8 | inner[l4 + 3]) != self.dport:
            return False
        s = sum(_HALVES[l4 >> 2].unpack_from(inner))
        s = (s & 0xFFFF) + (s >> 16)
        return (s & 0xFFFF) + (s >> 16) == 0xFFFF
