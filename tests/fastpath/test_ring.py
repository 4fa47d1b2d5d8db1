"""The AF_PACKET ring walk in C (`_fastpath.ring_read`) against the Python one
(`devices.ring_walk`): the same frames and the same slots handed back, for rings with
VLAN metadata, frames cut to their slot, headers pointing outside their slot, and a
wrap-around; and frames larger than a slot never read past it."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from espswitch.datapath.devices import ring_walk
from espswitch.datapath.fast import _fastpath

FS, NR = 256, 8
HDR = struct.Struct("=IIIHH8xHH")  # status, len, snaplen, mac, net, (sec, nsec), tci, tpid

slot_st = st.tuples(
    st.sampled_from([0, 1, 1 | 0x10, 1 | 0x10 | 0x40, 1 | 0x04]),  # kernel / user / VLAN ...
    st.integers(0, 300),          # snaplen
    st.booleans(),                # len == snaplen (else: cut to the slot)
    st.sampled_from([32, 34, 64, 250]),  # where the frame starts in the slot
    st.integers(0, 0xFFFF),       # tci
    st.sampled_from([0, 0x8100, 0x88A8]),
)


def ring(slots: list[tuple]) -> bytearray:
    buf = bytearray(FS * NR)
    for i, (status, snaplen, whole, mac, tci, tpid) in enumerate(slots):
        HDR.pack_into(buf, i * FS, status, snaplen if whole else snaplen + 100, snaplen, mac,
                      mac + 14, tci, tpid)
        body = bytes((i * 31 + j) & 0xFF for j in range(FS - mac))
        buf[i * FS + mac:(i + 1) * FS] = body
    return buf


@settings(max_examples=400, deadline=None)
@given(st.lists(slot_st, min_size=NR, max_size=NR), st.integers(0, NR - 1),
       st.integers(0, 12))
def test_the_c_ring_walk_is_the_python_one(slots: list[tuple], head: int, limit: int) -> None:
    a, b = ring(slots), ring(slots)
    assert _fastpath.ring_read(a, head, FS, NR, limit) == ring_walk(b, head, FS, NR, limit)
    assert a == b


def test_a_frame_cut_to_its_slot_is_dropped_and_its_slot_handed_back() -> None:
    r = ring([(1, 100, False, 32, 0, 0), (1, 60, True, 32, 0, 0)] + [(0, 0, True, 32, 0, 0)] * 6)
    frames, head = _fastpath.ring_read(r, 0, FS, NR, 32)
    assert [len(f) for f in frames] == [60] and head == 2
    assert struct.unpack_from("=I", r, 0)[0] == 0 and struct.unpack_from("=I", r, FS)[0] == 0


def test_vlan_metadata_is_put_back_as_a_tag() -> None:
    r = ring([(1 | 0x10, 60, True, 32, 0x0064, 0)] + [(0, 0, True, 32, 0, 0)] * 7)
    (frame,), _ = _fastpath.ring_read(r, 0, FS, NR, 32)
    assert frame[12:16] == b"\x81\x00\x00\x64" and len(frame) == 64


def test_a_ring_smaller_than_its_slots_is_refused() -> None:
    for args in ((bytearray(100), 0, FS, NR, 1), (bytearray(FS * NR), NR, FS, NR, 1)):
        try:
            _fastpath.ring_read(*args)
        except ValueError:
            continue
        raise AssertionError(args)


# -- frames left in their slots (RingBatch) ---------------------------------------------------

def status(r: bytearray, i: int) -> int:
    return struct.unpack_from("=I", r, i * FS)[0]


@settings(max_examples=300, deadline=None)
@given(st.lists(slot_st, min_size=NR, max_size=NR), st.integers(0, NR - 1),
       st.integers(0, 12))
def test_frames_taken_in_place_are_those_the_ring_walk_copies(slots, head, limit) -> None:
    a, b = ring(slots), ring(slots)
    frames, next_head = _fastpath.ring_read(a, head, FS, NR, limit)
    batch = _fastpath.ring_take(b, head, FS, NR, limit)
    assert batch.copy_all() == frames and batch.head == next_head
    assert batch.nbytes == sum(map(len, frames)) and len(batch) == len(frames)
    batch.release()
    assert a == b  # the same slots handed back
    assert len(batch) == 0 and batch.copy_all() == []  # released: nothing left to read


def test_slots_stay_the_readers_until_the_batch_is_released() -> None:
    r = ring([(1, 60, True, 32, 0, 0)] * 3 + [(0, 0, True, 32, 0, 0)] * 5)
    batch = _fastpath.ring_take(r, 0, FS, NR, 32)
    assert len(batch) == 3 and batch.head == 3
    assert [status(r, i) for i in range(3)] == [1, 1, 1]  # the kernel may not write them
    assert _fastpath.ring_take(r, batch.head, FS, NR, 32).copy_all() == []
    batch.release()
    batch.release()  # idempotent
    assert [status(r, i) for i in range(3)] == [0, 0, 0]


def test_a_full_ring_is_taken_once_and_misses_are_copied_out() -> None:
    r = ring([(1, 40 + i, True, 32, 0, 0) for i in range(NR)])
    batch = _fastpath.ring_take(r, 5, FS, NR, 100)
    assert len(batch) == NR and batch.head == 5
    kinds = bytearray([0, 3, 3, 0, 1, 0, 2, 3])
    missed = batch.copies(kinds)
    assert [len(f) for f in missed] == [len(batch[i]) for i in (0, 3, 5)]
    assert batch[0] == bytes(r[5 * FS + 32:5 * FS + 32 + 45])  # slot 5 came first
    del batch  # dropped without release: the slots still go back
    assert all(status(r, i) == 0 for i in range(NR))


def test_vlan_metadata_in_place_is_put_back_as_a_tag() -> None:
    r = ring([(1 | 0x10, 60, True, 32, 0x0064, 0)] + [(0, 0, True, 32, 0, 0)] * 7)
    batch = _fastpath.ring_take(r, 0, FS, NR, 32)
    assert batch[0][12:16] == b"\x81\x00\x00\x64" and batch.nbytes == 64
    batch.release()
