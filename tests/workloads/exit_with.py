"""A one-shot "container" for the runner tests: print, optionally sleep, write a termination message, exit.

    python exit_with.py [--code N] [--message TEXT --message-file PATH] [--sleep S] [--print TEXT]
                        [--print-env NAME] [--spawn-child PIDFILE]

`--spawn-child` starts a grandchild that sleeps and writes its pid to PIDFILE, so that a test can prove the
runner stops a container's whole process group. Standard library only: it runs in any environment.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--code", type=int, default=0)
    parser.add_argument("--message", default="")
    parser.add_argument("--message-file", type=Path)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--print", dest="text", default="")
    parser.add_argument("--print-env", action="append", default=[])
    parser.add_argument("--spawn-child", type=Path)
    args = parser.parse_args()
    if args.text:
        print(args.text, flush=True)
    for name in args.print_env:
        print(f"{name}={os.environ.get(name, '')}", flush=True)
    if args.spawn_child:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        args.spawn_child.write_text(str(child.pid))
    time.sleep(args.sleep)
    if args.message_file and args.message:
        args.message_file.write_text(args.message)
    return int(args.code)


if __name__ == "__main__":
    sys.exit(main())
