"""Which vLLM kernel serves a scheme on a target, and the shape rules each kernel needs. Torch-free.

One table, read by two callers that must never disagree:
- the calibration worker's pre-check, before any compute is spent (every quantized Linear's shape, the group
  size and the tensor-parallel size are checked; the first failure names the layer and the rule);
- the serving side's post-load verification (the kernel family vLLM logged must be the one expected here).

The table mirrors vLLM's own selection: for each (scheme, target) an ordered list of candidate kernels, as
`choose_mp_linear_kernel` / `choose_scaled_mm_linear_kernel` try them; the first whose rules all hold is the
one that will serve. Rule constants are vLLM's:
- Marlin (`utils/marlin_utils.py`): output_size_per_partition % GPTQ_MARLIN_MIN_THREAD_N (64) == 0,
  input_size_per_partition % GPTQ_MARLIN_MIN_THREAD_K (128) == 0, group size in MARLIN_SUPPORTED_GROUP_SIZES
  (-1, 32, 64, 128) and dividing the input partition; compute capability ≥ 8.0 (7.5 for some types).
- Machete (`kernels/mixed_precision/machete.py`, `utils/machete_utils.py`): compute capability exactly 9.0,
  group size in (-1, 128), in_features % 64 == 0 and out_features % 128 == 0 (MACHETE_PREPACKED_BLOCK_SHAPE).
- CPUWNA16 (`kernels/mixed_precision/cpu.py`): 4-bit types only (uint4b8, uint4), even group size, in and out
  sizes multiples of 32.
- CUTLASS scaled_mm (int8 / fp8): both weight dimensions multiples of 16; FP8 needs capability ≥ 8.9, below it
  FP8 weights run weight-only through Marlin (CompressedTensorsW8A16Fp8).
- CPU (vLLM CPU 0.32, probed on this machine; ARCHITECTURE.md): W8A8 int8 via CPUInt8ScaledMMLinearKernel; W4A16
  and W4A8 serve; FP8_DYNAMIC loads but runs emulated (≈1.8 s per output token); static FP8 fails at the first
  request (`_C::static_scaled_fp8_quant`); W8A16 fails at load (no WNA16 kernel for 8-bit on CPU).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from quantrol_worker.contracts import (
    KernelPrecheck,
    KernelVerdict,
    KernelViolation,
    KvCacheScheme,
    Scheme,
    Target,
)

# Constants as vLLM names them.
GPTQ_MARLIN_MIN_THREAD_N = 64
GPTQ_MARLIN_MIN_THREAD_K = 128
MARLIN_SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128)
MACHETE_SUPPORTED_GROUP_SIZES = (-1, 128)
MACHETE_PREPACKED_BLOCK_SHAPE = (64, 128)
CUTLASS_SCALED_MM_ALIGNMENT = 16
CPU_WNA16_ALIGNMENT = 32

COMPUTE_CAPABILITY: dict[Target, int | None] = {
    Target.CUDA_SM90: 90,
    Target.CUDA_SM89: 89,
    Target.CUDA_SM80: 80,
    Target.CPU_X86: None,
}


class Parallel(StrEnum):
    """How tensor parallelism splits a Linear: by output features (column) or input features (row)."""

    COLUMN = "column"
    ROW = "row"
    REPLICATED = "replicated"


# Llama-style projection names → how vLLM shards them (QKVParallelLinear / MergedColumnParallelLinear are column
# parallel; o_proj and down_proj are RowParallelLinear).
_ROW_PARALLEL = re.compile(r"(^|\.)(o_proj|down_proj|out_proj|dense_4h_to_h|wo|w2|c_proj)$")
_COLUMN_PARALLEL = re.compile(r"(^|\.)(q_proj|k_proj|v_proj|qkv_proj|gate_proj|up_proj|gate_up_proj|w1|w3|wq|wk|wv)$")


def parallel_of(name: str) -> Parallel:
    if _ROW_PARALLEL.search(name):
        return Parallel.ROW
    if _COLUMN_PARALLEL.search(name):
        return Parallel.COLUMN
    return Parallel.REPLICATED


@dataclass(frozen=True)
class LinearShape:
    """A Linear layer as the checkpoint has it: `weight` is [out_features, in_features]."""

    name: str
    in_features: int
    out_features: int

    def partition(self, tp: int) -> tuple[int, int]:
        """(input, output) features of one tensor-parallel shard."""
        kind = parallel_of(self.name)
        if kind is Parallel.ROW:
            return self.in_features // tp, self.out_features
        if kind is Parallel.COLUMN:
            return self.in_features, self.out_features // tp
        return self.in_features, self.out_features


@dataclass(frozen=True)
class LayerContext:
    layer: LinearShape
    group_size: int | None  # None: channel-wise or tensor-wise scales (vLLM's -1)
    tp: int

    @property
    def vllm_group(self) -> int:
        return -1 if self.group_size is None else self.group_size


@dataclass(frozen=True)
class Rule:
    """One condition a kernel needs; `check` returns an explanation when it does not hold."""

    name: str
    check: Callable[[LayerContext], str | None]


def _tp_divides(c: LayerContext) -> str | None:
    kind = parallel_of(c.layer.name)
    dim = c.layer.in_features if kind is Parallel.ROW else c.layer.out_features
    if kind is not Parallel.REPLICATED and dim % c.tp:
        return f"{'in' if kind is Parallel.ROW else 'out'}_features={dim} not divisible by tensor_parallel_size={c.tp}"
    return None


def _multiple(which: str, k: int) -> Rule:
    def check(c: LayerContext) -> str | None:
        part_in, part_out = c.layer.partition(c.tp)
        value = part_in if which == "in" else part_out
        if value % k:
            return f"{which}_features per partition = {value} is not a multiple of {k}"
        return None

    return Rule(f"{which}_features % {k} == 0", check)


def _group_in(allowed: tuple[int, ...]) -> Rule:
    def check(c: LayerContext) -> str | None:
        if c.vllm_group not in allowed:
            return f"group_size={c.vllm_group} not in {list(allowed)}"
        return None

    return Rule(f"group_size in {list(allowed)}", check)


def _group_divides_input(c: LayerContext) -> str | None:
    part_in, _ = c.layer.partition(c.tp)
    g = c.vllm_group
    if g != -1 and g < c.layer.in_features and part_in % g:
        return f"in_features per partition = {part_in} is not divisible by group_size={g}"
    return None


def _group_even(c: LayerContext) -> str | None:
    if c.vllm_group != -1 and c.vllm_group % 2:
        return f"group_size={c.vllm_group} is not a multiple of 2"
    return None


TP_RULE = Rule("features % tensor_parallel_size == 0", _tp_divides)
MARLIN_RULES = (
    _multiple("out", GPTQ_MARLIN_MIN_THREAD_N),
    _multiple("in", GPTQ_MARLIN_MIN_THREAD_K),
    _group_in(MARLIN_SUPPORTED_GROUP_SIZES),
    Rule("in_features % group_size == 0", _group_divides_input),
)
MACHETE_RULES = (
    _multiple("in", MACHETE_PREPACKED_BLOCK_SHAPE[0]),
    _multiple("out", MACHETE_PREPACKED_BLOCK_SHAPE[1]),
    _group_in(MACHETE_SUPPORTED_GROUP_SIZES),
    Rule("in_features % group_size == 0", _group_divides_input),
)
CUTLASS_RULES = (_multiple("in", CUTLASS_SCALED_MM_ALIGNMENT), _multiple("out", CUTLASS_SCALED_MM_ALIGNMENT))
CPU_WNA16_RULES = (
    _multiple("in", CPU_WNA16_ALIGNMENT),
    _multiple("out", CPU_WNA16_ALIGNMENT),
    Rule("group_size % 2 == 0", _group_even),
    Rule("in_features % group_size == 0", _group_divides_input),
)


@dataclass(frozen=True)
class KernelCandidate:
    """A kernel vLLM may pick for the scheme on the target, in vLLM's priority order."""

    family: str
    verdict: KernelVerdict
    rules: tuple[Rule, ...] = ()
    note: str = ""


@dataclass(frozen=True)
class Expectation:
    """The table's entry for one (scheme, target)."""

    scheme: Scheme
    target: Target
    candidates: tuple[KernelCandidate, ...]
    none_reason: str = ""  # when no kernel exists at all (candidates empty)
    # log line substrings the serving side can match after load (first candidate's family is the usual one)
    families: tuple[str, ...] = field(default=())


def _e(scheme: Scheme, target: Target, *candidates: KernelCandidate, none_reason: str = "") -> Expectation:
    return Expectation(scheme, target, candidates, none_reason, tuple(c.family for c in candidates))


N, F = KernelVerdict.NATIVE, KernelVerdict.FALLBACK
_MACHETE = KernelCandidate("MacheteLinearKernel", N, MACHETE_RULES)
_MARLIN = KernelCandidate("MarlinLinearKernel", N, MARLIN_RULES)
_CPU_WNA16 = KernelCandidate("CPUWNA16LinearKernel", N, CPU_WNA16_RULES)
_CUTLASS_FP8 = KernelCandidate("CutlassFP8ScaledMMLinearKernel", N, CUTLASS_RULES)
_MARLIN_FP8 = KernelCandidate(
    "MarlinFP8 (CompressedTensorsW8A16Fp8)", F, MARLIN_RULES[:2], "FP8 below capability 8.9: weight-only Marlin"
)
_CUTLASS_INT8 = KernelCandidate("CutlassInt8ScaledMMLinearKernel", N, CUTLASS_RULES)
_CPU_INT8 = KernelCandidate("CPUInt8ScaledMMLinearKernel", N)

_CUDA = (Target.CUDA_SM90, Target.CUDA_SM89, Target.CUDA_SM80)

KERNEL_TABLE: dict[tuple[Scheme, Target], Expectation] = {}


def _put(exp: Expectation) -> None:
    KERNEL_TABLE[(exp.scheme, exp.target)] = exp


for _t in _CUDA:
    _wna16 = (_MACHETE, _MARLIN) if _t is Target.CUDA_SM90 else (_MARLIN,)
    _fp8 = (_CUTLASS_FP8,) if _t is not Target.CUDA_SM80 else (_MARLIN_FP8,)
    _put(_e(Scheme.W4A16, _t, *_wna16))
    _put(_e(Scheme.W4A16_ASYM, _t, *_wna16))
    _put(_e(Scheme.W8A16, _t, *_wna16))
    _put(_e(Scheme.W8A8, _t, _CUTLASS_INT8))
    _put(_e(Scheme.FP8_DYNAMIC, _t, *_fp8))
    _put(_e(Scheme.FP8, _t, *_fp8))
    # int4 weights with int8 activations: Marlin's 8-bit-activation path (is_a_8bit), needs Marlin's shapes
    _put(_e(Scheme.W4A8, _t, KernelCandidate("MarlinLinearKernel (int8 activations)", F, MARLIN_RULES)))

_put(_e(Scheme.W4A16, Target.CPU_X86, _CPU_WNA16))
_put(_e(Scheme.W4A16_ASYM, Target.CPU_X86, _CPU_WNA16))
_put(_e(Scheme.W4A8, Target.CPU_X86, KernelCandidate("CPUWNA16LinearKernel (int8 activations)", N, CPU_WNA16_RULES)))
_put(_e(Scheme.W8A8, Target.CPU_X86, _CPU_INT8))
_put(
    _e(
        Scheme.FP8_DYNAMIC,
        Target.CPU_X86,
        KernelCandidate("TorchFP8ScaledMM (CPU emulation)", F, (), "loads, but about 1.8 s per output token on CPU"),
    )
)
_put(
    _e(
        Scheme.W8A16,
        Target.CPU_X86,
        none_reason="Failed to find a kernel that can implement the WNA16 linear layer (CPU WNA16 is 4-bit only)",
    )
)
_put(_e(Scheme.FP8, Target.CPU_X86, none_reason="_C::static_scaled_fp8_quant is not supported on CPU"))

# KV-cache dtypes each target serves (vLLM `--kv-cache-dtype`); fp8 works on every target listed here.
KV_CACHE_SUPPORT: dict[Target, frozenset[KvCacheScheme]] = {
    t: frozenset({KvCacheScheme.NONE, KvCacheScheme.FP8}) for t in Target
}


def expectation(scheme: Scheme, target: Target) -> Expectation:
    return KERNEL_TABLE[(scheme, target)]


def _violations(candidate: KernelCandidate, ctx: LayerContext) -> list[KernelViolation]:
    found: list[KernelViolation] = []
    for rule in (TP_RULE, *candidate.rules):
        detail = rule.check(ctx)
        if detail is not None:
            found.append(KernelViolation(layer=ctx.layer.name, rule=f"{candidate.family}: {rule.name}", detail=detail))
    return found


def select_kernel(
    scheme: Scheme, target: Target, layer: LinearShape, group_size: int | None, tp: int = 1
) -> tuple[KernelCandidate | None, list[KernelViolation]]:
    """The kernel vLLM would pick for this layer, or None with every candidate's violations."""
    exp = expectation(scheme, target)
    ctx = LayerContext(layer, group_size, tp)
    if not exp.candidates:
        return None, [
            KernelViolation(layer=layer.name, rule=f"no kernel for {scheme} on {target}", detail=exp.none_reason)
        ]
    violations: list[KernelViolation] = []
    for candidate in exp.candidates:
        found = _violations(candidate, ctx)
        if not found:
            return candidate, []
        violations.extend(found)
    return None, violations


def precheck(
    scheme: Scheme,
    target: Target,
    layers: Iterable[LinearShape],
    group_size: int | None,
    tp: int = 1,
    kv_cache: KvCacheScheme = KvCacheScheme.NONE,
) -> KernelPrecheck:
    """Check every quantized Linear against the table; the result lists each violation with layer and rule."""
    exp = expectation(scheme, target)
    violations: list[KernelViolation] = []
    chosen: dict[str, KernelCandidate] = {}
    if kv_cache not in KV_CACHE_SUPPORT[target]:
        violations.append(KernelViolation(layer="*", rule=f"kv-cache {kv_cache}", detail=f"not served on {target}"))
    for layer in layers:
        candidate, found = select_kernel(scheme, target, layer, group_size, tp)
        if candidate is None:
            violations.extend(found)
        else:
            chosen[candidate.family] = candidate
    # The weakest kernel any layer lands on decides the verdict (a single fallback layer slows every token).
    verdict = KernelVerdict.NONE
    family: str | None = None
    if not violations and chosen:
        order = [KernelVerdict.NATIVE, KernelVerdict.FALLBACK]
        worst = max(chosen.values(), key=lambda c: order.index(c.verdict))
        verdict, family = worst.verdict, worst.family
    note = exp.none_reason or "; ".join(c.note for c in chosen.values() if c.note)
    return KernelPrecheck(
        target=target,
        scheme=scheme,
        family=family,
        verdict=verdict,
        compatible=not violations,
        violations=violations[:64],
        note=note,
    )
