"""IKEv2 message fragmentation (RFC 7383), sans-IO.

When both ends announced IKEV2_FRAGMENTATION_SUPPORTED in IKE_SA_INIT, an encrypted message
that would not fit one datagram of `fragment_size` bytes (the whole IP datagram: IPv4 and
UDP headers and, on port 4500, the non-ESP marker included) is sent as several IKE messages,
each carrying one Encrypted Fragment payload (SKF, type 53) with its own IV, padding and ICV,
so that no IP fragmentation is needed on the way (`fragment_message`).

`Reassembler` puts received fragments together, under bounds:
- each fragment is authenticated (its ICV checked with the IKE SA's keys, RFC 7383 §2.6)
  before it changes any state, so forged fragments are counted and dropped, never kept;
- a message has at most `max_fragments` fragments and `max_message` bytes, and every
  message being reassembled together holds at most `max_held` bytes (what a fragment and a
  message cost in memory beside their content counted too, so that tiny fragments are no
  way around the bound);
- a message not complete within `timeout` seconds is dropped (its sender retransmits all
  its fragments, which fills the gaps of a message still held);
- one message per IKE SA and direction: a fragment of a newer message (or of the same one
  split in more fragments, §2.5.2) replaces the old one; fewer fragments than held, or a
  duplicate, is ignored.
What happens to each fragment is counted in the `counters` dict given to it.
"""

from __future__ import annotations

import struct
from collections.abc import Hashable
from dataclasses import dataclass

from espswitch.ike.consts import HEADER_LEN, PayloadType
from espswitch.ike.errors import IkeConfigError, ProtocolError
from espswitch.ike.message import (
    Header,
    Message,
    SkCodec,
    encode_payloads,
    pack_header,
)

__all__ = [
    "DEFAULT_FRAGMENT_SIZE",
    "FragmentHeader",
    "FragmentLimits",
    "Reassembler",
    "fragment_message",
    "max_message_len",
    "open_fragment",
    "parse_fragment_header",
]

# The IP datagram size of a fragment, as strongSwan's charon.fragment_size: it fits the IPv6
# minimum MTU, so any path that carries IPv6, and nearly every IPv4 path, carries it whole.
DEFAULT_FRAGMENT_SIZE = 1280
# The smallest fragment_size accepted: RFC 791's 576 bytes every IPv4 host must receive.
MIN_FRAGMENT_SIZE = 576
_IPV4_UDP = 20 + 8
_IPV6_UDP = 40 + 8
_NON_ESP_MARKER = 4
_SKF = struct.Struct("!BBHHH")  # next payload, flags, length, fragment number, total
_SKF_LEN = _SKF.size
# What Python spends on a held fragment and a held message beside the content (roughly: a
# bytes object and its dict entry; the message object and its dict).
_FRAGMENT_COST = 96
_MESSAGE_COST = 256

COUNTERS = ("fragments_sent", "fragments_received", "fragments_reassembled",
            "fragments_forged", "fragments_invalid", "fragments_duplicate", "fragments_stale",
            "fragments_expired", "fragments_over_limit")


def max_message_len(fragment_size: int, nat_t: bool, v6: bool = False) -> int:
    """The longest IKE message that fits one IP datagram of `fragment_size` bytes (IPv4,
    or IPv6 with `v6`: its header is 20 bytes longer)."""
    return fragment_size - (_IPV6_UDP if v6 else _IPV4_UDP) - (_NON_ESP_MARKER if nat_t else 0)


def fragment_message(msg: Message, sk: SkCodec, max_len: int) -> tuple[bytes, ...] | None:
    """`msg` (encrypted) as Encrypted Fragment messages of at most `max_len` bytes each,
    or None when it fits unfragmented. Each fragment takes `msg`'s header fields; the
    first carries the type of the first inner payload (RFC 7383 §2.5)."""
    first, inner = encode_payloads(msg.payloads)
    if HEADER_LEN + 4 + sk.sealed_len(len(inner)) <= max_len:
        return None
    room = max_len - HEADER_LEN - _SKF_LEN  # for IV, content, padding and ICV
    chunk = room - sk.sealed_len(0) + 1
    while chunk > 0 and sk.sealed_len(chunk) > room:
        chunk -= 1
    if chunk <= 0:
        raise IkeConfigError(f"fragments of {max_len} bytes leave no room for content")
    pieces = [inner[i : i + chunk] for i in range(0, len(inner), chunk)] or [b""]
    total = len(pieces)
    if total > 0xFFFF:
        raise ValueError("message too long to fragment")
    out = []
    for num, piece in enumerate(pieces, 1):
        sealed_len = sk.sealed_len(len(piece))
        hdr = pack_header(spi_i=msg.spi_i, spi_r=msg.spi_r, next_payload=PayloadType.SKF,
                          exchange=msg.exchange, flags=msg.flags, mid=msg.mid,
                          length=HEADER_LEN + _SKF_LEN + sealed_len)
        # The AAD covers the IKE header and the whole SKF header, number and total too.
        skf = _SKF.pack(first if num == 1 else 0, 0, _SKF_LEN + sealed_len, num, total)
        out.append(hdr + skf + sk.seal(hdr + skf, piece))
    return tuple(out)


@dataclass(frozen=True, slots=True, kw_only=True)
class FragmentHeader:
    """What an Encrypted Fragment payload says of itself (not yet authenticated)."""

    first_payload: int
    number: int
    total: int


def parse_fragment_header(h: Header, data: bytes) -> FragmentHeader:
    """The SKF header of a datagram whose IKE header `h` announces SKF; ProtocolError when
    it is malformed (numbering outside 1..total, lengths that disagree)."""
    if h.next_payload != PayloadType.SKF or len(data) < HEADER_LEN + _SKF_LEN:
        raise ProtocolError("malformed IKE fragment")
    first, _, plen, num, total = _SKF.unpack_from(data, HEADER_LEN)
    if HEADER_LEN + plen != h.length or plen <= _SKF_LEN:
        raise ProtocolError("IKE fragment length does not match its message")
    if not 1 <= num <= total:
        raise ProtocolError(f"IKE fragment number {num} of {total}")
    return FragmentHeader(first_payload=first, number=num, total=total)


def open_fragment(h: Header, data: bytes, sk: SkCodec) -> tuple[FragmentHeader, bytes]:
    """The header and decrypted content of one fragment, its ICV checked with the sender's
    keys; ProtocolError when it does not authenticate."""
    fh = parse_fragment_header(h, data)
    return fh, sk.open(data[: HEADER_LEN + _SKF_LEN], data[HEADER_LEN + _SKF_LEN :])


@dataclass(frozen=True, slots=True, kw_only=True)
class FragmentLimits:
    """Bounds of reassembly: fragments and bytes of one message, bytes held over all
    messages, seconds a message may take to complete."""

    max_fragments: int = 64
    max_message: int = 65535
    max_held: int = 2 << 20
    timeout: float = 30.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_fragments <= 0xFFFF or self.max_message < 1 or \
                self.max_held < self.max_message or self.timeout <= 0:
            raise IkeConfigError("bad fragment reassembly limits")


class _Message:
    """One message being reassembled."""

    __slots__ = ("cost", "first", "mid", "parts", "size", "started", "total")

    def __init__(self, mid: int, total: int, started: float) -> None:
        self.mid, self.total, self.started = mid, total, started
        self.parts: dict[int, bytes] = {}
        self.first = PayloadType.NONE
        self.size = 0  # bytes of content
        self.cost = _MESSAGE_COST  # memory counted against max_held


class Reassembler:
    """Every message being reassembled, by a key of the caller's (an IKE SA and a
    direction), under one set of `FragmentLimits`; outcomes counted in `counters`."""

    def __init__(self, limits: FragmentLimits, counters: dict[str, int]) -> None:
        self.limits = limits
        self.counters = counters
        for name in COUNTERS:
            counters.setdefault(name, 0)
        self._msgs: dict[Hashable, _Message] = {}
        self.held = 0  # bytes held (content and overhead), over every message

    def add(self, key: Hashable, h: Header, data: bytes, sk: SkCodec,
            now: float) -> tuple[int, bytes] | None:
        """Take one fragment of message `h.mid` (the caller checked that this message ID is
        one it expects). Returns (type of the first inner payload, inner payloads) when the
        message is complete, None while fragments are missing or when this one is ignored
        (a duplicate, a stale one); raises ProtocolError for a malformed, oversized or
        forged fragment. Nothing changes unless the fragment authenticates."""
        c = self.counters
        c["fragments_received"] += 1
        self.expire(now)
        try:
            fh = parse_fragment_header(h, data)
        except ProtocolError:
            c["fragments_invalid"] += 1
            raise
        if fh.total > self.limits.max_fragments:
            c["fragments_invalid"] += 1
            raise ProtocolError(f"IKE message in {fh.total} fragments, more than "
                                f"{self.limits.max_fragments}")
        cur = self._msgs.get(key)
        same = cur is not None and cur.mid == h.mid
        if same and fh.total < cur.total:
            c["fragments_stale"] += 1  # §2.6: from before a re-fragmentation; ignored
            return None
        if same and fh.total == cur.total and fh.number in cur.parts:
            c["fragments_duplicate"] += 1
            return None
        try:
            _, content = open_fragment(h, data, sk)
        except ProtocolError:
            c["fragments_forged"] += 1
            raise
        # This fragment starts a message (a newer one, or the same in more fragments,
        # which supersedes what is held) or adds to the one held.
        fresh = not same or fh.total > cur.total
        if (0 if fresh else cur.size) + len(content) > self.limits.max_message:
            if not fresh:
                self._drop(key, "fragments_over_limit")
            c["fragments_over_limit"] += 1
            raise ProtocolError(f"fragmented IKE message longer than "
                                f"{self.limits.max_message} bytes")
        freed = cur.cost if fresh and cur is not None else 0
        cost = len(content) + _FRAGMENT_COST + (_MESSAGE_COST if fresh else 0)
        if self.held - freed + cost > self.limits.max_held:
            c["fragments_over_limit"] += 1
            raise ProtocolError("too many bytes of IKE fragments held")
        if fresh:
            self._drop(key, "fragments_stale")
            cur = self._msgs[key] = _Message(h.mid, fh.total, now)
        cur.parts[fh.number] = content
        cur.size += len(content)
        cur.cost += len(content) + _FRAGMENT_COST
        self.held += cost
        if fh.number == 1:
            cur.first = fh.first_payload
        if len(cur.parts) < cur.total:
            return None
        del self._msgs[key]
        self.held -= cur.cost
        c["fragments_reassembled"] += 1
        return cur.first, b"".join(cur.parts[n] for n in range(1, cur.total + 1))

    def retransmitted(self, h: Header, data: bytes, sk: SkCodec) -> bool:
        """A fragment of a request already answered (RFC 7383 §2.6.1): True when it is the
        first fragment and authentic, so that the response goes again; counted."""
        c = self.counters
        c["fragments_received"] += 1
        try:
            fh = parse_fragment_header(h, data)
        except ProtocolError:
            c["fragments_invalid"] += 1
            raise
        c["fragments_duplicate"] += 1
        if fh.number != 1:
            return False
        try:
            open_fragment(h, data, sk)
        except ProtocolError:
            c["fragments_duplicate"] -= 1
            c["fragments_forged"] += 1
            raise
        return True

    def _drop(self, key: Hashable, why: str = "fragments_expired") -> None:
        """Forget the message held under `key`, counting its fragments under `why`."""
        old = self._msgs.pop(key, None)
        if old is not None:
            self.held -= old.cost
            self.counters[why] += len(old.parts)

    def discard(self, *keys: Hashable) -> None:
        """Forget what is held under `keys` (their IKE SA is gone)."""
        for key in keys:
            self._drop(key)

    def expire(self, now: float) -> None:
        """Drop the messages older than the timeout."""
        end = now - self.limits.timeout
        for key in [k for k, m in self._msgs.items() if m.started <= end]:
            self._drop(key)

    def next_deadline(self) -> float | None:
        """When the oldest message held times out, or None."""
        return min((m.started + self.limits.timeout for m in self._msgs.values()),
                   default=None)

    def __len__(self) -> int:
        return len(self._msgs)
