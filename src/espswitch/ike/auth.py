"""Identities, credentials and the AUTH payload (RFC 7296 §2.15, RFC 7427).

`Identity` parses strongSwan-style identities (`moon.example`, `@moon`, `user@example`,
`192.0.2.1`, `C=CH, O=Example, CN=moon`). `Credentials` holds a PSK or a certificate,
private key and trusted CAs; `make_auth`/`check_auth` build and verify AUTH payloads.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.constant_time import bytes_eq
from cryptography.x509.oid import NameOID

from espswitch.ike.consts import AuthMethod, CertEncoding, HashAlg, IdType, Notify
from espswitch.ike.crypto import prf
from espswitch.ike.errors import IkeConfigError, ProtocolError
from espswitch.ike.message import AuthPayload, CertPayload, CertReqPayload, IdPayload

__all__ = ["Credentials", "Identity", "check_auth", "make_auth", "signed_octets"]

_KEY_PAD = b"Key Pad for IKEv2"

_ATTR = {
    "C": NameOID.COUNTRY_NAME, "ST": NameOID.STATE_OR_PROVINCE_NAME, "L": NameOID.LOCALITY_NAME,
    "O": NameOID.ORGANIZATION_NAME, "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "CN": NameOID.COMMON_NAME, "E": NameOID.EMAIL_ADDRESS,
    "EMAIL": NameOID.EMAIL_ADDRESS, "SN": NameOID.SERIAL_NUMBER,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    """An IKE identity: ID type and its wire data."""

    id_type: int
    data: bytes

    @classmethod
    def parse(cls, text: str) -> Identity:
        """Parse strongSwan's identity syntax; IkeConfigError when it cannot."""
        s = text.strip()
        if not s:
            raise IkeConfigError("empty identity")
        try:
            return cls(id_type=IdType.IPV4_ADDR, data=ipaddress.IPv4Address(s).packed)
        except ValueError:
            pass
        if "=" in s:
            rdns = []
            for part in s.split(","):
                k, _, v = part.strip().partition("=")
                oid = _ATTR.get(k.strip().upper())
                if oid is None or not v.strip():
                    raise IkeConfigError(f"bad distinguished name {text!r}")
                rdns.append(x509.RelativeDistinguishedName([x509.NameAttribute(oid, v.strip())]))
            return cls(id_type=IdType.DER_ASN1_DN, data=x509.Name(rdns).public_bytes())
        if s.startswith("@"):
            return cls(id_type=IdType.FQDN, data=s[1:].encode())
        if "@" in s:
            return cls(id_type=IdType.RFC822_ADDR, data=s.encode())
        return cls(id_type=IdType.FQDN, data=s.encode())

    @classmethod
    def from_payload(cls, p: IdPayload) -> Identity:
        """The identity an ID payload carries."""
        return cls(id_type=p.id_type, data=p.data)

    def payload(self, initiator: bool) -> IdPayload:
        """As an IDi (`initiator`) or IDr payload."""
        return IdPayload(id_type=self.id_type, data=self.data, initiator=initiator)

    def __str__(self) -> str:
        if self.id_type == IdType.IPV4_ADDR and len(self.data) == 4:
            return str(ipaddress.IPv4Address(self.data))
        if self.id_type in (IdType.FQDN, IdType.RFC822_ADDR):
            return self.data.decode("utf-8", "replace")
        return f"{IdType(self.id_type).name if self.id_type in IdType._value2member_map_ else self.id_type}:{self.data.hex()}"  # noqa: E501

    def matched_by_cert(self, cert: x509.Certificate) -> bool:
        """True when the certificate vouches for this identity (subject or subjectAltName)."""
        if self.id_type == IdType.DER_ASN1_DN:
            return bytes_eq(cert.subject.public_bytes(), self.data)
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            san = None
        if self.id_type == IdType.FQDN:
            name = self.data.decode("ascii", "replace").lower()
            return san is not None and name in [
                n.lower() for n in san.get_values_for_type(x509.DNSName)]
        if self.id_type == IdType.RFC822_ADDR:
            name = self.data.decode("ascii", "replace").lower()
            return san is not None and name in [
                n.lower() for n in san.get_values_for_type(x509.RFC822Name)]
        if self.id_type == IdType.IPV4_ADDR and len(self.data) == 4:
            return san is not None and ipaddress.IPv4Address(self.data) in \
                san.get_values_for_type(x509.IPAddress)
        return False


@dataclass(frozen=True, slots=True, kw_only=True)
class Credentials:
    """How we authenticate and how we check the peer: a PSK, or certificates.

    With certificates, `cert`/`key` are ours and `cas` are the trust anchors for the peer's
    certificate; `rsa_pss` makes RSA keys sign with PSS instead of PKCS#1 v1.5.
    """

    psk: bytes | None = field(default=None, repr=False)
    cert: x509.Certificate | None = None
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | None = field(default=None, repr=False)
    cas: tuple[x509.Certificate, ...] = ()
    rsa_pss: bool = False

    def __post_init__(self) -> None:
        if self.psk is None and (self.cert is None or self.key is None):
            raise IkeConfigError("credentials need a PSK, or a certificate and its private key")
        if self.psk is not None and not self.psk:
            raise IkeConfigError("empty PSK")
        if self.cert is not None and not self.cas:
            raise IkeConfigError("certificate authentication needs a CA certificate")

    @property
    def uses_certs(self) -> bool:
        """True for certificate authentication."""
        return self.psk is None

    def certreq(self) -> CertReqPayload | None:
        """A CERTREQ naming our CAs (SHA-1 of their public keys), or None with a PSK."""
        if not self.uses_certs:
            return None
        data = b""
        for ca in self.cas:
            spki = ca.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
            h = hashes.Hash(hashes.SHA1())
            h.update(spki)
            data += h.finalize()
        return CertReqPayload(encoding=CertEncoding.X509_SIGNATURE, data=data)

    def cert_payload(self) -> CertPayload | None:
        """Our certificate as a CERT payload, or None with a PSK."""
        if self.cert is None or not self.uses_certs:
            return None
        return CertPayload(encoding=CertEncoding.X509_SIGNATURE,
                           data=self.cert.public_bytes(serialization.Encoding.DER))


def signed_octets(*, message: bytes, peer_nonce: bytes, prf_id: int, sk_p: bytes,
                  id_payload: IdPayload) -> bytes:
    """InitiatorSignedOctets / ResponderSignedOctets of §2.15."""
    return message + peer_nonce + prf(prf_id, sk_p, id_payload.body)


# -- RFC 7427 AlgorithmIdentifiers -------------------------------------------------------


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes((tag, n)) + body
    lb = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(lb))) + lb + body


def _oid(dotted: str) -> bytes:
    parts = [int(x) for x in dotted.split(".")]
    out = bytearray((40 * parts[0] + parts[1],))
    for p in parts[2:]:
        chunk = [p & 0x7F]
        p >>= 7
        while p:
            chunk.append(0x80 | (p & 0x7F))
            p >>= 7
        out += bytes(reversed(chunk))
    return _der(0x06, bytes(out))


_NULL = b"\x05\x00"
_HASH_OID = {"sha256": "2.16.840.1.101.3.4.2.1", "sha384": "2.16.840.1.101.3.4.2.2",
             "sha512": "2.16.840.1.101.3.4.2.3"}
_HASH_CLS = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}
_HASH_LEN = {"sha256": 32, "sha384": 48, "sha512": 64}


def _pss_algid(h: str) -> bytes:
    hash_alg = _der(0x30, _oid(_HASH_OID[h]) + _NULL)
    mgf = _der(0x30, _oid("1.2.840.113549.1.1.8") + hash_alg)
    params = _der(0x30, _der(0xA0, hash_alg) + _der(0xA1, mgf)
                  + _der(0xA2, _der(0x02, bytes((_HASH_LEN[h],)))))
    return _der(0x30, _oid("1.2.840.113549.1.1.10") + params)


# AlgorithmIdentifier DER -> (scheme, hash)
_ALGIDS: dict[bytes, tuple[str, str]] = {}
for _h, _n in (("sha256", 11), ("sha384", 12), ("sha512", 13)):
    _ALGIDS[_der(0x30, _oid(f"1.2.840.113549.1.1.{_n}") + _NULL)] = ("pkcs1", _h)
    _ALGIDS[_pss_algid(_h)] = ("pss", _h)
for _h, _n in (("sha256", 2), ("sha384", 3), ("sha512", 4)):
    _ALGIDS[_der(0x30, _oid(f"1.2.840.10045.4.3.{_n}"))] = ("ecdsa", _h)
_ALGID_OF = {v: k for k, v in _ALGIDS.items()}
_PSS_OID = _oid("1.2.840.113549.1.1.10")
_HASH_OID_BYTES = {_oid(v): k for k, v in _HASH_OID.items()}


def _parse_algid(algid: bytes) -> tuple[str, str] | None:
    known = _ALGIDS.get(algid)
    if known is not None:
        return known
    # PSS parameters are encoded in several equivalent ways (with or without NULL, explicit
    # defaults): find the hash OID inside and require the salt to be the hash length.
    if algid[2 : 2 + len(_PSS_OID)] == _PSS_OID:
        for oid, h in _HASH_OID_BYTES.items():
            if oid in algid:
                return ("pss", h)
    return None


def _hash_for_key(key: object, peer_hashes: frozenset[int]) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {256: "sha256", 384: "sha384", 521: "sha512"}.get(key.curve.key_size, "sha256")
    if HashAlg.SHA2_256 in peer_hashes or not peer_hashes:
        return "sha256"
    return "sha384" if HashAlg.SHA2_384 in peer_hashes else "sha512"


def make_auth(creds: Credentials, octets: bytes, prf_id: int,
              peer_hashes: frozenset[int] = frozenset()) -> AuthPayload:
    """Our AUTH payload over `octets`: PSK MAC, or an RFC 7427 digital signature."""
    if creds.psk is not None:
        return AuthPayload(method=AuthMethod.PSK,
                           data=prf(prf_id, prf(prf_id, creds.psk, _KEY_PAD), octets))
    key = creds.key
    h = _hash_for_key(key, peer_hashes)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        scheme = "ecdsa"
        sig = key.sign(octets, ec.ECDSA(_HASH_CLS[h]()))
    else:
        scheme = "pss" if creds.rsa_pss else "pkcs1"
        pad = (padding.PSS(mgf=padding.MGF1(_HASH_CLS[h]()), salt_length=_HASH_LEN[h])
               if creds.rsa_pss else padding.PKCS1v15())
        sig = key.sign(octets, pad, _HASH_CLS[h]())
    algid = _ALGID_OF[(scheme, h)]
    return AuthPayload(method=AuthMethod.DIGITAL_SIGNATURE, data=bytes((len(algid),)) + algid + sig)


def _auth_failed(why: str) -> ProtocolError:
    return ProtocolError(f"authentication failed: {why}", notify=Notify.AUTHENTICATION_FAILED)


def verify_peer_cert(creds: Credentials, certs: list[bytes],
                     wallclock: Callable[[], datetime.datetime] | None) -> x509.Certificate:
    """The peer's end-entity certificate, checked against our CAs (one level)."""
    if not certs:
        raise _auth_failed("peer sent no certificate")
    try:
        cert = x509.load_der_x509_certificate(certs[0])
    except ValueError:
        raise _auth_failed("peer certificate does not parse") from None
    for ca in creds.cas:
        if cert.issuer != ca.subject:
            continue
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            continue
        if wallclock is not None:
            now = wallclock()
            if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                raise _auth_failed("peer certificate is not valid now")
        return cert
    raise _auth_failed("peer certificate is not issued by a trusted CA")


def check_auth(creds: Credentials, auth: AuthPayload, octets: bytes, prf_id: int,
               peer_cert: x509.Certificate | None) -> None:
    """Verify the peer's AUTH payload; raises ProtocolError(AUTHENTICATION_FAILED)."""
    if creds.psk is not None:
        if auth.method != AuthMethod.PSK:
            raise _auth_failed("peer did not use the pre-shared key")
        expected = prf(prf_id, prf(prf_id, creds.psk, _KEY_PAD), octets)
        if not bytes_eq(expected, auth.data):
            raise _auth_failed("pre-shared key AUTH mismatch")
        return
    if peer_cert is None:
        raise _auth_failed("no peer certificate")
    pub = peer_cert.public_key()
    try:
        if auth.method == AuthMethod.DIGITAL_SIGNATURE:
            if not auth.data:
                raise _auth_failed("empty signature")
            n = auth.data[0]
            algo = _parse_algid(auth.data[1 : 1 + n])
            sig = auth.data[1 + n :]
            if algo is None:
                raise _auth_failed("unsupported signature algorithm")
            scheme, h = algo
            if scheme == "ecdsa" and isinstance(pub, ec.EllipticCurvePublicKey):
                pub.verify(sig, octets, ec.ECDSA(_HASH_CLS[h]()))
            elif scheme == "pkcs1" and isinstance(pub, rsa.RSAPublicKey):
                pub.verify(sig, octets, padding.PKCS1v15(), _HASH_CLS[h]())
            elif scheme == "pss" and isinstance(pub, rsa.RSAPublicKey):
                pub.verify(sig, octets, padding.PSS(mgf=padding.MGF1(_HASH_CLS[h]()),
                                                    salt_length=padding.PSS.AUTO), _HASH_CLS[h]())
            else:
                raise _auth_failed("signature scheme does not fit the key")
        elif auth.method == AuthMethod.RSA_SIG and isinstance(pub, rsa.RSAPublicKey):
            pub.verify(auth.data, octets, padding.PKCS1v15(), hashes.SHA1())
        elif auth.method in (AuthMethod.ECDSA_256, AuthMethod.ECDSA_384) and isinstance(
                pub, ec.EllipticCurvePublicKey):
            # RFC 4754: r | s, fixed length
            h, n = ((hashes.SHA256, 32) if auth.method == AuthMethod.ECDSA_256
                    else (hashes.SHA384, 48))
            if len(auth.data) != 2 * n:
                raise _auth_failed("bad ECDSA signature length")
            der = encode_dss_signature(int.from_bytes(auth.data[:n], "big"),
                                       int.from_bytes(auth.data[n:], "big"))
            pub.verify(der, octets, ec.ECDSA(h()))
        else:
            raise _auth_failed(f"unsupported authentication method {auth.method}")
    except InvalidSignature:
        raise _auth_failed("bad signature") from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise _auth_failed("bad signature encoding") from None
