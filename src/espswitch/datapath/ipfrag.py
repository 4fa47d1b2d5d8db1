"""IPv4 reassembly of the tunnel packets sent to a local endpoint (RFC 791), sans-IO.

RFC 4303 §3.4.1: an IPsec receiver reassembles outer fragments before ESP processing. They
reach espswitch when a peer sends ESP or VXLAN larger than the path MTU without DF; Linux's
`vxlan` device does that by default when its MTU is larger than the underlay's. espswitch
itself never fragments an outer packet (see VxlanPort.fit).

Hostile fragments are the reason for the limits: a datagram whose fragments overlap is
dropped whole (overlaps only ever come from attacks on filters, as RFC 5722 says for IPv6),
one that would exceed 65,535 bytes is dropped, unfinished datagrams expire after `timeout`
seconds, and at most `max_datagrams` datagrams and `max_bytes` bytes are held: past that new
fragments are dropped and counted (Linux's ipfrag_high_thresh does the same).
Time comes in as `now`; nothing here reads a clock or touches a socket.
"""

from __future__ import annotations

from collections.abc import Callable

from espswitch.packet.ipv4 import ipv4_header_checksum

TIMEOUT = 30.0  # seconds, as Linux's net.ipv4.ipfrag_time
MAX_DATAGRAMS = 256
MAX_BYTES = 4 * 1024 * 1024
MAX_PAYLOAD = 65535 - 20


class _Datagram:
    """The fragments of one datagram seen so far."""

    __slots__ = ("eth", "first_seen", "frames", "header", "held", "pieces", "total")

    def __init__(self, now: float) -> None:
        self.first_seen = now
        self.pieces: dict[int, bytes] = {}  # offset -> payload
        self.held = 0  # payload bytes in `pieces`
        self.total: int | None = None  # payload length, known from the last fragment
        self.header: bytes | None = None  # IPv4 header of the first fragment
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
        self.bytes_held -= d.held
        return d

    def expire(self, now: float) -> None:
        """Drop the datagrams whose first fragment came more than `timeout` seconds ago."""
        old = [k for k, d in self.pending.items() if now - d.first_seen >= self.timeout]
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
        more = flags & 0x20
        payload = frame[l3 + ihl : l3 + total_len]
        end = offset + len(payload)
        if (more and (not payload or len(payload) % 8)) or end > MAX_PAYLOAD:
            self._drop("malformed")
            return None
        # Source, destination, protocol and identification name the datagram (RFC 791).
        key = frame[l3 + 12 : l3 + 20] + frame[l3 + 9 : l3 + 10] + frame[l3 + 4 : l3 + 6]
        d = self.pending.get(key)
        if d is None:
            if len(self.pending) >= self.max_datagrams or \
                    self.bytes_held + len(payload) > self.max_bytes:
                self.expire(now)
            if len(self.pending) >= self.max_datagrams or \
                    self.bytes_held + len(payload) > self.max_bytes:
                self._drop("no_room")
                return None
            d = self.pending[key] = _Datagram(now)
        elif self.bytes_held + len(payload) > self.max_bytes:
            self._forget(key)
            self._drop("no_room")
            return None
        # Overlaps drop the datagram; an exact duplicate (a retransmitted fragment) is ignored.
        for o, p in d.pieces.items():
            if o < end and offset < o + len(p):
                if o == offset and p == payload:
                    return None
                self._forget(key)
                self._drop("overlaps")
                return None
        if not more:
            if d.total is not None or any(o + len(p) > end for o, p in d.pieces.items()):
                self._forget(key)
                self._drop("malformed")
                return None
            d.total = end
        elif d.total is not None and end > d.total:
            self._forget(key)
            self._drop("malformed")
            return None
        if offset == 0:
            d.header = frame[l3 : l3 + ihl]
            d.eth = frame[:l3]
        d.pieces[offset] = payload
        d.held += len(payload)
        self.bytes_held += len(payload)
        d.frames.append(frame)
        if d.total is None or d.header is None or d.held != d.total:
            return None
        self._forget(key)
        hdr = bytearray(d.header)
        hdr[2:4] = (len(hdr) + d.total).to_bytes(2, "big")
        hdr[6] &= 0x40  # keep DF, clear MF and the offset
        hdr[7] = 0
        hdr[10:12] = ipv4_header_checksum(hdr).to_bytes(2, "big")
        body = b"".join(d.pieces[o] for o in sorted(d.pieces))
        return d.eth + bytes(hdr) + body, d.frames
