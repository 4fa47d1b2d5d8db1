"""Credentials and the AUTH payload (RFC 7296 §2.15, RFC 7427).

`Credentials` holds a PSK or a certificate (with the intermediate CA certificates sent
after it), private key and trusted CAs; `make_auth`/`check_auth` build and verify AUTH
payloads, and `verify_peer_cert` checks the peer's certificates (`espswitch.ike.chain`).
Identities and their matching live in `espswitch.ike.identity` (`Identity` is re-exported
here).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.constant_time import bytes_eq

from espswitch.ike.chain import PathError, verify_path
from espswitch.ike.consts import AuthMethod, CertEncoding, HashAlg, Notify
from espswitch.ike.crypto import prf
from espswitch.ike.errors import IkeConfigError, ProtocolError
from espswitch.ike.identity import Identity
from espswitch.ike.message import AuthPayload, CertPayload, CertReqPayload, IdPayload

__all__ = ["Credentials", "Identity", "check_auth", "make_auth", "signed_octets",
           "verify_peer_cert"]

# CERT payloads of the peer looked at: its certificate and this many minus one
# intermediates (strongSwan accepts 8 too).
MAX_PEER_CERTS = 8

_KEY_PAD = b"Key Pad for IKEv2"


@dataclass(frozen=True, slots=True, kw_only=True)
class Credentials:
    """How we authenticate and how we check the peer: a PSK, or certificates.

    With certificates, `cert`/`key` are ours, `chain` the intermediate CA certificates sent
    after ours (so the peer can reach its trust anchor), and `cas` the trust anchors for
    the peer's certificate; `rsa_pss` makes RSA keys sign with PSS instead of PKCS#1 v1.5.
    """

    psk: bytes | None = field(default=None, repr=False)
    cert: x509.Certificate | None = None
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | None = field(default=None, repr=False)
    cas: tuple[x509.Certificate, ...] = ()
    rsa_pss: bool = False
    chain: tuple[x509.Certificate, ...] = ()

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

    def cert_payloads(self) -> list[CertPayload]:
        """Our certificate, then the intermediates, as CERT payloads (none with a PSK)."""
        if self.cert is None or not self.uses_certs:
            return []
        return [CertPayload(encoding=CertEncoding.X509_SIGNATURE,
                            data=c.public_bytes(serialization.Encoding.DER))
                for c in (self.cert, *self.chain)]


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
    """The peer's end-entity certificate (the first CERT payload), with a certification
    path through the intermediates it sent to one of our CAs (`espswitch.ike.chain`)."""
    if not certs:
        raise _auth_failed("peer sent no certificate")
    try:
        cert = x509.load_der_x509_certificate(certs[0])
    except ValueError:
        raise _auth_failed("peer certificate does not parse") from None
    intermediates = []
    for der in certs[1:MAX_PEER_CERTS]:
        try:
            intermediates.append(x509.load_der_x509_certificate(der))
        except ValueError:
            continue  # an unusable extra certificate is simply not used
    try:
        verify_path(cert, intermediates, creds.cas,
                    wallclock() if wallclock is not None else None)
    except PathError as e:
        raise _auth_failed(str(e)) from None
    return cert


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
