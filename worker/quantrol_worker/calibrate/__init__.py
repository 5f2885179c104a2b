"""The calibration worker: load → pre-check → calibrate/quantize → evaluate → package → publish.

`quantrol-worker calibrate --config FILE` lands in `pipeline.main`. torch, transformers and llm-compressor are
imported lazily inside the modules that need them, so importing this package stays cheap; the config, the report
and the termination message are the torch-free models in `quantrol_worker.contracts`.
"""

from __future__ import annotations

from quantrol_worker.contracts import Reason, Stage


class WorkerError(Exception):
    """A failure with a machine-readable reason and the stage it happened in."""

    def __init__(self, reason: Reason, message: str, stage: Stage | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.stage = stage
