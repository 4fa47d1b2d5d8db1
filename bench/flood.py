"""Run `espswitch bench flood`: see espswitch/benchmarks/flood.py (`--help` for its options)."""

import sys

from espswitch.benchmarks.flood import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
