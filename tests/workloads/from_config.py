"""A config-file-driven "container" for the runner tests, shaped like the calibration worker.

    python from_config.py --config FILE

FILE is JSON: {"work_dir": DIR, "data_uri": "file://PATH", "termination_message_path": PATH}. It reads the
data file, writes `<work_dir>/out.txt`, and writes "read: <data>" as its termination message. Standard library.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    config = json.loads(parser.parse_args().config.read_text())
    data = Path(config["data_uri"].removeprefix("file://")).read_text().strip()
    Path(config["work_dir"], "out.txt").write_text(data)
    Path(config["termination_message_path"]).write_text(f"read: {data}")


if __name__ == "__main__":
    main()
