"""`quantrol-worker`: the command the operator's pods run.

Subcommands arrive with their issues (calibrate, fetch, serve, route); this module only dispatches,
and imports each subcommand lazily so that a torch-free image never imports torch.
"""

from __future__ import annotations

import argparse
import sys

from quantrol_worker import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantrol-worker", description=__doc__)
    parser.add_argument("--version", action="version", version=f"quantrol-worker {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
