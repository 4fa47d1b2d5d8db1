"""NIC batches read in place in the receive ring (`RingBatch`) through the datapath: the
same outputs, counters and state as the same frames as bytes, with the fast path on and
off, and every slot handed back after each batch."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from espswitch.datapath.fast import _fastpath
from fastpath import test_rx_pipeline as rx
from fastpath.diff import PIPELINES

FS, NR = 2048, 64
HDR = struct.Struct("=IIIHH8xHH")


def ring_of(frames: list[bytes]) -> bytearray:
    """A TPACKET_V2 ring with `frames` in its first slots, handed to the reader."""
    buf = bytearray(FS * NR)
    for i, f in enumerate(frames):
        HDR.pack_into(buf, i * FS, 1, len(f), len(f), 32, 46, 0, 0)
        buf[i * FS + 32:i * FS + 32 + len(f)] = f
    return buf


def run(batches: list[list[str]], fast_path: bool) -> None:
    """The same frames from the wire as bytes and, on a second hypervisor, in place."""
    a, b = rx.hypervisor(fast_path), rx.hypervisor(fast_path)
    port = b.dp.ports["eth0"]
    peer = rx.Peer()
    for batch in batches:
        frames = [peer.make(a, k) for k in batch]
        r = ring_of(frames)
        a.inject("eth0", *frames)
        b.dp.receive(port, _fastpath.ring_take(r, 0, FS, NR, len(frames)))
        PIPELINES["rx frames"] += len(frames)
        assert rx.state(a) == rx.state(b), batch
        assert all(struct.unpack_from("=I", r, i * FS)[0] == 0 for i in range(len(frames)))


def test_hits_misses_and_drops_in_place_are_those_of_bytes() -> None:
    run([["valid"] * 4, ["valid", "forged", "broadcast", "valid"], ["valid"] * 3], True)


def test_with_the_fast_path_off_a_batch_in_place_is_copied_for_python() -> None:
    run([["valid"] * 3, ["valid", "arp", "replay"]], False)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(st.sampled_from(rx.KINDS + ("valid",) * 6), min_size=1, max_size=8),
                max_size=6), st.booleans())
def test_random_batches_in_place_match_bytes(batches, fast_path) -> None:
    run(batches, fast_path)
