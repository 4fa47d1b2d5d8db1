"""Certification paths: end entity, intermediates the peer sends, our trust anchors."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

from espswitch.ike import Credentials, IkeCore
from espswitch.ike.chain import MAX_PATH, PathError, verify_path

from .certs import Ca
from .helpers import A_ADDR, B_ADDR, Link, peer

NOW = datetime.datetime.now(datetime.UTC)
ROOT = Ca("root")
SUB = Ca("sub", parent=ROOT, rsa_bits=2048)
SUB2 = Ca("sub2", parent=SUB)


def test_leaf_through_intermediates_to_the_anchor():
    leaf, _ = SUB2.issue("moon")
    path = verify_path(leaf, [SUB.cert, SUB2.cert], [ROOT.cert], NOW)
    assert path == [leaf, SUB2.cert, SUB.cert, ROOT.cert]
    # Any order, with an unrelated certificate among them.
    other = Ca("unrelated").cert
    assert verify_path(leaf, [other, SUB.cert, SUB2.cert], [ROOT.cert], NOW)[-1] == ROOT.cert
    # An intermediate configured as an anchor shortens the path.
    assert verify_path(leaf, [], [SUB2.cert]) == [leaf, SUB2.cert]


def test_missing_intermediate_or_other_anchor_is_refused():
    leaf, _ = SUB2.issue("moon")
    with pytest.raises(PathError, match="trusted CA"):
        verify_path(leaf, [SUB2.cert], [ROOT.cert], NOW)
    with pytest.raises(PathError, match="trusted CA"):
        verify_path(leaf, [SUB.cert, SUB2.cert], [Ca("other root").cert], NOW)


def test_intermediate_must_be_a_ca_within_its_path_length():
    not_ca = Ca("not a CA", parent=ROOT, ca=False)
    leaf, _ = not_ca.issue("moon")
    with pytest.raises(PathError):
        verify_path(leaf, [not_ca.cert], [ROOT.cert], NOW)
    top = Ca("pathlen 0", parent=ROOT, path_length=0)
    below = Ca("below", parent=top)
    leaf, _ = below.issue("moon")
    with pytest.raises(PathError):
        verify_path(leaf, [top.cert, below.cert], [ROOT.cert], NOW)
    leaf, _ = top.issue("moon")
    assert verify_path(leaf, [top.cert], [ROOT.cert], NOW)[-1] == ROOT.cert


def test_validity_of_every_certificate():
    leaf, _ = SUB2.issue("moon")
    later = NOW + datetime.timedelta(days=20)  # leaf expired (10 days)
    with pytest.raises(PathError, match="not valid now"):
        verify_path(leaf, [SUB.cert, SUB2.cert], [ROOT.cert], later)
    short = Ca("short-lived", parent=ROOT, days=2)
    leaf, _ = short.issue("moon", days=30)
    with pytest.raises(PathError, match="chain is not valid now"):
        verify_path(leaf, [short.cert], [ROOT.cert], NOW + datetime.timedelta(days=5))


def test_forged_signature_is_refused():
    # Same names as SUB, another key: the leaf it signs does not chain to ROOT.
    impostor = Ca("sub", rsa_bits=2048)
    leaf, _ = impostor.issue("moon")
    with pytest.raises(PathError):
        verify_path(leaf, [SUB.cert], [ROOT.cert], NOW)


def test_names_chain_whatever_their_string_type():
    """An issuer written in PrintableString below a CA whose subject is UTF8String (and
    in other case and spacing) chains, as RFC 5280 §7.1 compares names."""
    key = ec.generate_private_key(ec.SECP256R1())
    issuer = x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "CH", _ASN1Type.PrintableString),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ESPSWITCH  test",
                           _ASN1Type.PrintableString),
        x509.NameAttribute(NameOID.COMMON_NAME, "Root", _ASN1Type.PrintableString)])
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, "moon")])).issuer_name(issuer)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=1))
        .sign(ROOT.key, hashes.SHA256()))
    assert verify_path(leaf, [], [ROOT.cert], NOW) == [leaf, ROOT.cert]


def test_pinned_peer_certificate_is_its_own_anchor():
    leaf, _ = SUB2.issue("moon")
    assert verify_path(leaf, [], [leaf], NOW) == [leaf]


def test_long_or_looping_chains_are_bounded():
    cas = [ROOT]
    for k in range(MAX_PATH + 2):
        cas.append(Ca(f"level {k}", parent=cas[-1]))
    leaf, _ = cas[-1].issue("deep")
    with pytest.raises(PathError):
        verify_path(leaf, [c.cert for c in cas[1:]], [ROOT.cert], NOW)
    ok_leaf, _ = cas[MAX_PATH].issue("deep enough")
    assert len(verify_path(ok_leaf, [c.cert for c in cas[1:MAX_PATH + 1]], [ROOT.cert],
                           NOW)) == MAX_PATH + 2


def test_cores_authenticate_with_intermediates_both_ways():
    """Each side sends its certificate and its intermediate; each trusts only the root."""
    a_cert, a_key = SUB2.issue("a", kind="rsa", dns="a.example")
    b_cert, b_key = SUB.issue("b", kind="ecdsa", dns="b.example")
    a_creds = Credentials(cert=a_cert, key=a_key, cas=(ROOT.cert,),
                          chain=(SUB2.cert, SUB.cert))
    b_creds = Credentials(cert=b_cert, key=b_key, cas=(ROOT.cert,), chain=(SUB.cert,))
    a = IkeCore([peer(A_ADDR, B_ADDR, "b", credentials=a_creds, local_id="a.example",
                      remote_id="b.example")],
                wallclock=lambda: datetime.datetime.now(datetime.UTC))
    b = IkeCore([peer(B_ADDR, A_ADDR, "a", credentials=b_creds, local_id="b.example",
                      remote_id="a.example")],
                wallclock=lambda: datetime.datetime.now(datetime.UTC))
    link = Link(a, b)
    a.initiate("b", 0.0)
    link.run()
    assert len(link.installed(a)) == len(link.installed(b)) == 1, (a.errors, b.errors)
    # Without its intermediates, a is not trusted.
    a2 = IkeCore([peer(A_ADDR, B_ADDR, "b", local_id="a.example", remote_id="b.example",
                       credentials=Credentials(cert=a_cert, key=a_key, cas=(ROOT.cert,)))])
    b2 = IkeCore([peer(B_ADDR, A_ADDR, "a", credentials=b_creds, local_id="b.example",
                       remote_id="a.example")])
    link = Link(a2, b2)
    a2.initiate("b", 0.0)
    link.run()
    assert not link.installed(a2) and any("trusted CA" in str(e) for e in b2.errors)


def test_cross_signed_loop_ends():
    """X issued by Y and Y issued by X, neither under an anchor: refused, and quickly."""
    x = Ca("x")
    y = Ca("y", parent=x)
    x_by_y = Ca("x", parent=y)
    x_by_y.key = x.key
    x_by_y.cert = (x509.CertificateBuilder().subject_name(x.name).issuer_name(y.name)
                   .public_key(x.key.public_key()).serial_number(7)
                   .not_valid_before(NOW - datetime.timedelta(days=1))
                   .not_valid_after(NOW + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                   .sign(y.key, hashes.SHA256()))
    leaf, _ = x.issue("moon")
    with pytest.raises(PathError):
        verify_path(leaf, [x_by_y.cert, y.cert, x.cert] * 3, [ROOT.cert], NOW)
