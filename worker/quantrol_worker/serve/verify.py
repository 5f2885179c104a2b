"""Kernel verification: what vLLM says it loaded, judged against the shared table (`quantrol_worker.kernels`).

The table says which kernel family a (scheme, target) must land on and whether that is `native`, a `fallback` or
`none`; this module turns vLLM's log events (`logparse`) into the same words, so the calibration pre-check and the
serving-side verification can never disagree. Pure and torch-free: fed events, asked for an `Assessment`.

Verdicts (`contracts.KernelVerdict`, shared with the pre-check and the rollout state machine): `native` /
`fallback` / `none` as in the table, and `unknown` when the engine is up but its log named no kernel the table
knows (a new vLLM, a scheme the table lacks): the operator treats that as unverified, never as a pass. Mismatches
are listed separately from the verdict (a native kernel with default KV-cache scales is still a candidate that
does not keep its promise).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

from quantrol_worker.contracts import KernelVerdict, Scheme, Target
from quantrol_worker.kernels import KERNEL_TABLE, KernelCandidate
from quantrol_worker.serve.logparse import EventKind, LogEvent


class Mismatch(StrEnum):
    """Why a loaded engine does not keep the artifact's promise (CamelCase, like condition reasons)."""

    KERNEL_UNAVAILABLE = "KernelUnavailable"  # vLLM found no kernel, or the table says none exists on this target
    KERNEL_NOT_EXPECTED = "KernelNotExpected"  # vLLM picked a kernel the table does not list for the scheme
    NO_KERNEL_LOGGED = "NoKernelLogged"  # quantized scheme, engine up, but no kernel selection line was seen
    NOT_IN_TABLE = "SchemeNotInTable"  # the table has no row for (scheme, target)
    KV_CACHE_SCALE_DEFAULT = "KvCacheScaleDefault"  # calibrated k/v scales promised, vLLM used 1.0
    KV_CACHE_NOT_QUANTIZED = "KvCacheNotQuantized"  # calibrated fp8 KV cache promised, served without --kv-cache-dtype


# Worst first wins when layers disagree: one fallback layer slows every token; an unknown one is unverified.
_ORDER = (KernelVerdict.NATIVE, KernelVerdict.FALLBACK, KernelVerdict.UNKNOWN, KernelVerdict.NONE)
UNQUANTIZED = "unquantized"  # the scheme label of a bf16/fp16 baseline: nothing to verify, dense GEMM
FP8_WEIGHT_ONLY_FAMILY = "MarlinFP8 (weight-only)"
_TRACE_LAYER = re.compile(r"\bself\.(?P<attr>\w+) = (?P<cls>\w*Linear\w*)\(")
_TRACE_SCHEME = re.compile(r"schemes/(?P<file>\w+\.py)")
# vLLM's engine start line: "Initializing a V1 LLM engine (v0.32.0) with config: model=…, dtype=…, device_config=cpu,
# …": the engine's own word on its version, device and effective settings (the serving-side experiment envelope).
_ENGINE_LINE = re.compile(r"Initializing a \S+ LLM engine \(v(?P<version>[^)\s]+)\) with config: (?P<config>.*)")
_ENGINE_KEYS = ("device_config", "dtype", "quantization", "kv_cache_dtype", "max_seq_len", "enforce_eager",
                "tensor_parallel_size", "enable_prefix_caching", "enable_chunked_prefill")


def engine_facts(line: str) -> dict[str, str] | None:
    """The version, device and settings vLLM reports at start, or None for any other line (values cut to 128)."""
    m = _ENGINE_LINE.search(line)
    if m is None:
        return None
    facts = {"version": m["version"][:64]}
    for key in _ENGINE_KEYS:
        if found := re.search(rf"\b{key}=([^,]*)", m["config"]):
            facts[key] = found.group(1).strip()[:128]
    return facts


@dataclass(frozen=True)
class KernelInUse:
    """One kernel vLLM reported, with the table's word for it."""

    kernel: str
    subject: str  # the scheme class it serves (CompressedTensorsW8A8Int8) or "mixed-precision"
    family: str  # the table's family it matched, or the kernel itself when it matched none
    verdict: KernelVerdict


@dataclass(frozen=True)
class Assessment:
    scheme: str  # a Scheme value, UNQUANTIZED, or "unknown"
    target: str
    kv_cache_dtype: str
    phase: str  # starting | serving | failed | exited
    verdict: KernelVerdict | None  # None while starting and nothing decisive was seen yet
    family: str
    kernels: tuple[KernelInUse, ...]
    mismatches: tuple[tuple[Mismatch, str], ...]
    message: str
    engine: dict[str, str] = field(default_factory=dict)  # engine_facts: version, device, effective settings
    flags: tuple[str, ...] = ()  # the engine's command-line flags, as the launcher passed them

    @property
    def verified(self) -> bool:
        """The kernels are the ones the scheme promises (fallback included: kernelPolicy decides about it)."""
        return self.verdict in (KernelVerdict.NATIVE, KernelVerdict.FALLBACK) and not self.mismatches


@dataclass
class KernelObserver:
    """Accumulates log events of one engine run; `assess()` may be called at any time (the metrics endpoint does)."""

    scheme: Scheme | None  # None: unquantized baseline
    target: Target
    kv_cache_dtype: str = "auto"
    kv_scales_promised: bool = False  # the artifact was calibrated with an fp8 KV-cache scheme
    scheme_known: bool = True  # False: quantized, but the launcher could not tell which scheme
    selected: list[LogEvent] = field(default_factory=list)
    no_kernel: LogEvent | None = None
    no_kernel_reasons: list[str] = field(default_factory=list)
    kv_scale_default: bool = False
    ready: bool = False
    exit_code: int | None = None
    layer: str = ""  # the Linear being built when vLLM gave up (from its traceback)
    scheme_class: str = ""  # the vLLM scheme implementation file that asked for the kernel
    engine: dict[str, str] = field(default_factory=dict)
    flags: tuple[str, ...] = ()

    def feed(self, line: str, event: LogEvent | None) -> None:
        if not self.engine and (facts := engine_facts(line)) is not None:
            self.engine = facts
        if event is None:
            # Traceback lines of a failed load name the layer and the scheme implementation; keep the last ones.
            if self.no_kernel is None and self.exit_code is None:
                if m := _TRACE_LAYER.search(line):
                    self.layer = f"{m['attr']} ({m['cls']})"
                elif m := _TRACE_SCHEME.search(line):
                    self.scheme_class = m["file"]
            return
        if event.kind in (EventKind.SELECTED, EventKind.MIXED_PRECISION, EventKind.FP8_WEIGHT_ONLY):
            self.selected.append(event)
        elif event.kind is EventKind.NO_KERNEL and self.no_kernel is None:
            self.no_kernel = event
        elif event.kind is EventKind.NO_KERNEL_REASON and self.no_kernel is not None:
            self.no_kernel_reasons.append(f"{event.kernel}: {event.detail}")
        elif event.kind is EventKind.KV_SCALE_DEFAULT:
            self.kv_scale_default = True
        elif event.kind is EventKind.READY:
            self.ready = True

    @property
    def scheme_label(self) -> str:
        if not self.scheme_known:
            return "unknown"
        return UNQUANTIZED if self.scheme is None else self.scheme.value

    def _phase(self) -> str:
        if self.exit_code is not None:
            return "exited" if self.ready else "failed"
        return "serving" if self.ready else "starting"

    def _match(self, event: LogEvent, candidates: tuple[KernelCandidate, ...]) -> KernelInUse:
        if event.kind is EventKind.FP8_WEIGHT_ONLY:
            return KernelInUse(event.kernel, event.subject, FP8_WEIGHT_ONLY_FAMILY, KernelVerdict.FALLBACK)
        for candidate in candidates:
            # Table families may carry a note in parentheses ("TorchFP8ScaledMM (CPU emulation)"); vLLM names the
            # concrete class (ChannelWiseTorchFP8ScaledMMLinearKernel), so the family's first word must occur in it.
            if candidate.family.split(" ")[0] in event.kernel:
                return KernelInUse(event.kernel, event.subject, candidate.family, candidate.verdict)
        return KernelInUse(event.kernel, event.subject, event.kernel, KernelVerdict.UNKNOWN)

    def _no_kernel_message(self) -> str:
        assert self.no_kernel is not None
        where = self.layer or "a quantized Linear"
        impl = f" (vLLM {self.scheme_class})" if self.scheme_class else ""
        reasons = "; ".join(self.no_kernel_reasons) or "no reasons logged"
        return (
            f"vLLM found no kernel for the {self.no_kernel.subject} linear layer {where}{impl} "
            f"(scheme {self.scheme_label} on {self.target}): {reasons}"
        )

    def _kv_mismatches(self) -> list[tuple[Mismatch, str]]:
        if not self.kv_scales_promised:
            return []
        if not self.kv_cache_dtype.startswith("fp8"):
            return [(Mismatch.KV_CACHE_NOT_QUANTIZED,
                     f"artifact carries calibrated fp8 KV-cache scales but --kv-cache-dtype is {self.kv_cache_dtype}")]
        if self.kv_scale_default:
            return [(Mismatch.KV_CACHE_SCALE_DEFAULT,
                     "vLLM used KV cache scaling factor 1.0: the calibrated k/v scales were not loaded")]
        return []

    def assess(self) -> Assessment:
        phase = self._phase()
        kernels: tuple[KernelInUse, ...] = ()
        mismatches: list[tuple[Mismatch, str]] = []
        verdict: KernelVerdict | None = None
        family = ""
        if self.no_kernel is not None:
            verdict, message = KernelVerdict.NONE, self._no_kernel_message()
            mismatches.append((Mismatch.KERNEL_UNAVAILABLE, message))
            family = self.no_kernel.subject
        elif not self.scheme_known:
            kernels = tuple(self._match(e, ()) for e in self.selected)
            verdict = KernelVerdict.UNKNOWN if self.ready else None
            message = "scheme unknown: pass --scheme or ship quantrol-report.json with the artifact"
        elif self.scheme is None:
            kernels = tuple(self._match(e, ()) for e in self.selected)
            verdict, family = KernelVerdict.NATIVE, "dense"
            if kernels:
                mismatches.append((Mismatch.KERNEL_NOT_EXPECTED,
                                   f"unquantized model, yet vLLM selected {[k.kernel for k in kernels]}"))
            message = "unquantized: dense GEMM, nothing to verify"
        else:
            verdict, family, kernels, message = self._judge_quantized(self.scheme, mismatches)
        mismatches.extend(self._kv_mismatches())
        if mismatches and verdict is not None and message.startswith("ok"):
            message = "; ".join(detail for _, detail in mismatches)
        return Assessment(
            scheme=self.scheme_label,
            target=self.target.value,
            kv_cache_dtype=self.kv_cache_dtype,
            phase=phase,
            verdict=verdict,
            family=family,
            kernels=kernels,
            mismatches=tuple(mismatches),
            message=message,
            engine=dict(self.engine),
            flags=self.flags,
        )

    def _judge_quantized(
        self, scheme: Scheme, mismatches: list[tuple[Mismatch, str]]
    ) -> tuple[KernelVerdict | None, str, tuple[KernelInUse, ...], str]:
        expectation = KERNEL_TABLE.get((scheme, self.target))
        if expectation is None:
            mismatches.append((Mismatch.NOT_IN_TABLE, f"the kernel table has no row for {scheme} on {self.target}"))
            kernels = tuple(self._match(e, ()) for e in self.selected)
            return (KernelVerdict.UNKNOWN if self.ready or kernels else None), "", kernels, mismatches[-1][1]
        if not expectation.candidates:
            # The table knows there is no kernel here (e.g. static FP8 on CPU loads, then fails at the first request).
            detail = f"no kernel serves {scheme} on {self.target}: {expectation.none_reason}"
            mismatches.append((Mismatch.KERNEL_UNAVAILABLE, detail))
            return KernelVerdict.NONE, "", tuple(self._match(e, ()) for e in self.selected), detail
        kernels = tuple(self._match(e, expectation.candidates) for e in self.selected)
        expected = [c.family for c in expectation.candidates]
        for k in kernels:
            if k.verdict is KernelVerdict.UNKNOWN:
                mismatches.append((Mismatch.KERNEL_NOT_EXPECTED,
                                   f"vLLM selected {k.kernel} for {k.subject}; the table expects one of {expected}"))
        if not kernels:
            if not self.ready:
                return None, "", (), f"waiting for kernel selection (expecting {expected})"
            mismatches.append((Mismatch.NO_KERNEL_LOGGED, f"engine is up but logged no kernel; expected {expected}"))
            return KernelVerdict.UNKNOWN, "", (), mismatches[-1][1]
        worst = max(kernels, key=lambda k: _ORDER.index(k.verdict))
        return worst.verdict, worst.family, kernels, f"ok: {worst.kernel} is {worst.verdict} for {scheme}"
