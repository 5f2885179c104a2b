"""The kernel table: scheme x target -> kernel family and verdict, and the shape rules of the pre-check."""

from __future__ import annotations

import pytest

from quantrol_worker.contracts import KernelVerdict, KvCacheScheme, Scheme, Target
from quantrol_worker.kernels import (
    KERNEL_TABLE,
    LinearShape,
    Parallel,
    expectation,
    parallel_of,
    precheck,
    select_kernel,
)

# The tiny Llama the worker tests train: hidden 256, MLP 768, 4 heads, 2 KV heads of 64.
TINY = [
    LinearShape("model.layers.0.self_attn.q_proj", 256, 256),
    LinearShape("model.layers.0.self_attn.k_proj", 256, 128),
    LinearShape("model.layers.0.self_attn.v_proj", 256, 128),
    LinearShape("model.layers.0.self_attn.o_proj", 256, 256),
    LinearShape("model.layers.0.mlp.gate_proj", 256, 768),
    LinearShape("model.layers.0.mlp.up_proj", 256, 768),
    LinearShape("model.layers.0.mlp.down_proj", 768, 256),
]


def test_table_covers_every_scheme_on_every_target() -> None:
    assert set(KERNEL_TABLE) == {(s, t) for s in Scheme for t in Target}


@pytest.mark.parametrize(
    ("scheme", "verdict", "family"),
    [
        # ARCHITECTURE.md's probe of vLLM CPU 0.32 on this machine
        (Scheme.W8A8, KernelVerdict.NATIVE, "CPUInt8ScaledMMLinearKernel"),
        (Scheme.W4A16, KernelVerdict.NATIVE, "CPUWNA16LinearKernel"),
        (Scheme.FP8_DYNAMIC, KernelVerdict.FALLBACK, "TorchFP8ScaledMM (CPU emulation)"),
        (Scheme.FP8, KernelVerdict.NONE, None),
        (Scheme.W8A16, KernelVerdict.NONE, None),
    ],
)
def test_cpu_rows_match_the_probe(scheme: Scheme, verdict: KernelVerdict, family: str | None) -> None:
    group = 128 if scheme in (Scheme.W4A16, Scheme.W8A16) else None
    result = precheck(scheme, Target.CPU_X86, TINY, group)
    assert result.verdict is verdict and result.family == family
    assert result.compatible is (verdict is not KernelVerdict.NONE)
    if not result.compatible:
        assert result.violations[0].layer == "model.layers.0.self_attn.q_proj"


def test_w8a16_on_cpu_names_vllms_own_error() -> None:
    result = precheck(Scheme.W8A16, Target.CPU_X86, TINY, 128)
    assert "Failed to find a kernel that can implement the WNA16 linear layer" in result.violations[0].detail


def test_hopper_w4a16_prefers_machete_then_marlin() -> None:
    assert [c.family for c in expectation(Scheme.W4A16, Target.CUDA_SM90).candidates] == [
        "MacheteLinearKernel",
        "MarlinLinearKernel",
    ]
    assert [c.family for c in expectation(Scheme.W4A16, Target.CUDA_SM80).candidates] == ["MarlinLinearKernel"]
    # group 64: not a Machete group size, a Marlin one
    chosen, _ = select_kernel(Scheme.W4A16, Target.CUDA_SM90, TINY[0], 64)
    assert chosen is not None and chosen.family == "MarlinLinearKernel"
    chosen, _ = select_kernel(Scheme.W4A16, Target.CUDA_SM90, TINY[0], 128)
    assert chosen is not None and chosen.family == "MacheteLinearKernel"


def test_group_size_no_kernel_supports_fails_with_every_rule() -> None:
    result = precheck(Scheme.W4A16, Target.CUDA_SM90, TINY, 96)
    assert not result.compatible
    rules = {v.rule for v in result.violations}
    assert "MacheteLinearKernel: group_size in [-1, 128]" in rules
    assert "MarlinLinearKernel: group_size in [-1, 32, 64, 128]" in rules


def test_marlin_shape_rules_are_vllms() -> None:
    # out % 64 (GPTQ_MARLIN_MIN_THREAD_N) and in % 128 (GPTQ_MARLIN_MIN_THREAD_K)
    ok, _ = select_kernel(Scheme.W4A16, Target.CUDA_SM80, LinearShape("x.q_proj", 128, 64), 128)
    assert ok is not None
    bad, why = select_kernel(Scheme.W4A16, Target.CUDA_SM80, LinearShape("x.q_proj", 192, 64), 64)
    assert bad is None and any("in_features per partition = 192 is not a multiple of 128" in v.detail for v in why)
    bad, why = select_kernel(Scheme.W4A16, Target.CUDA_SM80, LinearShape("x.q_proj", 128, 96), 128)
    assert bad is None and any("out_features per partition = 96 is not a multiple of 64" in v.detail for v in why)


def test_tensor_parallel_splits_column_and_row_layers() -> None:
    assert parallel_of("model.layers.3.self_attn.o_proj") is Parallel.ROW
    assert parallel_of("model.layers.3.mlp.down_proj") is Parallel.ROW
    assert parallel_of("model.layers.3.mlp.up_proj") is Parallel.COLUMN
    assert parallel_of("lm_head") is Parallel.REPLICATED
    assert LinearShape("m.down_proj", 768, 256).partition(2) == (384, 256)
    assert LinearShape("m.up_proj", 256, 768).partition(2) == (256, 384)
    assert precheck(Scheme.W4A16, Target.CUDA_SM80, TINY, 128, tp=2).compatible
    # TP 4: row-parallel o_proj/down_proj get 64/192 inputs (Marlin wants multiples of 128), k/v_proj 32 outputs (64)
    result = precheck(Scheme.W4A16, Target.CUDA_SM80, TINY, 128, tp=4)
    assert {v.layer.rsplit(".", 1)[1] for v in result.violations} == {"k_proj", "v_proj", "o_proj", "down_proj"}
    assert any("in_features per partition = 192 is not a multiple of 128" in v.detail for v in result.violations)
    result = precheck(Scheme.W8A8, Target.CUDA_SM90, TINY, None, tp=3)
    assert any("tensor_parallel_size=3" in v.detail for v in result.violations)


def test_fp8_needs_ada_or_hopper_else_weight_only_marlin() -> None:
    assert precheck(Scheme.FP8_DYNAMIC, Target.CUDA_SM89, TINY, None).verdict is KernelVerdict.NATIVE
    sm80 = precheck(Scheme.FP8_DYNAMIC, Target.CUDA_SM80, TINY, None)
    assert sm80.verdict is KernelVerdict.FALLBACK and "Marlin" in (sm80.family or "")


def test_kv_cache_fp8_is_served_everywhere() -> None:
    for target in Target:
        assert precheck(Scheme.W8A8, target, TINY, None, kv_cache=KvCacheScheme.FP8).compatible
