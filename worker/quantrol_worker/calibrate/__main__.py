"""`python -m quantrol_worker.calibrate [run] --config FILE`, `... evaluate --config FILE --candidate DIR`,
or `... pull REPO@sha256:… --out DIR [--insecure]` (fetch and verify an artifact; JSON result on stdout)."""

from __future__ import annotations

import sys

from quantrol_worker.calibrate.pipeline import evaluate_main, main, pull_main

if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "evaluate":
        sys.exit(evaluate_main(args[1:]))
    if args and args[0] == "pull":
        sys.exit(pull_main(args[1:]))
    if args and args[0] == "run":
        args = args[1:]
    sys.exit(main(args))
