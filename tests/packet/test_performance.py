"""Guards against the hot-path helpers turning into per-byte Python loops.

The bounds are about 8x the measured times (checksum of 1400 bytes ~3 us, template fill
~0.3 us on the development machine) so a loaded CI host does not fail them, while a
per-byte or per-word loop (~50-100 us for 1400 bytes) would.
"""

import os
import timeit

from espswitch.packet.checksum import internet_checksum
from espswitch.packet.ipv4 import Ipv4Template, ip_to_bytes


def _best_us(fn, number):
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def test_checksum_of_1400_bytes_is_fast():
    data = os.urandom(1400)
    assert _best_us(lambda: internet_checksum(data), 2000) < 25


def test_template_fill_is_fast():
    tpl = Ipv4Template(src=ip_to_bytes("192.0.2.1"), dst=ip_to_bytes("192.0.2.2"), proto=50)
    buf = bytearray(1500)
    assert _best_us(lambda: tpl.fill(buf, 14, 1400, 7), 5000) < 3
