"""Benchmark: libipsec-mb measured as a second crypto backend beside OpenSSL's EVP (issue 10).

The compiled fast path seals and opens each ESP packet through OpenSSL's libcrypto EVP
interface. Issue 10 asks to measure a library that does several packets per call, as DPDK
and VPP use: Intel's Multi-Buffer Crypto for IPsec (Debian's `libipsec-mb-dev`). This builds
`crypto_backends.c` against both libraries and runs AES-128-GCM round trips (seal + open of
ESP packets: 12-byte nonce, 8-byte AAD, 16-byte tag) through EVP as the fast path calls it,
through libipsec-mb's direct GCM functions and through its job API in bursts; each
backend's output is checked byte for byte against EVP's. It prints ns per packet round trip
and the ratios, and with `--json FILE` writes them.

Run:  python3 bench/crypto_backends.py [--sizes 64,512,1400] [--packets 400000] [--json F]
Needs: gcc, libssl-dev, libipsec-mb-dev (scripts/install.sh installs them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BURST = 32


def build(out: Path) -> None:
    """Compile crypto_backends.c into `out`; exit with one line if it cannot be built."""
    if not Path("/usr/include/intel-ipsec-mb.h").exists():
        sys.exit("crypto_backends: libipsec-mb-dev is not installed "
                 "(apt-get install libipsec-mb-dev, or scripts/install.sh)")
    cmd = ["gcc", "-O2", "-o", str(out), str(HERE / "crypto_backends.c"), "-lcrypto",
           "-lIPSec_MB"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        sys.exit("crypto_backends: gcc is not installed")
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["?"])[-1]
        sys.exit(f"crypto_backends: build failed: {last}")


def run(exe: Path, size: int, packets: int) -> dict:
    p = subprocess.run([str(exe), str(size), str(max(packets // BURST, 1)), str(BURST)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(p.stderr.strip() or f"crypto_backends: failed at {size} bytes")
    return json.loads(p.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,512,1400")
    ap.add_argument("--packets", type=int, default=400_000)
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args()
    try:
        sizes = [int(s) for s in a.sizes.split(",")]
    except ValueError:
        sys.exit(f"crypto_backends: --sizes wants numbers separated by commas, not {a.sizes!r}")
    if a.packets < 1 or any(not 1 <= s <= 9000 for s in sizes):
        sys.exit("crypto_backends: --packets at least 1, --sizes from 1 to 9000")
    with tempfile.TemporaryDirectory() as d:
        exe = Path(d) / "crypto_backends"
        build(exe)
        rows = [run(exe, s, a.packets) for s in sizes]
    print(f"AES-128-GCM ESP round trips (seal + open), ns per packet; libipsec-mb "
          f"{rows[0]['imb_version']}, arch {rows[0]['imb_arch']} (4 = AVX2), bursts of {BURST}")
    print(f"{'bytes':>6} {'EVP':>8} {'imb direct':>11} {'imb jobs':>9} "
          f"{'EVP/direct':>11} {'EVP/jobs':>9}")
    for r in rows:
        r["evp_over_direct"] = r["evp_ns"] / r["imb_direct_ns"]
        r["evp_over_jobs"] = r["evp_ns"] / r["imb_job_ns"]
        print(f"{r['size']:>6} {r['evp_ns']:>8.0f} {r['imb_direct_ns']:>11.0f} "
              f"{r['imb_job_ns']:>9.0f} {r['evp_over_direct']:>10.2f}x {r['evp_over_jobs']:>8.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps({"burst": BURST, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
