"""Inbound selector checks (RFC 4301 §5.2): what a decrypted packet may be.

A VXLAN-over-ESP tunnel's SA protects exactly one kind of traffic: UDP from the remote
endpoint to the local one, to the tunnel's VXLAN port, from any source port. A packet
that authenticates but carries anything else is dropped and counted.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

UDP = 17
# The 16-bit words of an IPv4 header of 4*i bytes, for its checksum.
_HALVES = tuple(struct.Struct(f"!{2 * i}H") for i in range(16))


@dataclass(frozen=True, slots=True, kw_only=True)
class UdpSelector:
    """UDP from `src` (any port) to `dst`:`dport`, addresses as 4 bytes."""

    src: bytes
    dst: bytes
    dport: int

    def match_transport(self, outer_src: bytes, outer_dst: bytes, next_header: int,
                        payload: bytes) -> bool:
        """Transport mode: the outer addresses, ESP's next header and the UDP header."""
        return (next_header == UDP and outer_src == self.src and outer_dst == self.dst
                and len(payload) >= 8 and (payload[2] << 8 | payload[3]) == self.dport)

    def match_tunnel(self, inner: bytes) -> bool:
        """Tunnel mode: a sound inner IPv4 header (version, header length, total length
        within what was decrypted, checksum; no fragment) and its UDP header."""
        n = len(inner)
        if n < 28 or inner[0] >> 4 != 4 or inner[9] != UDP:
            return False
        if inner[6] & 0x3F or inner[7]:
            return False  # a fragment's ports cannot be checked (RFC 4301 §7)
        l4 = (inner[0] & 0x0F) * 4
        total = inner[2] << 8 | inner[3]
        if l4 < 20 or not l4 + 8 <= total <= n:
            return False
        if not (inner[12:16] == self.src and inner[16:20] == self.dst
                and (inner[l4 + 2] << 8 | inner[l4 + 3]) == self.dport):
            return False
        s = sum(_HALVES[l4 >> 2].unpack_from(inner))
        s = (s & 0xFFFF) + (s >> 16)
        return (s & 0xFFFF) + (s >> 16) == 0xFFFF
