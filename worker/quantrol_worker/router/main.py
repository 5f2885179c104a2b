"""`quantrol-worker route`: arguments and entry point. Imports aiohttp only when the command runs, so the CLI's
parser stays importable in images without it."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
from pathlib import Path


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("route", help="run the serving router in front of the stable and candidate arms")
    parser.add_argument("--config", type=Path, required=True, help="router config file (the ConfigMap mount)")
    parser.add_argument("--host", default="0.0.0.0", help="listen address (default: all interfaces, as in a pod)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--admin-token-file", type=Path, default=None,
                        help="bearer token file for /quantrol/config and /quantrol/diffs "
                        "(else $QUANTROL_ROUTER_ADMIN_TOKEN)")
    parser.add_argument("--admin-port", type=int, default=None,
                        help="serve /quantrol/config and /quantrol/diffs on this port only (default: on --port)")
    parser.add_argument("--namespace", default=None,
                        help="the policy's namespace: pushed arm URLs must be Services there (default: unchecked)")
    parser.add_argument("--reload-interval", type=float, default=1.0, help="seconds between config file checks")
    parser.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM")
    parser.add_argument("--log-level", default="INFO")


def run(args: argparse.Namespace) -> int:
    from quantrol_worker.router.app import serve

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main = serve(args.config, args.host, args.port, args.admin_token_file, args.reload_interval, args.shutdown_grace,
                 args.admin_port, args.namespace)
    # libuv's event loop where installed: about 10% less router CPU per request when the engine streams token by
    # token (bench/bench_router.py, paced section). The serving image, which runs the router, has it (vLLM depends
    # on it); other environments do not, hence the import by name, which keeps this module resolvable (and
    # type-checked) in all of them.
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        asyncio.run(main)
    else:
        logging.getLogger("quantrol.router").info("event loop: uvloop %s", uvloop.__version__)
        uvloop.run(main)
    return 0
