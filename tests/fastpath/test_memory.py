"""Hostile input through the compiled core: memory stays flat under 1,000,000 forged ESP
packets at a known SPI, every one a counted drop."""

from __future__ import annotations

import os
import random
import tracemalloc

from espswitch.datapath import fast
from espswitch.ipsec import DropReason, OutboundSA, SaParams


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _forged_pool(spi: int, n: int) -> list[bytes]:
    rng = random.Random(7)
    pool = []
    for i in range(n):
        size = rng.choice((36, 40, 100, 200, 1400, 37, 3))
        body = bytearray(rng.randbytes(size))
        body[0:4] = spi.to_bytes(4, "big")
        if len(body) >= 8:
            # Three in four ahead of the window (the AEAD runs and fails), the rest replays.
            seq = 3001 + i if i % 4 else 1 + i % 3000
            body[4:8] = seq.to_bytes(4, "big")
        pool.append(bytes(body))
    return pool


def test_a_million_forged_packets_leave_memory_flat() -> None:
    p = SaParams(spi=0x7007, transform="aes128gcm16", keymat=os.urandom(20), replay_window=1024)
    inb = fast.make_inbound_sa(p)
    out = OutboundSA(p)
    for _ in range(3000):  # a real flow first: the window sits at 3000
        assert type(inb.open(out.encrypt(b"v" * 64, 17))) is tuple
    pool = _forged_pool(p.spi, 4096)
    batches = [pool[i: i + 32] for i in range(0, len(pool), 32)]

    def flood(rounds: int) -> None:
        for _ in range(rounds):
            for batch in batches:
                for r in fast.open_batch(inb, batch):
                    assert type(r) is DropReason

    flood(10)  # warm up allocators
    rss0 = _rss_kib()
    flood(234)  # 234 * 4096 = 958,464 ...
    for i in range(41536):  # ... + 41,536 single calls = 1,000,000 after the warm-up
        assert type(inb.open(pool[i % len(pool)])) is DropReason
    grown = _rss_kib() - rss0
    c = inb.counters()
    assert c["packets"] == 3000
    assert sum(v for k, v in c.items() if k not in ("packets", "bytes")) == 1_000_000 + 40960
    if not os.environ.get("ESPSWITCH_SANITIZED"):  # ASan's quarantine holds freed memory
        assert grown < 2048, f"RSS grew by {grown} KiB under the flood"

    tracemalloc.start()
    try:
        flood(2)
        before = tracemalloc.get_traced_memory()[0]
        flood(20)
        for esp in pool:
            inb.open(esp)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert after - before < 64 * 1024, f"Python allocations grew by {after - before} bytes"
