"""Micro-benchmark of the wire-format helpers on the datapath's hot path.

Prints microseconds per call for the Internet checksum of 1400 bytes and for
`Ipv4Template.fill`; `--json FILE` writes them. A benchmark, not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import timeit

from espswitch.packet.checksum import internet_checksum
from espswitch.packet.ipv4 import Ipv4Template, ip_to_bytes


def _best_us(fn, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    data = os.urandom(1400)
    tpl = Ipv4Template(src=ip_to_bytes("192.0.2.1"), dst=ip_to_bytes("192.0.2.2"), proto=50)
    buf = bytearray(1500)
    results = {
        "internet_checksum_1400_us": _best_us(lambda: internet_checksum(data), 2000),
        "ipv4_template_fill_us": _best_us(lambda: tpl.fill(buf, 14, 1400, 7), 5000),
    }
    for name, value in results.items():
        print(f"{name:32s} {value:8.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results}, f, indent=1)


if __name__ == "__main__":
    main()
