"""Run `espswitch bench esp`: see espswitch/benchmarks/esp.py (`--help` for its options)."""

import sys

from espswitch.benchmarks.esp import main

if __name__ == "__main__":
    sys.exit(main())
