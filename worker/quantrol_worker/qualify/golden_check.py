"""The golden-output check: the candidate engine, greedy, scores the artifact's evaluation prompts teacher-forced
(`prompt_logprobs`), and its figures per slice are compared with calibration's reference on the same prompts.

Why: the offline gate measured a fake-quantised model in transformers; the serving kernel may compute something
else (a wrong fast path, weights changed after calibration). The engine must reproduce what calibration
measured, within the policy's tolerance. Only a *worse* engine is refused: one closer to the baseline than the
reference cannot hurt users, and the figures show it.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from quantrol_worker.contracts import EvaluationPrompts, GoldenSlice, GoldenTolerance, SliceQuality
from quantrol_worker.golden import CandidatePosition, GoldenTally

MAX_RESPONSE_BYTES = 16 * 1024 * 1024  # prompt_logprobs of one prompt: k entries per token, well below this
REQUEST_TIMEOUT_S = 120.0
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # cluster addresses never go through a proxy

Post = Callable[[str, dict[str, Any]], Any]


def post_json(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with _HTTP.open(request, timeout=REQUEST_TIMEOUT_S) as response:
        data = response.read(MAX_RESPONSE_BYTES + 1)
    if len(data) > MAX_RESPONSE_BYTES:
        raise ValueError(f"{url}: answer over {MAX_RESPONSE_BYTES} bytes")
    return json.loads(data)


def engine_positions(answer: Any, ids: list[int], k: int) -> list[CandidatePosition]:
    """vLLM's `prompt_logprobs` (one entry per prompt token, `null` first, each a map from token id to
    {logprob, rank}, always holding the prompt's own token) as positions: entry i+1 predicted token i+1."""
    entries = answer["choices"][0]["prompt_logprobs"]
    out: list[CandidatePosition] = []
    for i in range(len(ids) - 1):
        entry = entries[i + 1] or {}
        top = {int(t): float(v["logprob"]) for t, v in entry.items() if int(v.get("rank") or k + 1) <= k}
        own = entry.get(str(ids[i + 1]))
        if own is None:
            raise ValueError(f"prompt_logprobs lack the prompt's own token at position {i + 1}")
        out.append(CandidatePosition(top, float(own["logprob"])))
    return out


def score_engine(base_url: str, model: str, prompts: EvaluationPrompts, post: Post = post_json,
                 max_seconds: float = 600.0) -> list[SliceQuality]:
    """The engine's golden figures per slice (quantrol_worker.golden), greedy and teacher-forced on each prompt.
    Bounded: prompts are taken round-robin over the slices, so a deadline cuts every slice alike."""
    deadline = time.monotonic() + max_seconds
    tallies = {s.slice: GoldenTally() for s in prompts.slices}
    rounds = max((len(s.prompts) for s in prompts.slices), default=0)
    for i in range(rounds):
        for shipped in prompts.slices:
            if i >= len(shipped.prompts) or time.monotonic() > deadline:
                continue
            prompt, tally = shipped.prompts[i], tallies[shipped.slice]
            if prompt.baseline is None:
                continue
            body = {"model": model, "prompt": prompt.token_ids, "max_tokens": 1, "temperature": 0,
                    "prompt_logprobs": prompts.top_k}
            answer = post(f"{base_url.rstrip('/')}/v1/completions", body)
            tally.add(prompt.baseline, engine_positions(answer, prompt.token_ids, prompts.top_k))
    return [tallies[s.slice].figures(s.slice) for s in prompts.slices]


def compare(engine: SliceQuality, reference: SliceQuality | None, tolerance: GoldenTolerance) -> GoldenSlice:
    """One slice judged: every limit the engine misses against the reference is named."""
    result = GoldenSlice(slice=engine.slice, prompts=engine.samples, mean_kl=_r(engine.mean_kl_divergence),
                         top1=_r(engine.top1_agreement), ppl_ratio=_r(engine.perplexity_ratio))
    if reference is None or not engine.tokens:
        return result.model_copy(update={"passed": False, "failed": ["no reference or no scored tokens"]})
    result = result.model_copy(update={"reference_mean_kl": _r(reference.mean_kl_divergence),
                                       "reference_top1": _r(reference.top1_agreement),
                                       "reference_ppl_ratio": _r(reference.perplexity_ratio)})
    failed: list[str] = []
    kl, ref_kl = engine.mean_kl_divergence or 0.0, reference.mean_kl_divergence or 0.0
    if kl > ref_kl + tolerance.max_kl_increase:
        failed.append(f"meanKl: {kl:.4g} > {ref_kl:.4g} + {tolerance.max_kl_increase:.4g}")
    top1, ref_top1 = engine.top1_agreement or 0.0, reference.top1_agreement or 0.0
    if top1 < ref_top1 - tolerance.max_top1_drop:
        failed.append(f"top1: {top1:.4g} < {ref_top1:.4g} - {tolerance.max_top1_drop:.4g}")
    ppl, ref_ppl = engine.perplexity_ratio or 0.0, reference.perplexity_ratio or 1.0
    if ppl > ref_ppl * (1 + tolerance.max_perplexity_increase):
        failed.append(f"perplexityRatio: {ppl:.4g} > {ref_ppl:.4g} × (1 + {tolerance.max_perplexity_increase:.4g})")
    return result.model_copy(update={"passed": not failed, "failed": failed})


def check(base_url: str, model: str, prompts: EvaluationPrompts, tolerance: GoldenTolerance,
          post: Post = post_json, max_seconds: float = 600.0) -> list[GoldenSlice]:
    out = []
    for engine in score_engine(base_url, model, prompts, post, max_seconds):
        shipped = prompts.for_slice(engine.slice)
        out.append(compare(engine, shipped.reference if shipped else None, tolerance))
    return out


def _r(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.4g}")
