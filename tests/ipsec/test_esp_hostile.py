"""Hostile input into the inbound path: tampering, random bytes, truncation.

Whatever arrives, the engine answers with one of its own drop results and a counter;
nothing of a packet that failed is returned, and no other exception escapes.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from espswitch.ipsec import (
    TRANSFORM_NAMES,
    DropReason,
    EspDrop,
    InboundSA,
    OutboundSA,
    Sad,
    SaParams,
    parse_transform,
)

ALL = [n + esn for n in TRANSFORM_NAMES for esn in ("", "-esn")]
SPI = 0x0000C0DE
SRC, DST = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])
VXLAN_LIKE = bytes(range(256)) * 2


def _params(transform: str, mode: str = "transport") -> SaParams:
    keymat = os.urandom(parse_transform(transform).keymat_len)
    return SaParams(spi=SPI, transform=transform, keymat=keymat, mode=mode,
                    tunnel_src=SRC, tunnel_dst=DST)


def _fresh_sad(params: SaParams) -> tuple[Sad, InboundSA]:
    sad = Sad()
    sa = InboundSA(params)
    sad.add(sa)
    return sad, sa


PACKETS = {}
for _name in ALL:
    _p = _params(_name)
    # seq 1000: flips in the sequence number land on numbers never received.
    PACKETS[_name] = (_p, OutboundSA(_p, seq_start=1000).encrypt(VXLAN_LIKE[:333], 17))


@pytest.mark.parametrize("transform", ALL)
@settings(max_examples=400)
@given(data=st.data())
def test_any_single_bit_flip_fails_and_is_counted(transform: str, data: st.DataObject) -> None:
    params, wire = PACKETS[transform]
    bit = data.draw(st.integers(0, len(wire) * 8 - 1))
    bad = bytearray(wire)
    bad[bit // 8] ^= 0x80 >> (bit % 8)
    sad, sa = _fresh_sad(params)
    with pytest.raises(EspDrop) as err:
        sad.decrypt(bytes(bad))
    reason = err.value.reason
    if bit < 32:  # the SPI: no SA has the flipped one
        assert reason == DropReason.UNKNOWN_SPI and sad.unknown_spi == 1
    else:
        assert reason == DropReason.AUTH_FAILED
        assert sa.counters()["auth_failed"] == 1
    assert sa.packets == 0 and sa.bytes == 0
    # The genuine packet is still accepted afterwards: the failure moved no window.
    assert sad.decrypt(wire)[1:] == (17, VXLAN_LIKE[:333])


@pytest.mark.parametrize("transform", ALL)
def test_every_single_bit_flip_of_one_packet_fails(transform: str) -> None:
    # Exhaustive over the bits of one small packet, complementing the random search above.
    params = _params(transform)
    wire = OutboundSA(params, seq_start=1000).encrypt(b"ping", 1)
    sad, sa = _fresh_sad(params)
    for bit in range(len(wire) * 8):
        bad = bytearray(wire)
        bad[bit // 8] ^= 0x80 >> (bit % 8)
        with pytest.raises(EspDrop):
            sad.decrypt(bytes(bad))
    assert sa.packets == 0
    assert sa.counters()["auth_failed"] + sad.unknown_spi == len(wire) * 8


@pytest.mark.parametrize("transform", ["aes128gcm16", "aes128-sha256", "null-sha256"])
@settings(max_examples=300)
@given(cut=st.integers(0, 400))
def test_truncated_packets_are_malformed_or_fail_authentication(transform: str, cut: int) -> None:
    params, wire = PACKETS[transform]
    sad, sa = _fresh_sad(params)
    with pytest.raises(EspDrop) as err:
        sad.decrypt(wire[: min(cut, len(wire) - 1)])
    assert err.value.reason in (DropReason.MALFORMED, DropReason.AUTH_FAILED)
    assert sa.packets == 0


HOSTILE = st.one_of(
    st.binary(max_size=2000),
    # Valid SPI followed by garbage: gets past the SAD into the SA's checks.
    st.binary(max_size=600).map(lambda b: SPI.to_bytes(4, "big") + b),
    st.binary(max_size=600).map(lambda b: SPI.to_bytes(4, "big") + bytes(4) + b),
)


@pytest.mark.parametrize("transform", ["aes128gcm16-esn", "chacha20poly1305", "aes128-sha1",
                                       "null-sha256"])
@settings(max_examples=2500)
@given(blob=HOSTILE)
def test_random_bytes_only_ever_produce_drop_results(transform: str, blob: bytes) -> None:
    sad, sa = _fresh_sad(PACKETS[transform][0])
    with pytest.raises(EspDrop):
        sad.decrypt(blob)
    assert sa.packets == 0


IPV4_HOSTILE = st.one_of(
    st.binary(max_size=200),
    st.binary(min_size=16, max_size=600).map(
        lambda b: bytes([0x45, 0, 0, 0]) + b[:4] + bytes([64, 50, 0, 0]) + b[4:]),
)


@pytest.mark.parametrize("mode", ["transport", "tunnel"])
@settings(max_examples=1500)
@given(blob=IPV4_HOSTILE)
def test_random_ip_packets_into_unprotect_only_ever_produce_drop_results(
        mode: str, blob: bytes) -> None:
    sa = InboundSA(_params("aes128gcm16", mode))
    with pytest.raises(EspDrop):
        sa.unprotect(blob)
    assert sa.packets == 0


def test_bad_padding_is_counted_and_nothing_is_returned() -> None:
    # A sender that authenticates a wrong padding: the ICV verifies, the trailer does not.
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    params = _params("aes128gcm16")
    key, salt = params.keymat[:16], params.keymat[16:]
    header = SPI.to_bytes(4, "big") + (1).to_bytes(4, "big")
    iv = bytes(8)
    plaintext = b"data" + b"\x09\x09" + b"\x02\x11"  # padding must be 01 02
    wire = header + iv + AESGCM(key).encrypt(salt + iv, plaintext, header)
    sa = InboundSA(params)
    with pytest.raises(EspDrop) as err:
        sa.decrypt(wire)
    assert err.value.reason == DropReason.BAD_PADDING
    assert sa.counters()["bad_padding"] == 1 and sa.packets == 0


def test_a_pad_length_longer_than_the_payload_is_bad_padding() -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    params = _params("aes128gcm16")
    key, salt = params.keymat[:16], params.keymat[16:]
    header = SPI.to_bytes(4, "big") + (1).to_bytes(4, "big")
    wire = header + bytes(8) + AESGCM(key).encrypt(salt + bytes(8), b"\x01\x02\xff\x11", header)
    sa = InboundSA(params)
    with pytest.raises(EspDrop) as err:
        sa.decrypt(wire)
    assert err.value.reason == DropReason.BAD_PADDING
