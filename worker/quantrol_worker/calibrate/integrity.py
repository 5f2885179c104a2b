"""Integrity checks and per-layer scale statistics over a compressed-tensors checkpoint, as written to disk.

Checks: no NaN/inf anywhere; no all-constant quantized (packed) weight; no zero, negative, non-finite or
degenerate (identical across channels) scales; every Linear outside `ignore` quantized; KV scales on every
attention layer when a KV-cache scheme is set. Statistics per quantized layer: largest |weight| the scales
must cover, scale range, and the fraction of the baseline's weights that fall outside the quantized range.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from quantrol_worker.contracts import IntegrityCheck, LayerScaleStats

SCALE_SUFFIXES = ("weight_scale", "input_scale", "k_scale", "v_scale")
FP8_MAX = 448.0


def read_tensors(checkpoint: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    for path in sorted(checkpoint.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def weight_args(checkpoint: Path) -> dict[str, Any]:
    qc = json.loads((checkpoint / "config.json").read_text()).get("quantization_config") or {}
    for group in (qc.get("config_groups") or {}).values():
        weights = group.get("weights")
        if weights:
            return dict(weights)
    return {}


def _qmax(args: dict[str, Any]) -> float | None:
    if args.get("type") == "float":
        return FP8_MAX
    if args.get("symmetric", True) and args.get("num_bits"):
        return float(2 ** (int(args["num_bits"]) - 1) - 1)
    return None  # asymmetric: the zero point moves the range; clipping is not a function of the scale alone


def _clipped(weight: Any, scale: Any, qmax: float) -> float:
    import torch

    w = weight.float()
    s = scale.float()
    if s.numel() == 1:
        s = s.reshape(1, 1).expand_as(w)
    elif s.shape[1] == 1:
        s = s.expand_as(w)
    else:
        s = s.repeat_interleave(math.ceil(w.shape[1] / s.shape[1]), dim=1)[:, : w.shape[1]]
    return float((w.abs() / s.clamp_min(torch.finfo(torch.float32).tiny) > qmax + 0.5).float().mean())


def check(
    checkpoint: Path,
    quantized_layers: list[str],
    attention_layers: list[str],
    kv_expected: bool,
    baseline_weights: dict[str, Any] | None = None,
) -> tuple[list[IntegrityCheck], list[LayerScaleStats]]:
    import torch

    tensors = read_tensors(checkpoint)
    args = weight_args(checkpoint)
    qmax = _qmax(args)
    nonfinite = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t.float()).all())]
    constant: list[str] = []
    bad_scales: list[str] = []
    missing: list[str] = []
    stats: list[LayerScaleStats] = []
    for layer in quantized_layers:
        scale = tensors.get(f"{layer}.weight_scale")
        packed = tensors.get(f"{layer}.weight_packed", tensors.get(f"{layer}.weight"))
        if scale is None or packed is None:
            missing.append(layer)
            continue
        if packed.numel() > 1 and bool((packed.view(-1) == packed.view(-1)[0]).all()):
            constant.append(layer)
        base = None if baseline_weights is None else baseline_weights.get(f"{layer}.weight")
        stats.append(
            LayerScaleStats(
                layer=layer,
                kind="weight",
                max_abs=None if base is None else float(base.float().abs().max()),
                min_scale=float(scale.float().min()),
                max_scale=float(scale.float().max()),
                fraction_clipped=None if base is None or qmax is None else _clipped(base, scale, qmax),
            )
        )
    for name, t in sorted(tensors.items()):
        if not name.endswith(SCALE_SUFFIXES):
            continue
        s = t.float()
        if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
            bad_scales.append(f"{name}: zero, negative or non-finite")
        elif s.numel() > 8 and bool((s == s.view(-1)[0]).all()):
            bad_scales.append(f"{name}: identical across all {s.numel()} channels")
        kind = name.rsplit(".", 1)[1].removesuffix("_scale")
        if kind in ("input", "k", "v"):
            stats.append(
                LayerScaleStats(
                    layer=name.rsplit(".", 1)[0],
                    kind=kind,
                    max_abs=float(s.max()) * FP8_MAX if kind in ("k", "v") else None,
                    min_scale=float(s.min()),
                    max_scale=float(s.max()),
                )
            )
    kv_missing = [
        a for a in attention_layers if kv_expected and not (f"{a}.k_scale" in tensors and f"{a}.v_scale" in tensors)
    ]
    checks = [
        IntegrityCheck(name="finite", passed=not nonfinite, detail=", ".join(nonfinite[:8])),
        IntegrityCheck(name="quantized-weights-not-constant", passed=not constant, detail=", ".join(constant[:8])),
        IntegrityCheck(name="scales-valid", passed=not bad_scales, detail="; ".join(bad_scales[:8])),
        IntegrityCheck(
            name="all-target-layers-quantized",
            passed=not missing,
            detail=", ".join(missing[:8]) or f"{len(quantized_layers)} layers",
        ),
    ]
    if kv_expected:
        checks.append(
            IntegrityCheck(
                name="kv-scales-present",
                passed=not kv_missing,
                detail=", ".join(kv_missing[:8]) or f"{len(attention_layers)} attention layers",
            )
        )
    return checks, stats
