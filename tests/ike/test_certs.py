"""Certificate authentication (RFC 7427 signatures, X.509 from a CA made here)."""

from __future__ import annotations

import asyncio
import datetime

import pytest

from espswitch.ike import ChildSaInstalled, Credentials, IkeCore, IkeSaDown, IkeSaUp

from .certs import Ca, write_pem
from .esside import EsSide, es_peer
from .helpers import A_ADDR, B_ADDR, Link, peer
from .strongswan import swanctl_conf
from .test_strongswan import established

CA = Ca()
OTHER_CA = Ca("someone else's CA")
# (kind, identity string, SAN keyword arguments)
IDENTITIES = {
    "fqdn": ("rsa", "moon.example", {"dns": "moon.example"}),
    "rfc822": ("ecdsa", "sun@example.org", {"email": "sun@example.org"}),
    "ipv4": ("ecdsa384", "192.0.2.2", {"ip": "192.0.2.2"}),
    "dn": ("rsa", "C=CH, O=espswitch test, CN=venus", {}),
}


def _creds(ca, kind, cn, pss=False, **san):
    cert, key = ca.issue(cn, kind=kind, **san)
    return Credentials(cert=cert, key=key, cas=(CA.cert,), rsa_pss=pss)


@pytest.mark.parametrize("which", list(IDENTITIES))
@pytest.mark.parametrize("pss", [False, True])
def test_cores_with_certificates(which, pss):
    kind, ident, san = IDENTITIES[which]
    cn = "venus" if which == "dn" else "x"
    a_creds = _creds(CA, "rsa", "a", pss=pss, dns="a.example")
    b_creds = _creds(CA, kind, cn, pss=pss, **san)
    a = IkeCore([peer(A_ADDR, B_ADDR, "b", credentials=a_creds, local_id="a.example",
                      remote_id=ident)], wallclock=lambda: datetime.datetime.now(datetime.UTC))
    b = IkeCore([peer(B_ADDR, A_ADDR, "a", credentials=b_creds, local_id=ident,
                      remote_id="a.example")])
    link = Link(a, b)
    a.initiate("b", 0.0)
    link.run()
    assert len(link.installed(a)) == len(link.installed(b)) == 1, (a.errors, b.errors)
    up = next(e for e in link.events[id(a)] if isinstance(e, IkeSaUp))
    assert up.remote_id == str(b.peers["a"].local_id)


def test_certificate_from_another_ca_is_refused():
    a = IkeCore([peer(A_ADDR, B_ADDR, "b", credentials=_creds(CA, "ecdsa", "a", dns="a.x"),
                      local_id="a.x", remote_id="b.x")])
    bad = OTHER_CA.issue("b", kind="ecdsa", dns="b.x")
    b = IkeCore([peer(B_ADDR, A_ADDR, "a", local_id="b.x", remote_id="a.x",
                      credentials=Credentials(cert=bad[0], key=bad[1], cas=(CA.cert,)))])
    link = Link(a, b)
    a.initiate("b", 0.0)
    link.run()
    assert not link.installed(a)
    assert any(isinstance(e, IkeSaDown) for e in link.events[id(a)])
    # b trusted a and was up for a moment; a's notice made it delete its half.
    assert b.ike_sas() == [] and any(isinstance(e, IkeSaDown) for e in link.events[id(b)])
    assert any("trusted CA" in str(e) for e in a.errors)


def test_identity_not_in_certificate_is_refused():
    a = IkeCore([peer(A_ADDR, B_ADDR, "b", credentials=_creds(CA, "ecdsa", "a", dns="a.x"),
                      local_id="a.x", remote_id=None)])
    # b's certificate says b.x, but b claims to be c.x (its config is checked by us, not it).
    cert, key = CA.issue("b", kind="ecdsa", dns="b.x")
    bcfg = peer(B_ADDR, A_ADDR, "a", local_id="b.x", remote_id="a.x",
                credentials=Credentials(cert=cert, key=key, cas=(CA.cert,)))
    object.__setattr__(bcfg, "local_id", type(bcfg.local_id).parse("c.x"))
    b = IkeCore([bcfg])
    link = Link(a, b)
    a.initiate("b", 0.0)
    link.run()
    assert not link.installed(a)
    assert any("does not vouch" in str(e) for e in a.errors)


@pytest.mark.net
@pytest.mark.parametrize("kind", ["rsa", "ecdsa"])
@pytest.mark.parametrize("we_initiate", [True, False])
def test_certificates_with_charon(lab, kind, we_initiate):
    sw_cert, sw_key = CA.issue("charon", kind=kind, dns="charon.test")
    write_pem(lab.dir / "x509ca" / "ca.pem", CA.cert)
    write_pem(lab.dir / "x509" / "charon.pem", sw_cert)
    write_pem(lab.dir / "private" / "charon.pem", sw_key)
    lab.start_charon(swanctl_conf(auth="pubkey", local_cert="charon.pem"))
    es_cert, es_key = CA.issue("espswitch", kind="ecdsa" if kind == "rsa" else "rsa",
                               dns="espswitch.test")
    creds = Credentials(cert=es_cert, key=es_key, cas=(CA.cert,))

    async def main():
        async with EsSide(lab, es_peer(credentials=creds)) as es:
            if we_initiate:
                es.driver.initiate("sw")
            else:
                from .esside import run_cmd
                out = await run_cmd(lab.swanctl_cmd("--initiate", "--child", "net"))
                assert "successfully" in out, out + lab.log()[-2000:]
            await es.wait(lambda: es.of(ChildSaInstalled), timeout=10)
            assert established(lab) == (1, 1), lab.list_sas()
            assert await es.ping_ok(1)

    asyncio.run(main())
