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
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    from quantrol_worker.router.main import add_parser as add_route  # argparse only: no aiohttp at parse time

    add_route(commands)
    from quantrol_worker.deliver import add_parser as add_install_launcher  # stdlib only
    from quantrol_worker.fetch import add_parser as add_fetch  # stdlib only at import time
    from quantrol_worker.serve.main import add_parser as add_serve

    add_fetch(commands)
    add_serve(commands)
    add_install_launcher(commands)
    from quantrol_worker.fleet import add_parser as add_fleet  # stdlib only at import time

    add_fleet(commands)
    calibrate = commands.add_parser("calibrate", help="calibrate, quantize, evaluate and publish a model (torch)")
    calibrate.add_argument("--config", required=True, help="CalibrationConfig file (JSON or YAML)")
    qualify = commands.add_parser("qualify", help="measure both arms in three regimes and the golden output (GuideLLM)")
    qualify.add_argument("--config", required=True, help="QualificationConfig file (JSON or YAML)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "route":
        from quantrol_worker.router.main import run as run_route

        return run_route(args)
    if args.command == "calibrate":
        from quantrol_worker.calibrate.pipeline import main as run_calibrate  # torch is imported only here

        return run_calibrate(["--config", args.config])
    if args.command == "qualify":
        from quantrol_worker.qualify.run import main as run_qualify  # guidellm and torch are imported only here

        return run_qualify(["--config", args.config])
    if args.command == "fleet":
        from quantrol_worker.fleet import run as run_fleet  # guidellm is imported only when the run starts

        return run_fleet(args)
    if args.command == "fetch":
        from quantrol_worker.fetch import run as run_fetch

        return run_fetch(args)
    if args.command == "serve":
        from quantrol_worker.serve.main import run as run_serve

        return run_serve(args)
    if args.command == "install-launcher":
        from quantrol_worker.deliver import run as run_install

        return run_install(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
