"""Candidate vs baseline on held-out samples of each slice: KL (mean, p99), top-1 agreement, perplexity ratio.

Both models run in float32 on the same token ids; the candidate is the compressed checkpoint as written,
loaded back (compressed-tensors decompresses it and keeps the activation/KV quantization it declares), so
what is measured is the artifact, not the in-memory state of the quantizer.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from quantrol_worker.calibrate.data import SliceData
from quantrol_worker.contracts import (
    GOLDEN_TOP_K,
    EvaluationPrompt,
    EvaluationPromptsPolicy,
    GoldenLogprobs,
    QualityLimits,
    SampleGeneration,
    SlicePrompts,
    SliceQuality,
    redact,
)
from quantrol_worker.golden import CandidatePosition, GoldenTally


def load_model(path: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    return model


def _log_probs(model: Any, ids: list[int]) -> Any:
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def measure_slice(baseline: Any, candidate: Any, data: SliceData, progress: Any = None) -> SliceQuality:
    import torch

    kls: list[Any] = []
    agree = total = 0
    nll_base = nll_cand = 0.0
    for i, ids in enumerate(data.evaluation):
        lp_b = _log_probs(baseline, ids)
        lp_c = _log_probs(candidate, ids)
        kl = (lp_b.exp() * (lp_b - lp_c)).sum(-1)  # KL(baseline || candidate) per position
        kls.append(kl)
        agree += int((lp_b.argmax(-1) == lp_c.argmax(-1)).sum())
        total += len(ids)
        target = torch.tensor(ids[1:])
        nll_base -= float(lp_b[:-1].gather(1, target[:, None]).sum())
        nll_cand -= float(lp_c[:-1].gather(1, target[:, None]).sum())
        if progress is not None:
            progress.log(f"slice {data.name}", i=i + 1, n=len(data.evaluation))
    all_kl = torch.cat(kls).clamp_min(0)
    predicted = total - len(data.evaluation)
    ppl_b = math.exp(nll_base / predicted)
    ppl_c = math.exp(nll_cand / predicted)
    return SliceQuality(
        slice=data.name,
        samples=len(data.evaluation),
        tokens=total,
        mean_kl_divergence=float(all_kl.mean()),
        p99_kl_divergence=float(torch.quantile(all_kl, 0.99)),
        top1_agreement=agree / total,
        perplexity_ratio=ppl_c / ppl_b,
        baseline_perplexity=ppl_b,
        candidate_perplexity=ppl_c,
    )


def apply_gate(q: SliceQuality, limits: QualityLimits) -> SliceQuality:
    """Set `passed` and name every limit the slice misses (`limit: value > bound`)."""
    failed: list[str] = []
    checks: list[tuple[str, float | None, float | None, bool]] = [
        ("maxMeanKlDivergence", q.mean_kl_divergence, limits.max_mean_kl_divergence, True),
        ("maxP99KlDivergence", q.p99_kl_divergence, limits.max_p99_kl_divergence, True),
        ("minTop1Agreement", q.top1_agreement, limits.min_top1_agreement, False),
        (
            "maxPerplexityIncrease",
            None if q.perplexity_ratio is None else q.perplexity_ratio - 1,
            limits.max_perplexity_increase,
            True,
        ),
    ]
    for name, value, bound, is_max in checks:
        if bound is None:
            continue
        if value is None or not math.isfinite(value):
            failed.append(f"{name}: not measured")
        elif (value > bound) if is_max else (value < bound):
            failed.append(f"{name}: {value:.4g} {'>' if is_max else '<'} {bound:.4g}")
    return q.model_copy(update={"passed": not failed, "failed_limits": failed})


def sample_generations(
    baseline: Any, candidate: Any, tokenizer: Any, data: SliceData, count: int, prompt_tokens: int, new_tokens: int
) -> list[SampleGeneration]:
    """Greedy continuations of the first held-out prompts, from both models, for a human to read."""
    import torch

    out: list[SampleGeneration] = []
    for ids in data.evaluation[:count]:
        prompt = torch.tensor([ids[:prompt_tokens]])
        texts = []
        for model in (baseline, candidate):
            with torch.no_grad():
                gen = model.generate(
                    input_ids=prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                )
            texts.append(tokenizer.decode(gen[0, prompt.shape[1] :], skip_special_tokens=True))
        out.append(
            SampleGeneration(
                slice=data.name,
                prompt=tokenizer.decode(prompt[0], skip_special_tokens=True),
                baseline=texts[0],
                candidate=texts[1],
            )
        )
    return out


def _r(value: float) -> float:
    return float(f"{value:.5g}")


def golden_logprobs(log_probs: Any, ids: list[int], k: int = GOLDEN_TOP_K) -> GoldenLogprobs:
    """The baseline's record for one prompt: per position, its top-k and its log-probability of the next token."""
    import torch

    rows = log_probs[:-1]
    target = rows.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    top = torch.topk(rows, k, dim=-1)
    return GoldenLogprobs(
        target_logprobs=[_r(v) for v in target.tolist()],
        top_ids=top.indices.tolist(),
        top_logprobs=[[_r(v) for v in row] for row in top.values.tolist()],
    )


def candidate_positions(log_probs: Any, ids: list[int], k: int = GOLDEN_TOP_K) -> list[CandidatePosition]:
    """The candidate at each position as a serving engine would report it: top-k plus the actual token."""
    record = golden_logprobs(log_probs, ids, k)
    return [
        CandidatePosition(dict(zip(i, lp, strict=True)), t)
        for i, lp, t in zip(record.top_ids, record.top_logprobs, record.target_logprobs, strict=True)
    ]


def evaluation_prompts(
    baseline: Any, candidate: Any, tokenizer: Any, data: SliceData, policy: EvaluationPromptsPolicy, max_tokens: int
) -> SlicePrompts:
    """The slice's held-out prompts as shipped (redacted, then cut to `max_tokens`), each with the baseline's golden
    record, and the candidate's reference figures on exactly these prompts (quantrol_worker.golden)."""
    import re

    patterns = [re.compile(p) for p in policy.redact_patterns]
    tally = GoldenTally()
    prompts: list[EvaluationPrompt] = []
    for text in data.eval_texts[: policy.max_per_slice]:
        clean, redactions = redact(text, patterns)
        ids = list(tokenizer(clean, truncation=True, max_length=max_tokens)["input_ids"])
        if len(ids) < 2:
            continue
        golden = golden_logprobs(_log_probs(baseline, ids), ids)
        tally.add(golden, candidate_positions(_log_probs(candidate, ids), ids))
        shipped = tokenizer.decode(ids, skip_special_tokens=True)
        prompts.append(EvaluationPrompt(text=shipped, token_ids=ids, redactions=redactions, baseline=golden))
    return SlicePrompts(slice=data.name, prompts=prompts, reference=tally.figures(data.name))
