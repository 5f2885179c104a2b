"""Calibration data: JSONL lines with `text` (or chat `messages`) and a `slice` label.

Each slice contributes `samples` calibration sequences and `evalSamples` held-out sequences, drawn without
overlap by a seeded shuffle. The data digest is taken over the token ids (what the model actually saw), so the
same text under another tokenizer is a different experiment.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantrol_worker.calibrate import WorkerError
from quantrol_worker.contracts import CalibrationReason, DataConfig, Stage


@dataclass
class SliceData:
    name: str
    calibration: list[list[int]] = field(default_factory=list)
    evaluation: list[list[int]] = field(default_factory=list)
    eval_texts: list[str] = field(default_factory=list)


def _render(line: dict[str, Any], tokenizer: Any, where: str) -> str:
    if isinstance(line.get("text"), str):
        return str(line["text"])
    messages = line.get("messages")
    if isinstance(messages, list):
        if getattr(tokenizer, "chat_template", None):
            return str(tokenizer.apply_chat_template(messages, tokenize=False))
        return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages)
    raise WorkerError(CalibrationReason.CALIBRATION_DATA_INVALID, f"{where}: neither `text` nor `messages`", Stage.DATA)


def read_jsonl(uri: str) -> list[dict[str, Any]]:
    path = Path(uri.removeprefix("file://"))
    if "://" in uri and not uri.startswith("file://"):
        raise WorkerError(
            CalibrationReason.CALIBRATION_DATA_INVALID, f"{uri}: only file:// or a path is supported", Stage.DATA
        )
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise WorkerError(CalibrationReason.CALIBRATION_DATA_INVALID, f"{uri}: {exc}", Stage.DATA) from exc
    lines = []
    for n, raw in enumerate(text.splitlines(), start=1):
        if raw.strip():
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError as exc:
                raise WorkerError(CalibrationReason.CALIBRATION_DATA_INVALID, f"{uri}:{n}: {exc}", Stage.DATA) from exc
    return lines


def load_slices(config: DataConfig, tokenizer: Any) -> tuple[list[SliceData], str]:
    """Token ids per slice (calibration and held-out), and the digest over them."""
    lines = read_jsonl(config.uri)
    rng = random.Random(config.seed)
    out: list[SliceData] = []
    for spec in config.slices:
        mine = [(i, line) for i, line in enumerate(lines) if line.get("slice") == spec.name]
        if not mine:
            raise WorkerError(
                CalibrationReason.EMPTY_SLICE, f"slice {spec.name!r} has no lines in {config.uri}", Stage.DATA
            )
        if len(mine) < 2:
            raise WorkerError(
                CalibrationReason.EMPTY_SLICE,
                f"slice {spec.name!r}: one line cannot be calibrated and held out",
                Stage.DATA,
            )
        rng.shuffle(mine)
        n_eval = min(spec.eval_samples, max(1, len(mine) // 2))
        held, calib = mine[:n_eval], mine[n_eval : n_eval + spec.samples]
        data = SliceData(spec.name)
        for part, target in ((calib, data.calibration), (held, data.evaluation)):
            for i, line in part:
                text = _render(line, tokenizer, f"{config.uri} line {i + 1}")
                ids = tokenizer(text, truncation=True, max_length=config.max_sequence_length)["input_ids"]
                if len(ids) >= 2:
                    target.append(list(ids))
                    if target is data.evaluation:
                        data.eval_texts.append(text)
        if not data.calibration or not data.evaluation:
            raise WorkerError(
                CalibrationReason.EMPTY_SLICE, f"slice {spec.name!r}: no usable samples after tokenizing", Stage.DATA
            )
        out.append(data)
    digest = hashlib.sha256(
        json.dumps([[s.name, s.calibration, s.evaluation] for s in out], separators=(",", ":")).encode()
    ).hexdigest()
    return out, "sha256:" + digest
