"""Sequence-number marks of manually keyed SAs: where a restarted SA starts."""

from __future__ import annotations

from espswitch.datapath.vxlanipsec import SEQ_RESERVE, SeqMarks
from espswitch.ipsec import OutboundSA, SaParams, parse_transform


def params(spi: int = 0x1001, esp: str = "aes128gcm16") -> SaParams:
    t = parse_transform(esp)
    return SaParams(spi=spi, transform=t, keymat=bytes(t.keymat_len))


def send(sa: OutboundSA, n: int) -> None:
    for _ in range(n):
        sa.encrypt(b"x" * 10, 17)


def test_an_sa_installed_again_starts_past_everything_it_sent():
    marks = SeqMarks()
    assert marks.start_for("tun0", params()) == 1
    sa = OutboundSA(params(), seq_start=1)
    marks.track("tun0", sa)
    assert marks.dirty
    send(sa, 1000)
    again = OutboundSA(params(), seq_start=marks.start_for("tun0", params()))
    assert again.seq + 1 > 1000
    assert again.seq + 1 == 1 + SEQ_RESERVE


def test_the_reservation_moves_ahead_before_it_runs_out():
    marks = SeqMarks()
    sa = OutboundSA(params(), seq_start=1)
    marks.track("tun0", sa)
    first = marks.marks["tun0"][2]
    marks.dirty = False
    sa.seq = first - SEQ_RESERVE // 2 + 10  # past half of the reservation
    marks.track("tun0", sa)
    assert marks.dirty and marks.marks["tun0"][2] == sa.seq + 1 + SEQ_RESERVE


def test_another_spi_or_transform_starts_at_one():
    marks = SeqMarks({"tun0": (0x1001, "aes128gcm16", 5000)})
    assert marks.start_for("tun0", params()) == 5000
    assert marks.start_for("tun0", params(spi=0x1002)) == 1
    assert marks.start_for("tun0", params(esp="aes256gcm16")) == 1
    assert marks.start_for("tun1", params()) == 1


def test_a_mark_past_the_sequence_space_still_gives_a_valid_start():
    marks = SeqMarks({"tun0": (0x1001, "aes128gcm16", 2**32 + 5)})
    start = marks.start_for("tun0", params())
    assert start == 2**32 - 1
    OutboundSA(params(), seq_start=start)  # accepted; it can send one packet
