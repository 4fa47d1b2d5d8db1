"""Cookies, INVALID_KE_PAYLOAD, and hostile input into a responder."""

from __future__ import annotations

import os
import random
import struct

from hypothesis import given
from hypothesis import strategies as st

from espswitch.ike import ChildConfig, CoreSettings, IkeCore, IkeSaUp
from espswitch.ike.consts import Notify
from espswitch.ike.crypto import DhKey
from espswitch.ike.message import (
    KePayload,
    Message,
    NoncePayload,
    NotifyPayload,
    SaPayload,
    encode_message,
    parse_message,
)
from espswitch.ike.proposals import parse_proposals

from .helpers import A_ADDR, B_ADDR, Link, pair, peer

SRC, DST = (A_ADDR, 500), (B_ADDR, 500)


def _responder(**settings) -> IkeCore:
    return IkeCore([peer(B_ADDR, A_ADDR, "a")], settings=CoreSettings(**settings))


def _recorded_messages() -> list[tuple[bytes, tuple, tuple]]:
    """Every datagram of a full run (setup, child rekey, IKE rekey, DPD, delete)."""
    a, b, link = pair(children=(ChildConfig(name="c", esp_proposals="aes128-sha256-x25519"),))
    seen: list[tuple[bytes, bool]] = []
    a.initiate("b", 0.0)
    link.drop = lambda data, sender: seen.append((data, sender is a)) and False
    link.run()
    a.rekey_child("b", 1.0)
    link.run()
    a.rekey_ike("b", 2.0)
    link.run()
    link.advance(40.0, step=5.0)
    a.delete_ike("b", 50.0)
    link.run()
    assert b.ike_sas() == []
    return [(d, SRC if from_a else DST, DST if from_a else SRC) for d, from_a in seen]


RECORDED = _recorded_messages()


def test_cookie_demanded_above_threshold_and_initiator_retries():
    a, b, link = pair()
    b.settings = CoreSettings(cookie_threshold=0)
    a.initiate("b", 0.0)
    link.run()
    assert b.counters["cookies_sent"] == 1
    assert len(link.installed(a)) == 1 and len(link.installed(b)) == 1
    # The retried IKE_SA_INIT starts with the COOKIE notify.
    retry = [m for m in link.wire if m[18] == 34 and not m[19] & 0x20][1]
    first = parse_message(retry).payloads[0]
    assert isinstance(first, NotifyPayload) and first.notify == Notify.COOKIE


def test_invalid_ke_payload_retry_with_the_group_asked_for():
    a = IkeCore([peer(A_ADDR, B_ADDR, "b",
                      ike_proposals="aes128gcm16-prfsha256-x25519-ecp256")])
    b = IkeCore([peer(B_ADDR, A_ADDR, "a", ike_proposals="aes128gcm16-prfsha256-ecp256")])
    link = Link(a, b)
    a.initiate("b", 0.0)
    link.run()
    assert len(link.installed(a)) == 1
    inits = [parse_message(m) for m in link.wire if m[18] == 34]
    # request (x25519), INVALID_KE_PAYLOAD(ecp256), request (ecp256), response
    assert inits[0].get(KePayload).group == 31
    assert inits[1].notify(Notify.INVALID_KE_PAYLOAD).data == struct.pack("!H", 19)
    assert inits[2].get(KePayload).group == 19


def test_no_proposal_chosen_is_reported():
    a = IkeCore([peer(A_ADDR, B_ADDR, "b", ike_proposals="aes128gcm16-prfsha256-x25519")])
    b = IkeCore([peer(B_ADDR, A_ADDR, "a", ike_proposals="aes256-sha512-modp3072")])
    link = Link(a, b)
    a.initiate("b", 0.0)
    link.run()
    downs = [e for e in link.events[id(a)] if type(e).__name__ == "IkeSaDown"]
    assert downs and "NO_PROPOSAL_CHOSEN" in downs[0].reason
    assert b.ike_sas() == []


def _init_request(spi: bytes, unknown_critical: bool = False) -> bytes:
    spec = parse_proposals("aes128gcm16-prfsha256-x25519", 1)[0]
    msg = Message(spi_i=spi, spi_r=bytes(8), exchange=34, flags=0x08, mid=0, payloads=(
        SaPayload(proposals=(spec.to_proposal(1, b""),)),
        KePayload(group=31, data=DhKey(31).public), NoncePayload(nonce=os.urandom(32))))
    data = encode_message(msg)
    if unknown_critical:
        # Append an unknown payload type 200 with the critical bit after the Nonce.
        body = bytearray(data)
        off = 28
        while True:
            np, _, plen = struct.unpack_from("!BBH", body, off)
            if np == 0:
                body[off] = 200
                break
            off += plen
        body += b"\x00\x80\x00\x08abcd"
        struct.pack_into("!I", body, 24, len(body))
        data = bytes(body)
    return data


def test_unknown_critical_payload_rejected_and_non_critical_skipped():
    b = _responder()
    b.receive_datagram(_init_request(os.urandom(8), unknown_critical=True), src=SRC, dst=DST,
                       now=0.0)
    (out,) = b.datagrams_to_send()
    assert parse_message(out.data).notify(Notify.UNSUPPORTED_CRITICAL_PAYLOAD) is not None
    assert b.ike_sas() == []
    # The same payload without the critical bit is skipped and the SA proceeds.
    data = bytearray(_init_request(os.urandom(8), unknown_critical=True))
    data[-7] = 0
    b.receive_datagram(bytes(data), src=SRC, dst=DST, now=0.0)
    (out,) = b.datagrams_to_send()
    assert parse_message(out.data).get(KePayload) is not None
    assert len(b.ike_sas()) == 1


def test_spoofed_init_flood_triggers_cookies_and_bounded_memory():
    b = _responder(cookie_threshold=10, max_half_open=50)
    for i in range(3000):
        # Spoofed: each from another source port/SPI (the peer is chosen by address).
        b.receive_datagram(_init_request(struct.pack("!Q", i + 1)), src=(A_ADDR, 1024 + i),
                           dst=DST, now=i * 0.001)
    out = b.datagrams_to_send()
    assert len(b.ike_sas()) == 10  # state only up to the cookie threshold
    assert b.counters["cookies_sent"] == 2990
    cookies = [parse_message(d.data).notify(Notify.COOKIE) for d in out[10:]]
    assert all(c is not None for c in cookies)
    # Half-open SAs time out; the real peer still gets through by returning the cookie.
    b.on_timer(100.0)
    assert b.ike_sas() == []
    a = IkeCore([peer(A_ADDR, B_ADDR, "b")])
    b.settings = CoreSettings(cookie_threshold=0)
    link = Link(a, b)
    link.now = 100.0
    a.initiate("b", 100.0)
    link.run()
    assert any(isinstance(e, IkeSaUp) for e in link.events[id(a)])


@given(st.binary(max_size=600))
def test_random_bytes_never_raise(data):
    b = _responder()
    for port in (500, 4500):
        b.receive_datagram(data, src=(A_ADDR, port), dst=(B_ADDR, port), now=0.0)
        b.receive_datagram(bytes(4) + data, src=(A_ADDR, port), dst=(B_ADDR, port), now=0.0)


@given(st.integers(0, len(RECORDED) - 1), st.lists(
    st.tuples(st.integers(0, 2000), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(0, 3))
def test_mutated_real_messages_never_raise(idx, flips, cut):
    data, src, dst = RECORDED[idx]
    buf = bytearray(data)
    for pos, val in flips:
        buf[pos % len(buf)] = val
    if cut:
        buf = buf[: max(0, len(buf) - cut * 7)]
    b = _responder()
    b.receive_datagram(bytes(buf), src=src, dst=dst, now=0.0)
    b.on_timer(1.0)


def test_mutated_messages_into_a_live_sa_never_raise():
    """Replay a whole recorded run into a fresh responder with random corruption."""
    rnd = random.Random(1)
    ok = 0
    for _ in range(300):
        a, b, link = pair()
        a.initiate("b", 0.0)

        def corrupt(data, sender, b=b, link=link):
            if rnd.random() < 0.3:
                i = rnd.randrange(len(data))
                b.receive_datagram(data[:i] + bytes([rnd.randrange(256)]) + data[i + 1:],
                                   src=SRC, dst=DST, now=link.now)
            return False

        link.drop = corrupt
        link.run()
        link.advance(3.0)
        # Nothing raised; b keeps at most the real SA and one made by a corrupted copy.
        assert len(b.ike_sas()) <= 2
        ok += bool(link.installed(a))
    assert ok > 100  # most runs still come up despite the corrupted copies


def test_unauthenticated_malformed_message_gets_no_answer():
    """A message with the IKE SA's SPIs and the next message ID, malformed outside its SK
    payload (nothing authenticated), is dropped unanswered: answering it (INVALID_SYNTAX)
    would use up the message ID and the real IKE_AUTH would then fail."""
    a, b, link = pair()
    a.initiate("b", 0.0)
    init = a.datagrams_to_send()
    for d in init:
        b.receive_datagram(d.data, src=d.src, dst=d.dst, now=0.0)
    for d in b.datagrams_to_send():
        a.receive_datagram(d.data, src=d.src, dst=d.dst, now=0.0)
    auth = a.datagrams_to_send()
    real = auth[0].data
    forged = real[:16] + bytes([200]) + real[17:]  # first payload: unknown, then garbage
    b.receive_datagram(forged, src=auth[0].src, dst=auth[0].dst, now=0.1)
    assert b.datagrams_to_send() == [] and b.counters["dropped"] == 1
    for d in auth:
        b.receive_datagram(d.data, src=d.src, dst=d.dst, now=0.2)
    link.run()
    assert link.installed(b) and link.installed(a)
