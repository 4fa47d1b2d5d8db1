"""FastLoop, the datapath's poll loop in C, on descriptors that are not fast sources.

What it does with NIC rings and TAPs is checked on real devices in a running espswitchd
(tests/net/test_fast_loop.py); here: an event on a descriptor it does not run comes back
to Python as it arrived, a quiet loop returns at its deadline, a configuration naming a
port outside the tables is refused, and an unconfigured loop refuses to run.
"""

from __future__ import annotations

import os
import select
import time

import pytest

from espswitch.datapath.fast import _fastpath


class Tables:
    """What the loop asks of FastTables: whether the tables are still current."""

    def __init__(self) -> None:
        self.asked = 0

    def current(self) -> bool:
        self.asked += 1
        return True


@pytest.fixture
def loop_and_pipe():
    ep = select.epoll()
    r, w = os.pipe()
    ep.register(r, select.EPOLLIN)
    loop = _fastpath.FastLoop()
    loop.configure(_fastpath.RxTable(), Tables(), ep.fileno(), {}, 0, 0)
    try:
        yield loop, r, w
    finally:
        ep.close()
        os.close(r)
        os.close(w)


def test_an_event_on_a_descriptor_it_does_not_run_comes_back_as_it_arrived(loop_and_pipe):
    loop, r, w = loop_and_pipe
    os.write(w, b"x")
    work = loop.poll(time.monotonic() + 5.0, 32, {})
    assert work == [(r, select.EPOLLIN, None, None)]
    assert loop.fold() == (0, 0, 0, [], [])  # nothing was forwarded


def test_a_quiet_loop_returns_at_its_deadline(loop_and_pipe):
    loop, _r, _w = loop_and_pipe
    t0 = time.monotonic()
    assert loop.poll(t0 + 0.05, 32, {}) == []
    assert time.monotonic() - t0 >= 0.05
    t0 = time.monotonic()
    assert loop.poll(t0 - 1.0, 32, {}) == []  # a deadline already past: one look, no wait


def test_a_source_outside_the_tables_is_refused():
    ep = select.epoll()
    try:
        loop = _fastpath.FastLoop()
        with pytest.raises(ValueError, match="outside the tables"):
            loop.configure(_fastpath.RxTable(), Tables(), ep.fileno(),
                           {5: (_fastpath.LOOP_TAP, 3, 0, None, 65600, True)}, 2, 0)
        with pytest.raises(ValueError, match="unknown source kind"):
            loop.configure(_fastpath.RxTable(), Tables(), ep.fileno(),
                           {5: (99, 0, 0, None, 65600, True)}, 2, 0)
    finally:
        ep.close()


def test_an_unconfigured_loop_refuses_to_run():
    with pytest.raises(ValueError, match="configure"):
        _fastpath.FastLoop().poll(time.monotonic(), 32, {})
