"""Security associations: the per-packet ESP work (RFC 4303), sans-IO.

An `OutboundSA` turns a payload into an ESP packet; an `InboundSA` turns an ESP packet back
into its payload, or returns the `DropReason` (the counter it went to) when it drops it.
Drops are returned values, never exceptions on the per-packet path: nothing of a dropped
packet outlives the call (a raised exception would keep its frames, and the packet bytes in
them, alive through its traceback). Both are built once, when
the SA is installed: the AEAD object, HMAC state, header templates and limits are made then,
and the per-packet methods only patch bytes.

Wire layout handled here (RFC 4303 §2):
    SPI(4) | Sequence Number(4) | IV | encrypted(Payload | Padding | Pad Length | Next Header) | ICV
"""

from __future__ import annotations

import enum
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.constant_time import bytes_eq

from espswitch.ipsec.errors import DropReason, EspDrop, IpsecConfigError, SaRefused
from espswitch.ipsec.replay import ReplayWindow
from espswitch.ipsec.transforms import Transform, parse_transform
from espswitch.packet.checksum import internet_checksum

__all__ = ["InboundSA", "Lifetime", "LifetimeEvent", "OutboundSA", "SaParams"]

ESP_PROTO = 50
NH_IPV4 = 4
NH_IPV6 = 41
NH_DUMMY = 59  # RFC 4303 §2.6: dummy packets for traffic flow confidentiality

_SPI_SEQ = struct.Struct("!II")
_SPI_SEQ_IV64 = struct.Struct("!IIQ")
_SPI_HI_LO = struct.Struct("!III")
_U32 = struct.Struct("!I")
_U16 = struct.Struct("!H")
_SEQ32_MAX = (1 << 32) - 1
_SEQ64_MAX = (1 << 64) - 1

# Padding is 1, 2, 3, ... (RFC 4303 §2.4); trailers for every pad length a block cipher
# needs, times every next header, are made once so that sealing is one slice assignment.
_PADS = tuple(bytes(range(1, n + 1)) for n in range(256))
_TRAILERS = tuple(tuple(_PADS[p] + bytes((p, nh)) for nh in range(256)) for p in range(16))


class Mode(enum.StrEnum):
    """ESP mode: what the protected payload is."""

    TRANSPORT = "transport"
    TUNNEL = "tunnel"


@dataclass(frozen=True, slots=True, kw_only=True)
class Lifetime:
    """A lifetime limit; None means unlimited."""

    packets: int | None = None
    bytes: int | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        for name in ("packets", "bytes", "seconds"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value <= 0):
                raise IpsecConfigError(f"lifetime {name} must be positive, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class SaParams:
    """Everything that defines one SA. The keying material never shows in its repr."""

    spi: int
    transform: Transform
    keymat: bytes = field(repr=False)
    mode: Mode = Mode.TRANSPORT
    replay_window: int = 1024
    soft: Lifetime = field(default_factory=Lifetime)
    hard: Lifetime = field(default_factory=Lifetime)
    # Outer addresses for tunnel mode (outbound builds the outer IPv4 header from them).
    tunnel_src: bytes | None = None
    tunnel_dst: bytes | None = None

    def __post_init__(self) -> None:
        if isinstance(self.transform, str):
            object.__setattr__(self, "transform", parse_transform(self.transform))
        if not isinstance(self.spi, int) or not 0 <= self.spi <= _SEQ32_MAX:
            raise IpsecConfigError(f"SPI must be a 32-bit number, got {self.spi!r}")
        if not isinstance(self.keymat, bytes | bytearray):
            raise IpsecConfigError("keying material must be bytes")
        self.transform.split_keymat(bytes(self.keymat))  # checks the length
        object.__setattr__(self, "mode", Mode(self.mode))
        for name in ("tunnel_src", "tunnel_dst"):
            addr = getattr(self, name)
            if addr is not None and len(addr) not in (4, 16):
                raise IpsecConfigError(f"{name} must be an IPv4 (4 bytes) or IPv6 (16 bytes) "
                                       "address")
        ReplayWindow(self.replay_window)  # checks the size


@dataclass(frozen=True, slots=True, kw_only=True)
class LifetimeEvent:
    """A lifetime was crossed: `hard=False` asks for a rekey, `hard=True` means expired."""

    spi: int
    direction: str
    hard: bool
    kind: str  # "packets", "bytes" or "seconds"


class _SaBase:
    """What inbound and outbound SAs share: identity, crypto objects, counters, lifetimes."""

    __slots__ = (
        "_aead",
        "_bytes_check",
        "_cipher_key",
        "_events",
        "_hmac",
        "_salt",
        "_soft_fired",
        "_spi_bytes",
        "bytes",
        "drops",
        "esn",
        "expired",
        "installed_at",
        "mode",
        "packets",
        "params",
        "spi",
        "transform",
    )

    direction = ""

    def __init__(self, params: SaParams, now: float) -> None:
        t = params.transform
        self.params = params
        self.spi = params.spi
        self.transform = t
        self.mode = params.mode
        self.esn = t.esn
        self._spi_bytes = _U32.pack(params.spi)
        enc_key, salt, integ_key = t.split_keymat(bytes(params.keymat))
        self._salt = salt
        self._aead: AESGCM | ChaCha20Poly1305 | None = None
        self._cipher_key: algorithms.AES | None = None
        self._hmac: hmac.HMAC | None = None
        if t.cipher == "aes-gcm":
            self._aead = AESGCM(enc_key)
        elif t.cipher == "chacha20-poly1305":
            self._aead = ChaCha20Poly1305(enc_key)
        elif t.cipher == "aes-cbc":
            self._cipher_key = algorithms.AES(enc_key)
        if t.integrity != "aead":
            algo = hashes.SHA256() if t.integrity == "hmac-sha256" else hashes.SHA1()
            self._hmac = hmac.HMAC(integ_key, algo)
        self.packets = 0
        self.bytes = 0
        self.drops = [0] * len(DropReason)
        self.expired = False
        self.installed_at = now
        self._events: list[LifetimeEvent] = []
        self._soft_fired: set[str] = set()
        self._bytes_check = self._next_byte_limit()

    # -- lifetimes --------------------------------------------------------------------

    def _next_byte_limit(self) -> float:
        """The next byte count at which `_crossed` must run."""
        limits = []
        if self.params.soft.bytes is not None and "bytes" not in self._soft_fired:
            limits.append(self.params.soft.bytes)
        if self.params.hard.bytes is not None and not self.expired:
            limits.append(self.params.hard.bytes)
        return min(limits, default=math.inf)

    def _crossed(self, kind: str, value: float) -> None:
        """Slow path: a packet count, byte count or age reached a limit."""
        soft = getattr(self.params.soft, kind)
        hard = getattr(self.params.hard, kind)
        if soft is not None and value >= soft and kind not in self._soft_fired:
            self._soft_fired.add(kind)
            self._emit(hard=False, kind=kind)
        if hard is not None and value >= hard:
            self.expire(kind)
        self._bytes_check = self._next_byte_limit()

    def _emit(self, *, hard: bool, kind: str) -> None:
        self._events.append(
            LifetimeEvent(spi=self.spi, direction=self.direction, hard=hard, kind=kind))

    def expire(self, kind: str = "deleted") -> None:
        """Stop protecting anything with this SA (hard lifetime, or deleted by the caller)."""
        if not self.expired:
            self.expired = True
            self._on_expired()
            self._emit(hard=True, kind=kind)

    def _on_expired(self) -> None:
        pass

    def next_deadline(self) -> float | None:
        """When `on_timer` must next run for time lifetimes, or None."""
        if self.expired:
            return None
        times = []
        if self.params.soft.seconds is not None and "seconds" not in self._soft_fired:
            times.append(self.installed_at + self.params.soft.seconds)
        if self.params.hard.seconds is not None:
            times.append(self.installed_at + self.params.hard.seconds)
        return min(times, default=None)

    def on_timer(self, now: float) -> None:
        """Apply time lifetimes at time `now` (same clock as the `now` given at install)."""
        if not self.expired:
            self._crossed("seconds", now - self.installed_at)

    def take_events(self) -> list[LifetimeEvent]:
        """Return and forget the lifetime events since the last call."""
        events, self._events = self._events, []
        return events

    # -- observability ----------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """Packets, bytes and every drop counter, by name."""
        out = {"packets": self.packets, "bytes": self.bytes}
        for reason in DropReason:
            out[reason.counter] = self.drops[reason]
        return out

    def lifetime_left(self) -> dict[str, float]:
        """What is left of each hard lifetime that is set (packets, bytes)."""
        left: dict[str, float] = {}
        hard = self.params.hard
        if hard.packets is not None:
            left["packets"] = max(hard.packets - self.packets, 0)
        if hard.bytes is not None:
            left["bytes"] = max(hard.bytes - self.bytes, 0)
        return left

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} spi=0x{self.spi:08x} {self.transform.proposal} "
                f"{self.mode} packets={self.packets}>")


class OutboundSA(_SaBase):
    """Protects outgoing packets with one SA.

    `encrypt(payload, next_header)` returns the ESP packet, from the SPI to the ICV.
    `iv_source(seq) -> bytes` replaces the IV generator; it exists for known-answer tests.
    """

    __slots__ = (
        "_check_seq",
        "_hard_seq",
        "_ident",
        "_iv_mask",
        "_iv_source",
        "_outer",
        "_seq_limit",
        "_soft_seq",
        "encrypt",
        "seq",
    )

    direction = "out"

    def __init__(self, params: SaParams, *, now: float = 0.0, seq_start: int = 1,
                 iv_source: Callable[[int], bytes] | None = None) -> None:
        super().__init__(params, now)
        t = params.transform
        seq_max = _SEQ64_MAX if t.esn else _SEQ32_MAX
        if not 1 <= seq_start <= seq_max:
            raise IpsecConfigError(f"first sequence number must be 1 to {seq_max}")
        self.seq = seq_start - 1  # the last one sent
        hard_p, soft_p = params.hard.packets, params.soft.packets
        self._hard_seq = seq_max if hard_p is None else min(seq_max, self.seq + hard_p)
        self._seq_limit = self._hard_seq
        self._soft_seq = -1 if soft_p is None else self.seq + soft_p
        # One comparison per packet: the next sequence number where a packet limit is
        # crossed (at the hard one the SA expires now, not at the next packet).
        self._check_seq = self._next_check_seq()
        self._iv_source = iv_source
        self._iv_mask = int.from_bytes(os.urandom(8), "big")
        self._ident = 0
        # Tunnel mode's outer header for protect(); a caller that builds its own outer
        # header (the datapath, whose local address may change) uses encrypt() instead.
        # protect() builds IPv4 outer headers only; IPv6 tunnels use encrypt() (the datapath).
        if params.mode is Mode.TUNNEL and params.tunnel_src and params.tunnel_dst and \
                len(params.tunnel_src) == len(params.tunnel_dst) == 4:
            self._outer = bytearray(
                struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 0, 0x4000, 64, ESP_PROTO, 0,
                            params.tunnel_src, params.tunnel_dst))
        else:
            self._outer = None
        self.encrypt = self._seal_aead if t.aead else self._seal_hmac

    def _on_expired(self) -> None:
        self._seq_limit = 0

    def _refuse(self) -> None:
        raise SaRefused(self.reserve())

    # -- the per-packet paths, one per transform family -----------------------------------
    # These are the datapath's hot path: measured, bytes concatenation beats building the
    # packet in a bytearray with encrypt_into/memoryview slices in cryptography 4x.

    def _seal_aead(self, payload: bytes | bytearray | memoryview, next_header: int) -> bytes:
        # reserve(), seal() and commit() written out in one function: the hot path.
        seq = self.seq + 1
        if seq > self._seq_limit:
            self._refuse()
        self.seq = seq
        if self._iv_source is None:
            # RFC 4106 §3.1: the IV must be unique per key. The sequence number XOR a random
            # mask chosen at install (Linux's "seqiv") is unique within this SA, and a
            # manually keyed SA installed again after a restart does not repeat its IVs.
            hdr = _SPI_SEQ_IV64.pack(self.spi, seq & _SEQ32_MAX, seq ^ self._iv_mask)
        else:
            hdr = _SPI_SEQ.pack(self.spi, seq & _SEQ32_MAX) + self._iv_source(seq)
        n = len(payload)
        aad = _SPI_HI_LO.pack(self.spi, seq >> 32, seq & _SEQ32_MAX) if self.esn else hdr[:8]
        out = hdr + self._aead.encrypt(
            self._salt + hdr[8:], payload + _TRAILERS[-(n + 2) & 3][next_header], aad)
        self.packets += 1
        self.bytes += n
        if seq == self._check_seq or self.bytes >= self._bytes_check:
            self._account_slow(seq)
        return out

    def _seal_hmac(self, payload: bytes | bytearray | memoryview, next_header: int) -> bytes:
        """AES-CBC then HMAC, or HMAC alone for null encryption (encrypt, then MAC)."""
        seq = self.reserve()
        if type(seq) is not int:
            raise SaRefused(seq)
        out = self.seal(seq, payload, next_header)
        self.commit(seq, len(payload))
        return out

    # -- the same work in three stages, for batches and other crypto backends ---------------
    # encrypt() = reserve() + seal() + commit(); only reserve and commit read or change the
    # SA's state, so a batch can reserve its sequence numbers, seal elsewhere (another
    # thread, another backend) and commit what was sent.

    def reserve(self) -> int | DropReason:
        """Stage 1: take the next sequence number; or the reason (counted) why this SA may
        not send: past its hard lifetime, or out of sequence numbers."""
        seq = self.seq + 1
        if seq > self._seq_limit:
            reason = DropReason.EXPIRED if self.expired else DropReason.SEQ_EXHAUSTED
            self.drops[reason] += 1
            return reason
        self.seq = seq
        return seq

    def seal(self, seq: int, payload: bytes | bytearray | memoryview, next_header: int) -> bytes:
        """Stage 2: the ESP packet (SPI to ICV) of `payload` at sequence number `seq`; reads
        only the keys, changes nothing."""
        t = self.transform
        n = len(payload)
        if t.aead:
            if self._iv_source is None:
                hdr = _SPI_SEQ_IV64.pack(self.spi, seq & _SEQ32_MAX, seq ^ self._iv_mask)
            else:
                hdr = _SPI_SEQ.pack(self.spi, seq & _SEQ32_MAX) + self._iv_source(seq)
            aad = _SPI_HI_LO.pack(self.spi, seq >> 32, seq & _SEQ32_MAX) if self.esn \
                else hdr[:8]
            return hdr + self._aead.encrypt(
                self._salt + hdr[8:], payload + _TRAILERS[-(n + 2) & 3][next_header], aad)
        plaintext = payload + _TRAILERS[-(n + 2) % t.block_size][next_header]
        hdr = _SPI_SEQ.pack(self.spi, seq & _SEQ32_MAX)
        if self._cipher_key is None:
            body = hdr + plaintext
        else:
            # RFC 3602: the CBC IV must be unpredictable, so it is random.
            iv = self._iv_source(seq) if self._iv_source is not None else os.urandom(t.iv_len)
            enc = Cipher(self._cipher_key, modes.CBC(iv)).encryptor()
            body = hdr + iv + enc.update(plaintext) + enc.finalize()
        return body + self._icv(body, seq)

    def commit(self, seq: int, nbytes: int) -> None:
        """Stage 3: count a packet of `nbytes` payload bytes sent at `seq`; lifetimes."""
        self.packets += 1
        self.bytes += nbytes
        if seq == self._check_seq or self.bytes >= self._bytes_check:
            self._account_slow(seq)

    def _icv(self, body: bytes, seq: int) -> bytes:
        h = self._hmac.copy()
        h.update(body)
        if self.esn:
            # RFC 4303 §2.2.1: the high half is authenticated as if it followed the trailer.
            h.update(_U32.pack(seq >> 32))
        return h.finalize()[: self.transform.icv_len]

    def _account_slow(self, seq: int) -> None:
        if seq == self._check_seq:
            self._crossed("packets", self.packets)
            self._check_seq = self._next_check_seq()
        if self.bytes >= self._bytes_check:
            self._crossed("bytes", self.bytes)

    def _next_check_seq(self) -> int:
        """The next sequence number at which a packet lifetime is crossed, or -1."""
        checks = [x for x in (self._soft_seq, self._hard_seq if self.params.hard.packets
                              is not None else -1) if x > self.seq]
        return min(checks, default=-1)

    # -- whole IP packets --------------------------------------------------------------------

    def protect(self, packet: bytes | bytearray | memoryview) -> bytearray:
        """Protect a whole IP packet in this SA's mode and return the IPv4 ESP packet.

        Transport mode: `packet` is IPv4; ESP goes between its header and its payload.
        Tunnel mode: `packet` is IPv4 or IPv6; a new outer IPv4 header carries it.
        Raises ValueError for a packet the mode cannot take, SaRefused when the SA may not send.
        """
        mv = memoryview(packet)
        if self.mode is Mode.TUNNEL:
            if self._outer is None:
                raise ValueError("tunnel-mode protect() needs IPv4 tunnel_src and tunnel_dst")
            return self._protect_tunnel(mv)
        ihl, total = _ipv4_bounds(mv)
        if mv[6] & 0x3F or mv[7]:
            raise ValueError("transport mode protects whole datagrams, not fragments")
        buf = bytearray(mv[:ihl])
        buf += self.encrypt(bytes(mv[ihl:total]), mv[9])
        buf[9] = ESP_PROTO
        _fix_ipv4_header(buf, ihl)
        return buf

    def _protect_tunnel(self, mv: memoryview) -> bytearray:
        if len(mv) < 20 or mv[0] >> 4 not in (4, 6):
            raise ValueError("tunnel mode protects IPv4 or IPv6 packets")
        nh = NH_IPV4 if mv[0] >> 4 == 4 else NH_IPV6
        # RFC 4301 §5.1.2.1: the outer DSCP/ECN is copied from the inner header.
        tos = mv[1] if nh == NH_IPV4 else ((mv[0] & 0x0F) << 4) | (mv[1] >> 4)
        buf = self._outer + self.encrypt(bytes(mv), nh)
        buf[1] = tos
        self._ident = (self._ident + 1) & 0xFFFF
        _U16.pack_into(buf, 4, self._ident)
        _fix_ipv4_header(buf, 20)
        return buf


class InboundSA(_SaBase):
    """Checks and removes ESP from incoming packets of one SA.

    `open(esp)` takes the ESP packet (from the SPI to the end of the ICV) and returns
    `(next_header, payload)` with the payload as bytes, or, on any failure, the
    `DropReason` it counted (nothing of the packet is kept). `decrypt(esp)` is the same for
    callers that prefer an exception: it raises a fresh `EspDrop`.
    `esn_high` seeds the ESN high half for a receiver that joins an SA late (offline tools).
    """

    __slots__ = ("_check_packets", "_fixed", "_min_len", "open", "window")

    direction = "in"

    def __init__(self, params: SaParams, *, now: float = 0.0, esn_high: int = 0) -> None:
        super().__init__(params, now)
        t = params.transform
        self.window = ReplayWindow(params.replay_window, esn=t.esn, initial_high=esn_high)
        self._fixed = 8 + t.iv_len + t.icv_len
        # The smallest plaintext is one block (CBC) or one 4-byte word: pad length + next header.
        self._min_len = self._fixed + max(t.block_size, 4)
        self._check_packets = self._next_packet_limit()
        self.open = self._open_aead if t.aead else self._open_hmac

    def decrypt(self, esp: bytes | bytearray | memoryview) -> tuple[int, bytes]:
        """`open`, raising a fresh `EspDrop` instead of returning the drop reason."""
        result = self.open(esp)
        if type(result) is tuple:
            return result
        raise EspDrop(result)

    def _drop(self, reason: DropReason) -> DropReason:
        self.drops[reason] += 1
        return reason

    # -- open() in three stages, for batches and other crypto backends -------------------------
    # open() = admit() + unseal() + commit(); only admit and commit read or change the SA's
    # state (admit only reads it), so a batch can admit, unseal elsewhere, then commit.

    def admit(self, esp: bytes | bytearray | memoryview) -> int | DropReason:
        """Stage 1: the length, lifetime and replay checks that come before any crypto;
        the sequence number, or the drop reason (a `DropReason`, never a plain int)."""
        n = len(esp)
        if n < self._min_len or (n - self._fixed) % self.transform.block_size:
            return self._drop(DropReason.MALFORMED)
        if self.expired:
            return self._drop(DropReason.EXPIRED)
        window = self.window
        seq = _U32.unpack_from(esp, 4)[0]
        if self.esn:
            seq = window.infer(seq)
        if seq <= window.top:
            reason = window.check(seq)
            if reason is not None:
                return self._drop(reason)
        return seq

    def unseal(self, esp: bytes | bytearray | memoryview, seq: int) -> bytes | DropReason:
        """Stage 2: check the ICV and decrypt an admitted packet; its plaintext (payload,
        padding, pad length, next header), or AUTH_FAILED (counted). Changes nothing else."""
        esp = bytes(esp)
        if self._aead is not None:
            aad = _SPI_HI_LO.pack(self.spi, seq >> 32, seq & _SEQ32_MAX) if self.esn \
                else esp[:8]
            try:
                return self._aead.decrypt(self._salt + esp[8:16], esp[16:], aad)
            except InvalidTag:
                return self._drop(DropReason.AUTH_FAILED)
        end = self._verify(esp, seq)
        if type(end) is not int:
            return end
        if self._cipher_key is None:
            return esp[8:end]
        dec = Cipher(self._cipher_key, modes.CBC(esp[8:24])).decryptor()
        return dec.update(esp[24:end]) + dec.finalize()

    def commit(self, seq: int, pt: bytes) -> tuple[int, bytes] | DropReason:
        """Stage 3: the trailer checks after the ICV verified, then the window moves
        (RFC 4303 §3.4.3) and the packet is counted: (next header, payload) or the reason."""
        pad = pt[-2]
        end = len(pt) - 2 - pad
        if end < 0 or not pt.endswith(_PADS[pad], 0, end + pad):
            return self._drop(DropReason.BAD_PADDING)
        self.window.update(seq)
        self.packets += 1
        self.bytes += end
        if self.packets >= self._check_packets or self.bytes >= self._bytes_check:
            self._account_slow()
        nh = pt[-1]
        if nh == NH_DUMMY:
            return self._drop(DropReason.DUMMY)
        return nh, pt[:end]

    def _account_slow(self) -> None:
        if self.packets >= self._check_packets:
            self._crossed("packets", self.packets)
            self._check_packets = self._next_packet_limit()
        if self.bytes >= self._bytes_check:
            self._crossed("bytes", self.bytes)

    def _next_packet_limit(self) -> float:
        limits = [x for x in (self.params.soft.packets, self.params.hard.packets)
                  if x is not None and x > self.packets]
        return min(limits, default=math.inf)

    def _open_aead(self, esp: bytes | bytearray | memoryview) -> tuple[int, bytes] | DropReason:
        """`admit`, `unseal` and `commit` written out in one function: this is the
        datapath's hot path, where each call and attribute lookup shows in the profile.
        The checks that cost nothing (length, lifetime, replay window) come before the
        AEAD, so a flood of forged or replayed packets costs little."""
        n = len(esp)
        if n < self._min_len or (n - self._fixed) & 3:
            return self._drop(DropReason.MALFORMED)
        if self.expired:
            return self._drop(DropReason.EXPIRED)
        window = self.window
        seq = _U32.unpack_from(esp, 4)[0]
        if self.esn:
            seq = window.infer(seq)
        if seq <= window.top:
            reason = window.check(seq)
            if reason is not None:
                return self._drop(reason)
        if type(esp) is not bytes:
            esp = bytes(esp)
        aad = _SPI_HI_LO.pack(self.spi, seq >> 32, seq & _SEQ32_MAX) if self.esn else esp[:8]
        try:
            pt = self._aead.decrypt(self._salt + esp[8:16], esp[16:], aad)
        except InvalidTag:
            # A fresh exception from cryptography, caught here: its traceback dies with
            # this frame, and nothing of it is kept.
            return self._drop(DropReason.AUTH_FAILED)
        pad = pt[-2]
        end = len(pt) - 2 - pad
        # endswith() compares the padding in place: no slice is made.
        if end < 0 or not pt.endswith(_PADS[pad], 0, end + pad):
            return self._drop(DropReason.BAD_PADDING)
        top = window.top
        if seq > top and not (seq ^ top) >> 6:
            # In-order packet within the top 64-bit block: the common case, done inline.
            window.top = seq
            window.blocks[(seq >> 6) & window.bmask] |= 1 << (seq & 63)
        else:
            window.update(seq)
        self.packets += 1
        self.bytes += end
        if self.packets >= self._check_packets or self.bytes >= self._bytes_check:
            self._account_slow()
        nh = pt[-1]
        if nh == NH_DUMMY:
            return self._drop(DropReason.DUMMY)
        return nh, pt[:end]

    def _verify(self, esp: bytes, seq: int) -> int | DropReason:
        """The ICV check: the end of the authenticated part, or AUTH_FAILED."""
        icv_len = self.transform.icv_len
        end = len(esp) - icv_len
        h = self._hmac.copy()
        h.update(esp[:end])
        if self.esn:
            h.update(_U32.pack(seq >> 32))
        if not bytes_eq(h.finalize()[:icv_len], esp[end:]):
            return self._drop(DropReason.AUTH_FAILED)
        return end

    def _open_hmac(self, esp: bytes | bytearray | memoryview) -> tuple[int, bytes] | DropReason:
        """Verify the HMAC first (nothing is decrypted from a forged packet), then AES-CBC
        or, for null encryption, nothing."""
        seq = self.admit(esp)
        if type(seq) is not int:
            return seq
        pt = self.unseal(esp, seq)
        if type(pt) is not bytes:
            return pt
        return self.commit(seq, pt)

    # -- whole IP packets --------------------------------------------------------------------

    def unprotect(self, packet: bytes | bytearray | memoryview) -> bytearray:
        """Undo `OutboundSA.protect`: take an IPv4 ESP packet, return the packet it carried.

        Transport mode returns the IPv4 packet with its protocol, length and checksum
        restored; tunnel mode returns the inner IPv4 or IPv6 packet.
        """
        mv = memoryview(packet)
        try:
            ihl, total = _ipv4_bounds(mv)
        except ValueError:
            ihl = total = 0
        if not ihl or mv[9] != ESP_PROTO or mv[6] & 0x3F or mv[7]:
            raise EspDrop(self._drop(DropReason.MALFORMED))
        nh, payload = self.decrypt(mv[ihl:total])
        if self.mode is Mode.TUNNEL:
            return self._inner_packet(nh, payload)
        out = bytearray(ihl + len(payload))
        out[:ihl] = mv[:ihl]
        out[ihl:] = payload
        out[9] = nh
        _fix_ipv4_header(out, ihl)
        return out

    def _inner_packet(self, nh: int, payload: bytes) -> bytearray:
        # The payload may carry TFC padding after the inner packet: trust its own length.
        n = len(payload)
        if nh == NH_IPV4 and n >= 20 and payload[0] >> 4 == 4:
            length = _U16.unpack_from(payload, 2)[0]
        elif nh == NH_IPV6 and n >= 40 and payload[0] >> 4 == 6:
            length = 40 + _U16.unpack_from(payload, 4)[0]
        else:
            length = 0
        if not 20 <= length <= n:
            raise EspDrop(self._drop(DropReason.MALFORMED))
        return bytearray(payload[:length])


def _ipv4_bounds(mv: memoryview) -> tuple[int, int]:
    """Return (header length, total length) of an IPv4 packet, or raise ValueError."""
    if len(mv) < 20 or mv[0] >> 4 != 4:
        raise ValueError("not an IPv4 packet")
    ihl = (mv[0] & 0x0F) * 4
    total = _U16.unpack_from(mv, 2)[0]
    if ihl < 20 or total < ihl or total > len(mv):
        raise ValueError("bad IPv4 header or total length")
    return ihl, total


def _fix_ipv4_header(buf: bytearray, ihl: int) -> None:
    """Set the total length to the buffer's and recompute the header checksum."""
    _U16.pack_into(buf, 2, len(buf))
    buf[10:12] = b"\0\0"
    _U16.pack_into(buf, 10, internet_checksum(memoryview(buf)[:ihl]))
