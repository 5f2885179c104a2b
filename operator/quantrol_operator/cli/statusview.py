"""`quantrol status`: a ServingPolicy or QuantizedModel readable at a glance (also as `kubectl quantrol`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from quantrol_operator.api.kinds import QUANTIZED_MODEL, SERVING_POLICY


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def render_servingpolicy(obj: dict[str, Any]) -> str:
    meta, status = obj["metadata"], obj.get("status") or {}
    weights = status.get("weights") or {}
    lines = [
        f"ServingPolicy {meta.get('namespace')}/{meta['name']}: {status.get('phase', 'Pending')}"
        + (f" step {status['step']}" if status.get("step") is not None else ""),
        f"  weights     stable {weights.get('stable', 100)}%  candidate {weights.get('candidate', 0)}%"
        f"  mirror {weights.get('mirrorFraction', 0.0):.0%}",
        f"  stable      {_fmt(status.get('stableArtifact'))}",
        f"  candidate   {_fmt(status.get('candidateArtifact'))}",
    ]
    if status.get("rollbackTarget"):
        lines.append(f"  rollback to {status['rollbackTarget']}"
                     + (f"  (kept warm, analysis on, until {status['guardUntil']})" if status.get("guardUntil")
                        else ""))
    if status.get("message"):
        lines.append(f"  message     {status['message']}")
    lines += _qualification(status.get("qualification") or {})
    analysis = status.get("lastAnalysis")
    if analysis:
        lines.append(f"  last analysis {analysis.get('time')} over {analysis.get('windowSeconds')}s: "
                     f"{analysis.get('verdict')}"
                     + (f" ({analysis['cause']})" if analysis.get("cause") else "")
                     + (f" — no judgement: {analysis['noJudgement']}" if analysis.get("noJudgement") else ""))
        lines.append(f"    {'SLO':<22} {'slice':<12} {'candidate':>10} {'stable':>10} {'limit':>10}  verdict")
        for m in analysis.get("metrics", []):
            lines.append(f"    {m.get('slo', ''):<22} {m.get('slice') or 'all':<12} {_fmt(m.get('value')):>10} "
                         f"{_fmt(m.get('stableValue')):>10} {_fmt(m.get('limit')):>10}  {m.get('verdict')}")
        for g in analysis.get("goodput") or []:
            lines.append(f"    goodput {g.get('arm'):<10} accepted share {_fmt(g.get('acceptedShare'))} × quality "
                         f"{_fmt(g.get('qualityAcceptance'))} = {_fmt(g.get('value'))}; "
                         f"{_fmt(g.get('perEngineSecond'))} accepted tokens per engine-second")
    probes = status.get("probes")
    if probes:
        lines.append(f"  probes      {probes.get('source')}: {probes.get('message', '')}"
                     + (f" {probes['prompts']}" if probes.get("prompts") else ""))
    for arm in status.get("arms") or []:
        lines.append(f"  arm {arm.get('shortDigest')} ({arm.get('settings')} settings, {arm.get('replicas')} "
                     f"replicas): tensor parallel {arm.get('tensorParallelSize')}, {arm.get('gpus')} GPU, KV cache "
                     f"{arm.get('kvCacheDtype')}, storage {arm.get('storage')}")
        engine = arm.get("engine") or {}
        if engine:
            lines.append(f"      engine {engine.get('version')} on {engine.get('device') or '?'}, image "
                         f"{engine.get('image') or '?'}")
    for c in status.get("conditions") or []:
        if c.get("type") in ("StableReady", "CandidateReady") and c.get("status") == "False" and \
                c.get("reason") not in ("ArmNotReady",):
            lines.append(f"  {c.get('type')}: {c.get('reason')} — {c.get('message', '')}")
    paused = next((c for c in status.get("conditions") or [] if c.get("type") == "Paused"), None)
    if paused and paused.get("status") == "True":
        lines.append(f"  PAUSED: {paused.get('reason')} — {paused.get('message', '')}")
    rollback = status.get("rollback")
    if rollback:
        lines.append(f"  ROLLED BACK {rollback.get('time')}: {rollback.get('reason')}"
                     + (f" ({rollback['cause']})" if rollback.get("cause") else "")
                     + (f" on {rollback['slo']}" + (f" in slice {rollback['slice']}" if rollback.get("slice") else "")
                        + f": candidate {_fmt(rollback.get('candidateValue'))} vs limit "
                        f"{_fmt(rollback.get('limit'))}" if rollback.get("slo") else "")
                     + (f" — {rollback['message']}" if rollback.get("message") else ""))
        also = [slo for slo in rollback.get("failingSlos") or [] if slo != rollback.get("slo")]
        if also:
            lines.append(f"              also failing in that window: {', '.join(also)}")
        lines.append("  to retry:   kubectl annotate sp "
                     f"{meta['name']} quantrol.io/retry=$(date +%s) --overwrite")
    history = status.get("history") or []
    if history:
        lines.append("  recent transitions:")
        lines += [f"    {h.get('time')}  {h.get('from', '-'):>10} → {h.get('to'):<10} {h.get('reason')}"
                  for h in history[-8:]]
    return "\n".join(lines)


def _qualification(q: dict[str, Any]) -> list[str]:
    """The Qualifying phase's verdict, each arm's floor and sustainable figures, the golden check per slice."""
    if not q:
        return []
    lines = [f"  qualification {q.get('state')} ({q.get('reason') or '-'}, {q.get('tool') or 'no tool run'}): "
             f"goodput {_fmt(q.get('goodputRatio'))} × stable, required ≥ {_fmt(q.get('requiredGoodputRatio'))}",
             f"    {q.get('message', '')}"]
    for arm in q.get("arms") or []:
        for r in arm.get("regimes") or []:
            figures = (f"rate {_fmt(r.get('rateRps'))}/s  TTFT p99 {_fmt(r.get('ttftP99Seconds'))}s  "
                       f"ITL p99 {_fmt(r.get('itlP99Seconds'))}s  "
                       f"goodput {_fmt(r.get('goodputTokensPerEngineSecond'))} tok/engine-s  "
                       f"429 {_fmt(r.get('rejectedFraction'))}  recovery {_fmt(r.get('recoverySeconds'))}s")
            verdict = "" if r.get("passed") else f"  FAIL {'; '.join(r.get('failed') or [])}"
            lines.append(f"    {arm.get('arm', ''):<10} {r.get('regime', ''):<12} {figures}{verdict}")
    for g in q.get("golden") or []:
        figures = (f"KL {_fmt(g.get('meanKl'))} (ref {_fmt(g.get('referenceMeanKl'))})  "
                   f"top-1 {_fmt(g.get('top1'))} (ref {_fmt(g.get('referenceTop1'))})")
        verdict = "" if g.get("passed") else f"  FAIL {'; '.join(g.get('failed') or [])}"
        lines.append(f"    golden {g.get('slice', ''):<12} {figures}{verdict}")
    return lines


def render_quantizedmodel(obj: dict[str, Any]) -> str:
    meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
    quant = spec.get("quantization") or {}
    artifact = status.get("artifact") or {}
    lines = [
        f"QuantizedModel {meta.get('namespace')}/{meta['name']}: {status.get('phase', 'Pending')} "
        f"({quant.get('scheme')} {quant.get('method', '')} for {quant.get('target', '')})",
        f"  artifact    {_fmt(artifact.get('ref'))}" + (f"  ({artifact['sizeBytes']} bytes)"
                                                       if artifact.get("sizeBytes") else ""),
    ]
    if status.get("message"):
        lines.append(f"  message     {status['message']}")
    quality = status.get("quality") or []
    if quality:
        lines.append(f"    {'slice':<16} {'mean KL':>10} {'p99 KL':>10} {'top-1':>8} {'ppl ×':>8}  gate")
        for q in quality:
            gate = "pass" if q.get("passed") else "FAIL " + ",".join(q.get("failedLimits", []))
            lines.append(f"    {q.get('slice', ''):<16} {_fmt(q.get('meanKlDivergence')):>10} "
                         f"{_fmt(q.get('p99KlDivergence')):>10} {_fmt(q.get('top1Agreement')):>8} "
                         f"{_fmt(q.get('perplexityRatio')):>8}  {gate}")
    for c in status.get("conditions", []):
        lines.append(f"  {c.get('type'):<16} {c.get('status'):<7} {c.get('reason')}: {c.get('message', '')}")
    return "\n".join(lines)


# What `quantrol status` prints per kind.
RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {
    SERVING_POLICY.kind: render_servingpolicy,
    QUANTIZED_MODEL.kind: render_quantizedmodel,
}
