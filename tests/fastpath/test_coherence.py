"""One SA, one state: the Python engine's own per-packet code, the compiled single calls
and the batches, interleaved on the same SA (and from several threads), give what one
Python SA gives for the same packets."""

from __future__ import annotations

import os
import random
import threading

import pytest

from espswitch.datapath import fast
from espswitch.ipsec import InboundSA, OutboundSA, SaParams, SaRefused, parse_transform

from .diff import TRANSFORMS, iv_for


def _slow_seal(sa: OutboundSA):
    # The Python engine's own per-packet method, run on the compiled SA's state.
    fn = OutboundSA._seal_aead if sa.transform.aead else OutboundSA._seal_hmac
    return lambda payload, nh: fn(sa, payload, nh)


def _slow_open(sa: InboundSA):
    fn = InboundSA._open_aead if sa.transform.aead else InboundSA._open_hmac
    return lambda esp: fn(sa, esp)


@pytest.mark.parametrize("name", [n + e for n in TRANSFORMS for e in ("", "-esn")])
def test_slow_single_and_batch_paths_interleave_on_one_sa(name: str) -> None:
    rng = random.Random(name)
    t = parse_transform(name)
    p = SaParams(spi=0x3003, transform=t, keymat=rng.randbytes(t.keymat_len), replay_window=64)
    ivs = iv_for(t.iv_len) if t.cipher == "aes-cbc" else None
    start = (1 << 32) - 40 if t.esn else 1
    ref_out = OutboundSA(p, seq_start=start, iv_source=ivs)
    fo = fast.make_outbound_sa(p, seq_start=start, iv_source=ivs, iv_mask=ref_out._iv_mask)
    ref_in, fi = InboundSA(p), fast.make_inbound_sa(p)
    slow_seal, slow_open = _slow_seal(fo), _slow_open(fi)
    sent: list[bytes] = []
    for step in range(300):
        payloads = [rng.randbytes(rng.randrange(0, 300)) for _ in range(rng.randrange(1, 6))]
        want = [ref_out.encrypt(x, 17) for x in payloads]
        way = step % 3
        if way == 0:
            got = [slow_seal(x, 17) for x in payloads]
        elif way == 1:
            got = [fo.encrypt(x, 17) for x in payloads]
        else:
            got = fast.seal_batch(fo, payloads, 17)
        assert got == want, step
        sent.extend(want)
        # Deliver in a shuffled window of recent packets, with replays, by another path.
        batch = sent[-8:]
        rng.shuffle(batch)
        want_in = [ref_in.open(x) for x in batch]
        way = rng.randrange(3)
        if way == 0:
            got_in = [slow_open(x) for x in batch]
        elif way == 1:
            got_in = [fi.open(x) for x in batch]
        else:
            got_in = fast.open_batch(fi, batch)
        assert got_in == want_in, step
    assert fo.seq == ref_out.seq and fo.counters() == ref_out.counters()
    assert fi.counters() == ref_in.counters()
    assert fi.window.top == ref_in.window.top and list(fi.window.blocks) == ref_in.window.blocks


def test_threads_sealing_with_one_sa_never_reuse_a_sequence_number() -> None:
    p = SaParams(spi=0x4004, transform="aes128gcm16", keymat=os.urandom(20))
    out = fast.make_outbound_sa(p)
    results: list[list[bytes]] = [[] for _ in range(4)]

    def worker(k: int) -> None:
        for _ in range(200):
            if k % 2:
                results[k].extend(fast.seal_batch(out, [b"p" * 64] * 16, 17))
            else:
                results[k].append(out.encrypt(b"q" * 64, 17))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    packets = [x for r in results for x in r]
    seqs = {int.from_bytes(x[4:8], "big") for x in packets}
    assert len(packets) == 2 * 200 * 16 + 2 * 200 == len(seqs) == out.seq
    assert seqs == set(range(1, out.seq + 1))


def test_threads_opening_the_same_packets_accept_each_exactly_once() -> None:
    p = SaParams(spi=0x5005, transform="aes256gcm16-esn", keymat=os.urandom(36),
                 replay_window=4096)
    out = OutboundSA(p, seq_start=(1 << 32) - 1000)
    inb = fast.make_inbound_sa(p)
    packets = [out.encrypt(os.urandom(40), 17) for _ in range(3000)]
    accepted = [0] * 4

    def worker(k: int) -> None:
        for i in range(0, len(packets), 32):
            chunk = packets[i: i + 32]
            res = fast.open_batch(inb, chunk) if k % 2 else [inb.open(x) for x in chunk]
            accepted[k] += sum(type(r) is tuple for r in res)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    c = inb.counters()
    assert sum(accepted) == 3000 == c["packets"]
    assert c["replayed"] + c["too_old"] == 3 * 3000
    assert inb.window.top == out.seq


def test_expiry_from_the_slow_path_stops_the_fast_path() -> None:
    p = SaParams(spi=0x6006, transform="chacha20poly1305", keymat=os.urandom(36))
    out, inb = fast.make_outbound_sa(p), fast.make_inbound_sa(p)
    esp = out.encrypt(b"x", 17)
    out.expire()
    inb.expire()
    with pytest.raises(SaRefused):
        out.encrypt(b"x", 17)
    assert fast.open_batch(inb, [esp]) == [inb.open(esp)] and inb.counters()["expired"] == 2
