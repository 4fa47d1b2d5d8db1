"""IP addresses as the IKE core handles them: text (IPv4 dotted quad, or IPv6 in RFC 5952
form) in datagrams, peers and events; 4 or 16 bytes in NAT detection hashes, cookies and
traffic selectors."""

from __future__ import annotations

import functools
import ipaddress

from espswitch.packet.errors import PacketError

__all__ = ["addr_bytes", "canonical", "is_v6"]


@functools.lru_cache(maxsize=256)
def canonical(text: str) -> str:
    """`text` as the core compares addresses: one spelling per address (an IPv6 address
    can be written many ways; a socket reports the RFC 5952 one). ValueError if it is no
    IPv4 or IPv6 address."""
    return str(ipaddress.ip_address(text))


def addr_bytes(text: str) -> bytes:
    """The 4 (IPv4) or 16 (IPv6) bytes of an address in text; PacketError if it is none."""
    try:
        return ipaddress.ip_address(text).packed
    except ValueError:
        raise PacketError(f"bad IP address {text!r}") from None


def is_v6(text: str) -> bool:
    """Whether an address in text is IPv6 (cheap: IPv4 text has no colon)."""
    return ":" in text

