"""Sequence-number marks of manually keyed SAs: where a restarted SA starts."""

from __future__ import annotations

from espswitch.datapath.protection import MAX_MARKS, SEQ_RESERVE, SeqMarks
from espswitch.ipsec import OutboundSA, SaParams, parse_transform


def params(spi: int = 0x1001, esp: str = "aes128gcm16") -> SaParams:
    t = parse_transform(esp)
    return SaParams(spi=spi, transform=t, keymat=bytes(t.keymat_len))


def send(sa: OutboundSA, n: int) -> None:
    for _ in range(n):
        sa.encrypt(b"x" * 10, 17)


def test_an_sa_installed_again_starts_past_everything_it_sent():
    marks = SeqMarks()
    assert marks.start_for("192.0.2.2", params()) == 1
    sa = OutboundSA(params(), seq_start=1)
    marks.track("192.0.2.2", sa)
    assert marks.dirty
    send(sa, 1000)
    again = OutboundSA(params(), seq_start=marks.start_for("192.0.2.2", params()))
    assert again.seq + 1 > 1000
    assert again.seq + 1 == 1 + SEQ_RESERVE


def test_the_reservation_moves_ahead_before_it_runs_out():
    marks = SeqMarks()
    sa = OutboundSA(params(), seq_start=1)
    marks.track("192.0.2.2", sa)
    first = marks.marks[("192.0.2.2", 0x1001, "aes128gcm16")]
    marks.dirty = False
    sa.seq = first - SEQ_RESERVE // 2 + 10  # past half of the reservation
    marks.track("192.0.2.2", sa)
    assert marks.dirty
    assert marks.marks[("192.0.2.2", 0x1001, "aes128gcm16")] == sa.seq + 1 + SEQ_RESERVE


def test_another_spi_transform_or_peer_starts_at_one():
    marks = SeqMarks({("192.0.2.2", 0x1001, "aes128gcm16"): 5000})
    assert marks.start_for("192.0.2.2", params()) == 5000
    assert marks.start_for("192.0.2.2", params(spi=0x1002)) == 1
    assert marks.start_for("192.0.2.2", params(esp="aes256gcm16")) == 1
    assert marks.start_for("192.0.2.3", params()) == 1


def test_a_mark_past_the_sequence_space_still_gives_a_valid_start():
    marks = SeqMarks({("192.0.2.2", 0x1001, "aes128gcm16"): 2**32 + 5})
    start = marks.start_for("192.0.2.2", params())
    assert start == 2**32 - 1
    OutboundSA(params(), seq_start=start)  # accepted; it can send one packet


def test_changing_the_spi_and_back_continues_past_what_the_first_sa_sent():
    """Issue 9 D2: spi_out 0x1001 -> 0x1003 -> 0x1001 must not restart 0x1001 at 1."""
    marks = SeqMarks()
    first = OutboundSA(params(), seq_start=marks.start_for("192.0.2.2", params()))
    marks.track("192.0.2.2", first)
    send(first, 5000)
    other = OutboundSA(params(spi=0x1003), seq_start=marks.start_for("192.0.2.2",
                                                                     params(spi=0x1003)))
    marks.track("192.0.2.2", other)
    assert other.seq == 0
    back = OutboundSA(params(), seq_start=marks.start_for("192.0.2.2", params()))
    assert back.seq >= 5000
    # ... and a mark never moves backwards, whatever SA object reports to it.
    marks.track("192.0.2.2", OutboundSA(params(), seq_start=1))
    assert marks.start_for("192.0.2.2", params()) > 5000


def test_marks_are_bounded_and_forget_the_least_recently_used():
    marks = SeqMarks()
    for spi in range(256, 256 + MAX_MARKS + 10):
        marks.track("192.0.2.2", OutboundSA(params(spi=spi)))
    assert len(marks.marks) == MAX_MARKS
    assert marks.start_for("192.0.2.2", params(spi=256)) == 1
    assert marks.start_for("192.0.2.2", params(spi=256 + MAX_MARKS + 9)) > 1


def test_a_new_key_under_the_same_spi_continues_past_the_old_sequence_numbers():
    """A re-key in place (same SPI and transform, new key): the peer's SA keeps its
    window only if it is not re-keyed too, so never going back is the safe choice."""
    marks = SeqMarks()
    old = OutboundSA(params(), seq_start=marks.start_for("192.0.2.2", params()))
    marks.track("192.0.2.2", old)
    send(old, 300)
    t = parse_transform("aes128gcm16")
    rekeyed = SaParams(spi=0x1001, transform=t, keymat=bytes(range(1, t.keymat_len + 1)))
    assert marks.start_for("192.0.2.2", rekeyed) > 300
