"""The Internet checksum (RFC 1071) and its incremental update (RFC 1624).

Two kinds of value appear here:

* a *sum*: the ones' complement sum of 16-bit words, folded to 16 bits, not complemented.
  Sums can be added together (:func:`fold`) and passed as ``initial`` to continue a checksum;
* a *checksum*: the complement of a sum, the value written into a header.
"""

from __future__ import annotations

__all__ = [
    "checksum_update16",
    "fold",
    "internet_checksum",
    "ipv4_pseudo_header_sum",
    "ipv6_pseudo_header_sum",
    "ones_complement_sum",
]

Buffer = bytes | bytearray | memoryview


def ones_complement_sum(data: Buffer, initial: int = 0) -> int:
    """Return the folded 16-bit ones' complement sum of ``data`` plus the sum ``initial``.

    An odd-length buffer is summed as if padded with one zero byte (RFC 1071).
    """
    # Why this is fast: 2**16 == 1 (mod 0xFFFF), so the ones' complement sum of the big-endian
    # 16-bit words equals the whole buffer, read as one big integer, modulo 0xFFFF. CPython
    # does the conversion and the reduction in C, with no per-word Python loop.
    n = int.from_bytes(data, "big")
    if len(data) & 1:
        n <<= 8  # the zero pad byte of an odd-length buffer
    n += initial
    r = n % 0xFFFF
    # End-around-carry addition never yields 0 from non-zero input: it yields 0xFFFF, which is
    # the same class modulo 0xFFFF ("negative zero").
    if r == 0 and n:
        return 0xFFFF
    return r


def fold(value: int) -> int:
    """Fold any non-negative integer (e.g. a sum of several sums) to a 16-bit ones' sum."""
    r = value % 0xFFFF
    if r == 0 and value:
        return 0xFFFF
    return r


def internet_checksum(data: Buffer, initial: int = 0) -> int:
    """Return the Internet checksum of ``data`` (RFC 1071), continuing from the sum ``initial``.

    Computed over a header whose checksum field is zero, this is the value to write into the
    field; computed over a header carrying a correct checksum, it is 0.
    """
    return ~ones_complement_sum(data, initial) & 0xFFFF


def checksum_update16(old_csum: int, old_word: int, new_word: int) -> int:
    """Return the checksum after one 16-bit word changed from ``old_word`` to ``new_word``.

    This is RFC 1624 eqn. 3, ``HC' = ~(~HC + ~m + m')``: unlike RFC 1141's ``HC - m + m'``
    it stays correct when the ones' sum involves negative zero.
    """
    s = (~old_csum & 0xFFFF) + (~old_word & 0xFFFF) + (new_word & 0xFFFF)
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4_pseudo_header_sum(src4: Buffer, dst4: Buffer, proto: int, length: int) -> int:
    """Return the ones' sum of the IPv4 pseudo header (RFC 768 / RFC 793).

    Pass the result as ``initial`` to :func:`internet_checksum` over the UDP or TCP segment.
    """
    if len(src4) != 4 or len(dst4) != 4:
        raise ValueError("pseudo header addresses must be 4 bytes")
    n = int.from_bytes(src4, "big") + int.from_bytes(dst4, "big") + (proto & 0xFF) + length
    return fold(n)


def ipv6_pseudo_header_sum(src16: Buffer, dst16: Buffer, next_header: int, length: int) -> int:
    """Return the ones' sum of the IPv6 pseudo header (RFC 8200 §8.1): both addresses, the
    upper-layer length as 32 bits, three zero bytes and the next header value."""
    if len(src16) != 16 or len(dst16) != 16:
        raise ValueError("pseudo header addresses must be 16 bytes")
    # Adding the addresses as two 128-bit integers is the same modulo 0xFFFF as adding
    # their 16-bit words (2**16 == 1 mod 0xFFFF).
    n = int.from_bytes(src16, "big") + int.from_bytes(dst16, "big") + length + next_header
    return fold(n)
