"""Benchmark: what a second thread gives the compiled pipeline on this machine (issue 10).

The batch loops release the GIL (`tx_burst` segments, seals and builds outer frames with it
released), so two threads, each with its own tunnel and SA, can use two cores. This runs
the transmit pipeline's compiled call on TSO super-frames (45 segments of 1,400-odd bytes,
aes128gcm16) in one thread, then in two threads at once, and prints the segments per second
of each and their ratio, and the same with two processes for comparison; with `--json FILE` it
writes them. The sealed frames leave as espswitchd sends them, from the pipeline's own
buffer with `sendmmsg` (here to a socket pair, which fills and then refuses: what is
measured is the compiled loop, not a NIC), or with `--objects` as one bytes object per
frame handed back to Python (the pipeline before it wrote its own output). What it
measures is the compiled loop's scaling only: espswitchd itself runs one datapath thread
(see README).

Run:  PYTHONPATH=src python3 bench/threads.py [--seconds 3] [--objects] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import struct
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from datapath.helpers import eth, ipv4
from espswitch.datapath.fast import _fastpath
from fastpath.test_tx_pipeline import PEER_VM, VM_MAC, hypervisor


def super_frame(mss: int, segments: int = 45) -> bytes:
    """A TCP/IPv4 TSO read from the VM: virtio-net header (GSO TCPv4) and 64 KiB frame."""
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1, 1, 0x50, 0x10, 502, 0, 0)
    ip = bytearray(ipv4("192.168.1.2", "192.168.1.1", 6, tcp + bytes(segments * mss)))
    ip[6] |= 0x40
    return struct.pack("<BBHHHH", 1, 1, 54, mss, 34, 16) + eth(PEER_VM, VM_MAC, bytes(ip))


def worker(seconds: float, out, start, wire: bool) -> None:
    hv = hypervisor(True, wire=wire)
    f = hv.dp._fast
    f.ensure()
    port = hv.dp.ports["vm"]
    idx, bridge = f.tx_ports[port]
    raw = super_frame(hv.tun.max_frame - 54)
    burst, table = _fastpath.tx_burst, f.table
    start.wait()
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        n += burst(table, [raw], idx, bridge, True)[-1][0]
    out.append(n)


def run(threads: int, seconds: float, wire: bool) -> float:
    out: list[int] = []
    start = threading.Barrier(threads)
    ts = [threading.Thread(target=worker, args=(seconds, out, start, wire))
          for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(out) / seconds


def run_processes(n: int, seconds: float, wire: bool) -> float:
    ctx = multiprocessing.get_context("fork")
    out = ctx.Manager().list()
    start = ctx.Barrier(n)
    ps = [ctx.Process(target=worker, args=(seconds, out, start, wire)) for _ in range(n)]
    for p in ps:
        p.start()
    for p in ps:
        p.join()
    return sum(out) / seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--objects", action="store_true",
                    help="hand every sealed frame back as a bytes object")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    wire = not args.objects
    one = run(1, args.seconds, wire)
    two = run(2, args.seconds, wire)
    procs = run_processes(2, args.seconds, wire)
    res = {"cores": os.cpu_count(), "loadavg_1m": os.getloadavg()[0],
           "output": "sendmmsg from the pipeline" if wire else "bytes objects",
           "one_thread_segments_per_s": round(one), "two_threads_segments_per_s": round(two),
           "two_processes_segments_per_s": round(procs),
           "ratio": round(two / one, 2), "processes_ratio": round(procs / one, 2)}
    print(f"tx_burst, TSO super-frames, aes128gcm16, output {res['output']}: "
          f"1 thread {one / 1e3:.0f}k segments/s, 2 threads {two / 1e3:.0f}k segments/s "
          f"({two / one:.2f}x), 2 processes {procs / 1e3:.0f}k ({procs / one:.2f}x) "
          f"(load {res['loadavg_1m']:.2f}, {res['cores']} cores)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
