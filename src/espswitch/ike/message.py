"""IKEv2 message codec (RFC 7296 §3): the header, every payload the core uses, and SK.

`Message` holds the header fields and the payloads; `encode_message` turns it into bytes
(putting the payloads into an SK payload when the message is `encrypted`), and
`parse_message` does the reverse. Parsing raises only `ProtocolError` (carrying the notify
type to answer with): a payload type we do not know is skipped unless its critical bit is
set, in which case the message is refused with UNSUPPORTED_CRITICAL_PAYLOAD (§2.5).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from typing import Protocol as TypingProtocol

from espswitch.ike.consts import (
    ATTR_KEY_LENGTH,
    HEADER_LEN,
    IKE_VERSION,
    MAX_MESSAGE,
    Flag,
    Notify,
    PayloadType,
    Protocol,
    TsType,
)
from espswitch.ike.errors import ProtocolError

__all__ = [
    "AuthPayload",
    "CertPayload",
    "CertReqPayload",
    "DeletePayload",
    "Header",
    "IdPayload",
    "KePayload",
    "Message",
    "NoncePayload",
    "NotifyPayload",
    "Payload",
    "Proposal",
    "SaPayload",
    "SkCodec",
    "TrafficSelector",
    "Transform",
    "TsPayload",
    "VendorPayload",
    "encode_message",
    "encode_payloads",
    "pack_header",
    "parse_header",
    "parse_inner",
    "parse_message",
]

_HDR = struct.Struct("!8s8sBBBBII")
_GEN = struct.Struct("!BBH")


def _bad(what: str, notify: int = Notify.INVALID_SYNTAX) -> ProtocolError:
    return ProtocolError(f"malformed IKE message: {what}", notify=notify)


# -- header ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Header:
    """The fixed IKE header."""

    spi_i: bytes
    spi_r: bytes
    next_payload: int
    exchange: int
    flags: int
    mid: int
    length: int

    def __post_init__(self) -> None:
        if len(self.spi_i) != 8 or len(self.spi_r) != 8:
            raise ValueError("IKE SPIs are 8 bytes")

    @property
    def is_response(self) -> bool:
        """True when the R flag is set."""
        return bool(self.flags & Flag.RESPONSE)

    @property
    def from_initiator(self) -> bool:
        """True when the I flag is set (sent by the original initiator of the IKE SA)."""
        return bool(self.flags & Flag.INITIATOR)


def parse_header(data: bytes) -> Header:
    """Parse and check the fixed header (version, length) of a datagram's IKE message."""
    if len(data) < HEADER_LEN:
        raise _bad("shorter than the IKE header")
    spi_i, spi_r, np, version, exch, flags, mid, length = _HDR.unpack_from(data, 0)
    if version >> 4 != 2:
        raise _bad(f"major version {version >> 4}", Notify.INVALID_MAJOR_VERSION)
    if length != len(data) or length > MAX_MESSAGE:
        raise _bad("length field does not match the datagram")
    return Header(spi_i=spi_i, spi_r=spi_r, next_payload=np, exchange=exch, flags=flags,
                  mid=mid, length=length)


def pack_header(*, spi_i: bytes, spi_r: bytes, next_payload: int, exchange: int, flags: int,
                mid: int, length: int) -> bytes:
    """The fixed IKE header's 28 bytes."""
    return _HDR.pack(spi_i, spi_r, next_payload, IKE_VERSION, exchange, flags, mid, length)


# -- payloads ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Transform:
    """One transform of a proposal; `key_length` is the Key Length attribute in bits."""

    type: int
    id: int
    key_length: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Proposal:
    """One proposal of an SA payload."""

    num: int
    protocol: int
    spi: bytes
    transforms: tuple[Transform, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class SaPayload:
    """Security Association payload."""

    proposals: tuple[Proposal, ...]
    type = PayloadType.SA


@dataclass(frozen=True, slots=True, kw_only=True)
class KePayload:
    """Key Exchange payload."""

    group: int
    data: bytes
    type = PayloadType.KE


@dataclass(frozen=True, slots=True, kw_only=True)
class NoncePayload:
    """Nonce payload."""

    nonce: bytes
    type = PayloadType.NONCE


@dataclass(frozen=True, slots=True, kw_only=True)
class IdPayload:
    """IDi or IDr; `initiator` picks the payload type."""

    id_type: int
    data: bytes
    initiator: bool = True

    @property
    def type(self) -> int:
        """The payload type, IDi or IDr."""
        return PayloadType.IDI if self.initiator else PayloadType.IDR

    @property
    def body(self) -> bytes:
        """RestOfIDPayload as signed in AUTH (§2.15): type, reserved, data."""
        return bytes((self.id_type, 0, 0, 0)) + self.data


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthPayload:
    """Authentication payload."""

    method: int
    data: bytes = field(repr=False)
    type = PayloadType.AUTH


@dataclass(frozen=True, slots=True, kw_only=True)
class NotifyPayload:
    """Notify payload."""

    notify: int
    protocol: int = Protocol.NONE
    spi: bytes = b""
    data: bytes = b""
    type = PayloadType.NOTIFY


@dataclass(frozen=True, slots=True, kw_only=True)
class DeletePayload:
    """Delete payload: an IKE SA (no SPIs) or CHILD_SAs by their 4-byte SPIs."""

    protocol: int
    spis: tuple[bytes, ...] = ()
    type = PayloadType.DELETE


@dataclass(frozen=True, slots=True, kw_only=True)
class VendorPayload:
    """Vendor ID payload."""

    data: bytes
    type = PayloadType.VENDOR


@dataclass(frozen=True, slots=True, kw_only=True)
class CertPayload:
    """Certificate payload."""

    encoding: int
    data: bytes
    type = PayloadType.CERT


@dataclass(frozen=True, slots=True, kw_only=True)
class CertReqPayload:
    """Certificate request payload (SHA-1 hashes of CA public keys for X.509)."""

    encoding: int
    data: bytes
    type = PayloadType.CERTREQ


@dataclass(frozen=True, slots=True, kw_only=True)
class TrafficSelector:
    """One IPv4/IPv6 address-range traffic selector; proto 0 and ports 0-65535 mean any."""

    ts_type: int = TsType.IPV4_ADDR_RANGE
    ip_proto: int = 0
    start_port: int = 0
    end_port: int = 65535
    start_addr: bytes = b"\0\0\0\0"
    end_addr: bytes = b"\xff\xff\xff\xff"

    def __post_init__(self) -> None:
        alen = 4 if self.ts_type == TsType.IPV4_ADDR_RANGE else 16
        if len(self.start_addr) != alen or len(self.end_addr) != alen:
            raise ValueError("traffic selector address length does not match its type")
        if not (0 <= self.start_port <= 65535 and 0 <= self.end_port <= 65535
                and 0 <= self.ip_proto <= 255):
            raise ValueError("traffic selector port or protocol out of range")


@dataclass(frozen=True, slots=True, kw_only=True)
class TsPayload:
    """TSi or TSr."""

    selectors: tuple[TrafficSelector, ...]
    initiator: bool = True

    @property
    def type(self) -> int:
        """The payload type, TSi or TSr."""
        return PayloadType.TSI if self.initiator else PayloadType.TSR


Payload = (SaPayload | KePayload | NoncePayload | IdPayload | AuthPayload | NotifyPayload
           | DeletePayload | VendorPayload | CertPayload | CertReqPayload | TsPayload)


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """An IKE message. With `encrypted`, the payloads travel inside an SK payload."""

    spi_i: bytes
    spi_r: bytes
    exchange: int
    flags: int
    mid: int
    payloads: tuple[Payload, ...] = ()
    encrypted: bool = False

    def __post_init__(self) -> None:
        if len(self.spi_i) != 8 or len(self.spi_r) != 8:
            raise ValueError("IKE SPIs are 8 bytes")
        if not 0 <= self.mid <= 0xFFFFFFFF:
            raise ValueError("message ID out of range")

    @property
    def is_response(self) -> bool:
        """True when the R flag is set."""
        return bool(self.flags & Flag.RESPONSE)

    def get(self, cls: type, *, initiator: bool | None = None) -> Any:
        """The first payload of class `cls` (and side, for ID/TS), or None."""
        for p in self.payloads:
            if isinstance(p, cls) and (initiator is None or p.initiator == initiator):
                return p
        return None

    def all(self, cls: type) -> Iterator:
        """Every payload of class `cls`, in order."""
        return (p for p in self.payloads if isinstance(p, cls))

    def notify(self, notify: int) -> NotifyPayload | None:
        """The first Notify payload of type `notify`, or None."""
        for p in self.payloads:
            if isinstance(p, NotifyPayload) and p.notify == notify:
                return p
        return None

    def error_notify(self) -> NotifyPayload | None:
        """The first error Notify (type below 16384), or None."""
        for p in self.payloads:
            if isinstance(p, NotifyPayload) and p.notify < 16384:
                return p
        return None


# -- payload bodies ----------------------------------------------------------------------


def _enc_sa(p: SaPayload) -> bytes:
    out = bytearray()
    for i, prop in enumerate(p.proposals):
        tbytes = bytearray()
        for j, t in enumerate(prop.transforms):
            attrs = b""
            if t.key_length is not None:
                attrs = struct.pack("!HH", 0x8000 | ATTR_KEY_LENGTH, t.key_length)
            last = 0 if j == len(prop.transforms) - 1 else 3
            tbytes += struct.pack("!BBHBBH", last, 0, 8 + len(attrs), t.type, 0, t.id) + attrs
        last = 0 if i == len(p.proposals) - 1 else 2
        out += struct.pack("!BBHBBBB", last, 0, 8 + len(prop.spi) + len(tbytes), prop.num,
                           prop.protocol, len(prop.spi), len(prop.transforms))
        out += prop.spi + tbytes
    return bytes(out)


def _dec_sa(b: bytes) -> SaPayload:
    props = []
    off = 0
    while True:
        if len(b) - off < 8:
            raise _bad("truncated proposal")
        last, _, plen, num, proto, spi_size, ntrans = struct.unpack_from("!BBHBBBB", b, off)
        if plen < 8 + spi_size or off + plen > len(b) or last not in (0, 2):
            raise _bad("bad proposal length")
        spi = b[off + 8 : off + 8 + spi_size]
        toff, tend = off + 8 + spi_size, off + plen
        trans = []
        for k in range(ntrans):
            if tend - toff < 8:
                raise _bad("truncated transform")
            tlast, _, tlen, ttype, _, tid = struct.unpack_from("!BBHBBH", b, toff)
            if tlen < 8 or toff + tlen > tend or tlast != (0 if k == ntrans - 1 else 3):
                raise _bad("bad transform length")
            key_length = None
            aoff = toff + 8
            while aoff < toff + tlen:
                if toff + tlen - aoff < 4:
                    raise _bad("truncated transform attribute")
                atype, aval = struct.unpack_from("!HH", b, aoff)
                if atype & 0x8000:
                    aoff += 4
                else:  # TLV: aval is the length
                    aoff += 4 + aval
                    if aoff > toff + tlen:
                        raise _bad("truncated transform attribute")
                if atype == 0x8000 | ATTR_KEY_LENGTH:
                    key_length = aval
                elif not atype & 0x8000 or (atype & 0x7FFF) != ATTR_KEY_LENGTH:
                    # RFC 7296 §3.3.6: an unknown attribute makes the transform unusable;
                    # keep it recognisably unusable instead of failing the whole message.
                    key_length = -1
            trans.append(Transform(type=ttype, id=tid, key_length=key_length))
            toff += tlen
        if toff != tend:
            raise _bad("proposal length does not match its transforms")
        props.append(Proposal(num=num, protocol=proto, spi=spi, transforms=tuple(trans)))
        off += plen
        if last == 0:
            break
    if off != len(b):
        raise _bad("trailing bytes after the last proposal")
    return SaPayload(proposals=tuple(props))


def _enc_ts(p: TsPayload) -> bytes:
    out = bytearray(struct.pack("!B3x", len(p.selectors)))
    for ts in p.selectors:
        out += struct.pack("!BBHHH", ts.ts_type, ts.ip_proto, 8 + 2 * len(ts.start_addr),
                           ts.start_port, ts.end_port)
        out += ts.start_addr + ts.end_addr
    return bytes(out)


def _dec_ts(b: bytes, initiator: bool) -> TsPayload:
    if len(b) < 4:
        raise _bad("truncated TS payload")
    n = b[0]
    off = 4
    sels = []
    for _ in range(n):
        if len(b) - off < 8:
            raise _bad("truncated traffic selector")
        ttype, proto, slen, sp, ep = struct.unpack_from("!BBHHH", b, off)
        if off + slen > len(b) or slen < 8:
            raise _bad("bad traffic selector length")
        alen = {TsType.IPV4_ADDR_RANGE: 4, TsType.IPV6_ADDR_RANGE: 16}.get(ttype)
        if alen is not None:
            if slen != 8 + 2 * alen:
                raise _bad("bad traffic selector length")
            sels.append(TrafficSelector(
                ts_type=ttype, ip_proto=proto, start_port=sp, end_port=ep,
                start_addr=b[off + 8 : off + 8 + alen],
                end_addr=b[off + 8 + alen : off + 8 + 2 * alen]))
        off += slen
    if off != len(b):
        raise _bad("trailing bytes in TS payload")
    return TsPayload(selectors=tuple(sels), initiator=initiator)


def _need(b: bytes, n: int, what: str) -> None:
    if len(b) < n:
        raise _bad(f"truncated {what} payload")


def _dec_notify(b: bytes) -> NotifyPayload:
    _need(b, 4, "notify")
    proto, spi_size, ntype = struct.unpack_from("!BBH", b, 0)
    _need(b, 4 + spi_size, "notify")
    return NotifyPayload(notify=ntype, protocol=proto, spi=b[4 : 4 + spi_size],
                         data=b[4 + spi_size :])


def _dec_delete(b: bytes) -> DeletePayload:
    _need(b, 4, "delete")
    proto, spi_size, n = struct.unpack_from("!BBH", b, 0)
    if len(b) != 4 + spi_size * n:
        raise _bad("delete payload length does not match its SPIs")
    if spi_size == 0 and n:
        raise _bad("delete payload with SPI size 0 lists SPIs")
    spis = tuple(b[4 + i * spi_size : 4 + (i + 1) * spi_size] for i in range(n))
    return DeletePayload(protocol=proto, spis=spis)


def _dec_ke(b: bytes) -> KePayload:
    _need(b, 4, "KE")
    return KePayload(group=struct.unpack_from("!H", b, 0)[0], data=b[4:])


def _dec_id(b: bytes, initiator: bool) -> IdPayload:
    _need(b, 4, "ID")
    return IdPayload(id_type=b[0], data=b[4:], initiator=initiator)


def _dec_auth(b: bytes) -> AuthPayload:
    _need(b, 4, "AUTH")
    return AuthPayload(method=b[0], data=b[4:])


def _dec_nonce(b: bytes) -> NoncePayload:
    if not 16 <= len(b) <= 256:
        raise _bad("nonce length outside 16..256")
    return NoncePayload(nonce=b)


def _dec_cert(b: bytes) -> CertPayload:
    _need(b, 1, "CERT")
    return CertPayload(encoding=b[0], data=b[1:])


def _dec_certreq(b: bytes) -> CertReqPayload:
    _need(b, 1, "CERTREQ")
    return CertReqPayload(encoding=b[0], data=b[1:])


# The reader and writer tables (h11's _readers/_writers): payload type -> function.
_READERS: dict[int, Callable[[bytes], Payload]] = {
    PayloadType.SA: _dec_sa,
    PayloadType.KE: _dec_ke,
    PayloadType.IDI: lambda b: _dec_id(b, True),
    PayloadType.IDR: lambda b: _dec_id(b, False),
    PayloadType.CERT: _dec_cert,
    PayloadType.CERTREQ: _dec_certreq,
    PayloadType.AUTH: _dec_auth,
    PayloadType.NONCE: _dec_nonce,
    PayloadType.NOTIFY: _dec_notify,
    PayloadType.DELETE: _dec_delete,
    PayloadType.VENDOR: lambda b: VendorPayload(data=b),
    PayloadType.TSI: lambda b: _dec_ts(b, True),
    PayloadType.TSR: lambda b: _dec_ts(b, False),
}

_WRITERS: dict[type, Callable] = {
    SaPayload: _enc_sa,
    KePayload: lambda p: struct.pack("!H2x", p.group) + p.data,
    NoncePayload: lambda p: p.nonce,
    IdPayload: lambda p: p.body,
    AuthPayload: lambda p: bytes((p.method, 0, 0, 0)) + p.data,
    NotifyPayload: lambda p: struct.pack("!BBH", p.protocol, len(p.spi), p.notify) + p.spi
    + p.data,
    DeletePayload: lambda p: struct.pack("!BBH", p.protocol, len(p.spis[0]) if p.spis else 0,
                                         len(p.spis)) + b"".join(p.spis),
    VendorPayload: lambda p: p.data,
    CertPayload: lambda p: bytes((p.encoding,)) + p.data,
    CertReqPayload: lambda p: bytes((p.encoding,)) + p.data,
    TsPayload: _enc_ts,
}


def encode_payloads(payloads: tuple[Payload, ...] | list[Payload]) -> tuple[int, bytes]:
    """Encode a payload chain; returns (type of the first payload, bytes)."""
    bodies = [(int(p.type), _WRITERS[type(p)](p)) for p in payloads]
    out = bytearray()
    for i, (_, body) in enumerate(bodies):
        np = bodies[i + 1][0] if i + 1 < len(bodies) else PayloadType.NONE
        if len(body) + 4 > 0xFFFF:
            raise ValueError("payload too long")
        out += _GEN.pack(np, 0, 4 + len(body)) + body
    return (bodies[0][0] if bodies else PayloadType.NONE), bytes(out)


def _decode_chain(data: bytes, first: int, off: int, end: int,
                  allow_sk: bool) -> tuple[list[Payload], int | None, int]:
    """Decode payloads in data[off:end]; returns (payloads, SK next-payload, SK offset)."""
    out: list[Payload] = []
    np = first
    while np != PayloadType.NONE:
        if end - off < 4:
            raise _bad("truncated payload header")
        nxt, flags, plen = _GEN.unpack_from(data, off)
        if plen < 4 or off + plen > end:
            raise _bad("payload length beyond the message")
        if np == PayloadType.SK:
            if not allow_sk:
                raise _bad("SK payload inside SK")
            if off + plen != end:
                raise _bad("SK payload is not the last one")
            return out, nxt, off
        body = data[off + 4 : off + plen]
        reader = _READERS.get(np)
        if reader is not None:
            out.append(reader(body))
        elif flags & 0x80:
            raise ProtocolError(f"unsupported critical payload {np}",
                                notify=Notify.UNSUPPORTED_CRITICAL_PAYLOAD, data=bytes((np,)))
        off += plen
        np = nxt
    if off != end:
        raise _bad("trailing bytes after the last payload")
    return out, None, -1


class SkCodec(TypingProtocol):
    """What `encode_message`/`parse_message` need from the SK protection of one direction."""

    def sealed_len(self, n: int) -> int:
        """Length of IV + ciphertext + ICV for `n` bytes of inner payloads."""
        ...

    def seal(self, aad: bytes, plaintext: bytes) -> bytes:
        """Return IV + ciphertext + ICV; `aad` is the header and SK generic header."""
        ...

    def open(self, aad: bytes, body: bytes) -> bytes:
        """Check and decrypt IV + ciphertext + ICV; return the inner payloads."""
        ...


def encode_message(msg: Message, sk: SkCodec | None = None) -> bytes:
    """Encode `msg`; encrypted messages need `sk`, the sender's SK protection."""
    first, body = encode_payloads(msg.payloads)
    if msg.encrypted:
        if sk is None:
            raise ValueError("an encrypted message needs SK keys")
        sealed_len = sk.sealed_len(len(body))
        total = HEADER_LEN + 4 + sealed_len
        hdr = _HDR.pack(msg.spi_i, msg.spi_r, PayloadType.SK, IKE_VERSION, msg.exchange,
                        msg.flags, msg.mid, total)
        skhdr = _GEN.pack(first, 0, 4 + sealed_len)
        return hdr + skhdr + sk.seal(hdr + skhdr, body)
    total = HEADER_LEN + len(body)
    return _HDR.pack(msg.spi_i, msg.spi_r, first, IKE_VERSION, msg.exchange, msg.flags,
                     msg.mid, total) + body


def parse_inner(header: Header, first_payload: int, inner: bytes) -> Message:
    """The encrypted message whose decrypted payload chain is `inner` (starting with a
    payload of type `first_payload`), as reassembled from fragments (RFC 7383)."""
    try:
        payloads, _, _ = _decode_chain(inner, first_payload, 0, len(inner), False)
    except ProtocolError:
        raise
    except (struct.error, ValueError, IndexError, TypeError) as e:
        raise _bad(type(e).__name__) from None
    return Message(spi_i=header.spi_i, spi_r=header.spi_r, exchange=header.exchange,
                   flags=header.flags, mid=header.mid, payloads=tuple(payloads),
                   encrypted=True)


def parse_message(data: bytes, sk: SkCodec | None = None,
                  header: Header | None = None) -> Message:
    """Parse a whole IKE message; an SK payload is opened with `sk` (the peer's keys).

    Raises ProtocolError (with `notify` set) for anything malformed, and for an SK payload
    that does not authenticate or that arrives when no keys exist yet.
    """
    try:
        h = header or parse_header(data)
        try:
            payloads, sk_first, sk_off = _decode_chain(data, h.next_payload, HEADER_LEN,
                                                       h.length, True)
        except ProtocolError as e:
            if sk is None:
                raise
            # Outside the SK payload nothing is authenticated: such a message is dropped,
            # never answered (RFC 7296 §2.21.2), or anyone could end an exchange.
            raise ProtocolError(str(e)) from None
        encrypted = sk_first is not None
        if encrypted:
            if sk is None:
                raise _bad("encrypted payload before keys exist")
            if payloads:
                # Only unencrypted payloads may precede SK; we need none of them.
                payloads = []
            inner = sk.open(data[: sk_off + 4], data[sk_off + 4 : h.length])
            payloads, _, _ = _decode_chain(inner, sk_first, 0, len(inner), False)
        return Message(spi_i=h.spi_i, spi_r=h.spi_r, exchange=h.exchange, flags=h.flags,
                       mid=h.mid, payloads=tuple(payloads), encrypted=encrypted)
    except ProtocolError:
        raise
    except (struct.error, ValueError, IndexError, TypeError) as e:
        raise _bad(type(e).__name__) from None
