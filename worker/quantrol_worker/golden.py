"""The golden-output score: a candidate's next-token distributions against the baseline's golden record, per slice.

One definition for both sides, so that "the serving engine reproduces what calibration measured" compares like
with like: calibration scores the candidate checkpoint (transformers, full distributions) and qualification scores
the serving engine (vLLM's `prompt_logprobs`, top-k only) with this same function on the same prompts.

Per position i (predicting token i+1), with B = the baseline's top-k {token: log p} from the golden record and
C = the candidate's top-k {token: log p} plus its log-probability of the actual token:
- top-1 agreement: the most likely token of B equals the most likely token of C;
- approximate KL(baseline ‖ candidate) over B: Σ_{t∈B} p_b(t) (log p_b(t) − log p_c(t)), where a t missing from C
  takes C's smallest log-probability (it is at most that likely); clamped at 0. Only top-k is available from an
  engine, so the reference figure calibration records is computed the same way, never from the full vocabulary;
- perplexity ratio: exp(mean candidate NLL − mean baseline NLL) of the actual tokens (exact on both sides).
Torch-free and pure: the operator's side may import it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from quantrol_worker.contracts import GoldenLogprobs, SliceQuality


@dataclass(frozen=True)
class CandidatePosition:
    """What the candidate said at one position: its top-k and its log-probability of the actual next token."""

    top: Mapping[int, float]
    target_logprob: float


@dataclass
class GoldenTally:
    """Sums over the positions of one slice; `figures()` turns them into the slice's SliceQuality."""

    positions: int = 0
    prompts: int = 0
    kl_sum: float = 0.0
    agree: int = 0
    nll_baseline: float = 0.0
    nll_candidate: float = 0.0

    def add(self, baseline: GoldenLogprobs, candidate: Sequence[CandidatePosition]) -> None:
        """Fold one prompt in; `candidate[i]` is position i. Positions beyond the shorter side are not scored."""
        self.prompts += 1
        for i, cand in enumerate(candidate[: len(baseline.target_logprobs)]):
            golden = dict(zip(baseline.top_ids[i], baseline.top_logprobs[i], strict=True))
            self.kl_sum += position_kl(golden, cand.top)
            self.agree += int(_top1(golden) == _top1(cand.top))
            self.nll_baseline -= baseline.target_logprobs[i]
            self.nll_candidate -= cand.target_logprob
            self.positions += 1

    def figures(self, slice_name: str) -> SliceQuality:
        if self.positions == 0:
            return SliceQuality(slice=slice_name, samples=self.prompts, tokens=0)
        n = self.positions
        return SliceQuality(
            slice=slice_name,
            samples=self.prompts,
            tokens=n,
            mean_kl_divergence=self.kl_sum / n,
            top1_agreement=self.agree / n,
            perplexity_ratio=math.exp((self.nll_candidate - self.nll_baseline) / n),
            baseline_perplexity=math.exp(self.nll_baseline / n),
            candidate_perplexity=math.exp(self.nll_candidate / n),
        )


def _top1(top: Mapping[int, float]) -> int | None:
    return max(top, key=lambda t: top[t]) if top else None


def position_kl(golden: Mapping[int, float], candidate: Mapping[int, float]) -> float:
    if not golden or not candidate:
        return 0.0
    floor = min(candidate.values())
    kl = sum(math.exp(lp) * (lp - candidate.get(t, floor)) for t, lp in golden.items())
    return max(kl, 0.0)
