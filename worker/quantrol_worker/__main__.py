"""`python3 -m quantrol_worker …`: the same CLI as `quantrol-worker`, for images that have Python but not the console
script — a stock vLLM image runs the launcher this way from the volume the `launcher` init step filled."""

from __future__ import annotations

import sys

from quantrol_worker.cli import main

sys.exit(main())
