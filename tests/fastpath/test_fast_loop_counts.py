"""FastLoop counts the batches the pipelines take whole itself, in C (issue 10).

A batch of hits only, all written clean to installed outputs, builds no Python result: the
loop adds its port counters and MAC ages to arrays that `FastTables.fold` adds to the
ports and bridges later. Everything else comes back as the burst's result, which Python
finishes as `Datapath.receive` would. Here one hypervisor gets each batch through the
FastLoop (a NIC batch from a receive ring, a VM's reads from a datagram socket, as a TAP
gives them) and a twin gets the same batch through `Datapath.receive`: the bytes on every
wire, the port statistics, SA counters, drops, MAC tables and MAC ages must agree.
"""

from __future__ import annotations

import os
import select
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from espswitch.datapath.fast import _fastpath
from fastpath import test_rx_pipeline as rx
from fastpath import test_tx_pipeline as tx
from fastpath.diff import PIPELINES
from fastpath.test_ring_pipeline import FS, NR, ring_of

READ_SIZE = 65536 + 64  # BUF_SIZE's share: a whole TSO read
SO_SNDBUFFORCE = 32  # asm-generic/socket.h


class Ring:
    """What the loop asks of a NIC device: where its ring is read next."""

    def __init__(self) -> None:
        self.ring_head = 0


def ages(hv) -> dict:
    return {b.name: sorted((k, v[0].name, v[1]) for k, v in b.macs.items())
            for b in hv.dp.bridges.values()}


def loop_run(hv, port_name: str, source: tuple, fd: int) -> tuple[int, int]:
    """Run `hv`'s FastLoop once over the ready descriptor `fd` (`source` without its port
    and bridge indices); finish what it hands back as loop.py does. Returns (batches the
    loop counted itself, batches handed back)."""
    dp = hv.dp
    fast = dp.fast_tables
    assert fast.ensure()
    port = dp.ports[port_name]
    where = fast.rx_ports.get(port) or fast.tx_ports[port]
    ep = select.epoll()
    try:
        ep.register(fd, select.EPOLLIN)
        loop = _fastpath.FastLoop()
        loop.configure(fast.table, fast, ep.fileno(),
                       {fd: (source[0], where[0], where[1], *source[1:])},
                       len(fast.ports), len(fast.entries))
        before = fast.loop_batches
        try:
            work = loop.poll(time.monotonic() + 0.05, 64, {})
        finally:
            fast.fold(loop)
        for _fd, _ev, frames, result in work:
            assert frames is not None
            dp.receive(port, frames, result)
            if isinstance(frames, _fastpath.RingBatch):
                frames.release()
        return fast.loop_batches - before, len(work)
    finally:
        ep.close()


def same_clock(ref, hv) -> None:
    """Both hypervisors at one time a little later (the MAC ages are compared)."""
    hv.dp.now = ref.dp.now = max(ref.dp.now, hv.dp.now) + 0.5


def twins(make):
    """Two hypervisors made alike, their MAC entries of the same age."""
    ref, hv = make(), make()
    same_clock(ref, hv)
    for h in (ref, hv):
        for b in h.dp.bridges.values():
            for entry in b.macs.values():
                entry[1] = h.dp.now
    return ref, hv


def rx_both(batches: list[list[str]]) -> tuple[int, int]:
    ref, hv = twins(lambda: rx.hypervisor(True, wire=True))
    peer = rx.Peer()
    counted = handed = 0
    for batch in batches:
        same_clock(ref, hv)
        frames = [peer.make(ref, k) for k in batch]
        ref.inject("eth0", *frames)
        r, w = os.pipe()  # always readable: the ring is what the loop reads
        try:
            os.write(w, b"x")
            c, h = loop_run(hv, "eth0", (_fastpath.LOOP_RING, Ring(), ring_of(frames), FS, NR),
                            r)
        finally:
            os.close(r)
            os.close(w)
        counted, handed = counted + c, handed + h
        PIPELINES["rx frames"] += len(frames)
        assert rx.state(hv) == rx.state(ref), batch
        assert ages(hv) == ages(ref), batch
    return counted, handed


def tx_both(batches: list[list[str]]) -> tuple[int, int]:
    ref, hv = twins(lambda: tx.hypervisor(True, wire=True))
    for h in (ref, hv):
        h.dp.ports["vm"].vnet = True
    counted = handed = n = 0
    for batch in batches:
        same_clock(ref, hv)
        reads = []
        for k in batch:
            n += 1
            reads.append(tx.make_vnet(ref, k, n))
        ref.inject("vm", *reads)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # Room for the whole batch of reads (up to 64 KiB each), as a TAP's queue.
            b.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 8 << 20)
            for f in reads:
                b.send(f)
            a.setblocking(False)
            c, h = loop_run(hv, "vm", (_fastpath.LOOP_TAP, None, READ_SIZE, True), a.fileno())
        finally:
            a.close()
            b.close()
        counted, handed = counted + c, handed + h
        PIPELINES["tx offload reads"] += len(reads)
        assert tx.state(hv) == tx.state(ref), batch
        assert ages(hv) == ages(ref), batch
    return counted, handed


def test_a_batch_of_hits_is_counted_by_the_loop_as_python_counts_it() -> None:
    counted, handed = rx_both([["valid"] * 5, ["valid"] * 3, ["valid"]])
    assert counted >= 2  # (the first batch teaches the router's MAC: a miss)
    counted, handed = tx_both([["tso"], ["plain", "tso_fin", "tso"], ["tso_odd"]])
    assert counted == 3 and handed == 0


def test_a_batch_with_anything_else_comes_back_to_python_and_counts_the_same() -> None:
    counted, handed = rx_both([["valid"] * 2, ["valid", "forged", "valid"],
                               ["valid", "arp"], ["replay"], ["valid"]])
    assert handed >= 3
    counted, handed = tx_both([["tso", "broadcast"], ["plain", "arp"], ["tso_too_big"]])
    assert counted == 0 and handed == 3


def test_a_write_that_fails_is_counted_by_python_as_its_port_counts_it() -> None:
    """The wire to the VM refuses the frames (its reader is gone): the loop hands the
    batch back, written, and Python counts the frames dropped, as the device would."""
    ref, hv = rx.hypervisor(True, wire=True), rx.hypervisor(True, wire=True)
    peer = rx.Peer()
    frames = [peer.make(ref, "valid") for _ in range(3)]
    ref.inject("eth0", *frames)
    r, w = os.pipe()
    os.write(w, b"x")
    try:
        loop_run(hv, "eth0", (_fastpath.LOOP_RING, Ring(), ring_of(frames), FS, NR), r)
        assert rx.state(hv) == rx.state(ref)
        for h in (ref, hv):
            h.dev("vm")._pair[1].close()
        frames = [peer.make(ref, "valid") for _ in range(4)]
        ref.inject("eth0", *frames)
        counted, handed = loop_run(hv, "eth0",
                                   (_fastpath.LOOP_RING, Ring(), ring_of(frames), FS, NR), r)
    finally:
        os.close(r)
        os.close(w)
    assert (counted, handed) == (0, 1)
    stats = {n: dict(p.stats) for n, p in hv.dp.ports.items()}
    assert stats == {n: dict(p.stats) for n, p in ref.dp.ports.items()}
    assert stats["vm"]["tx_dropped"] >= 4


@pytest.mark.parametrize("direction", ["rx", "tx"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_batches_through_the_loop_count_as_through_python(direction, data) -> None:
    kinds = rx.KINDS + ("valid",) * 8 if direction == "rx" else \
        tx.VNET_KINDS + ("tso", "plain") * 4
    batches = data.draw(st.lists(st.lists(st.sampled_from(kinds), min_size=1, max_size=8),
                                 min_size=1, max_size=6))
    (rx_both if direction == "rx" else tx_both)(batches)
