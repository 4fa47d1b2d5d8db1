"""Identity matching: RFC 5280 §7.1 / RFC 4518 for DNs, subjectAltNames for the others.

The DER is made by `cryptography` (an encoder that is not ours) in every ASN.1 string type a
DN value may have; hypothesis varies the types, case and spacing (must match) and the
values, attributes and order (must not).
"""

from __future__ import annotations

import ipaddress

import pytest
from cryptography import x509
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from espswitch.ike.consts import IdType
from espswitch.ike.errors import IkeConfigError
from espswitch.ike.identity import (
    Identity,
    dn_equal,
    format_dn,
    parse_dn_der,
    parse_dn_text,
    prepare,
)

from .certs import Ca

# The string types that can carry any PrintableString text, and those for any Unicode.
PRINTABLE_TYPES = [_ASN1Type.PrintableString, _ASN1Type.UTF8String, _ASN1Type.BMPString,
                   _ASN1Type.UniversalString, _ASN1Type.IA5String, _ASN1Type.VisibleString,
                   _ASN1Type.T61String]
UNICODE_TYPES = [_ASN1Type.UTF8String, _ASN1Type.UniversalString]
OIDS = [NameOID.ORGANIZATION_NAME, NameOID.ORGANIZATIONAL_UNIT_NAME, NameOID.COMMON_NAME,
        NameOID.LOCALITY_NAME, NameOID.STATE_OR_PROVINCE_NAME, NameOID.SURNAME]
PRINTABLE = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 '()+,-./:=?"

printable_value = st.text(PRINTABLE, min_size=1, max_size=12).filter(
    lambda v: prepare(v) not in (None, ""))
unicode_value = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Co", "Cn")),
                        min_size=1, max_size=12).filter(lambda v: prepare(v) not in (None, ""))
# A DN: RDNs of one attribute (OID, printable value); multi-valued RDNs come below.
dns = st.lists(st.tuples(st.sampled_from(OIDS), printable_value), min_size=1, max_size=6)


def der(rdns: list[list[tuple[x509.ObjectIdentifier, str, _ASN1Type]]]) -> bytes:
    """A Name encoded by `cryptography` with the string types given."""
    return x509.Name([x509.RelativeDistinguishedName(
        [x509.NameAttribute(oid, v, t) for oid, v, t in rdn]) for rdn in rdns]).public_bytes()


def dn_id(data: bytes) -> Identity:
    return Identity(id_type=IdType.DER_ASN1_DN, data=data)


def same(a: bytes, b: bytes) -> bool:
    """dn_equal both ways, and through Identity.matches/equivalent."""
    x, y = parse_dn_der(a), parse_dn_der(b)
    assert dn_equal(x, y) == dn_equal(y, x)
    assert dn_id(a).equivalent(dn_id(b)) == dn_equal(x, y) == dn_id(a).matches(dn_id(b))
    return dn_equal(x, y)


def respace(v: str, data: st.DataObject) -> str:
    """`v` with leading/trailing spaces added and inner spaces widened (insignificant)."""
    words = v.split(" ")
    out = words[0]
    for w in words[1:]:
        out += " " * data.draw(st.integers(1, 3)) + w
    return " " * data.draw(st.integers(0, 3)) + out + " " * data.draw(st.integers(0, 3))


def recase(v: str, data: st.DataObject) -> str:
    return "".join(c.swapcase() if data.draw(st.booleans()) else c for c in v)


@settings(max_examples=300, deadline=None)
@given(dns, st.data())
def test_string_type_case_and_spacing_do_not_matter(dn, data):
    ref = der([[(oid, v, _ASN1Type.UTF8String)] for oid, v in dn])
    variant = der([[(oid, respace(recase(v, data), data), data.draw(st.sampled_from(
        PRINTABLE_TYPES)))] for oid, v in dn])
    assert same(ref, variant)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(OIDS), unicode_value), min_size=1, max_size=4),
       st.data())
def test_any_unicode_value_in_any_unicode_type(dn, data):
    a = der([[(oid, v, data.draw(st.sampled_from(UNICODE_TYPES)))] for oid, v in dn])
    b = der([[(oid, v, data.draw(st.sampled_from(UNICODE_TYPES)))] for oid, v in dn])
    assert same(a, b)
    # BMPString holds the Basic Multilingual Plane only.
    if all(ord(c) < 0x10000 for _, v in dn for c in v):
        assert same(a, der([[(oid, v, _ASN1Type.BMPString)] for oid, v in dn]))


@settings(max_examples=300, deadline=None)
@given(dns, st.data())
def test_a_different_value_does_not_match(dn, data):
    i = data.draw(st.integers(0, len(dn) - 1))
    other = data.draw(printable_value)
    assume(prepare(other) != prepare(dn[i][1]))
    changed = [*dn[:i], (dn[i][0], other), *dn[i + 1:]]
    t = data.draw(st.sampled_from(PRINTABLE_TYPES))
    assert not same(der([[(o, v, t)] for o, v in dn]), der([[(o, v, t)] for o, v in changed]))


@settings(max_examples=300, deadline=None)
@given(dns, st.data())
def test_a_missing_extra_or_other_attribute_does_not_match(dn, data):
    ref = der([[(o, v, _ASN1Type.UTF8String)] for o, v in dn])
    i = data.draw(st.integers(0, len(dn) - 1))
    if len(dn) > 1:
        assert not same(ref, der([[(o, v, _ASN1Type.UTF8String)]
                                  for o, v in dn[:i] + dn[i + 1:]]))
    extra = data.draw(st.tuples(st.sampled_from(OIDS), printable_value))
    assert not same(ref, der([[(o, v, _ASN1Type.UTF8String)]
                              for o, v in [*dn[:i], extra, *dn[i:]]]))
    other_oid = data.draw(st.sampled_from([o for o in OIDS if o != dn[i][0]]))
    assert not same(ref, der([[(o if k != i else other_oid, v, _ASN1Type.UTF8String)]
                              for k, (o, v) in enumerate(dn)]))
    # The same attributes as one multi-valued RDN are another name too.
    if len(dn) > 1 and len({o for o, _ in dn}) == len(dn):
        assert not same(ref, der([[(o, v, _ASN1Type.UTF8String) for o, v in dn]]))


@settings(max_examples=300, deadline=None)
@given(dns, st.data())
def test_another_order_does_not_match(dn, data):
    perm = data.draw(st.permutations(dn))
    keys = [(o, prepare(v)) for o, v in dn]
    assume([(o, prepare(v)) for o, v in perm] != keys)
    t = data.draw(st.sampled_from(PRINTABLE_TYPES))
    assert not same(der([[(o, v, t)] for o, v in dn]), der([[(o, v, t)] for o, v in perm]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(OIDS), printable_value), min_size=2, max_size=4,
                unique_by=lambda x: x[0]), st.data())
def test_multi_valued_rdn_is_a_set(avas, data):
    perm = data.draw(st.permutations(avas))
    a = der([[(o, v, _ASN1Type.PrintableString) for o, v in avas]])
    b = der([[(o, recase(v, data), _ASN1Type.UTF8String) for o, v in perm]])
    assert same(a, b)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([*OIDS, NameOID.COUNTRY_NAME]),
                          st.text(st.characters(codec="utf-8", exclude_categories=(
                              "Cs", "Co", "Cn")), min_size=1, max_size=10)),
                min_size=1, max_size=5))
def test_shown_form_reads_back_as_the_same_name(dn):
    dn = [(o, "CH" if o == NameOID.COUNTRY_NAME else v) for o, v in dn]
    assume(all(prepare(v) not in (None, "") for _, v in dn))
    data = der([[(o, v, _ASN1Type.UTF8String)] for o, v in dn])
    shown = str(dn_id(data))
    assert "\n" not in shown and shown.isprintable()
    assert same(data, Identity.parse(shown).data), shown


def test_prepare_follows_rfc4518():
    assert prepare("  Acme   Widgets  Inc ") == "acme widgets inc"
    assert prepare("ACME\tWIDGETS") == "acme widgets"
    assert prepare("soft\u00adhyphen") == "softhyphen"
    assert prepare("zero\u200bwidth") == "zerowidth"
    assert prepare("\uff21\uff22") == "ab"  # fullwidth letters, NFKC
    assert prepare("Stra\u00dfe") == prepare("STRASSE")  # full case folding
    assert prepare("e\u0301") == prepare("\u00e9")  # composed and decomposed
    assert prepare("private\ue000use") is None
    assert prepare("   ") == ""


def test_strongswan_and_openssl_spellings():
    ref = Identity.parse("C=CH, O=strongSwan Test, CN=moon.strongswan.org")
    for text in ("/C=CH/O=strongSwan Test/CN=moon.strongswan.org",
                 "c=ch,o=strongswan test,cn=MOON.strongswan.org",
                 "countryName=CH, organizationName=strongSwan  Test, commonName=moon."
                 "strongswan.org",
                 "2.5.4.6=CH, OID.2.5.4.10=strongSwan Test, CN=moon.strongswan.org",
                 'C=CH, O="strongSwan Test", CN=moon.strongswan.org'):
        assert Identity.parse(text).equivalent(ref), text
    assert not Identity.parse("CN=moon.strongswan.org, O=strongSwan Test, C=CH").matches(ref)
    # An escaped comma is part of the value; the SN of strongSwan 5.9 and OpenSSL is surname.
    esc = Identity.parse(r"O=Example\, Inc., CN=a")
    assert len(esc.dn()) == 2 and esc.dn()[0][0].text == "Example, Inc."
    assert Identity.parse("SN=Smith").dn()[0][0].oid == NameOID.SURNAME.dotted_string
    for bad in ("C=CH, XX=y", "C=CH, O=", "C=CH,, O=x", "C=CHE", "O=a\\"):
        with pytest.raises(IkeConfigError):
            Identity.parse(bad)


def test_identities_are_shown_as_text_never_der():
    a = Identity.parse("C=CH, O=Example, CN=moon")
    assert str(a) == "C=CH, O=Example, CN=moon"
    assert str(Identity.parse("2001:db8::1")) == "2001:db8::1"
    assert str(Identity(id_type=IdType.DER_ASN1_DN, data=b"\x30\x05garbage")) == \
        "malformed distinguished name (9 bytes)"
    # A peer's FQDN with a line break does not break a log line.
    assert str(Identity(id_type=IdType.FQDN, data=b"evil\nline")) == "evil\\0Aline"
    assert len(str(Identity(id_type=IdType.FQDN, data=b"x" * 5000))) <= 400


def test_malformed_der_never_matches_and_never_raises():
    good = Identity.parse("CN=a")
    for junk in (b"", b"\x30", b"\x30\x80", b"\x30\x03\x31\x01\x00", b"\x31\x00",
                 b"\x30\x84\xff\xff\xff\xff", good.data + b"\x00", good.data[:-1]):
        ident = Identity(id_type=IdType.DER_ASN1_DN, data=junk)
        assert ident.dn() is None
        assert not good.matches(ident) and not ident.equivalent(ident)


@given(st.binary(max_size=80))
def test_random_der_is_safe(junk):
    ident = Identity(id_type=IdType.DER_ASN1_DN, data=junk)
    str(ident)
    Identity.parse("CN=a").matches(ident)


CA = Ca()


def test_certificate_vouches_through_subject_and_subject_alt_names():
    cert, _ = CA.issue("moon", kind="ecdsa", dns="Moon.Example", email="Ops@Example.ORG",
                       ip="192.0.2.7")
    subject_printable = der([[(NameOID.COUNTRY_NAME, "ch", _ASN1Type.PrintableString)],
                             [(NameOID.ORGANIZATION_NAME, "ESPSWITCH  TEST",
                               _ASN1Type.PrintableString)],
                             [(NameOID.COMMON_NAME, "Moon", _ASN1Type.BMPString)]])
    yes = [dn_id(subject_printable), Identity.parse("moon.example."),
           Identity.parse("@MOON.example"), Identity.parse("Ops@example.org"),
           Identity.parse("192.0.2.7"), Identity.parse("C=CH, O=espswitch test, CN=moon")]
    no = [Identity.parse("C=CH, O=espswitch test, CN=sun"), Identity.parse("sun.example"),
          Identity.parse("ops@example.org"),  # the local part is case-sensitive
          Identity.parse("192.0.2.8"), Identity.parse("C=CH, CN=moon, O=espswitch test"),
          Identity(id_type=IdType.KEY_ID, data=b"moon")]
    for ident in yes:
        assert ident.matched_by_cert(cert), str(ident)
    for ident in no:
        assert not ident.matched_by_cert(cert), str(ident)
    bare, _ = CA.issue("bare", kind="ecdsa")
    assert not Identity.parse("bare").matched_by_cert(bare)  # no SAN: only the DN vouches
    dn_san = CA.issue("x", kind="ecdsa")[0]
    assert not Identity.parse("C=CH, O=espswitch test, CN=y").matched_by_cert(dn_san)
    v6 = Identity.parse("2001:db8::7")
    assert v6.id_type == IdType.IPV6_ADDR and v6.data == ipaddress.IPv6Address(
        "2001:db8::7").packed


def test_open_vswitch_remote_name_is_the_peer_cn():
    """ovs-monitor-ipsec passes remote_name (the CN) as `rightid=NAME` / `rightid=@NAME`."""
    peer_dn = dn_id(der([[(NameOID.COUNTRY_NAME, "US", _ASN1Type.PrintableString)],
                         [(NameOID.ORGANIZATION_NAME, "Open vSwitch", _ASN1Type.UTF8String)],
                         [(NameOID.COMMON_NAME, "host_2", _ASN1Type.PrintableString)]]))
    for name in ("host_2", "@host_2", "HOST_2"):
        assert Identity.parse(name).matches(peer_dn), name
        assert Identity.parse(name).matches(Identity(id_type=IdType.FQDN, data=b"host_2"))
    assert not Identity.parse("host_3").matches(peer_dn)
    assert not Identity.parse("Open vSwitch").matches(peer_dn)  # the CN, not any attribute
    # The other way round stays strict: a configured DN is not an FQDN.
    assert not Identity.parse("CN=host_2").matches(Identity(id_type=IdType.FQDN,
                                                            data=b"host_2"))


def test_format_dn_of_a_certificate_subject_as_pki_prints_it():
    dn = parse_dn_der(der([[(NameOID.COUNTRY_NAME, "CH", _ASN1Type.PrintableString)],
                           [(NameOID.ORGANIZATION_NAME, "strongSwan Test",
                             _ASN1Type.PrintableString)],
                           [(NameOID.COMMON_NAME, "moon.strongswan.org",
                             _ASN1Type.PrintableString)]]))
    assert format_dn(dn) == "C=CH, O=strongSwan Test, CN=moon.strongswan.org"
    assert parse_dn_text(format_dn(dn)) == [[("2.5.4.6", "CH")],
                                            [("2.5.4.10", "strongSwan Test")],
                                            [("2.5.4.3", "moon.strongswan.org")]]
