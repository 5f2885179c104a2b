"""The calibration worker: load → pre-check → calibrate/quantize → evaluate → package → publish.

`quantrol-worker calibrate --config FILE` lands in `pipeline.main`. torch, transformers and llm-compressor are
imported lazily inside the modules that need them, so importing this package stays cheap; the config, the report
and the termination message are the torch-free models in `quantrol_worker.contracts`.
"""

from __future__ import annotations

from quantrol_worker.contracts import CalibrationReason, Stage
from quantrol_worker.oci import ArtifactError, ArtifactReason


class WorkerError(Exception):
    """A failure with a machine-readable reason and the stage it happened in."""

    def __init__(self, reason: CalibrationReason, message: str, stage: Stage | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.stage = stage

    @classmethod
    def from_artifact(cls, exc: ArtifactError, stage: Stage, *, unavailable: CalibrationReason) -> WorkerError:
        """The calibration worker's reason for an artifact refusal: a reference or manifest that cannot be used is
        the config's problem (it named it), a digest mismatch stays one, and an unreachable registry is
        `unavailable` (the base model's for a pull, the publish step's for a push)."""
        reason = {
            ArtifactReason.DIGEST_MISMATCH: CalibrationReason.DIGEST_MISMATCH,
            ArtifactReason.INVALID_REFERENCE: CalibrationReason.INVALID_CONFIG,
            ArtifactReason.ARTIFACT_UNAVAILABLE: unavailable,
            ArtifactReason.REGISTRY_UNAUTHORIZED: CalibrationReason.REGISTRY_UNAUTHORIZED,
            ArtifactReason.INSUFFICIENT_STORAGE: unavailable,  # calibration pulls into its own work folder
        }[exc.reason]
        return cls(reason, exc.message, stage)
