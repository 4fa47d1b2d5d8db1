"""The compiled TAP-write coalescing (`_fastpath.gro_coalesce` / `tap_send`) against
datapath/gro.py: the same merged frames, headers and counts for any batch, and what
`tap_send` writes to a real TAP device is what the Python TapDevice.send writes."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datapath.test_gro import MSS, seg
from espswitch.datapath import gro
from espswitch.datapath.fast import _fastpath

# Frames a VM receives: segments of two flows, in and out of order, short, with PSH, other
# flags, fragments, not TCP, padded, truncated.
KINDS = ("next", "next", "next", "next", "short", "psh", "other_flow", "gap", "syn", "udp",
         "fragment", "padded", "tiny", "options", "window", "fin")


class Flow:
    def __init__(self) -> None:
        self.seq = {5001: 1000, 5002: 7_000_000}

    def make(self, kind: str) -> bytes:
        sport = 5002 if kind == "other_flow" else 5001
        seq = self.seq[sport]
        size = MSS
        flags = "A"
        if kind == "short":
            size = 300
        elif kind == "psh":
            flags = "PA"
        elif kind == "gap":
            seq += 5
        elif kind == "syn":
            flags = "S"
        elif kind == "fin":
            flags = "FA"
        f = seg(seq, size, flags, sport=sport, window=400 if kind == "window" else 500)
        self.seq[sport] = (seq + size) & 0xFFFFFFFF
        if kind == "udp":
            f = f[:23] + b"\x11" + f[24:]
        elif kind == "fragment":
            f = f[:20] + b"\x20" + f[21:]
        elif kind == "padded":
            f = f + b"\0\0"
        elif kind == "tiny":
            f = f[:40]
        elif kind == "options":
            f = f[:46] + b"\x60" + f[47:54] + b"\x01\x01\x01\x01" + f[54:-4]
        return f


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(KINDS), max_size=60))
def test_the_compiled_coalescing_is_gro_coalesce(kinds: list[str]) -> None:
    flow = Flow()
    frames = [flow.make(k) for k in kinds]
    assert _fastpath.gro_coalesce(frames) == gro.coalesce(frames)


def test_a_long_run_stops_at_the_gso_limit() -> None:
    frames = [seg(1000 + i * MSS) for i in range(100)]
    out = _fastpath.gro_coalesce(frames)
    assert out == gro.coalesce(frames)
    assert [c for _, _, c in out] == [65, 35]  # 65,000 payload bytes fit in gro.MAX_GSO


def test_tap_send_writes_what_the_python_device_writes() -> None:
    """Both write into a pipe (a TAP takes the same writes): the same bytes, the same
    count of writes."""
    flow = Flow()
    frames = [flow.make(k) for k in ("next", "next", "short", "next", "udp", "next", "psh")]
    r, w = os.pipe()
    try:
        sent, dropped, too_big = _fastpath.tap_send(w, frames)
        got = os.read(r, 1 << 20)
    finally:
        os.close(r)
        os.close(w)
    want = b"".join(v + f for v, f, _ in gro.coalesce(frames))
    assert (sent, dropped, too_big) == (len(frames), [], [])
    assert got == want


def test_a_failed_write_is_counted_per_original_frame() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    frames = [seg(1000 + i * MSS) for i in range(3)] + [seg(99, 10, "S")]
    sent, dropped, too_big = _fastpath.tap_send(w, frames)
    assert sent == 0 and too_big == []
    merged = len(gro.coalesce(frames)[0][1])
    assert dropped == [merged // 3] * 3 + [len(frames[3])]
