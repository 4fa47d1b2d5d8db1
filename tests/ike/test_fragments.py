"""IKE fragmentation (RFC 7383): the fragmenter and reassembler, two cores, hostile input."""

from __future__ import annotations

import contextlib
import datetime
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from espswitch.ike import ChildSaInstalled, CoreSettings, Credentials, IkeCore
from espswitch.ike.consts import HEADER_LEN, Encr, Exchange, Flag, Integ, Notify, PayloadType
from espswitch.ike.crypto import SkCipher
from espswitch.ike.errors import ProtocolError
from espswitch.ike.fragment import (
    FragmentLimits,
    Reassembler,
    fragment_message,
    max_message_len,
)
from espswitch.ike.message import (
    Message,
    VendorPayload,
    pack_header,
    parse_header,
    parse_inner,
    parse_message,
)

from .certs import Ca
from .helpers import A_ADDR, B_ADDR, Link, peer

SPI_I, SPI_R = b"\x11" * 8, b"\x22" * 8


def ciphers(kind: str) -> tuple[SkCipher, SkCipher]:
    """The same keys twice: one object seals, the other opens."""
    if kind == "gcm":
        mk = lambda: SkCipher(encr=Encr.AES_GCM_16, enc_key=bytes(range(20)))  # noqa: E731
    else:
        mk = lambda: SkCipher(encr=Encr.AES_CBC, enc_key=bytes(16),  # noqa: E731
                              integ=Integ.HMAC_SHA2_256_128, integ_key=bytes(range(32)))
    return mk(), mk()


def message(sizes: list[int], mid: int = 1) -> Message:
    return Message(spi_i=SPI_I, spi_r=SPI_R, exchange=Exchange.IKE_AUTH, flags=Flag.INITIATOR,
                   mid=mid, encrypted=True,
                   payloads=tuple(VendorPayload(data=bytes([i % 251]) * n)
                                  for i, n in enumerate(sizes)))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 3000), min_size=1, max_size=6), st.integers(200, 1500),
       st.sampled_from(["gcm", "cbc"]), st.randoms(use_true_random=False))
def test_fragments_fit_and_reassemble_in_any_order_with_duplicates(sizes, max_len, kind, rnd):
    tx, rx = ciphers(kind)
    msg = message(sizes)
    frags = fragment_message(msg, tx, max_len)
    if frags is None:  # it fits in one
        assert HEADER_LEN + 4 + tx.sealed_len(sum(4 + n for n in sizes)) <= max_len
        return
    assert all(len(f) <= max_len for f in frags)
    counters: dict[str, int] = {}
    r = Reassembler(FragmentLimits(max_fragments=0xFFFF), counters)
    order = list(frags) + [rnd.choice(frags) for _ in range(rnd.randint(0, 3))]
    rnd.shuffle(order)
    done = None
    delivered = 0
    for f in order:
        delivered += 1
        done = r.add("sa", parse_header(f), f, rx, 0.0)
        if done is not None:
            break
    assert done is not None, counters
    assert counters["fragments_duplicate"] == delivered - len(frags)
    back = parse_inner(parse_header(frags[0]), *done)
    assert back.payloads == msg.payloads
    assert r.held == 0 and len(r) == 0
    assert counters["fragments_reassembled"] == 1


def test_a_message_that_fits_is_not_fragmented():
    tx, _ = ciphers("gcm")
    assert fragment_message(message([100]), tx, 1252) is None
    assert max_message_len(1280, nat_t=False) == 1252
    assert max_message_len(1280, nat_t=True) == 1248


def craft(sk: SkCipher, *, mid: int = 1, num: int, total: int, content: bytes = b"x" * 40,
          first: int = PayloadType.VENDOR, flags: int = Flag.INITIATOR,
          spi_i: bytes = SPI_I, spi_r: bytes = SPI_R) -> bytes:
    """One Encrypted Fragment message, numbered as the caller says (however wrong)."""
    sealed = sk.sealed_len(len(content))
    hdr = pack_header(spi_i=spi_i, spi_r=spi_r, next_payload=PayloadType.SKF,
                      exchange=Exchange.IKE_AUTH, flags=flags, mid=mid,
                      length=HEADER_LEN + 8 + sealed)
    skf = bytes((first, 0)) + (8 + sealed).to_bytes(2, "big") + num.to_bytes(2, "big") + \
        total.to_bytes(2, "big")
    return hdr + skf + sk.seal(hdr + skf, content)


def test_reassembler_refuses_bad_numbering_and_forgeries_without_keeping_anything():
    tx, rx = ciphers("gcm")
    counters: dict[str, int] = {}
    r = Reassembler(FragmentLimits(), counters)
    for num, total in ((0, 1), (3, 2), (1, 0), (1, 65), (65535, 65535)):
        f = craft(tx, num=num, total=total)
        with pytest.raises(ProtocolError):
            r.add("sa", parse_header(f), f, rx, 0.0)
    assert counters["fragments_invalid"] == 5
    good = craft(tx, num=1, total=2)
    forged = good[:-1] + bytes([good[-1] ^ 1])
    with pytest.raises(ProtocolError):
        r.add("sa", parse_header(forged), forged, rx, 0.0)
    assert counters["fragments_forged"] == 1 and r.held == 0 and len(r) == 0
    # A lying length field is malformed, not a crash.
    bad = bytearray(good)
    bad[HEADER_LEN + 2 : HEADER_LEN + 4] = (5).to_bytes(2, "big")
    with pytest.raises(ProtocolError):
        r.add("sa", parse_header(bytes(bad)), bytes(bad), rx, 0.0)


def test_reassembler_bounds_timeout_and_refragmentation():
    tx, rx = ciphers("gcm")
    counters: dict[str, int] = {}
    r = Reassembler(FragmentLimits(max_fragments=8, max_message=1000, max_held=2000,
                                   timeout=30.0), counters)
    big = b"y" * 400

    def add(key, f, now=0.0):
        return r.add(key, parse_header(f), f, rx, now)

    # Per message: 3 x 400 bytes > 1000: the message is dropped.
    assert add("a", craft(tx, num=1, total=4, content=big)) is None
    assert add("a", craft(tx, num=2, total=4, content=big)) is None
    with pytest.raises(ProtocolError):
        add("a", craft(tx, num=3, total=4, content=big))
    assert counters["fragments_over_limit"] == 3 and r.held == 0  # the message's 3
    # Over every message: at most 2000 bytes held, what Python spends beside the content
    # counted too (so 400-byte fragments of 4 messages do not fit).
    kept = 0
    for key in "bcdefg":
        with contextlib.suppress(ProtocolError):
            add(key, craft(tx, num=1, total=2, content=big))
            kept += 1
        assert r.held <= 2000
    assert 1 <= kept < 4 and r.held > kept * 400
    assert counters["fragments_over_limit"] == 3 + 6 - kept
    # Tiny fragments are no way around it.
    for n in range(200):
        with contextlib.suppress(ProtocolError):
            add(f"tiny{n}", craft(tx, num=1, total=2, content=b"t"))
        assert r.held <= 2000
    assert len(r) < 2000 // 300
    # They time out; then there is room again.
    assert r.next_deadline() == 30.0
    r.expire(30.0)
    assert r.held == 0 and len(r) == 0 and counters["fragments_expired"] >= kept
    # Re-fragmented in more pieces (RFC 7383 §2.5.2): the new numbering replaces the old;
    # fragments of the old, smaller total are then stale.
    assert add("h", craft(tx, num=1, total=2, content=b"a")) is None
    assert add("h", craft(tx, num=1, total=3, content=b"A")) is None
    assert add("h", craft(tx, num=2, total=2, content=b"b")) is None
    assert counters["fragments_stale"] == 2  # the one replaced and the late one
    assert add("h", craft(tx, num=3, total=3, content=b"C")) is None
    assert add("h", craft(tx, num=3, total=3, content=b"C")) is None  # duplicate
    assert add("h", craft(tx, num=2, total=3, content=b"B")) == (PayloadType.VENDOR, b"ABC")
    # A fragment of a newer message replaces an unfinished older one.
    assert add("i", craft(tx, mid=5, num=1, total=2)) is None
    assert add("i", craft(tx, mid=6, num=2, total=2, content=b"z")) is None
    assert add("i", craft(tx, mid=6, num=1, total=2, content=b"y")) == (PayloadType.VENDOR,
                                                                         b"yz")


# -- two cores ----------------------------------------------------------------------------

ROOT = Ca("root", rsa_bits=3072)
SUB = Ca("sub", parent=ROOT, rsa_bits=3072)
NOW = datetime.datetime.now(datetime.UTC)


def rsa_creds(name: str) -> Credentials:
    cert, key = SUB.issue(name, kind="rsa", dns=f"{name}.example")
    return Credentials(cert=cert, key=key, cas=(ROOT.cert,), chain=(SUB.cert,))


A_CREDS, B_CREDS = rsa_creds("a"), rsa_creds("b")


def cores(frag_a: bool = True, frag_b: bool = True, size: int = 1280, **settings):
    a = IkeCore([peer(A_ADDR, B_ADDR, "b", credentials=A_CREDS, local_id="a.example",
                      remote_id="b.example", fragmentation=frag_a, fragment_size=size)],
                wallclock=lambda: NOW, settings=CoreSettings(**settings))
    b = IkeCore([peer(B_ADDR, A_ADDR, "a", credentials=B_CREDS, local_id="b.example",
                      remote_id="a.example", fragmentation=frag_b, fragment_size=size)],
                wallclock=lambda: NOW, settings=CoreSettings(**settings))
    return a, b


def test_ike_auth_with_a_certificate_chain_goes_in_fragments_that_fit():
    for size in (1280, 576):
        a, b = cores(size=size)
        link = Link(a, b)
        a.initiate("b", 0.0)
        link.run()
        assert len(link.installed(a)) == len(link.installed(b)) == 1, (a.errors, b.errors)
        init = parse_message(link.wire[0])
        assert init.notify(Notify.IKEV2_FRAGMENTATION_SUPPORTED) is not None
        assert parse_message(link.wire[1]).notify(Notify.IKEV2_FRAGMENTATION_SUPPORTED)
        assert [s.fragmentation for s in a.ike_sas() + b.ike_sas()] == [True, True]
        # Every datagram fits `size` bytes of IPv4 (20) and UDP (8).
        assert max(len(d) for d in link.wire) <= size - 28
        frags = [d for d in link.wire if parse_header(d).next_payload == PayloadType.SKF]
        assert a.counters["fragments_sent"] >= 3 and b.counters["fragments_sent"] >= 2
        assert a.counters["fragments_reassembled"] == b.counters["fragments_reassembled"] == 1
        assert len(frags) == a.counters["fragments_sent"] + b.counters["fragments_sent"]
        # Later exchanges are fragmented only when they do not fit: a rekey fits.
        sent = a.counters["fragments_sent"]
        a.rekey_child("b", 1.0)
        link.run()
        assert a.counters["fragments_sent"] == sent and len(link.installed(a)) == 2


def test_without_the_peers_support_nothing_is_fragmented():
    for fa, fb in ((True, False), (False, True)):
        a, b = cores(frag_a=fa, frag_b=fb)
        link = Link(a, b)
        a.initiate("b", 0.0)
        link.run()
        assert len(link.installed(a)) == 1
        assert a.counters["fragments_sent"] == b.counters["fragments_sent"] == 0
        assert [s.fragmentation for s in a.ike_sas() + b.ike_sas()] == [False, False]
        assert max(len(d) for d in link.wire) > 1252  # left to IP fragmentation
        if not fb:
            assert parse_message(link.wire[1]).notify(
                Notify.IKEV2_FRAGMENTATION_SUPPORTED) is None


def _deliver(src: IkeCore, dst: IkeCore, datagrams, now: float) -> None:
    for d in datagrams:
        dst.receive_datagram(d.data, src=d.src, dst=d.dst, now=now)


def _to_ike_auth(a: IkeCore, b: IkeCore):
    """IKE_SA_INIT delivered both ways; returns a's IKE_AUTH fragments, not delivered."""
    a.initiate("b", 0.0)
    _deliver(a, b, a.datagrams_to_send(), 0.0)
    _deliver(b, a, b.datagrams_to_send(), 0.0)
    frags = a.datagrams_to_send()
    assert len(frags) >= 3
    return frags


@pytest.mark.parametrize("how", ["reversed", "shuffled", "duplicated"])
def test_fragments_out_of_order_or_duplicated(how):
    a, b = cores()
    frags = _to_ike_auth(a, b)
    n = len(frags)
    if how == "reversed":
        frags = frags[::-1]
    elif how == "shuffled":
        random.Random(7).shuffle(frags)
    else:
        frags = [f for f in frags for _ in range(3)]
    _deliver(a, b, frags, 0.1)
    resp = b.datagrams_to_send()
    # The response (fragmented too) went out once, even for the late duplicates.
    assert len(resp) == b.counters["fragments_sent"] >= 2
    _deliver(b, a, resp[::-1], 0.2)
    assert any(isinstance(e, ChildSaInstalled) for e in a.events())
    if how == "duplicated":
        assert b.counters["fragments_duplicate"] == 2 * n
    assert b.counters["responses_resent"] == 0
    assert b.counters["dropped"] == 0 and b._frags.held == 0


def test_a_missing_fragment_comes_with_the_retransmission():
    a, b = cores()
    frags = _to_ike_auth(a, b)
    _deliver(a, b, [f for i, f in enumerate(frags) if i != 1], 0.1)
    assert b.datagrams_to_send() == [] and b._frags.held > 0
    a.on_timer(a.next_deadline())  # retransmits every fragment
    again = a.datagrams_to_send()
    assert len(again) == len(frags) and a.counters["retransmits"] == 1
    _deliver(a, b, again, 2.0)
    assert b.counters["fragments_duplicate"] == len(frags) - 1
    _deliver(b, a, b.datagrams_to_send(), 2.1)
    assert any(isinstance(e, ChildSaInstalled) for e in a.events())


def test_a_retransmitted_request_is_answered_on_its_first_fragment_only():
    a, b = cores()
    frags = _to_ike_auth(a, b)
    _deliver(a, b, frags, 0.1)
    lost = b.datagrams_to_send()  # the response is lost
    a.on_timer(a.next_deadline())
    again = a.datagrams_to_send()
    _deliver(a, b, again[::-1], 2.0)
    resent = b.datagrams_to_send()
    assert [d.data for d in resent] == [d.data for d in lost]  # once, all fragments
    assert b.counters["responses_resent"] == 1
    _deliver(b, a, resent, 2.1)
    assert any(isinstance(e, ChildSaInstalled) for e in a.events())


def test_hostile_fragments_into_a_responder():
    """Forged, misnumbered, oversized, unexpected and unnegotiated fragments: dropped and
    counted; nothing held; the real IKE_AUTH still goes through."""
    a, b = cores(fragments=FragmentLimits(max_fragments=16, max_message=8000,
                                          max_held=16000, timeout=10.0))
    frags = _to_ike_auth(a, b)
    a_sa = a._all_sas()[0]
    sk = a_sa.sk_out  # the initiator's keys: authentic fragments, wrong content
    spis = dict(spi_i=a_sa.spi_i, spi_r=a_sa.spi_r)
    src, dst = frags[0].src, frags[0].dst
    hostile = []
    rnd = random.Random(1)
    # Forged: another ICV, other ciphertext, cut short (lengths made consistent), and
    # datagrams whose lengths lie (not even fragments).
    for f in frags:
        d = f.data
        hostile.append(d[:-3] + b"\x00\x01\x02")
        hostile.append(d[:36] + rnd.randbytes(len(d) - 36))
        cut = len(d) - 20
        short = bytearray(d[:cut])
        short[24:28] = cut.to_bytes(4, "big")
        short[HEADER_LEN + 2 : HEADER_LEN + 4] = (cut - HEADER_LEN).to_bytes(2, "big")
        hostile.append(bytes(short))
        hostile.append(d[: len(d) // 2])
    # Authentic but misnumbered or oversized counts, or for another message ID.
    hostile += [craft(sk, num=n, total=t, **spis) for n, t in ((0, 2), (3, 2), (1, 17),
                                                                 (1, 65535))]
    hostile += [craft(sk, mid=m, num=1, total=2, **spis) for m in (0, 2, 7, 0xFFFFFFFF)]
    # Authentic, too many bytes for one message.
    hostile += [craft(sk, num=n, total=16, content=b"z" * 1000, **spis) for n in range(1, 10)]
    for data in hostile:
        b.receive_datagram(data, src=src, dst=dst, now=0.5)
        assert b._frags.held <= 16000
    assert b.datagrams_to_send() == []
    c = b.counters
    assert c["fragments_forged"] == 3 * len(frags), c
    # All dropped but the first 8 KB of the too-long message, which went with the 9th KB.
    assert c["dropped"] == len(hostile) - 8, c
    assert c["fragments_invalid"] >= 4 and c["fragments_over_limit"] >= 1, c
    assert b._frags.held == 0 and c["fragments_over_limit"] == 9
    _deliver(a, b, frags, 1.0)
    _deliver(b, a, b.datagrams_to_send(), 1.1)
    assert any(isinstance(e, ChildSaInstalled) for e in a.events()), b.errors
    assert b._frags.held == 0 and len(b._frags) == 0
    # Fragments in an SA that did not negotiate fragmentation are dropped.
    x, y = cores(frag_a=False, frag_b=False)
    link = Link(x, y)
    x.initiate("b", 0.0)
    link.run()
    xs = x._all_sas()[0]
    f = craft(xs.sk_out, mid=xs.next_mid, num=1, total=1, spi_i=xs.spi_i, spi_r=xs.spi_r)
    before = y.counters["dropped"]
    y.receive_datagram(f, src=(A_ADDR, 500), dst=(B_ADDR, 500), now=1.0)
    assert y.counters["dropped"] == before + 1
    assert any("not negotiated" in str(e) for e in y.errors)


def test_half_open_fragments_go_with_their_sa():
    """Fragments held for an IKE SA that never completes go when it times out."""
    a, b = cores()
    frags = _to_ike_auth(a, b)
    _deliver(a, b, frags[:1], 0.1)
    assert b._frags.held > 0
    b.on_timer(31.0)  # the half-open SA and the fragment reassembly both time out
    assert b._frags.held == 0 and b.ike_sas() == []


def test_many_half_open_sas_holding_fragments_stay_within_the_budget():
    """20 initiators (one address, other SPIs) each leave the first fragment of their
    IKE_AUTH and go silent: the responder holds at most `max_held` bytes, refuses (counts)
    the rest, and completes a real IKE_AUTH once the abandoned ones time out."""
    limits = FragmentLimits(max_message=6000, max_held=6000, timeout=10.0)
    b = IkeCore([peer(B_ADDR, A_ADDR, "a", credentials=B_CREDS, local_id="b.example",
                      remote_id="a.example")], wallclock=lambda: NOW,
                settings=CoreSettings(fragments=limits, half_open_timeout=30.0))
    for k in range(20):
        a = cores()[0]
        frags = _to_ike_auth(a, b)
        _deliver(a, b, frags[:1], 0.1 * k)
        assert b._frags.held <= 6000
    assert b.counters["fragments_over_limit"] >= 15 and len(b._frags) <= 6
    a = cores()[0]
    frags = _to_ike_auth(a, b)
    b.on_timer(12.0)  # the held fragments time out (the half-open SAs live on)
    assert b._frags.held == 0
    _deliver(a, b, frags, 12.0)
    _deliver(b, a, b.datagrams_to_send(), 12.1)
    assert any(isinstance(e, ChildSaInstalled) for e in a.events()), b.errors


def test_corrupted_copies_of_fragments_never_raise_nor_hold_state():
    """Every fragment of a run is also delivered corrupted (header fields, numbering,
    lengths, content) to both sides: nothing raises, nothing stays held, and the real
    exchange completes."""
    rnd = random.Random(3)
    for _ in range(60):
        a, b = cores(size=rnd.choice((576, 900, 1280)))
        link = Link(a, b)

        def corrupt(data, sender, a=a, b=b, link=link):
            if parse_header(data).next_payload != PayloadType.SKF:
                return False
            target = b if sender is a else a
            buf = bytearray(data)
            for _ in range(rnd.randint(1, 3)):
                pos = rnd.choice([rnd.randrange(len(buf)), *range(16, 36)])
                buf[pos] = rnd.randrange(256)
            if rnd.random() < 0.3:
                buf = buf[: rnd.randrange(len(buf))]
            src, dst = ((A_ADDR, 500), (B_ADDR, 500)) if sender is a else \
                ((B_ADDR, 500), (A_ADDR, 500))
            target.receive_datagram(bytes(buf), src=src, dst=dst, now=link.now)
            return False

        link.drop = corrupt
        a.initiate("b", 0.0)
        link.run()
        link.advance(3.0)
        assert len(link.installed(a)) >= 1, (a.errors, b.errors)
        link.advance(40.0, step=5.0)
        assert a._frags.held == b._frags.held == 0


def test_fragmented_ike_auth_response_with_a_spoofed_init_response_first():
    """A corrupted copy of the IKE_SA_INIT response arrives first and is taken; the real one
    then gets its own IKE_AUTH (§2.4). The responder's fragmented IKE_AUTH response goes to
    the candidate whose keys open its fragments, and that one comes up."""
    for pos in range(40, 300, 13):
        a, b = cores()
        link = Link(a, b)
        state = {"done": False}

        def drop(data, sender, a=a, link=link, state=state, pos=pos):
            if sender is not a and data[18] == 34 and not state["done"]:
                state["done"] = True
                bad = bytearray(data)
                bad[pos % len(bad)] ^= 0x5A
                a.receive_datagram(bytes(bad), src=(B_ADDR, 500), dst=(A_ADDR, 500),
                                   now=link.now)
            return False

        link.drop = drop
        a.initiate("b", 0.0)
        link.run()
        assert [s.state for s in a.ike_sas()] == ["established"], (pos, list(a.errors))
        assert len(link.installed(a)) == len(link.installed(b)) == 1, pos
        assert a.counters["fragments_reassembled"] >= 1 and a._frags.held == 0, pos
