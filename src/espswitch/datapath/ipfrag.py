"""IPv4 and IPv6 reassembly of the tunnel packets sent to a local endpoint (RFC 791, RFC 8200
§4.5), sans-IO.

RFC 4303 §3.4.1: an IPsec receiver reassembles outer fragments before ESP processing. They
reach espswitch when a peer sends ESP or VXLAN larger than the path MTU without DF; Linux's
`vxlan` device does that by default when its MTU is larger than the underlay's. espswitch
itself never fragments an outer packet (see VxlanPort.fit).

Hostile fragments are the reason for the limits: a datagram whose fragments overlap is
dropped whole (overlaps only ever come from attacks on filters, as RFC 5722 says for IPv6),
one that would exceed 65,535 bytes is dropped, unfinished datagrams expire after `timeout`
seconds, and at most `max_datagrams` datagrams and `max_bytes` bytes are held: past that new
fragments are dropped and counted (Linux's ipfrag_high_thresh does the same). The byte limit
counts what a held fragment really costs (the frame as received plus the bookkeeping of one
piece), not only its payload. Fragments no legitimate sender makes are dropped before any
state is kept: a fragment other than the last must carry at least `MIN_FRAGMENT` bytes (a
flood of 8-byte fragments would otherwise cost a datagram entry each), and a datagram may
have at most `MAX_FRAGMENTS` pieces.
Time comes in as `now`; nothing here reads a clock or touches a socket.

IPv6 (`add6`): a fragment is the fixed 40-byte header followed directly by the Fragment
header (other extension headers are not walked: such a packet is not a tunnel's); the
datagram is named by source, destination and the 32-bit identification, and comes back
as the IPv6 header with the Fragment header's next header and the whole payload length.
Both families share the limits and the `ipfrag_*` counters.
"""

from __future__ import annotations

from collections.abc import Callable

from espswitch.packet.ipv4 import ipv4_header_checksum

TIMEOUT = 30.0  # seconds, as Linux's net.ipv4.ipfrag_time
MAX_DATAGRAMS = 256
MAX_BYTES = 4 * 1024 * 1024
MAX_PAYLOAD = 65535 - 20
MAX_PAYLOAD6 = 65535  # IPv6's payload length does not count the 40-byte header
# A non-last fragment smaller than this comes from no real path: IPv4 links carry at least
# 576-byte datagrams in practice (RFC 791/1122), so a sender's fragments hold 552 or more.
MIN_FRAGMENT = 256
# 65,535 bytes in fragments of at least MIN_FRAGMENT need at most 256; real tunnel packets
# (up to a 9,000-byte jumbo frame over a 576-byte path) need at most 17.
MAX_FRAGMENTS = 64
# What one held fragment costs beyond its frame's bytes: the bytes object's header, its
# place in the list and the piece's entry (measured with tracemalloc: about 150 bytes).
FRAGMENT_OVERHEAD = 192


class _Datagram:
    """The fragments of one datagram seen so far."""

    __slots__ = ("cost", "eth", "first_seen", "frames", "header", "held", "pieces", "total")

    def __init__(self, now: float) -> None:
        self.first_seen = now
        # offset -> (index in `frames`, payload start, payload end): the payload stays in
        # the frame as received, so nothing is held twice.
        self.pieces: dict[int, tuple[int, int, int]] = {}
        self.held = 0  # payload bytes in `pieces`
        self.cost = 0  # memory charged to the limit for this datagram
        self.total: int | None = None  # payload length, known from the last fragment
        self.header: bytes | None = None  # IP header of the first fragment (IPv6: + Fragment)
        self.eth = b""  # link header of the first fragment
        self.frames: list[bytes] = []  # the fragments as received, for whoever wants them


class Reassembler:
    """Collects IPv4 fragments into datagrams; see the module docstring for the limits."""

    def __init__(self, on_drop: Callable[[str, int], None] | None = None, *,
                 timeout: float = TIMEOUT, max_datagrams: int = MAX_DATAGRAMS,
                 max_bytes: int = MAX_BYTES) -> None:
        self.timeout = timeout
        self.max_datagrams = max_datagrams
        self.max_bytes = max_bytes
        self.pending: dict[bytes, _Datagram] = {}
        self.bytes_held = 0
        self._on_drop = on_drop if on_drop is not None else (lambda cause, n: None)

    def _drop(self, cause: str, n: int = 1) -> None:
        self._on_drop(f"ipfrag_{cause}", n)

    def _forget(self, key: bytes) -> _Datagram:
        d = self.pending.pop(key)
        self.bytes_held -= d.cost
        return d

    def expire(self, now: float) -> None:
        """Drop the datagrams whose first fragment came more than `timeout` seconds ago."""
        # `pending` is in arrival order and time only moves forward: the expired datagrams
        # are a prefix, so a flood costs one look per call, not one per datagram held.
        old = []
        for k, d in self.pending.items():
            if now - d.first_seen < self.timeout:
                break
            old.append(k)
        for key in old:
            self._forget(key)
        if old:
            self._drop("timeouts", len(old))

    def add(self, frame: bytes, l3: int, now: float) -> tuple[bytes, list[bytes]] | None:
        """Take one fragment (an IPv4 packet at `l3` in `frame`).

        Returns (the whole datagram as one frame with the first fragment's link header, the
        fragments as received) once the last missing piece came, else None: the fragment is
        held, or was dropped and counted.
        """
        if len(frame) < l3 + 20:
            self._drop("malformed")
            return None
        ihl = (frame[l3] & 15) * 4
        total_len = (frame[l3 + 2] << 8) | frame[l3 + 3]
        if ihl < 20 or total_len < ihl or l3 + total_len > len(frame):
            self._drop("malformed")
            return None
        flags = frame[l3 + 6]
        offset = (((flags & 0x1F) << 8) | frame[l3 + 7]) * 8
        # Source, destination, protocol and identification name the datagram (RFC 791).
        key = frame[l3 + 12 : l3 + 20] + frame[l3 + 9 : l3 + 10] + frame[l3 + 4 : l3 + 6]
        d = self._collect(key, frame, l3, ihl, l3 + ihl, l3 + total_len, offset, flags & 0x20,
                          MAX_PAYLOAD, now)
        if d is None:
            return None
        hdr = bytearray(d.header)
        hdr[2:4] = (len(hdr) + d.total).to_bytes(2, "big")
        hdr[6] &= 0x40  # keep DF, clear MF and the offset
        hdr[7] = 0
        hdr[10:12] = ipv4_header_checksum(hdr).to_bytes(2, "big")
        return d.eth + bytes(hdr) + self._body(d), d.frames

    def add6(self, frame: bytes, l3: int, now: float) -> tuple[bytes, list[bytes]] | None:
        """Take one IPv6 fragment (an IPv6 header at `l3` whose next header is Fragment);
        returns and holds as `add` does."""
        if len(frame) < l3 + 48 or frame[l3 + 6] != 44:
            self._drop("malformed")
            return None
        stop = l3 + 40 + ((frame[l3 + 4] << 8) | frame[l3 + 5])
        if stop > len(frame) or stop < l3 + 48:
            self._drop("malformed")
            return None
        word = (frame[l3 + 42] << 8) | frame[l3 + 43]
        # Source, destination and identification name the datagram (RFC 8200 §4.5).
        key = b"6" + frame[l3 + 8 : l3 + 40] + frame[l3 + 44 : l3 + 48]
        d = self._collect(key, frame, l3, 48, l3 + 48, stop, word & 0xFFF8, word & 1,
                          MAX_PAYLOAD6, now)
        if d is None:
            return None
        h = d.header
        hdr = bytearray(h[:40])
        hdr[6] = h[40]  # the Fragment header's next header
        hdr[4:6] = d.total.to_bytes(2, "big")
        return d.eth + bytes(hdr) + self._body(d), d.frames

    @staticmethod
    def _body(d: _Datagram) -> bytes:
        pieces, frames = d.pieces, d.frames
        return b"".join(frames[i][s0:s1] for i, s0, s1 in (pieces[o] for o in sorted(pieces)))

    def _collect(self, key: bytes, frame: bytes, l3: int, hlen: int, start: int, stop: int,
                 offset: int, more: int, max_payload: int, now: float) -> _Datagram | None:
        """Hold the piece `frame[start:stop]` at payload offset `offset` of datagram `key`
        (the first `hlen` bytes at `l3` are its header); the datagram, no longer held, once
        it is whole, else None (held, or dropped and counted)."""
        size = stop - start
        end = offset + size
        if (more and (size < MIN_FRAGMENT or size % 8)) or not size or end > max_payload:
            self._drop("too_small" if more and size < MIN_FRAGMENT else "malformed")
            return None
        cost = len(frame) + FRAGMENT_OVERHEAD
        d = self.pending.get(key)
        if d is None:
            if len(self.pending) >= self.max_datagrams or \
                    self.bytes_held + cost > self.max_bytes:
                self.expire(now)
            if len(self.pending) >= self.max_datagrams or \
                    self.bytes_held + cost > self.max_bytes:
                self._drop("no_room")
                return None
            d = self.pending[key] = _Datagram(now)
        elif self.bytes_held + cost > self.max_bytes:
            self._forget(key)
            self._drop("no_room")
            return None
        elif len(d.pieces) >= MAX_FRAGMENTS:
            self._forget(key)
            self._drop("too_many")
            return None
        # Overlaps drop the datagram; an exact duplicate (a retransmitted fragment) is ignored.
        frames = d.frames
        for o, (i, s0, s1) in d.pieces.items():
            if o < end and offset < o + s1 - s0:
                if o == offset and s1 - s0 == size and \
                        frames[i][s0:s1] == frame[start:stop]:
                    return None
                self._forget(key)
                self._drop("overlaps")
                return None
        if not more:
            if d.total is not None or any(o + s1 - s0 > end
                                          for o, (_, s0, s1) in d.pieces.items()):
                self._forget(key)
                self._drop("malformed")
                return None
            d.total = end
        elif d.total is not None and end > d.total:
            self._forget(key)
            self._drop("malformed")
            return None
        if offset == 0:
            d.header = frame[l3 : l3 + hlen]
            d.eth = frame[:l3]
        d.pieces[offset] = (len(frames), start, stop)
        frames.append(frame)
        d.held += size
        d.cost += cost
        self.bytes_held += cost
        if d.total is None or d.header is None or d.held != d.total:
            return None
        self._forget(key)
        return d
