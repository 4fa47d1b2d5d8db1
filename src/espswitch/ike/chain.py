"""Certification paths for the peer's certificate (RFC 5280 §6, the part IKE needs).

The peer sends its end-entity certificate first and may send intermediate CA certificates
after it (RFC 7296 §3.6); our trust anchors are the configured CA certificates (or the
peer's own pinned certificate). `verify_path` builds a path from the end entity through
the intermediates to an anchor: issuer and subject names chained as RFC 5280 §7.1 compares
them (so a PrintableString issuer and a UTF8String subject chain), each signature checked
with the issuer's key, each intermediate a CA (basicConstraints, keyUsage keyCertSign,
pathLenConstraint) and, when the time is given, every certificate valid then.

No revocation checking (no CRL, no OCSP): nothing here does I/O.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from espswitch.ike.identity import dn_equal, parse_dn_der

__all__ = ["MAX_PATH", "PathError", "verify_path"]

# Longest path tried (intermediates between the end entity and an anchor), as a bound on
# the work a peer can cause with the certificates it sends.
MAX_PATH = 8


class PathError(ValueError):
    """No acceptable certification path; the message says why, without certificate data."""


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether `issuer`'s key made `cert`'s signature."""
    try:
        pub = issuer.public_key()
        params = cert.signature_algorithm_parameters
        if isinstance(pub, rsa.RSAPublicKey):
            pub.verify(cert.signature, cert.tbs_certificate_bytes, params,
                       cert.signature_hash_algorithm)
        elif isinstance(pub, ec.EllipticCurvePublicKey):
            pub.verify(cert.signature, cert.tbs_certificate_bytes, params)
        elif isinstance(pub, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            pub.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            return False
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError):
        return False
    return True


def _names_chain(subject_of_issuer: x509.Certificate, cert: x509.Certificate) -> bool:
    try:
        return dn_equal(parse_dn_der(subject_of_issuer.subject.public_bytes()),
                        parse_dn_der(cert.issuer.public_bytes()))
    except ValueError:
        return False


def _valid_at(cert: x509.Certificate, now: datetime.datetime | None) -> bool:
    return now is None or cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _ca_limit(cert: x509.Certificate) -> int | None:
    """How many more intermediates may follow below this CA (None: any); -1 when the
    certificate may not issue certificates at all."""
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return -1
    except ValueError:
        return -1
    if not bc.ca:
        return -1
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.key_cert_sign:
            return -1
    except x509.ExtensionNotFound:
        pass
    except ValueError:
        return -1
    return bc.path_length


def verify_path(leaf: x509.Certificate, intermediates: Sequence[x509.Certificate],
                anchors: Sequence[x509.Certificate],
                now: datetime.datetime | None = None) -> list[x509.Certificate]:
    """The path [leaf, intermediates..., anchor] that makes `leaf` trusted; PathError else.

    An anchor that is the leaf itself (a pinned peer certificate) trusts it directly.
    `now` (aware, UTC), when given, must lie in every certificate's validity period.
    """
    if not _valid_at(leaf, now):
        raise PathError("peer certificate is not valid now")
    if any(leaf == a for a in anchors):
        return [leaf]
    tried: set[bytes] = set()
    expired = False

    def extend(path: list[x509.Certificate]) -> list[x509.Certificate] | None:
        nonlocal expired
        cert = path[-1]
        for anchor in anchors:
            if _names_chain(anchor, cert) and _signed_by(cert, anchor):
                if _valid_at(anchor, now):
                    return [*path, anchor]
                expired = True
        if len(path) > MAX_PATH:
            return None
        for ca in intermediates:
            fp = ca.tbs_certificate_bytes
            if fp in tried or any(ca == p for p in path):
                continue
            if not _names_chain(ca, cert):
                continue
            tried.add(fp)
            limit = _ca_limit(ca)
            # The intermediates already below this one (path[1:]) must fit its limit.
            if limit is not None and (limit < 0 or len(path) - 1 > limit):
                continue
            if not _signed_by(cert, ca):
                continue
            if not _valid_at(ca, now):
                expired = True
                continue
            found = extend([*path, ca])
            if found is not None:
                return found
        return None

    found = extend([leaf])
    if found is None:
        if expired:
            raise PathError("a certificate of the peer's chain is not valid now")
        raise PathError("peer certificate is not issued by a trusted CA")
    return found
