"""espswitch's IKEv2 against strongSwan 5.9 (charon + kernel-libipsec) in a namespace."""

from __future__ import annotations

import asyncio
import re

import pytest

from espswitch.ike import ChildSaDeleted, ChildSaInstalled, IkeSaDown, IkeSaUp

from .esside import EsSide, es_peer, run_cmd
from .strongswan import swanctl_conf

pytestmark = pytest.mark.net

IKE_PROPOSALS = ["aes128gcm16-prfsha256-x25519", "aes256gcm16-prfsha384-ecp384",
                 "aes128-sha256-modp2048", "chacha20poly1305-prfsha256-x25519"]


def established(lab) -> tuple[int, int]:
    """(IKE SAs ESTABLISHED, CHILD_SAs INSTALLED) in charon's --list-sas."""
    out = lab.list_sas()
    return out.count("ESTABLISHED"), len(re.findall(r"\bINSTALLED\b", out))


@pytest.mark.parametrize("ike", IKE_PROPOSALS)
def test_espswitch_initiates(lab, ike):
    lab.start_charon(swanctl_conf(ike=ike))

    async def main():
        async with EsSide(lab, es_peer(ike_proposals=ike)) as es:
            es.driver.initiate("sw")
            await es.wait(lambda: es.of(ChildSaInstalled))
            assert es.of(IkeSaUp)[0].nat  # encap forced: IKE moved to 4500
            assert es.of(ChildSaInstalled)[0].remote_addr == ("192.0.2.2", 4500)
            assert established(lab) == (1, 1), lab.list_sas()

    asyncio.run(main())


@pytest.mark.parametrize("ike", IKE_PROPOSALS)
def test_charon_initiates(lab, ike):
    lab.start_charon(swanctl_conf(ike=ike))

    async def main():
        async with EsSide(lab, es_peer(ike_proposals=ike, encap=False)) as es:
            out = await run_cmd(lab.swanctl_cmd("--initiate", "--child", "net"))
            assert "initiate completed successfully" in out, out + lab.log()[-3000:]
            await es.wait(lambda: es.of(ChildSaInstalled))
            assert not es.of(IkeSaUp)[0].initiator
            assert established(lab) == (1, 1), lab.list_sas()

    asyncio.run(main())


def test_traffic_rekeys_and_deletes(lab):
    """ICMP through the CHILD_SA; CHILD_SA and IKE SA rekeys from both sides keep it
    flowing on the new SAs; deletes from either side are honoured."""
    lab.start_charon(swanctl_conf())

    async def main():
        async with EsSide(lab, es_peer()) as es:
            es.driver.initiate("sw")
            await es.wait(lambda: es.of(ChildSaInstalled))
            first = es.of(ChildSaInstalled)[0]
            assert await es.ping_ok(1), lab.log()[-3000:]
            assert es.esp_in_by_spi[first.spi_in] >= 1

            # Our CHILD_SA rekey.
            es.driver.rekey_child("sw")
            await es.wait(lambda: len(es.of(ChildSaInstalled)) == 2 and es.of(ChildSaDeleted))
            second = es.of(ChildSaInstalled)[1]
            assert second.rekey_of == first.spi_in and second.spi_in != first.spi_in
            assert await es.ping_ok(2)
            assert es.esp_in_by_spi.get(second.spi_in, 0) >= 1

            # charon's CHILD_SA rekey.
            out = await run_cmd(lab.swanctl_cmd("--rekey", "--child", "net"))
            assert "rekey completed successfully" in out, out
            await es.wait(lambda: len(es.of(ChildSaInstalled)) == 3
                          and len(es.of(ChildSaDeleted)) == 2)
            third = es.of(ChildSaInstalled)[2]
            assert third.rekey_of == second.spi_in
            assert await es.ping_ok(3)
            assert es.esp_in_by_spi.get(third.spi_in, 0) >= 1

            # Our IKE SA rekey, then charon's: the CHILD_SA survives both.
            es.driver.rekey_ike("sw")
            await es.wait(lambda: len(es.of(IkeSaUp)) == 2 and es.of(IkeSaDown))
            assert es.of(IkeSaDown)[0].reason == "rekeyed"
            out = await run_cmd(lab.swanctl_cmd("--rekey", "--ike", "es"))
            assert "rekey completed successfully" in out, out
            await es.wait(lambda: len(es.of(IkeSaUp)) == 3 and len(es.of(IkeSaDown)) == 2)
            assert established(lab) == (1, 1), lab.list_sas()
            assert await es.ping_ok(4)
            # A CHILD_SA rekey on the rekeyed IKE SA still works.
            es.driver.rekey_child("sw")
            await es.wait(lambda: len(es.of(ChildSaInstalled)) == 4)
            assert await es.ping_ok(5)

            # charon deletes the CHILD_SA; then we delete the IKE SA.
            n_del = len(es.of(ChildSaDeleted))
            out = await run_cmd(lab.swanctl_cmd("--terminate", "--child", "net"))
            await es.wait(lambda: len(es.of(ChildSaDeleted)) > n_del)
            assert es.of(ChildSaDeleted)[-1].reason == "deleted by peer"
            assert established(lab) == (1, 0), lab.list_sas()
            es.driver.delete_ike("sw")
            await es.wait(lambda: len(es.of(IkeSaDown)) == 3)
            await asyncio.sleep(0.2)
            assert established(lab) == (0, 0), lab.list_sas()
            assert es.core.ike_sas() == []

    asyncio.run(main())


def test_charon_deletes_ike_sa(lab):
    lab.start_charon(swanctl_conf())

    async def main():
        async with EsSide(lab, es_peer()) as es:
            es.driver.initiate("sw")
            await es.wait(lambda: es.of(ChildSaInstalled))
            await run_cmd(lab.swanctl_cmd("--terminate", "--ike", "es"))
            await es.wait(lambda: es.of(IkeSaDown))
            assert es.of(IkeSaDown)[0].reason == "deleted by peer"
            assert es.of(ChildSaDeleted)
            assert es.core.ike_sas() == []

    asyncio.run(main())


def test_dead_peer_detected(lab):
    lab.start_charon(swanctl_conf())

    async def main():
        peer = es_peer(dpd_delay=1.0, retransmit_timeout=0.5, retransmit_base=1.5,
                       retransmit_tries=3)
        async with EsSide(lab, peer) as es:
            es.driver.initiate("sw")
            await es.wait(lambda: es.of(ChildSaInstalled))
            await asyncio.sleep(1.5)  # a liveness check that is answered
            assert not es.of(IkeSaDown)
            lab.kill_charon()
            await es.wait(lambda: es.of(IkeSaDown), timeout=10)
            assert "dead" in es.of(IkeSaDown)[0].reason
            assert es.of(ChildSaDeleted)

    asyncio.run(main())
