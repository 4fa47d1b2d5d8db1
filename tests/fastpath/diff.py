"""The differential harness: one script of operations run on a Python SA pair and a compiled
SA pair with the same parameters, checking after each step that they agree.

A script is driven by a seeded `random.Random` (hypothesis draws the SA configuration and
the seed), so one example sends hundreds of packets cheaply: valid ones in order, replays,
reordered, mutated, truncated, extended and forged ones, through single calls and
batches, whole IP packets through `protect`/`unprotect` in the SA's mode, timers and
deletions. What must agree: every output byte, every drop reason, every counter, the
lifetime events, the expired state and, at the end, the whole replay window.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass

from espswitch.datapath import fast
from espswitch.ipsec import (
    DropReason,
    EspDrop,
    InboundSA,
    Lifetime,
    OutboundSA,
    SaParams,
    SaRefused,
    parse_transform,
)
from espswitch.packet.checksum import internet_checksum

TRANSFORMS = ("aes128gcm16", "aes192gcm16", "aes256gcm16", "chacha20poly1305",
              "aes128-sha256", "aes256-sha256", "aes128-sha1", "null-sha256")
SRC, DST = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])

STATS: dict[str, int] = {"examples": 0, "frames": 0, "events": 0}
"""What the differential tests compared in this run (printed in the terminal summary)."""

PIPELINES: dict[str, int] = {"rx frames": 0, "tx frames": 0, "tx offload reads": 0}
"""Inputs the pipeline differential tests (test_rx_pipeline, test_tx_pipeline) sent through
both paths in this run."""


@dataclass
class Config:
    """One SA configuration, as hypothesis draws it."""

    transform: str
    esn: bool
    mode: str
    window: int
    seq_start: int
    soft: Lifetime
    hard: Lifetime
    aead_iv_source: bool
    seed: int
    ops: int


def iv_for(iv_len: int):
    """A deterministic IV source for known-answer comparisons (CBC IVs are random)."""
    def source(seq: int) -> bytes:
        return (seq * 0x9E3779B97F4A7C15 & (1 << 64) - 1).to_bytes(8, "big").rjust(iv_len, b"\x5a")
    return source


def ipv4(payload: bytes, proto: int, ident: int = 7) -> bytes:
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000,
                                64, proto, 0, SRC, DST))
    struct.pack_into("!H", hdr, 10, internet_checksum(hdr))
    return bytes(hdr) + payload


def _call(fn, *args):
    """A per-packet call's result, with SaRefused/EspDrop/ValueError turned into values."""
    try:
        return fn(*args)
    except SaRefused as exc:
        return ("refused", exc.reason)
    except EspDrop as exc:
        return ("drop", exc.reason)
    except ValueError as exc:
        return ("value-error", type(exc).__name__)


def same(a: object, b: object, what: str) -> None:
    """The Python engine's result `a` and the compiled one `b` are the same."""
    assert type(a) is type(b), f"{what}: {a!r:.80} vs {b!r:.80}"
    if isinstance(a, DropReason):
        assert a is b, f"{what}: {a!r} vs {b!r}"
    else:
        assert a == b, f"{what}: {a!r:.80} vs {b!r:.80}"


def same_state(py: OutboundSA | InboundSA, fa: OutboundSA | InboundSA, what: str,
               whole_window: bool = False) -> None:
    same(py.counters(), fa.counters(), what + " counters")
    same(py.expired, fa.expired, what + " expired")
    events = py.take_events()
    same(events, fa.take_events(), what + " events")
    STATS["events"] += len(events)
    same(py.lifetime_left(), fa.lifetime_left(), what + " lifetime_left")
    same(py.next_deadline(), fa.next_deadline(), what + " next_deadline")
    if isinstance(py, OutboundSA):
        same(py.seq, fa.seq, what + " seq")
    else:
        same(py.window.top, fa.window.top, what + " window.top")
        same(py.window.size, fa.window.size, what + " window.size")
        if whole_window:
            same(py.window.blocks, list(fa.window.blocks), what + " window.blocks")


def _variant(rng: random.Random, frame: bytes, t_fixed: int) -> bytes:
    """A hostile variant of a valid frame."""
    kind = rng.randrange(7)
    b = bytearray(frame)
    if kind == 0:  # flip one bit anywhere (header, IV, ciphertext or ICV)
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncated, sometimes to almost nothing
        b = b[: rng.randrange(len(b))]
    elif kind == 2:  # extended
        b += rng.randbytes(rng.choice((1, 3, 4, 16, 17)))
    elif kind == 3:  # another sequence number (the ICV then fails, or the window drops it)
        struct.pack_into("!I", b, 4, rng.choice((0, 1, 2, 0xFFFFFFFF, rng.getrandbits(32),
                                                (struct.unpack_from("!I", b, 4)[0]
                                                 + rng.randrange(-70, 70)) & 0xFFFFFFFF)))
    elif kind == 4:  # random bytes with this SA's SPI
        b = b[:4] + rng.randbytes(rng.randrange(0, 2 * t_fixed + 64))
    elif kind == 5:  # the ciphertext of another length: whole blocks removed from the middle
        cut = rng.choice((4, 16, 32))
        if len(b) > t_fixed + cut:
            del b[t_fixed - 8: t_fixed - 8 + cut]
    else:  # the ICV replaced
        b[-4:] = rng.randbytes(4)
    return bytes(b)


def authentic(sa: OutboundSA, seq: int, plaintext: bytes, iv: bytes) -> bytes:
    """An ESP packet with a valid ICV around any `plaintext` (already block-aligned): what
    only a peer holding the key can send, e.g. a broken trailer. Built with the Python
    SA's own crypto objects, without touching its state."""
    t = sa.transform
    hdr = struct.pack("!II", sa.spi, seq & 0xFFFFFFFF)
    if t.aead:
        hdr += iv[:8]
        aad = struct.pack("!III", sa.spi, seq >> 32, seq & 0xFFFFFFFF) if t.esn else hdr[:8]
        return hdr + sa._aead.encrypt(sa._salt + iv[:8], plaintext, aad)
    if t.cipher == "aes-cbc":
        from cryptography.hazmat.primitives.ciphers import Cipher, modes

        enc = Cipher(sa._cipher_key, modes.CBC(iv[:16])).encryptor()
        body = hdr + iv[:16] + enc.update(plaintext) + enc.finalize()
    else:
        body = hdr + plaintext
    return body + sa._icv(body, seq)


def _bad_trailer(rng: random.Random, sa: OutboundSA) -> bytes:
    """An authentic packet whose padding or pad length is wrong (or, rarely, right)."""
    t = sa.transform
    n = rng.randrange(0, 64) * t.block_size + max(t.block_size, 4)
    pt = bytearray(rng.randbytes(n))
    pt[-2] = min(255, rng.choice((n - 1, n - 2, n, 255, rng.randrange(1, 16), 0)))
    if rng.random() < 0.5 and pt[-2] <= n - 2:
        # Right length, one wrong padding byte (or all right when pad is 0).
        pad = pt[-2]
        pt[n - 2 - pad: n - 2] = bytes(range(1, pad + 1))
        if pad:
            pt[n - 2 - rng.randrange(1, pad + 1)] ^= 0x80
    seq = min(sa.seq + 1 + rng.randrange(0, 50), (1 << (64 if t.esn else 32)) - 1)
    return authentic(sa, seq, bytes(pt), rng.randbytes(16))


def _size(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.5:
        return rng.randrange(0, 40)
    if r < 0.8:
        return rng.randrange(0, 1501)
    return rng.choice((0, 1, 2, 3, 4, 13, 14, 15, 16, 17, 1400, 1500))


def make_pairs(cfg: Config):
    """(python outbound, compiled outbound, python inbound, compiled inbound)."""
    name = cfg.transform + ("-esn" if cfg.esn else "")
    t = parse_transform(name)
    rng = random.Random(cfg.seed)
    params = SaParams(spi=rng.getrandbits(32), transform=t,
                      keymat=rng.randbytes(t.keymat_len), mode=cfg.mode,
                      replay_window=cfg.window, soft=cfg.soft, hard=cfg.hard,
                      tunnel_src=SRC, tunnel_dst=DST)
    ivs = iv_for(t.iv_len) if (t.cipher == "aes-cbc" or cfg.aead_iv_source) else None
    po = OutboundSA(params, now=100.0, seq_start=cfg.seq_start, iv_source=ivs)
    fo = fast.make_outbound_sa(params, now=100.0, seq_start=cfg.seq_start, iv_source=ivs,
                               iv_mask=po._iv_mask)
    esn_high = cfg.seq_start >> 32
    pi = InboundSA(params, now=100.0, esn_high=esn_high)
    fi = fast.make_inbound_sa(params, now=100.0, esn_high=esn_high)
    assert fast.is_compiled(fo) and fast.is_compiled(fi)
    return po, fo, pi, fi


def run_script(cfg: Config) -> int:
    """Run one script; return the number of packets compared."""
    rng = random.Random(cfg.seed ^ 0x5EED)
    po, fo, pi, fi = make_pairs(cfg)
    t_fixed = 8 + po.transform.iv_len + po.transform.icv_len
    now = 100.0
    sent: list[bytes] = []      # valid ESP packets, in sequence order
    ip_sent: list[bytes] = []   # protect() outputs
    nxt = 0                     # the next of `sent` to deliver in order
    frames = 0
    ops = ("seal", "seal", "seal", "deliver", "deliver", "deliver", "deliver", "variant",
           "variant", "replay", "reorder", "seal_batch", "open_batch", "protect", "timer",
           "bad_trailer")
    for step in range(cfg.ops):
        op = rng.choice(ops)
        if rng.random() < 0.0005:
            op = "expire"
        what = f"step {step} {op}"
        if op == "seal":
            payload, nh = rng.randbytes(_size(rng)), rng.choice((17, 4, 41, 59, rng.randrange(256)))
            a, b = _call(po.encrypt, payload, nh), _call(fo.encrypt, payload, nh)
            same(a, b, what)
            if type(a) is bytes:
                sent.append(a)
            frames += 1
        elif op == "seal_batch":
            payloads = [rng.randbytes(_size(rng)) for _ in range(rng.randrange(0, 40))]
            nh = rng.choice((17, 4))
            a = []
            for p in payloads:
                r = _call(po.encrypt, p, nh)
                a.append(r[1] if type(r) is tuple else r)
            b = fast.seal_batch(fo, payloads, nh)
            same(a, b, what)
            sent.extend(x for x in a if type(x) is bytes)
            frames += len(payloads)
        elif op in ("deliver", "variant", "replay", "reorder") and sent:
            if op == "deliver" and nxt < len(sent):
                frame = sent[nxt]
                nxt += 1
            elif op == "reorder" and nxt < len(sent):
                j = rng.randrange(nxt, min(len(sent), nxt + 80))
                frame = sent[j]
            else:
                frame = sent[rng.randrange(len(sent))]
            if op == "variant":
                frame = _variant(rng, frame, t_fixed)
            if rng.random() < 0.5:
                a, b = pi.open(frame), fi.open(frame)
            else:
                a, b = _call(pi.decrypt, frame), _call(fi.decrypt, memoryview(frame))
            same(a, b, what)
            frames += 1
        elif op == "bad_trailer":
            frame = _bad_trailer(rng, po)
            same(pi.open(frame), fi.open(frame), what)
            frames += 1
        elif op == "open_batch" and sent:
            batch = []
            for _ in range(rng.randrange(0, 40)):
                if nxt < len(sent) and rng.random() < 0.6:
                    batch.append(sent[nxt])
                    nxt += 1
                else:
                    f = sent[rng.randrange(len(sent))]
                    batch.append(_variant(rng, f, t_fixed) if rng.random() < 0.5 else f)
            same([pi.open(f) for f in batch], fast.open_batch(fi, batch), what)
            frames += len(batch)
        elif op == "protect":
            body = rng.randbytes(_size(rng))
            pkt = ipv4(body, rng.choice((17, 6)), ident=rng.randrange(65536))
            a, b = _call(po.protect, pkt), _call(fo.protect, pkt)
            same(a, b, what)
            if type(a) is bytearray:
                ip_sent.append(bytes(a))
            frames += 1
            if ip_sent:
                f = ip_sent[rng.randrange(len(ip_sent))] if rng.random() < 0.3 else ip_sent[-1]
                if rng.random() < 0.3:
                    f = f[:20] + _variant(rng, f[20:], t_fixed)
                same(_call(pi.unprotect, f), _call(fi.unprotect, f), what + " unprotect")
                frames += 1
        elif op == "timer":
            now += rng.choice((0.5, 3.0, 30.0))
            for sa in (po, fo, pi, fi):
                sa.on_timer(now)
        elif op == "expire":
            for sa in (po, fo) if rng.random() < 0.5 else (pi, fi):
                sa.expire()
        if step % 8 == 0 or op in ("timer", "expire"):
            same_state(po, fo, what + " out")
            same_state(pi, fi, what + " in")
    same_state(po, fo, "end out")
    same_state(pi, fi, "end in", whole_window=True)
    for sa in (po, pi):
        for name, value in sa.counters().items():
            if name not in ("packets", "bytes"):
                STATS[name] = STATS.get(name, 0) + value
    STATS["examples"] += 1
    STATS["frames"] += frames
    return frames
