"""Known-answer tests: the engine against published ESP vectors.

The vectors live in ../shared/vectors (draft-mcgrew-gcm-test-01 and RFC 8439 §2.8.2).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from espswitch.ipsec import EspDrop, InboundSA, OutboundSA, SaParams

VECTORS = Path(__file__).resolve().parents[3] / "shared" / "vectors"


def _load(name: str) -> dict:
    path = VECTORS / name
    assert path.exists(), f"test vectors missing: {path}"
    return json.loads(path.read_text())


GCM = _load("gcm-esp.json")["cases"]
CHACHA = _load("chacha20poly1305-rfc8439.json")


def _gcm_sa(case: dict) -> SaParams:
    key = bytes.fromhex(case["key"])
    transform = f"aes{len(key) * 8}gcm16" + ("-esn" if case["esn"] else "")
    return SaParams(spi=int(case["spi"], 16), transform=transform,
                    keymat=key + bytes.fromhex(case["salt"]))


def _gcm_wire(case: dict) -> bytes:
    seq = case["sequence"]
    return (bytes.fromhex(case["spi"]) + (seq & 0xFFFFFFFF).to_bytes(4, "big")
            + bytes.fromhex(case["iv"]) + bytes.fromhex(case["ciphertext"])
            + bytes.fromhex(case["icv"]))


def _gcm_payload(case: dict) -> bytes:
    plaintext = bytes.fromhex(case["esp_plaintext"])
    return plaintext[: len(plaintext) - 2 - case["pad_length"]]


def test_all_fourteen_gcm_cases_are_present() -> None:
    assert sorted(c["case"] for c in GCM) == list(range(1, 15))


@pytest.mark.parametrize("case", GCM, ids=lambda c: f"case{c['case']}")
def test_gcm_encrypt_produces_the_published_ciphertext_and_icv(case: dict) -> None:
    iv = bytes.fromhex(case["iv"])
    sa = OutboundSA(_gcm_sa(case), seq_start=case["sequence"], iv_source=lambda seq: iv)
    assert sa.encrypt(_gcm_payload(case), case["next_header"]) == _gcm_wire(case)


@pytest.mark.parametrize("case", GCM, ids=lambda c: f"case{c['case']}")
def test_gcm_decrypt_returns_the_published_plaintext(case: dict) -> None:
    sa = InboundSA(_gcm_sa(case), esn_high=case["sequence"] >> 32)
    next_header, payload = sa.decrypt(_gcm_wire(case))
    assert next_header == case["next_header"]
    assert payload == _gcm_payload(case)
    with pytest.raises(EspDrop) as again:
        sa.decrypt(_gcm_wire(case))
    assert again.value.reason.counter == "replayed"


@pytest.mark.parametrize("case", GCM, ids=lambda c: f"case{c['case']}")
def test_gcm_decrypt_rejects_the_vector_with_one_icv_bit_flipped(case: dict) -> None:
    sa = InboundSA(_gcm_sa(case), esn_high=case["sequence"] >> 32)
    wire = bytearray(_gcm_wire(case))
    wire[-1] ^= 0x01
    with pytest.raises(EspDrop) as err:
        sa.decrypt(bytes(wire))
    assert err.value.reason.counter == "auth_failed"
    # The failed packet did not move the window: the genuine one is still accepted.
    assert sa.decrypt(_gcm_wire(case))[0] == case["next_header"]


def _chacha_sa() -> SaParams:
    aad = bytes.fromhex(CHACHA["aad"])
    return SaParams(spi=int.from_bytes(aad[:4], "big"), transform="chacha20poly1305-esn",
                    keymat=bytes.fromhex(CHACHA["key"]) + bytes.fromhex(CHACHA["salt"]))


def _chacha_seq() -> int:
    return int.from_bytes(bytes.fromhex(CHACHA["aad"])[4:], "big")


def test_chacha20poly1305_rfc8439_example_through_the_engine_aead() -> None:
    # The RFC example's plaintext has no ESP trailer, so it checks the SA's AEAD object,
    # nonce (salt + IV) and AAD layout (SPI, ESN high, ESN low) that the engine builds.
    sa = OutboundSA(_chacha_sa(), seq_start=_chacha_seq())
    nonce = bytes.fromhex(CHACHA["salt"]) + bytes.fromhex(CHACHA["iv"])
    out = sa._aead.encrypt(nonce, bytes.fromhex(CHACHA["plaintext"]),
                           bytes.fromhex(CHACHA["aad"]))
    assert out == bytes.fromhex(CHACHA["ciphertext"]) + bytes.fromhex(CHACHA["tag"])


def test_chacha20poly1305_esp_packet_uses_rfc7634_nonce_and_aad() -> None:
    # Build the ESP packet the engine should emit for the RFC's key, salt, IV and ESN,
    # with the RFC plaintext as payload, and check it against an independent AEAD call.
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    iv = bytes.fromhex(CHACHA["iv"])
    seq = _chacha_seq()
    params = _chacha_sa()
    payload = bytes.fromhex(CHACHA["plaintext"])
    wire = OutboundSA(params, seq_start=seq, iv_source=lambda s: iv).encrypt(payload, 17)
    pad = -(len(payload) + 2) % 4
    trailer = bytes(range(1, pad + 1)) + bytes((pad, 17))
    expected = ChaCha20Poly1305(bytes.fromhex(CHACHA["key"])).encrypt(
        bytes.fromhex(CHACHA["salt"]) + iv, payload + trailer, bytes.fromhex(CHACHA["aad"]))
    assert wire == bytes.fromhex(CHACHA["aad"])[:4] + (seq & 0xFFFFFFFF).to_bytes(4, "big") \
        + iv + expected
    inbound = InboundSA(params, esn_high=seq >> 32)
    assert inbound.decrypt(wire) == (17, payload)
