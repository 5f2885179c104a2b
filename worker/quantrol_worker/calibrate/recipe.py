"""Build llm-compressor modifiers for a quantization config (an explicit registry, no package walking)."""

from __future__ import annotations

from typing import Any

from quantrol_worker.contracts import KvCacheScheme, Method, QuantizationConfig, Scheme

# FP8 KV cache with calibrated static per-tensor scales (vLLM reads k_scale / v_scale per attention layer).
KV_FP8: dict[str, Any] = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}

# Schemes whose activation scales (or KV scales) are observed from data: they need calibration samples.
STATIC_ACTIVATION_SCHEMES = frozenset({Scheme.FP8})


def needs_data(q: QuantizationConfig) -> bool:
    return (
        q.method is not Method.RTN
        or q.scheme in STATIC_ACTIVATION_SCHEMES
        or q.kv_cache_scheme is not KvCacheScheme.NONE
    )


def _scheme_kwargs(q: QuantizationConfig) -> dict[str, Any]:
    """`scheme=` for a preset, or `config_groups=` when the group size differs from the preset's 128."""
    group = q.effective_group_size
    if group is None or group == 128:
        return {"scheme": q.scheme.value}
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme(q.scheme.value, ["Linear"])
    assert scheme.weights is not None
    scheme.weights.group_size = group
    return {"config_groups": {"group_0": scheme}}


def build_modifiers(q: QuantizationConfig) -> list[Any]:
    common: dict[str, Any] = {"targets": ["Linear"], "ignore": list(q.ignore), **_scheme_kwargs(q)}
    if q.kv_cache_scheme is KvCacheScheme.FP8:
        common["kv_cache_scheme"] = dict(KV_FP8)
    if q.method is Method.RTN:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return [QuantizationModifier(**common)]
    if q.method is Method.GPTQ:
        from llmcompressor.modifiers.quantization import GPTQModifier

        return [GPTQModifier(**common)]
    if q.method is Method.SMOOTHQUANT_GPTQ:
        from llmcompressor.modifiers.quantization import GPTQModifier
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        return [SmoothQuantModifier(smoothing_strength=q.smoothing_strength), GPTQModifier(**common)]
    if q.method is Method.AWQ:
        from llmcompressor.modifiers.transform.awq import AWQModifier

        return [AWQModifier(**common)]
    raise ValueError(f"no modifier for method {q.method}")


def recipe_text(modifiers: list[Any]) -> str:
    """The recipe as llm-compressor writes it (YAML), for the report's envelope."""
    try:
        from llmcompressor.recipe import Recipe

        return str(Recipe.from_modifiers(modifiers).yaml())
    except Exception:  # an older/newer llm-compressor without yaml(): fall back to the modifiers' fields
        import json

        return json.dumps(
            [{type(m).__name__: m.model_dump(mode="json", exclude_defaults=True)} for m in modifiers], default=str
        )
