"""The ESP engine's three stages (reserve/seal/commit, admit/unseal/commit) do exactly what
the fused per-packet paths (`encrypt`, `open`) do: same bytes, same drops, same state."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from espswitch.ipsec import InboundSA, OutboundSA, SaParams, parse_transform
from espswitch.ipsec.errors import DropReason
from espswitch.ipsec.sa import Lifetime

TRANSFORMS = ("aes128gcm16", "aes256gcm16-esn", "chacha20poly1305", "aes128-sha256",
              "aes128-sha1-esn", "null-sha256")


def params(esp: str, window: int = 64, hard: int | None = None) -> SaParams:
    t = parse_transform(esp)
    return SaParams(spi=0x4242, transform=t, keymat=bytes(range(t.keymat_len)),
                    replay_window=window, hard=Lifetime(packets=hard))


def fixed_iv(seq: int) -> bytes:
    return seq.to_bytes(16, "big")


def staged_open(sa: InboundSA, esp: bytes):
    seq = sa.admit(esp)
    if type(seq) is not int:
        return seq
    pt = sa.unseal(esp, seq)
    if type(pt) is not bytes:
        return pt
    return sa.commit(seq, pt)


def state(sa: InboundSA) -> tuple:
    return (sa.counters(), sa.window.top, list(sa.window.blocks), sa.expired)


@settings(max_examples=60, deadline=None)
@given(esp=st.sampled_from(TRANSFORMS),
       ops=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 200), st.integers(0, 99)),
                    max_size=40))
def test_admit_unseal_commit_is_open(esp, ops):
    """Valid packets, replays of earlier ones, flipped bytes and truncations go through
    `open` on one SA and through the three stages on another: identical results."""
    t = parse_transform(esp)
    out = OutboundSA(params(esp), iv_source=None if t.aead else (lambda s: bytes(t.iv_len)))
    fused, staged = InboundSA(params(esp)), InboundSA(params(esp))
    sent: list[bytes] = []
    for kind, size, pick in ops:
        if kind == 0 or not sent:
            pkt = out.encrypt(bytes([size & 0xFF]) * size, 17)
            sent.append(pkt)
        elif kind == 1:
            pkt = sent[pick % len(sent)]  # a replay
        else:
            pkt = bytearray(sent[pick % len(sent)])
            pkt[pick % len(pkt)] ^= 0x5A
            pkt = bytes(pkt[: max(0, len(pkt) - size % 5)])
        assert fused.open(pkt) == staged_open(staged, pkt)
        assert state(fused) == state(staged)


@settings(max_examples=40, deadline=None)
@given(esp=st.sampled_from(TRANSFORMS), sizes=st.lists(st.integers(0, 300), max_size=20),
       hard=st.one_of(st.none(), st.integers(1, 10)))
def test_reserve_seal_commit_is_encrypt(esp, sizes, hard):
    t = parse_transform(esp)
    iv = None if t.aead else fixed_iv
    a = OutboundSA(params(esp, hard=hard), iv_source=(lambda s: fixed_iv(s)[: t.iv_len]) if iv
                   else None)
    b = OutboundSA(params(esp, hard=hard), iv_source=(lambda s: fixed_iv(s)[: t.iv_len]) if iv
                   else None)
    b._iv_mask = a._iv_mask  # the same IVs, so the same bytes
    for n in sizes:
        payload = bytes([n & 0xFF]) * n
        try:
            want = a.encrypt(payload, 17)
        except Exception as e:  # SaRefused
            want = e.reason
        seq = b.reserve()
        if type(seq) is int:
            got = b.seal(seq, payload, 17)
            b.commit(seq, n)
        else:
            got = seq
        assert got == want
        assert (a.counters(), a.seq, a.expired) == (b.counters(), b.seq, b.expired)
        assert a.take_events() == b.take_events()


def test_a_refused_reserve_is_counted_and_returned():
    sa = OutboundSA(params("aes128gcm16", hard=1))
    assert sa.reserve() == 1
    sa.commit(1, 10)
    assert sa.reserve() is DropReason.EXPIRED
    assert sa.counters()["expired"] == 1
