"""The compiled SAs as drop-in replacements: the factory, what the datapath reads from an
SA, published vectors, random CBC IVs, refusals, and what never leaks."""

from __future__ import annotations

import copy
import json
import os
import pickle
import weakref
from pathlib import Path

import pytest

from espswitch.datapath import fast
from espswitch.ipsec import (
    DropReason,
    InboundSA,
    Lifetime,
    LifetimeEvent,
    OutboundSA,
    SaParams,
    SaRefused,
    parse_transform,
)

from .diff import TRANSFORMS

_fastpath = pytest.importorskip("espswitch.datapath.fast._fastpath", reason=fast.REASON)
from espswitch.datapath.fast.sa import CompiledInboundSA, CompiledOutboundSA  # noqa: E402

VECTORS = Path(__file__).resolve().parents[3] / "shared" / "vectors"
KEY = bytes.fromhex("a5" * 20)


def _params(transform: str = "aes128gcm16", **kw: object) -> SaParams:
    t = parse_transform(transform)
    return SaParams(spi=0x1001, transform=t, keymat=os.urandom(t.keymat_len), **kw)


@pytest.mark.parametrize("name", [n + e for n in TRANSFORMS for e in ("", "-esn")])
def test_the_factory_makes_compiled_sas_that_are_the_python_classes_too(name: str) -> None:
    p = _params(name)
    out, inb = fast.make_outbound_sa(p), fast.make_inbound_sa(p)
    assert type(out) is CompiledOutboundSA and type(inb) is CompiledInboundSA
    # vxlanipsec's sa_rows and the SAD tell directions apart with isinstance.
    assert isinstance(out, OutboundSA) and isinstance(inb, InboundSA)
    assert fast.is_compiled(out) and fast.is_compiled(inb)
    assert type(fast.make_outbound_sa(p, fast=False)) is OutboundSA
    assert type(fast.make_inbound_sa(p, fast=False)) is InboundSA
    payload = os.urandom(100)
    assert inb.decrypt(out.encrypt(payload, 17)) == (17, payload)


def test_what_sa_rows_reads_comes_from_the_core() -> None:
    p = _params("aes128gcm16-esn", replay_window=64, hard=Lifetime(packets=10, bytes=10**6))
    out, inb = fast.make_outbound_sa(p, seq_start=(1 << 32) - 2), fast.make_inbound_sa(p)
    for _ in range(4):
        inb.open(out.encrypt(b"x" * 10, 17))
    assert out.seq == (1 << 32) + 1 and inb.window.top == (1 << 32) + 1
    assert inb.window.size == 64
    assert out.counters()["packets"] == 4 and inb.counters()["bytes"] == 40
    assert out.lifetime_left() == {"packets": 6, "bytes": 10**6 - 40}
    assert out._core.seq == out.seq and inb._core.win_top == inb.window.top


@pytest.mark.skipif(not (VECTORS / "gcm-esp.json").exists(), reason="shared vectors missing")
def test_published_gcm_esp_vectors() -> None:
    for case in json.loads((VECTORS / "gcm-esp.json").read_text())["cases"]:
        key = bytes.fromhex(case["key"])
        p = SaParams(spi=int(case["spi"], 16),
                     transform=f"aes{len(key) * 8}gcm16" + ("-esn" if case["esn"] else ""),
                     keymat=key + bytes.fromhex(case["salt"]))
        seq = case["sequence"]
        wire = (bytes.fromhex(case["spi"]) + (seq & 0xFFFFFFFF).to_bytes(4, "big")
                + bytes.fromhex(case["iv"]) + bytes.fromhex(case["ciphertext"])
                + bytes.fromhex(case["icv"]))
        pt = bytes.fromhex(case["esp_plaintext"])
        payload = pt[: len(pt) - 2 - case["pad_length"]]
        iv = bytes.fromhex(case["iv"])
        out = fast.make_outbound_sa(p, seq_start=seq, iv_source=lambda _s, iv=iv: iv)
        assert out.encrypt(payload, case["next_header"]) == wire, case["case"]
        inb = fast.make_inbound_sa(p, esn_high=seq >> 32)
        assert inb.open(wire) == (case["next_header"], payload), case["case"]
        bad = bytearray(wire)
        bad[-1] ^= 1
        assert fast.make_inbound_sa(p, esn_high=seq >> 32).open(bytes(bad)) is \
            DropReason.AUTH_FAILED


@pytest.mark.parametrize("name", ["aes128-sha256", "aes256-sha256-esn", "aes128-sha1"])
def test_random_cbc_ivs_interoperate_with_the_python_engine(name: str) -> None:
    p = _params(name)
    fo, po = fast.make_outbound_sa(p), OutboundSA(p)
    fi, pi = fast.make_inbound_sa(p), InboundSA(p)
    ivs = set()
    for n in (0, 1, 14, 15, 16, 1400):
        payload = os.urandom(n)
        esp = fo.encrypt(payload, 4)
        ivs.add(esp[8:24])
        assert pi.open(esp) == (4, payload)
        assert fi.open(po.encrypt(payload, 4)) == (4, payload)
    assert len(ivs) == 6  # RAND_bytes per packet


def test_refusals_raise_sarefused_and_are_counted_as_in_python() -> None:
    p = _params(hard=Lifetime(packets=3))
    fo, po = fast.make_outbound_sa(p), OutboundSA(p)
    for sa in (fo, po):
        for _ in range(3):
            sa.encrypt(b"", 17)
        with pytest.raises(SaRefused) as err:
            sa.encrypt(b"", 17)
        assert err.value.reason is DropReason.EXPIRED
    assert fo.counters() == po.counters() and fo.counters()["expired"] == 1
    assert fo.take_events() == po.take_events() == [
        LifetimeEvent(spi=0x1001, direction="out", hard=True, kind="packets")]
    assert fast.seal_batch(fo, [b"a", b"b"], 17) == [DropReason.EXPIRED] * 2


def test_a_lifetime_crossed_inside_a_batch_stops_the_rest_as_the_python_engine() -> None:
    p = _params(soft=Lifetime(packets=5, bytes=700), hard=Lifetime(packets=9))
    fo = fast.make_outbound_sa(p)
    po = OutboundSA(p, iv_source=None)
    po._iv_mask = fo._iv_mask
    payloads = [os.urandom(100) for _ in range(12)]
    got = fast.seal_batch(fo, payloads, 17)
    want = []
    for x in payloads:
        try:
            want.append(po.encrypt(x, 17))
        except SaRefused as exc:
            want.append(exc.reason)
    assert got == want and got[9:] == [DropReason.EXPIRED] * 3
    assert fo.take_events() == po.take_events()
    fi, pi = fast.make_inbound_sa(p), InboundSA(p)
    assert fast.open_batch(fi, got[:9]) == [pi.open(x) for x in want[:9]]
    assert fi.take_events() == pi.take_events() and fi.expired and pi.expired


def test_keys_never_show_and_cores_cannot_be_copied() -> None:
    key = bytes.fromhex("5e" * 16) + bytes.fromhex("c0ffee00")
    p = SaParams(spi=0x2002, transform="aes128gcm16", keymat=key)
    out, inb = fast.make_outbound_sa(p), fast.make_inbound_sa(p)
    for obj in (out, inb, out._core, inb._core, inb.window):
        text = repr(obj) + str(obj)
        assert "5e5e" not in text and "c0ffee" not in text
    for obj in (out._core, inb._core):
        with pytest.raises(TypeError):
            pickle.dumps(obj)
        with pytest.raises(TypeError):
            copy.copy(obj)
    with pytest.raises(ValueError) as err:
        _fastpath.SaCore(parse_transform("aes128gcm16"), key[:-1], spi=1, outbound=True)
    assert "5e" not in str(err.value)


def test_an_sa_is_freed_when_dropped_no_reference_cycle() -> None:
    out = fast.make_outbound_sa(_params())
    inb = fast.make_inbound_sa(_params(replay_window=1 << 20))
    refs = [weakref.ref(out), weakref.ref(inb)]
    del out, inb
    # No gc.collect(): the EVP contexts (and key schedules) go at once, by reference count.
    assert [r() for r in refs] == [None, None]


def test_wrong_direction_and_bad_arguments_are_caller_errors() -> None:
    p = _params()
    out, inb = fast.make_outbound_sa(p), fast.make_inbound_sa(p)
    with pytest.raises(TypeError):
        fast.seal_batch(inb, [b""], 17)
    with pytest.raises(TypeError):
        fast.open_batch(out, [b""])
    with pytest.raises(ValueError):
        out.encrypt(b"", 256)
    with pytest.raises(TypeError):
        inb.open("not bytes")
    assert fast.seal_batch(out, [], 17) == [] and fast.open_batch(inb, []) == []


def test_unsupported_transforms_get_the_python_sa() -> None:
    from dataclasses import replace

    t = replace(parse_transform("aes128gcm16"), cipher="aes-ccm")
    assert not fast.supports(t)
    assert fast.supports(parse_transform("chacha20poly1305-esn"))
