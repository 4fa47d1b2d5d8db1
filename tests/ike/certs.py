"""A CA made in the test with `cryptography`, and RSA / ECDSA end-entity certificates."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

_NOW = datetime.datetime.now(datetime.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "CH"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "espswitch test"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class Ca:
    """A CA (ECDSA P-256 unless `rsa_bits`) that issues certificates: self-signed, or an
    intermediate issued by `parent`."""

    def __init__(self, cn: str = "espswitch test CA", *, parent: Ca | None = None,
                 rsa_bits: int | None = None, path_length: int | None = None,
                 ca: bool = True, days: int = 30) -> None:
        self.key = (rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
                    if rsa_bits else ec.generate_private_key(ec.SECP256R1()))
        self.name = _name(cn)
        issuer_name, issuer_key = (parent.name, parent.key) if parent else (self.name, self.key)
        self.cert = (x509.CertificateBuilder().subject_name(self.name).issuer_name(issuer_name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(_NOW - datetime.timedelta(days=1))
                     .not_valid_after(_NOW + datetime.timedelta(days=days))
                     .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=ca,
                                                  crl_sign=ca, content_commitment=False,
                                                  key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False),
                                    True)
                     .sign(issuer_key, hashes.SHA256()))

    def issue(self, cn: str, *, kind: str = "ecdsa", dns: str | None = None,
              email: str | None = None, ip: str | None = None, days: int = 10):
        """(certificate, private key) for `cn`, with the subjectAltNames given."""
        key = (rsa.generate_private_key(public_exponent=65537, key_size=2048)
               if kind == "rsa" else ec.generate_private_key(
                   ec.SECP384R1() if kind == "ecdsa384" else ec.SECP256R1()))
        sans: list[x509.GeneralName] = []
        if dns:
            sans.append(x509.DNSName(dns))
        if email:
            sans.append(x509.RFC822Name(email))
        if ip:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self.name)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(_NOW - datetime.timedelta(days=1))
             .not_valid_after(_NOW + datetime.timedelta(days=days)))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), False)
        return b.sign(self.key, hashes.SHA256()), key


def write_pem(path: Path, obj: object) -> None:
    """Write a certificate or an unencrypted PKCS#8 private key as PEM."""
    if isinstance(obj, x509.Certificate):
        path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(obj.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
