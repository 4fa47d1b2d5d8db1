"""Run `espswitch bench e2e`: see espswitch/benchmarks/e2e.py (`--help` for its options)."""

import sys
from pathlib import Path

from espswitch.benchmarks.e2e import main

if __name__ == "__main__":
    # The chart lands beside this script unless --png says otherwise (the last one wins).
    sys.exit(main(["--png", str(Path(__file__).with_name("e2e.png")), *sys.argv[1:]]))
