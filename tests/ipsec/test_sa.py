"""Security associations: parameters, modes, lifetimes, counters, and what never leaks."""

from __future__ import annotations

import os
import struct

import pytest

from espswitch.ipsec import (
    DropReason,
    EspDrop,
    InboundSA,
    IpsecConfigError,
    Lifetime,
    LifetimeEvent,
    OutboundSA,
    Sad,
    SaParams,
    SaRefused,
    parse_transform,
)
from espswitch.packet.checksum import internet_checksum

SRC, DST = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])


def _ipv4(payload: bytes, proto: int = 17, flags_frag: int = 0x4000) -> bytes:
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 7, flags_frag,
                                64, proto, 0, SRC, DST))
    struct.pack_into("!H", hdr, 10, internet_checksum(hdr))
    return bytes(hdr) + payload


def _params(transform: str = "aes128gcm16", **kw: object) -> SaParams:
    keymat = os.urandom(parse_transform(transform).keymat_len)
    return SaParams(spi=0x1001, transform=transform, keymat=keymat, **kw)


# -- parameters ------------------------------------------------------------------------------


def test_unknown_transform_names_the_accepted_ones() -> None:
    with pytest.raises(IpsecConfigError, match=r"aes128gcm16.*chacha20poly1305"):
        parse_transform("aes128ccm8")


@pytest.mark.parametrize(("name", "length"), [
    ("aes128gcm16", 20), ("aes256gcm16", 36), ("chacha20poly1305", 36),
    ("aes128-sha256", 48), ("aes256-sha256", 64), ("aes128-sha1", 36), ("null-sha256", 32),
])
def test_keying_material_lengths_follow_the_interface_contract(name: str, length: int) -> None:
    assert parse_transform(name).keymat_len == length
    assert parse_transform(name + "-esn").esn


def test_a_wrong_key_length_says_what_is_needed_and_never_shows_the_key() -> None:
    key = bytes.fromhex("deadbeef" * 4)
    with pytest.raises(IpsecConfigError) as err:
        SaParams(spi=0x1001, transform="aes128gcm16", keymat=key)
    message = str(err.value)
    assert "20 bytes" in message and "16-byte key + 4-byte salt" in message
    assert "deadbeef" not in message.lower()


def test_keys_never_appear_in_reprs() -> None:
    params = _params()
    for obj in (params, OutboundSA(params), InboundSA(params)):
        text = repr(obj) + str(obj)
        assert params.keymat.hex() not in text
        assert params.keymat[:16].hex() not in text


def test_tunnel_mode_protect_needs_outer_addresses() -> None:
    with pytest.raises(ValueError, match="tunnel_src"):
        OutboundSA(_params(mode="tunnel")).protect(_ipv4(b"x" * 8))


def test_a_second_sa_with_the_same_spi_is_refused() -> None:
    sad = Sad()
    sad.add(InboundSA(_params()))
    with pytest.raises(IpsecConfigError, match="already in use"):
        sad.add(InboundSA(_params()))


# -- modes --------------------------------------------------------------------------------------


def test_transport_mode_puts_esp_between_the_ip_header_and_its_payload() -> None:
    params = _params()
    packet = _ipv4(b"u" * 8 + b"vxlan payload")
    wire = OutboundSA(params).protect(packet)
    assert wire[9] == 50
    assert struct.unpack_from("!H", wire, 2)[0] == len(wire)
    assert internet_checksum(bytes(wire[:20])) == 0
    assert wire[12:20] == packet[12:20]
    assert struct.unpack_from("!I", wire, 20)[0] == 0x1001
    assert InboundSA(params).unprotect(wire) == packet


def test_transport_mode_refuses_fragments() -> None:
    with pytest.raises(ValueError, match="fragments"):
        OutboundSA(_params()).protect(_ipv4(b"x" * 16, flags_frag=0x2000))


def test_tunnel_mode_wraps_the_whole_packet_in_a_new_outer_header() -> None:
    params = _params(mode="tunnel", tunnel_src=bytes([10, 0, 0, 1]), tunnel_dst=bytes([10, 0,
                                                                                      0, 2]))
    inner = _ipv4(b"payload", proto=1)
    out = OutboundSA(params)
    wire = out.protect(inner)
    assert wire[9] == 50 and wire[12:16] == bytes([10, 0, 0, 1])
    assert internet_checksum(bytes(wire[:20])) == 0
    assert struct.unpack_from("!H", wire, 6)[0] & 0x4000  # DF: the outer is never fragmented
    assert InboundSA(params).unprotect(wire) == inner
    # The IPv4 identification changes from packet to packet.
    assert out.protect(inner)[4:6] != wire[4:6]


def test_tunnel_mode_drops_a_next_header_that_is_not_ip() -> None:
    params = _params(mode="tunnel", tunnel_src=SRC, tunnel_dst=DST)
    esp = OutboundSA(params).encrypt(b"not an ip packet at all......", 17)
    inbound = InboundSA(params)
    with pytest.raises(EspDrop) as err:
        inbound.unprotect(_ipv4(esp, proto=50))
    assert err.value.reason == DropReason.MALFORMED
    assert inbound.counters()["malformed"] == 1


def test_dummy_packets_are_discarded_and_counted() -> None:
    params = _params()
    inbound = InboundSA(params)
    with pytest.raises(EspDrop) as err:
        inbound.decrypt(OutboundSA(params).encrypt(b"", 59))
    assert err.value.reason == DropReason.DUMMY
    assert inbound.counters()["dummy"] == 1


@pytest.mark.parametrize("transform", ["aes128-sha256", "aes128-sha1"])
def test_cbc_pads_to_the_block_and_uses_a_fresh_random_iv(transform: str) -> None:
    params = _params(transform)
    out = OutboundSA(params)
    a, b = out.encrypt(b"same", 17), out.encrypt(b"same", 17)
    assert a[8:24] != b[8:24]
    icv = parse_transform(transform).icv_len
    assert (len(a) - 8 - 16 - icv) % 16 == 0


def test_aead_iv_never_repeats_within_an_sa() -> None:
    out = OutboundSA(_params("aes256gcm16"))
    ivs = {out.encrypt(b"x", 17)[8:16] for _ in range(1000)}
    assert len(ivs) == 1000


def test_the_same_manual_sa_installed_twice_does_not_reuse_ivs() -> None:
    # A daemon restart with unchanged manual keys starts again at sequence number 1: the
    # IVs (and so the GCM nonces) must still differ, or the key stream repeats.
    params = _params("aes128gcm16")
    first = {OutboundSA(params).encrypt(b"x", 17)[8:16] for _ in range(1)}
    again = {OutboundSA(params).encrypt(b"x", 17)[8:16] for _ in range(1)}
    assert first.isdisjoint(again)


# -- lifetimes -----------------------------------------------------------------------------------


def test_soft_packet_lifetime_yields_one_event_and_hard_expires_the_sa() -> None:
    params = _params(soft=Lifetime(packets=3), hard=Lifetime(packets=5))
    out, inbound = OutboundSA(params), InboundSA(params)
    for i in range(5):
        inbound.decrypt(out.encrypt(b"%d" % i, 17))
    assert out.take_events() == [
        LifetimeEvent(spi=0x1001, direction="out", hard=False, kind="packets"),
        LifetimeEvent(spi=0x1001, direction="out", hard=True, kind="packets"),
    ]
    assert [e.hard for e in inbound.take_events()] == [False, True]
    assert out.take_events() == []
    assert out.expired and inbound.expired
    with pytest.raises(SaRefused) as err:
        out.encrypt(b"six", 17)
    assert err.value.reason == DropReason.EXPIRED
    assert out.counters()["expired"] == 1


def test_an_expired_inbound_sa_drops_and_counts_before_any_crypto() -> None:
    params = _params(hard=Lifetime(packets=1))
    out, inbound = OutboundSA(params, seq_start=1), InboundSA(params)
    first = out.encrypt(b"1", 17)
    later = OutboundSA(params, seq_start=2)
    inbound.decrypt(first)
    with pytest.raises(EspDrop) as err:
        inbound.decrypt(later.encrypt(b"2", 17))
    assert err.value.reason == DropReason.EXPIRED
    assert inbound.counters()["expired"] == 1


def test_byte_lifetimes_count_payload_bytes() -> None:
    params = _params(soft=Lifetime(bytes=1000), hard=Lifetime(bytes=2000))
    out = OutboundSA(params)
    out.encrypt(b"x" * 999, 17)
    assert out.take_events() == []
    out.encrypt(b"x" * 2, 17)
    assert [e.kind for e in out.take_events()] == ["bytes"]
    out.encrypt(b"x" * 1000, 17)
    assert out.expired
    with pytest.raises(SaRefused):
        out.encrypt(b"x", 17)


def test_time_lifetimes_fire_from_the_clock_the_caller_passes() -> None:
    params = _params(soft=Lifetime(seconds=10), hard=Lifetime(seconds=20))
    sa = OutboundSA(params, now=100.0)
    assert sa.next_deadline() == 110.0
    sa.on_timer(105.0)
    assert sa.take_events() == []
    sa.on_timer(110.0)
    assert [(e.hard, e.kind) for e in sa.take_events()] == [(False, "seconds")]
    assert sa.next_deadline() == 120.0
    sa.on_timer(121.0)
    assert sa.expired and sa.next_deadline() is None


def test_lifetime_values_must_be_positive() -> None:
    with pytest.raises(IpsecConfigError):
        Lifetime(packets=0)


def test_counters_name_every_drop_reason() -> None:
    counters = InboundSA(_params()).counters()
    for reason in DropReason:
        assert counters[reason.counter] == 0
    assert counters["packets"] == 0 and counters["bytes"] == 0
