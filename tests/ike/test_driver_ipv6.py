"""The IKE socket driver over IPv6, on real sockets in a network namespace: two addresses on
its loopback, an `IkeDriver` on each (asyncio), and espswitchd's way (`IkeSockets` bound to
the IPv6 wildcard, learning each datagram's destination with IPV6_RECVPKTINFO and answering
from it with IPV6_PKTINFO)."""

from __future__ import annotations

import asyncio
import os
import select
import socket
import time
import uuid

import pytest

from espswitch.ike import ChildSaInstalled, Credentials, IkeCore, IkeSaUp, PeerConfig
from espswitch.ike.driver import IkeDriver, IkeSockets, bind_udp, bind_wildcard

from .strongswan import in_netns, sh

A6, B6 = "2001:db8:77::1", "2001:db8:77::2"
PSK = b"driver-ipv6-test-psk"


@pytest.fixture
def ns():
    """A namespace whose loopback holds A6 and B6; deleted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    name = f"ike6-{uuid.uuid4().hex[:8]}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "link", "set", "lo", "up", ns=name)
        for addr in (A6, B6):
            sh("ip", "addr", "add", f"{addr}/128", "dev", "lo", "nodad", ns=name)
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


def peer(local: str, remote: str, name: str) -> PeerConfig:
    return PeerConfig(name=name, local_addr=local, remote_addr=remote,
                      credentials=Credentials(psk=PSK))


def test_two_drivers_on_ipv6_addresses_set_up_sas_and_carry_esp_in_udp(ns):
    with in_netns(ns):
        socks = {addr: {p: bind_udp(addr, p) for p in (500, 4500)} for addr in (A6, B6)}
    esp_seen: list[tuple[bytes, tuple[str, int]]] = []

    async def main() -> tuple[list, list]:
        a = IkeDriver(IkeCore([peer(A6, B6, "b")]), A6, sockets=socks[A6])
        b = IkeDriver(IkeCore([peer(B6, A6, "a")]), B6, sockets=socks[B6],
                      on_esp=lambda data, src: esp_seen.append((data, src)))
        await a.start()
        await b.start()
        try:
            a.initiate("b")
            got_a, got_b = [], []
            deadline = time.monotonic() + 10
            while not (any(isinstance(e, ChildSaInstalled) for e in got_a)
                       and any(isinstance(e, ChildSaInstalled) for e in got_b)):
                assert time.monotonic() < deadline, (got_a, got_b, a.core.errors)
                for q, got in ((a.events, got_a), (b.events, got_b)):
                    while not q.empty():
                        got.append(q.get_nowait())
                await asyncio.sleep(0.01)
            # ESP in UDP from A's 4500 reaches B's ESP callback with A's address.
            a.send_esp(b"\x00\x00\x10\x01" + bytes(20), (B6, 4500))
            deadline = time.monotonic() + 5
            while not esp_seen:
                assert time.monotonic() < deadline, "no ESP arrived on B's port 4500"
                await asyncio.sleep(0.01)
            return got_a, got_b
        finally:
            a.close()
            b.close()

    got_a, got_b = asyncio.run(main())
    (up,) = [e for e in got_a if isinstance(e, IkeSaUp)]
    assert (up.local_addr, up.remote_addr, up.nat) == ((A6, 500), (B6, 500), False)
    (child,) = [e for e in got_b if isinstance(e, ChildSaInstalled)]
    assert child.local_addr == (B6, 500) and child.remote_addr == (A6, 500)
    assert esp_seen[0][1] == (A6, 4500)


def test_wildcard_sockets_learn_the_ipv6_destination_and_answer_from_it(ns):
    """espswitchd's sockets: bound to [::]:500 and 4500, IPv6 only; the responder learns
    that the request was for B6 and answers from B6 (the initiator sees nothing else)."""
    with in_netns(ns):
        wild = IkeSockets(bind=bind_wildcard)
        wild.open(family=socket.AF_INET6)
        # An IPv4 socket of the same ports binds too: IPV6_V6ONLY keeps the families apart.
        wild.open(family=socket.AF_INET)
        one = IkeSockets(bind=lambda port, _family: bind_udp(A6, port))
        one.open(family=socket.AF_INET6)
    assert wild.families() == {socket.AF_INET, socket.AF_INET6}
    try:
        a, b = IkeCore([peer(A6, B6, "b")]), IkeCore([peer(B6, A6, "a")])
        seen_by_a, seen_by_b = [], []
        a.initiate("b", 0.0)
        deadline = time.monotonic() + 10
        while not (a.ike_sas() and a.ike_sas()[0].children and b.ike_sas()
                   and b.ike_sas()[0].children):
            assert time.monotonic() < deadline, (a.errors, b.errors)
            assert one.send(a.datagrams_to_send()) == []
            assert wild.send(b.datagrams_to_send()) == []
            fds = [s for io in (one, wild) for s in io.sockets.values()]
            select.select(fds, [], [], 0.05)
            for io, core, seen in ((one, a, seen_by_a), (wild, b, seen_by_b)):
                for key in list(io.sockets):
                    for data, src, dst in io.received(key):
                        seen.append((src, dst))
                        core.receive_datagram(data, src=src, dst=dst, now=0.0)
        assert seen_by_b and all(src[0] == A6 and dst == (B6, 500) for src, dst in seen_by_b)
        assert seen_by_a and all(src == (B6, 500) for src, _ in seen_by_a)
    finally:
        wild.close()
        one.close()
    assert wild.sockets == {} and one.sockets == {}
