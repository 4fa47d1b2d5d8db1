"""`espswitch bench esp|e2e [OPTIONS]`: the benchmarks, with their own options after the name."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any


def register(subparsers: Any) -> None:
    """Add `bench` to the `espswitch` subcommand parsers."""
    p = subparsers.add_parser(
        "bench", help="run a benchmark: esp (the ESP engine), e2e (VM to VM, root) or flood "
        "(pings under a forged-ESP flood, root)",
        description="Run a benchmark. `esp`: ESP round trips per second against the bare "
        "cryptography AEAD and scapy. `e2e` (root): iperf3 and ping VM to VM over espswitch "
        "vxlanipsec and vxlan, kernel VXLAN and strongSwan kernel-libipsec. `flood` (root): "
        "ping loss across a vxlanipsec tunnel while its underlay is flooded with forged ESP. "
        "Options after the name go to the benchmark (--help shows them).")
    p.add_argument("which", choices=("esp", "e2e", "flood"), help="the benchmark")
    p.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    """Run the chosen benchmark with its own options; return its exit code."""
    if args.which == "esp":
        from espswitch.benchmarks.esp import main
    elif args.which == "flood":
        from espswitch.benchmarks.flood import main
    else:
        from espswitch.benchmarks.e2e import main
    # Ctrl-C and SIGTERM both end in the clean-up of what the benchmark built (namespaces,
    # daemons), as the demo's do.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return main(args.options)
    except KeyboardInterrupt:
        print(f"espswitch bench {args.which}: interrupted; everything it made was removed",
              file=sys.stderr)
        return 130
