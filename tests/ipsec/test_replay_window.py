"""Anti-replay window (RFC 4303 §3.4.3 and Appendix A), checked against a plain model."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from espswitch.ipsec import DropReason, EspDrop, InboundSA, IpsecConfigError, OutboundSA, SaParams
from espswitch.ipsec.replay import MAX_WINDOW, ReplayWindow

SIZES = [0, 32, 1024, 65536, MAX_WINDOW]


class ModelWindow:
    """The obvious, slow definition: a set of everything received and the highest one."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.top = 0
        self.seen: set[int] = {0}

    def accept(self, seq: int) -> DropReason | None:
        if seq > self.top:
            self.top = seq
            self.seen.add(seq)
            return None
        if self.size == 0:
            return None
        if self.top - seq >= self.size:
            return DropReason.TOO_OLD
        if seq in self.seen:
            return DropReason.REPLAYED
        self.seen.add(seq)
        return None


def _deltas(size: int) -> st.SearchStrategy[list[int]]:
    # Steps relative to the current top: mostly small, around the window's edge, and jumps.
    edge = max(size, 1)
    return st.lists(
        st.one_of(
            st.integers(-8, 8),
            st.integers(-edge - 3, -edge + 3),
            st.integers(1, 3 * edge + 200),
            st.integers(-3 * edge - 200, 0),
        ),
        min_size=1,
        max_size=300,
    )


@pytest.mark.parametrize("size", SIZES)
@settings(max_examples=60)
@given(data=st.data())
def test_window_agrees_with_the_set_model(size: int, data: st.DataObject) -> None:
    window = ReplayWindow(size)
    model = ModelWindow(size)
    for delta in data.draw(_deltas(size)):
        seq = min(max(model.top + delta, 0), 2**32 - 1)
        verdict = window.check(seq)
        if verdict is None:
            window.update(seq)
        assert verdict == model.accept(seq), f"seq {seq} top {model.top}"
        assert window.top == model.top


@pytest.mark.parametrize("size", [32, 1024, 65536])
@given(order=st.permutations(list(range(1, 33))))
def test_out_of_order_inside_the_window_is_accepted_exactly_once(
        size: int, order: list[int]) -> None:
    window = ReplayWindow(size)
    for seq in order:
        assert window.check(seq) is None
        window.update(seq)
    for seq in order:
        assert window.check(seq) == DropReason.REPLAYED


@pytest.mark.parametrize("size", [32, 1024, 65536, MAX_WINDOW])
def test_a_packet_just_left_of_the_window_is_too_old(size: int) -> None:
    window = ReplayWindow(size)
    top = size + 1000
    window.update(top)
    assert window.check(top - size + 1) is None
    assert window.check(top - size) == DropReason.TOO_OLD
    assert window.check(0) == DropReason.TOO_OLD


def test_sequence_number_zero_is_never_accepted() -> None:
    assert ReplayWindow(1024).check(0) == DropReason.REPLAYED


def test_window_size_zero_accepts_duplicates() -> None:
    window = ReplayWindow(0)
    window.update(5)
    assert window.check(5) is None
    assert window.check(1) is None


@pytest.mark.parametrize("bad", [-1, MAX_WINDOW + 1, 1.5, "64"])
def test_window_sizes_outside_the_range_are_refused(bad: object) -> None:
    with pytest.raises(IpsecConfigError):
        ReplayWindow(bad)  # type: ignore[arg-type]


def test_a_million_packet_window_moves_in_constant_work_per_packet() -> None:
    # 200k in-order packets through a 2^20 window: with a per-packet cost that grew with
    # the window this would take minutes.
    window = ReplayWindow(MAX_WINDOW)
    for seq in range(1, 200_001):
        window.update(seq)
    assert window.check(1) == DropReason.REPLAYED
    assert window.check(200_001) is None


# -- ESN inference (RFC 4303 Appendix A) through real SAs ------------------------------------


def _pair(transform: str, window: int, seq_start: int) -> tuple[OutboundSA, InboundSA]:
    params = SaParams(spi=0x2000, transform=transform, keymat=os.urandom(20),
                      replay_window=window)
    return OutboundSA(params, seq_start=seq_start), InboundSA(params, esn_high=seq_start >> 32)


@pytest.mark.parametrize("window", [32, 1024, 0])
def test_esn_sequences_crossing_2_to_the_32_keep_working(window: int) -> None:
    out, inn = _pair("aes128gcm16-esn", window, 2**32 - 20)
    packets = [(out.seq + 1, out.encrypt(b"p%d" % i, 17)) for i in range(40)]
    assert out.seq > 2**32  # the sender crossed into high half 1
    # Deliver with some reordering around the wrap.
    order = packets[:15] + packets[17:25] + packets[15:17] + packets[25:]
    for seq, wire in order:
        assert inn.decrypt(wire) == (17, b"p%d" % (seq - (2**32 - 20)))
    assert inn.window.top == 2**32 + 19
    if window:
        with pytest.raises(EspDrop) as err:
            inn.decrypt(packets[20][1])
        assert err.value.reason == DropReason.REPLAYED


def test_esn_sender_sends_only_the_low_half_on_the_wire() -> None:
    out, _ = _pair("aes128gcm16-esn", 1024, 2**32 + 7)
    wire = out.encrypt(b"x", 17)
    assert wire[4:8] == (7).to_bytes(4, "big")


def test_without_esn_the_sender_refuses_to_wrap() -> None:
    from espswitch.ipsec import SaRefused

    out, _ = _pair("aes128gcm16", 1024, 2**32 - 2)
    out.encrypt(b"a", 17)
    out.encrypt(b"b", 17)
    with pytest.raises(SaRefused) as err:
        out.encrypt(b"c", 17)
    assert err.value.reason == DropReason.SEQ_EXHAUSTED
    assert out.counters()["seq_exhausted"] == 1
    assert out.seq == 2**32 - 1


def test_with_esn_the_sender_refuses_past_2_to_the_64() -> None:
    from espswitch.ipsec import SaRefused

    out, _ = _pair("aes128gcm16-esn", 1024, 2**64 - 1)
    out.encrypt(b"last", 17)
    with pytest.raises(SaRefused):
        out.encrypt(b"one too many", 17)
