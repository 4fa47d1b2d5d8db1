"""`tap_read`, TapDevice.recv_raw in C: one read a bytes object, as the Python loop."""

from __future__ import annotations

import os
import socket

from espswitch.datapath.fast import _fastpath


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    b.setblocking(False)
    return a, b


def test_each_read_is_one_datagram_whole_and_in_order() -> None:
    a, b = pair()
    sent = [bytes([i]) * (1 + i * 700) for i in range(10)]
    for d in sent:
        a.send(d)
    assert _fastpath.tap_read(b.fileno(), 32, 65600) == sent
    assert _fastpath.tap_read(b.fileno(), 32, 65600) == []  # EAGAIN: nothing more


def test_at_most_limit_reads_and_the_rest_stays_queued() -> None:
    a, b = pair()
    for i in range(5):
        a.send(bytes([i]) * 60)
    assert len(_fastpath.tap_read(b.fileno(), 3, 2048)) == 3
    assert _fastpath.tap_read(b.fileno(), 3, 2048) == [bytes([3]) * 60, bytes([4]) * 60]


def test_a_longer_datagram_is_cut_to_the_size_as_read_cuts_it() -> None:
    a, b = pair()
    a.send(b"x" * 5000)
    a.send(b"y" * 10)
    assert _fastpath.tap_read(b.fileno(), 8, 4096) == [b"x" * 4096, b"y" * 10]


def test_a_closed_or_bad_descriptor_reads_nothing() -> None:
    r, w = os.pipe()
    os.close(w)
    # End of file: every read returns nothing, as the Python loop's readv does.
    assert _fastpath.tap_read(r, 4, 64) == [b""] * 4
    os.close(r)
    assert _fastpath.tap_read(r, 4, 64) == []  # EBADF
