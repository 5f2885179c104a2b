"""Init-chain steps for the runner tests.

    python steps.py append FILE TEXT     # append TEXT as a line
    python steps.py copy SRC FILE        # append the content of SRC as a line
    python steps.py expect FILE LINE...  # exit 0 only if FILE holds exactly these lines, in order
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    verb, target, *rest = argv
    if verb == "append":
        with Path(target).open("a") as f:
            f.write(rest[0] + "\n")
        return 0
    if verb == "copy":
        with Path(rest[0]).open("a") as f:
            f.write(Path(target).read_text().strip() + "\n")
        return 0
    if verb == "expect":
        lines = Path(target).read_text().splitlines()
        if lines != rest:
            print(f"expected {rest}, found {lines}", flush=True)
            return 1
        return 0
    print(f"unknown verb {verb}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
