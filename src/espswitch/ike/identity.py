"""IKE identities, and when two of them, or an identity and a certificate, are the same name.

Distinguished names are compared as RFC 5280 §7.1 says: RDN by RDN in order, the attributes
of a multi-valued RDN as a set, and each string value after the LDAP string preparation of
RFC 4518 for caseIgnoreMatch (any ASN.1 string type, case folded, Unicode NFKC, insignificant
spaces folded). So `C=CH, O=Example` in PrintableString (strongSwan's `pki`, OpenSSL) is
the same name as in UTF8String (`cryptography`), as `c=ch,  o=example` is; a different
value, attribute or order is not.

FQDN, RFC 822 and IP identities are vouched for by a certificate only through its
subjectAltName (RFC 7296 §3.5, RFC 4945 §3.1): dNSName (case-insensitive), rfc822Name
(host part case-insensitive, RFC 5280 §7.5), iPAddress. A DN identity is vouched for by the
certificate's subject or a directoryName in its subjectAltName.

A configured identity written without `=` (`host_2`, `@host_2`) is an FQDN, as strongSwan
reads it; as Open vSwitch's IPsec documentation uses `remote_name` (the peer certificate's
common name, which ovs-monitor-ipsec hands to strongSwan as `rightid=NAME` and to Libreswan
as `rightid=@NAME`), such a configured name also accepts a peer whose identity is a DN whose
most specific CN is that name (`Identity.matches`).

Everything here is pure: no I/O. Peer-supplied names are shown with anything unprintable
escaped and long ones cut, so they can go into logs and `Interface.status`.
"""

from __future__ import annotations

import ipaddress
import unicodedata
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID, ObjectIdentifier

from espswitch.ike.consts import IdType
from espswitch.ike.errors import IkeConfigError
from espswitch.ike.message import IdPayload

__all__ = [
    "Ava",
    "Dn",
    "Identity",
    "dn_equal",
    "encode_dn",
    "format_dn",
    "parse_dn_der",
    "parse_dn_text",
    "prepare",
]

# Longest identity text shown (logs, status): a peer's ID payload can be 64 KiB.
_SHOW_MAX = 400

# -- attribute names ---------------------------------------------------------------------

# Names accepted in a DN string (case-insensitive): strongSwan's (`pki --print`, swanctl),
# OpenSSL's and RFC 4514's. SN is the surname, as in strongSwan 5.9 and OpenSSL.
_NAMES: dict[str, str] = {}
# How a DN is shown: the short name strongSwan prints.
_SHORT: dict[str, str] = {}
for _oid, _names in (
    ("2.5.4.6", ("C", "countryName")),
    ("2.5.4.8", ("ST", "S", "stateOrProvinceName")),
    ("2.5.4.7", ("L", "localityName")),
    ("2.5.4.9", ("STREET", "streetAddress")),
    ("2.5.4.10", ("O", "organizationName")),
    ("2.5.4.11", ("OU", "organizationalUnitName")),
    ("2.5.4.3", ("CN", "commonName")),
    ("2.5.4.4", ("SN", "surname")),
    ("2.5.4.5", ("serialNumber",)),
    ("2.5.4.12", ("T", "title")),
    ("2.5.4.13", ("D", "description")),
    ("2.5.4.17", ("postalCode",)),
    ("2.5.4.41", ("N", "name")),
    ("2.5.4.42", ("G", "GN", "givenName")),
    ("2.5.4.43", ("I", "initials")),
    ("2.5.4.46", ("dnQualifier",)),
    ("2.5.4.65", ("pseudonym",)),
    ("2.5.4.97", ("organizationIdentifier",)),
    ("0.9.2342.19200300.100.1.1", ("UID", "userId")),
    ("0.9.2342.19200300.100.1.25", ("DC", "domainComponent")),
    ("1.2.840.113549.1.9.1", ("E", "Email", "emailAddress")),
    ("1.2.840.113549.1.9.2", ("UN", "unstructuredName")),
):
    _SHORT[_oid] = _names[0]
    for _n in _names:
        _NAMES[_n.lower()] = _oid

_COMMON_NAME = NameOID.COMMON_NAME.dotted_string

# ASN.1 universal tags of the string types a DN value may have, and how to decode them.
# TeletexString (T.61) is read as Latin-1, as most implementations do.
_STRING_TAGS = {0x0C: "utf-8", 0x12: "ascii", 0x13: "ascii", 0x14: "latin-1", 0x16: "ascii",
                0x1A: "ascii", 0x1C: "utf-32-be", 0x1E: "utf-16-be"}


# -- the parsed form ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ava:
    """One attribute of an RDN: its type (dotted OID), the value's ASN.1 tag and content
    octets, and the value as text when it is a string type that decodes (else None)."""

    oid: str
    tag: int
    raw: bytes
    text: str | None


Dn = tuple[tuple[Ava, ...], ...]


class _DerError(ValueError):
    pass


def _der_item(data: bytes, off: int, end: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER item at `off`; single-byte tags only."""
    if end - off < 2:
        raise _DerError("truncated")
    tag, first = data[off], data[off + 1]
    if tag & 0x1F == 0x1F:
        raise _DerError("multi-byte tag")
    off += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 3 or end - off < n:
            raise _DerError("bad length")
        length = int.from_bytes(data[off : off + n], "big")
        off += n
    if end - off < length:
        raise _DerError("truncated")
    return tag, off, off + length


def _oid_text(body: bytes) -> str:
    if not body or body[-1] & 0x80:
        raise _DerError("bad OID")
    arcs, v = [], 0
    for b in body:
        v = (v << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(v)
            v = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in [first, arcs[0] - 40 * first, *arcs[1:]])


def parse_dn_der(data: bytes) -> Dn:
    """A DER Name (an ID_DER_ASN1_DN identity, a certificate's subject) as RDNs of `Ava`s.

    Raises ValueError when `data` is not exactly one well-formed Name."""
    tag, off, end = _der_item(data, 0, len(data))
    if tag != 0x30 or end != len(data):
        raise _DerError("not a SEQUENCE")
    rdns = []
    while off < end:
        tag, s_off, s_end = _der_item(data, off, end)
        if tag != 0x31 or s_off == s_end:
            raise _DerError("RDN is not a non-empty SET")
        avas = []
        while s_off < s_end:
            tag, a_off, a_end = _der_item(data, s_off, s_end)
            if tag != 0x30:
                raise _DerError("attribute is not a SEQUENCE")
            tag, o_off, o_end = _der_item(data, a_off, a_end)
            if tag != 0x06:
                raise _DerError("attribute type is not an OID")
            oid = _oid_text(data[o_off:o_end])
            vtag, v_off, v_end = _der_item(data, o_end, a_end)
            if v_end != a_end:
                raise _DerError("trailing bytes in an attribute")
            raw = data[v_off:v_end]
            text = None
            codec = _STRING_TAGS.get(vtag)
            if codec is not None:
                try:
                    text = raw.decode(codec)
                except UnicodeDecodeError:
                    text = None
            avas.append(Ava(oid, vtag, raw, text))
            s_off = a_end
        rdns.append(tuple(avas))
        off = s_end
    return tuple(rdns)


# -- RFC 4518 string preparation ---------------------------------------------------------

# Mapped to nothing (RFC 4518 §2.2): soft hyphens, joiners, variation selectors, the object
# replacement character, ZERO WIDTH SPACE, and the complete list of control code points.
_NOTHING_RANGES = (
    (0x0000, 0x0008), (0x000E, 0x001F), (0x007F, 0x0084), (0x0086, 0x009F), (0x00AD, 0x00AD),
    (0x034F, 0x034F), (0x06DD, 0x06DD), (0x070F, 0x070F), (0x1806, 0x1806), (0x180B, 0x180E),
    (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x2063), (0x206A, 0x206F), (0xFE00, 0xFE0F),
    (0xFEFF, 0xFEFF), (0xFFF9, 0xFFFC), (0x1D173, 0x1D17A), (0xE0001, 0xE0001),
    (0xE0020, 0xE007F),
)
_NOTHING = frozenset(c for lo, hi in _NOTHING_RANGES for c in range(lo, hi + 1))
_SPACE_CONTROLS = frozenset((0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x85))


def prepare(text: str) -> str | None:
    """`text` prepared for caseIgnoreMatch (RFC 4518): mapped, case folded, NFKC-normalized,
    insignificant spaces removed (inner runs as one space). None when it holds a prohibited
    code point (unassigned, private use, non-character, surrogate, U+FFFD): RFC 4518 makes
    the comparison undefined then.

    Case folding is Python's full Unicode case folding, which RFC 3454 table B.2 (case
    folding for NFKC) follows up to the Unicode versions they are taken from.
    """
    out = []
    for ch in text:
        c = ord(ch)
        if c in _NOTHING:
            continue
        if c in _SPACE_CONTROLS or unicodedata.category(ch) in ("Zs", "Zl", "Zp"):
            out.append(" ")
        else:
            out.append(ch)
    s = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", "".join(out)).casefold())
    for ch in s:
        if unicodedata.category(ch) in ("Cn", "Co", "Cs") or ch == "\ufffd":
            return None
    return " ".join(w for w in s.split(" ") if w)


def _ava_key(a: Ava) -> tuple:
    if a.text is not None:
        prepared = prepare(a.text)
        if prepared is not None:
            return (a.oid, "s", prepared)
        # Undefined under RFC 4518: only the very same characters are the same value.
        return (a.oid, "t", a.text)
    return (a.oid, "b", a.tag, a.raw)


def dn_equal(a: Dn, b: Dn) -> bool:
    """RFC 5280 §7.1: the same number of RDNs, each equal to its counterpart in order;
    an RDN's attributes compared as a set, string values after RFC 4518 preparation."""
    if len(a) != len(b):
        return False
    return all(len(x) == len(y) and sorted(map(_ava_key, x)) == sorted(map(_ava_key, y))
               for x, y in zip(a, b, strict=True))


# -- DN strings ---------------------------------------------------------------------------


def _split(text: str, seps: str) -> list[tuple[str, str]]:
    """Split at unescaped, unquoted characters of `seps`; (piece, separator after it)."""
    out, cur, quoted, i = [], [], False, 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            cur.append(text[i : i + 2])
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in seps:
            out.append(("".join(cur), ch))
            cur = []
            i += 1
            continue
        cur.append(ch)
        i += 1
    out.append(("".join(cur), ""))
    return out


def _unescape(value: str, text: str) -> str:
    """A DN value with RFC 4514 escapes (`\\,`, `\\XX` as UTF-8 octets) and quotes removed."""
    v = value.lstrip(" ")
    while v.endswith(" ") and not v.endswith("\\ "):  # an escaped space stays
        v = v[:-1]
    if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
        v = v[1:-1]
    out = bytearray()
    i = 0
    while i < len(v):
        ch = v[i]
        if ch == "\\":
            pair = v[i + 1 : i + 3]
            if len(pair) == 2 and all(c in "0123456789abcdefABCDEF" for c in pair):
                out.append(int(pair, 16))
                i += 3
                continue
            if i + 1 >= len(v):
                raise IkeConfigError(f"bad distinguished name {text!r}: trailing backslash")
            out += v[i + 1].encode()
            i += 2
            continue
        out += ch.encode()
        i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise IkeConfigError(f"bad distinguished name {text!r}: escapes are not UTF-8") \
            from None


def _attr_oid(key: str) -> str | None:
    k = key.strip()
    if k.lower().startswith("oid."):
        k = k[4:]
    if k and all(p.isdigit() for p in k.split(".")) and k.count(".") >= 1:
        return k
    return _NAMES.get(k.lower())


def parse_dn_text(text: str) -> list[list[tuple[str, str]]]:
    """A DN written as strongSwan and `pki --print` write it (`C=CH, O=Example, CN=moon`,
    most significant RDN first), or OpenSSL's `/C=CH/O=Example/CN=moon`, as a list of RDNs
    of (dotted OID, value). RFC 4514 escapes (`\\,`, `\\2C`) and `"quoted"` values are
    understood; `+` joins the attributes of a multi-valued RDN when an attribute name
    follows it. Raises IkeConfigError naming what is wrong."""
    s = text.lstrip()
    while s[-1:].isspace() and not s.endswith("\\" + s[-1:]):  # "\ " is a value's space
        s = s[:-1]
    sep = ","
    if s.startswith("/"):
        sep, s = "/", s[1:]
    rdns: list[list[tuple[str, str]]] = []
    for part, _ in _split(s, sep):
        if not part.strip():
            raise IkeConfigError(f"bad distinguished name {text!r}: empty RDN")
        # '+' separates attributes only when a KEY= follows; else it is part of the value.
        pieces = _split(part, "+")
        avas: list[str] = [pieces[0][0]]
        for piece, _ in pieces[1:]:
            key = piece.partition("=")[0]
            if "=" in piece and _attr_oid(key) is not None:
                avas.append(piece)
            else:
                avas[-1] += "+" + piece
        rdn = []
        for ava in avas:
            key, eq, value = ava.partition("=")
            oid = _attr_oid(key)
            if not eq or oid is None:
                raise IkeConfigError(
                    f"bad distinguished name {text!r}: unknown attribute {key.strip()!r}")
            v = _unescape(value, text)
            if not v:
                raise IkeConfigError(f"bad distinguished name {text!r}: empty "
                                     f"{key.strip()}")
            rdn.append((oid, v))
        rdns.append(rdn)
    return rdns


def encode_dn(rdns: list[list[tuple[str, str]]]) -> bytes:
    """DER of a parsed DN string, in the string types `cryptography` chooses (UTF8String,
    PrintableString or IA5String where X.520 and PKCS #9 ask for them): what matters to a
    peer is the name, which RFC 5280 compares whatever the encoding."""
    try:
        return x509.Name([x509.RelativeDistinguishedName(
            [x509.NameAttribute(ObjectIdentifier(oid), v) for oid, v in rdn])
            for rdn in rdns]).public_bytes()
    except ValueError as e:
        raise IkeConfigError(f"bad distinguished name: {e}") from None


def _show_text(s: str) -> str:
    """Printable as is; control and other unprintable characters as \\XX escapes."""
    if s.isprintable():
        return s
    return "".join(ch if ch.isprintable() else "".join(f"\\{b:02X}" for b in ch.encode())
                   for ch in s)


def _show_value(a: Ava) -> str:
    if a.text is None:
        return "#" + a.raw.hex()  # RFC 4514's form of a value that is not a string
    v = a.text.replace("\\", "\\\\")
    for ch in ',+"':
        v = v.replace(ch, "\\" + ch)
    if v.startswith((" ", "#", "/")):
        v = "\\" + v
    if v.endswith(" "):
        v = v[:-1] + "\\ "
    return _show_text(v)


def format_dn(dn: Dn) -> str:
    """A DN as strongSwan prints it, most significant RDN first: `C=CH, O=Example, CN=moon`
    (attributes of a multi-valued RDN joined by ` + `); `parse_dn_text` reads it back."""
    return ", ".join(" + ".join(f"{_SHORT.get(a.oid, a.oid)}={_show_value(a)}" for a in rdn)
                     for rdn in dn)


def _cut(s: str) -> str:
    return s if len(s) <= _SHOW_MAX else s[: _SHOW_MAX - 3] + "..."


# -- identities ----------------------------------------------------------------------------


def _fqdn(data: bytes) -> str:
    return data.decode("utf-8", "replace").rstrip(".").lower()


def _email_equal(a: bytes, b: bytes) -> bool:
    """RFC 5280 §7.5: the local part exactly, the host part case-insensitively."""
    la, _, ha = a.decode("utf-8", "replace").rpartition("@")
    lb, _, hb = b.decode("utf-8", "replace").rpartition("@")
    return la == lb and ha.lower().rstrip(".") == hb.lower().rstrip(".")


@dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    """An IKE identity: ID type and its wire data.

    Equality (`==`) is that of the bytes; `matches`, `equivalent` and `matched_by_cert`
    compare names as the RFCs say."""

    id_type: int
    data: bytes

    @classmethod
    def parse(cls, text: str) -> Identity:
        """Parse strongSwan's identity syntax (`192.0.2.1`, `2001:db8::1`, `moon.example`,
        `@moon`, `user@example`, `C=CH, O=Example, CN=moon`, `/C=CH/O=Example/CN=moon`);
        IkeConfigError when it cannot."""
        s = text.strip()
        if not s:
            raise IkeConfigError("empty identity")
        try:
            return cls(id_type=IdType.IPV4_ADDR, data=ipaddress.IPv4Address(s).packed)
        except ValueError:
            pass
        if ":" in s and "=" not in s:
            try:
                return cls(id_type=IdType.IPV6_ADDR, data=ipaddress.IPv6Address(s).packed)
            except ValueError:
                pass
        if "=" in s:
            # The text as given: an escaped space at its end belongs to the last value.
            return cls(id_type=IdType.DER_ASN1_DN, data=encode_dn(parse_dn_text(text)))
        if s.startswith("@"):
            if len(s) == 1:
                raise IkeConfigError("empty identity")
            return cls(id_type=IdType.FQDN, data=s[1:].encode())
        if "@" in s:
            return cls(id_type=IdType.RFC822_ADDR, data=s.encode())
        return cls(id_type=IdType.FQDN, data=s.encode())

    @classmethod
    def from_payload(cls, p: IdPayload) -> Identity:
        """The identity an ID payload carries."""
        return cls(id_type=p.id_type, data=p.data)

    @classmethod
    def of_subject(cls, cert: x509.Certificate) -> Identity:
        """The certificate's subject as an ID_DER_ASN1_DN identity (its own encoding)."""
        return cls(id_type=IdType.DER_ASN1_DN, data=cert.subject.public_bytes())

    def payload(self, initiator: bool) -> IdPayload:
        """As an IDi (`initiator`) or IDr payload."""
        return IdPayload(id_type=self.id_type, data=self.data, initiator=initiator)

    def dn(self) -> Dn | None:
        """The parsed DN of an ID_DER_ASN1_DN identity; None for other types or bad DER."""
        if self.id_type != IdType.DER_ASN1_DN:
            return None
        try:
            return parse_dn_der(self.data)
        except ValueError:
            return None

    def __str__(self) -> str:
        t, d = self.id_type, self.data
        if t == IdType.IPV4_ADDR and len(d) == 4:
            return str(ipaddress.IPv4Address(d))
        if t == IdType.IPV6_ADDR and len(d) == 16:
            return str(ipaddress.IPv6Address(d))
        if t in (IdType.FQDN, IdType.RFC822_ADDR):
            return _cut(_show_text(d.decode("utf-8", "replace")))
        if t == IdType.DER_ASN1_DN:
            dn = self.dn()
            return _cut(format_dn(dn)) if dn is not None else \
                f"malformed distinguished name ({len(d)} bytes)"
        name = IdType(t).name if t in IdType._value2member_map_ else f"ID type {t}"
        return _cut(f"{name}:{d.hex()}")

    def equivalent(self, other: Identity) -> bool:
        """The same name, whatever its encoding: DNs by RFC 5280 §7.1, FQDNs and e-mail
        hosts case-insensitively, addresses and key IDs by their bytes."""
        if self.id_type != other.id_type:
            return False
        if self.id_type == IdType.DER_ASN1_DN:
            a, b = self.dn(), other.dn()
            return a is not None and b is not None and dn_equal(a, b)
        if self.id_type == IdType.FQDN:
            return _fqdn(self.data) == _fqdn(other.data)
        if self.id_type == IdType.RFC822_ADDR:
            return _email_equal(self.data, other.data)
        return self.data == other.data

    def matches(self, received: Identity) -> bool:
        """Whether `received` (a peer's IDi or IDr) is the identity this configured one
        names: `equivalent`, and a configured FQDN also names a DN identity whose most
        specific CN is that name (Open vSwitch's `remote_name`, see the module docstring).
        """
        if self.equivalent(received):
            return True
        if self.id_type == IdType.FQDN and received.id_type == IdType.DER_ASN1_DN:
            dn = received.dn()
            cns = [a for rdn in dn or () for a in rdn if a.oid == _COMMON_NAME]
            if cns and cns[-1].text is not None:
                ours, theirs = prepare(self.data.decode("utf-8", "replace")), \
                    prepare(cns[-1].text)
                return ours is not None and ours == theirs
        return False

    def matched_by_cert(self, cert: x509.Certificate) -> bool:
        """True when the certificate vouches for this identity: a DN by its subject or a
        directoryName, the others by a subjectAltName of their kind (RFC 4945 §3.1)."""
        try:
            ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            ext = None
        except ValueError:  # a malformed extension vouches for nothing
            ext = None
        t = self.id_type
        if t == IdType.DER_ASN1_DN:
            names = [cert.subject] + (ext.get_values_for_type(x509.DirectoryName) if ext
                                      else [])
            for name in names:
                try:
                    if self.equivalent(Identity(id_type=t, data=name.public_bytes())):
                        return True
                except ValueError:
                    continue
            return False
        if ext is None:
            return False
        if t == IdType.FQDN:
            return any(_fqdn(self.data) == _fqdn(n.encode("utf-8", "replace"))
                       for n in ext.get_values_for_type(x509.DNSName))
        if t == IdType.RFC822_ADDR:
            return any(_email_equal(self.data, n.encode("utf-8", "replace"))
                       for n in ext.get_values_for_type(x509.RFC822Name))
        if t in (IdType.IPV4_ADDR, IdType.IPV6_ADDR):
            return any(ip.packed == self.data for ip in ext.get_values_for_type(x509.IPAddress))
        return False
