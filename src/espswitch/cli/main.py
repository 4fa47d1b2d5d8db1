"""The `espswitch` command: one dispatcher, one module per subcommand family."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from espswitch import __version__
from espswitch.cli import bench as bench_cmd
from espswitch.cli import demo as demo_cmd
from espswitch.cli import esp as esp_cmd
from espswitch.cli import service as service_cmd


class UsageError(Exception):
    """A user mistake: reported as one line on stderr with exit code 2."""


class _Parser(argparse.ArgumentParser):
    # argparse prints usage and exits 2 on its own errors; we want one line, same exit code.
    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("unrecognized arguments"):
            # argparse would repeat the arguments, and a mistyped option may be followed by
            # a key: name the problem, not the values.
            message = "unrecognized arguments (see --help)"
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    """Return the parser for every `espswitch` subcommand."""
    parser = _Parser(prog="espswitch", description=__doc__)
    parser.add_argument("--version", action="version", version=f"espswitch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    # Each subcommand family lives in its own module and adds its own subparsers.
    esp_cmd.register(sub)
    service_cmd.register(sub)
    demo_cmd.register(sub)
    bench_cmd.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `espswitch`; return the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("espswitch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
