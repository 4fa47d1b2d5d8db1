"""Reassembly of outer IPv4 fragments: the sans-IO Reassembler and the tunnel layer's use of it."""

from __future__ import annotations

import random
import struct

from hypothesis import given
from hypothesis import strategies as st

from espswitch.datapath.ipfrag import (
    FRAGMENT_OVERHEAD,
    MAX_FRAGMENTS,
    MIN_FRAGMENT,
    Reassembler,
)
from espswitch.packet.ipv4 import fragment_ipv4

from .helpers import Hypervisor, csum, eth, ipv4, mac, udp, vxlan

ETH = mac(1) + mac(2) + b"\x08\x00"


def packet(size: int, proto: int = 50, ident: int = 7) -> bytes:
    rng = random.Random(size * 31 + ident)
    return ipv4("10.0.0.1", "10.0.0.2", proto, rng.randbytes(size), ident=ident)


class Drops(dict):
    def __call__(self, cause: str, n: int = 1) -> None:
        self[cause] = self.get(cause, 0) + n


def feed(r: Reassembler, frags: list[bytes], now: float = 0.0) -> list:
    return [r.add(ETH + f, 14, now) for f in frags]


@given(size=st.integers(100, 9000), mtu=st.integers(20 + MIN_FRAGMENT, 1500),
       seed=st.integers(0, 2**32))
def test_fragments_in_any_order_give_back_the_packet_once(size, mtu, seed):
    pkt = packet(size)
    frags = fragment_ipv4(pkt, mtu)
    random.Random(seed).shuffle(frags)
    r = Reassembler()
    results = feed(r, frags)
    done = [x for x in results if x is not None]
    assert len(done) == 1 and results[-1] is not None
    whole, originals = done[0]
    assert whole == ETH + pkt
    assert csum(whole[14:34]) == 0
    assert sorted(originals) == sorted(ETH + f for f in frags)
    assert r.pending == {} and r.bytes_held == 0


def test_duplicate_fragment_is_ignored_and_overlap_drops_the_datagram():
    drops = Drops()
    r = Reassembler(drops)
    a, b, c = fragment_ipv4(packet(2000), 800)
    assert feed(r, [a, a, b]) == [None, None, None]
    assert r.add(ETH + c, 14, 0.0)[0] == ETH + packet(2000)
    assert drops == {}
    # An overlapping forgery: same offset as `b`, other bytes.
    forged = bytearray(b)
    forged[-1] ^= 1
    forged[10:12] = b"\0\0"
    forged[10:12] = struct.pack("!H", csum(bytes(forged[:20])))
    assert feed(r, [a, b, bytes(forged), c]) == [None, None, None, None]
    assert drops == {"ipfrag_overlaps": 1}
    assert r.pending  # `c` started a new datagram that can never finish ...
    r.expire(31.0)  # ... and expires
    assert r.pending == {} and drops["ipfrag_timeouts"] == 1 and r.bytes_held == 0


def test_limits_bound_what_is_held():
    drops = Drops()
    r = Reassembler(drops, max_datagrams=2, max_bytes=10_000)
    firsts = [fragment_ipv4(packet(3000, ident=i), 1000)[0] for i in range(3)]
    assert feed(r, firsts) == [None, None, None]
    assert len(r.pending) == 2 and drops == {"ipfrag_no_room": 1}
    # Later, the old ones have expired and there is room again.
    assert r.add(ETH + firsts[2], 14, 40.0) is None
    assert len(r.pending) == 1 and drops["ipfrag_timeouts"] == 2


def test_malformed_fragments_are_counted():
    drops = Drops()
    r = Reassembler(drops)
    a, b = fragment_ipv4(packet(1000), 600)
    odd = bytearray(a)  # MF set but a payload that is not a multiple of 8
    odd[2:4] = struct.pack("!H", len(a) - 3)
    past_end = bytearray(b)  # offset * 8 + length beyond 65,535
    past_end[6:8] = struct.pack("!H", 0x1FFF)
    truncated = a[:30]  # total length says more than the frame holds
    for f in (bytes(odd), bytes(past_end), truncated):
        assert r.add(ETH + f[: len(f)], 14, 0.0) is None
    assert drops == {"ipfrag_malformed": 3}
    # Two "last" fragments that disagree on the length.
    r.add(ETH + b, 14, 0.0)
    other_last = bytearray(b)
    beyond = (struct.unpack("!H", b[6:8])[0] & 0x1FFF) + (len(b) - 20) // 8 + 1
    other_last[6:8] = struct.pack("!H", beyond)
    assert r.add(ETH + bytes(other_last), 14, 0.0) is None
    assert drops["ipfrag_malformed"] == 4


def test_tiny_fragments_are_dropped_before_any_state_is_kept():
    """A flood of 8-byte fragments (no real path makes them) creates no datagram."""
    drops = Drops()
    r = Reassembler(drops)
    tiny = fragment_ipv4(packet(600, ident=3), 28)
    assert len(tiny) > 60
    assert feed(r, tiny[:-1]) == [None] * (len(tiny) - 1)
    assert r.pending == {} and r.bytes_held == 0
    assert drops == {"ipfrag_too_small": len(tiny) - 1}
    # The last fragment may be small: it is held, waiting for the rest.
    assert r.add(ETH + tiny[-1], 14, 0.0) is None and len(r.pending) == 1


def test_a_datagram_of_too_many_fragments_is_dropped_whole():
    drops = Drops()
    r = Reassembler(drops)
    frags = fragment_ipv4(packet(300 * (MAX_FRAGMENTS + 5), ident=4), 20 + 296)
    assert len(frags) > MAX_FRAGMENTS + 1
    results = feed(r, frags)
    assert all(x is None for x in results)
    assert drops["ipfrag_too_many"] == 1
    # What came after the drop started a new datagram, which expires.
    r.expire(31.0)
    assert r.pending == {} and r.bytes_held == 0


def test_the_byte_limit_counts_what_a_fragment_really_costs():
    drops = Drops()
    frag = fragment_ipv4(packet(3000, ident=9), 20 + MIN_FRAGMENT)[0]
    per_fragment = len(ETH + frag) + FRAGMENT_OVERHEAD
    r = Reassembler(drops, max_bytes=10 * per_fragment)
    firsts = [fragment_ipv4(packet(3000, ident=i), 20 + MIN_FRAGMENT)[0] for i in range(12)]
    feed(r, firsts)
    assert len(r.pending) == 10 and r.bytes_held == 10 * per_fragment
    assert drops == {"ipfrag_no_room": 2}


def test_a_full_table_under_flood_expires_only_what_is_old():
    drops = Drops()
    r = Reassembler(drops, max_datagrams=4)
    firsts = [fragment_ipv4(packet(3000, ident=i), 1000)[0] for i in range(8)]
    feed(r, firsts[:2], now=0.0)
    feed(r, firsts[2:4], now=20.0)
    assert r.add(ETH + firsts[4], 14, 31.0) is None  # the two from t=0 expire, not the others
    assert len(r.pending) == 3 and drops == {"ipfrag_timeouts": 2}


@given(st.binary(min_size=0, max_size=200), st.integers(0, 0x3FFF))
def test_random_fragments_never_raise(data, frag):
    r = Reassembler()
    body = ipv4("10.0.0.1", "10.0.0.2", 50, data)
    f = bytearray(body)
    f[6:8] = struct.pack("!H", frag)
    r.add(ETH + bytes(f), 14, 0.0)
    r.add(ETH + bytes(f[: len(f) // 2]), 14, 0.0)


# -- the tunnel layer ---------------------------------------------------------------------


def test_fragmented_vxlan_from_the_underlay_is_reassembled_and_delivered():
    b = Hypervisor("10.0.0.2", "10.0.0.1")
    inner = eth(mac(2), mac(1), ipv4("192.168.1.1", "192.168.1.2", 1, b"p" * 1400))
    outer = ipv4("10.0.0.1", "10.0.0.2", 17, udp(50000, 4789, vxlan(100, inner)), ident=99)
    frags = fragment_ipv4(outer, 600)
    assert len(frags) == 3
    head = b.dev("br-phy").mac + mac(50) + b"\x08\x00"
    b.inject("eth0", *[head + f for f in reversed(frags)])
    assert b.dev("vm").take() == [inner]
    assert b.dev("br-phy").take() == []
    assert b.tun.stats["rx_packets"] == 1


def test_fragments_of_other_udp_go_on_to_the_kernel_as_they_came():
    b = Hypervisor("10.0.0.2", "10.0.0.1")
    outer = ipv4("10.0.0.1", "10.0.0.2", 17, udp(500, 500, b"i" * 3000), ident=5)
    frags = [b.dev("br-phy").mac + mac(50) + b"\x08\x00" + f for f in fragment_ipv4(outer, 1200)]
    b.inject("eth0", *frags)
    assert b.dev("br-phy").take() == frags
    assert b.dev("vm").take() == []
