"""Comparing the candidate with the stable arm on identical inputs: pure functions.

Teacher-forced comparison, the one definition of online quality (README, "How a rollout is decided"): for a
request the stable arm answered, take the stable arm's own next-token distribution at each position it generated
(its top-k log-probabilities, which the router asks for at generation time) and the candidate's distribution on
the same prefix (the candidate scores the stable arm's emitted tokens as prompt log-probabilities: one extra
prefill). Per request:

- the mean approximate KL divergence KL(stable ‖ candidate) over the generated positions, in nats per token;
- top-1 agreement: the share of positions where both distributions put their highest probability on one token.

Both distributions are taken on the same tokens, so it does not matter whether the stable arm sampled them
(temperature 0.8) or chose greedily: a candidate identical to the stable arm scores KL 0 and agreement 1 either
way. Engines return only the top-k of a distribution, so the KL is that of the two distributions coarsened to the
stable arm's listed tokens plus one bucket for the rest (a lower bound of the full KL, by the data-processing
inequality); a token the candidate did not list counts as likely as its least likely listed top-k token (the most
it can be). Everything is keyed by token id, so chat and completions mean the same and no tokenizer is needed.

A request is quality-accepted when its mean KL is within the per-request limit (`accepted`); the share of accepted
requests is the quality-acceptance term of goodput.
"""

from __future__ import annotations

import math
import re
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from quantrol_worker.contracts import REDACTED as REDACTED  # re-exported: readers of diff samples test for it
from quantrol_worker.contracts import redact as redact_all

# A token the candidate all but rules out (vLLM clamps -inf to -9999) counts as this log-probability, so that one
# position cannot outweigh a whole window: e^-20 is already "never".
LOGPROB_FLOOR = -20.0
_EPS = 1e-9


@dataclass(frozen=True)
class TopLogprobs:
    """One position's next-token distribution as an engine returns it: log-probabilities by token id of its top-k
    tokens (and of the token actually there); any token it does not list is at most as likely as `floor`."""

    logprobs: Mapping[int, float]
    floor: float

    def top1(self) -> int:
        # Ties go to the smaller token id, on both arms alike.
        return max(self.logprobs, key=lambda t: (self.logprobs[t], -t))

    def of(self, token: int) -> float:
        return max(LOGPROB_FLOOR, self.logprobs.get(token, self.floor))


def position_kl(stable: TopLogprobs, candidate: TopLogprobs) -> float:
    """KL(stable ‖ candidate) at one position, coarsened to stable's listed tokens plus the rest (nats, ≥ 0)."""
    kl = mass_stable = mass_candidate = 0.0
    for token, logprob in stable.logprobs.items():
        own = max(LOGPROB_FLOOR, logprob)
        p = math.exp(own)
        other = candidate.of(token)
        kl += p * (own - other)
        mass_stable += p
        mass_candidate += math.exp(other)
    rest_stable, rest_candidate = 1.0 - mass_stable, max(_EPS, 1.0 - mass_candidate)
    if rest_stable > _EPS:
        kl += rest_stable * (math.log(rest_stable) - math.log(rest_candidate))
    return max(0.0, kl)


@dataclass(frozen=True)
class Comparison:
    """One request compared, teacher-forced: the sums behind its mean KL and top-1 agreement."""

    positions: int
    kl_sum: float
    top1_matches: int
    first_disagreement: int | None  # the first position whose top-1 tokens differ; None: none did

    @property
    def mean_kl(self) -> float:
        return self.kl_sum / self.positions

    @property
    def agreement(self) -> float:
        return self.top1_matches / self.positions


def teacher_forced(stable: Sequence[TopLogprobs], candidate: Sequence[TopLogprobs]) -> Comparison | None:
    """Compare two arms position by position (see the module docstring); None when there is nothing to compare
    (no positions, or the two sides do not line up)."""
    if not stable or len(stable) != len(candidate):
        return None
    kl_sum, matches, first = 0.0, 0, None
    for position, (s, c) in enumerate(zip(stable, candidate, strict=True)):
        kl_sum += position_kl(s, c)
        if s.top1() == c.top1():
            matches += 1
        elif first is None:
            first = position
    return Comparison(positions=len(stable), kl_sum=kl_sum, top1_matches=matches, first_disagreement=first)


def accepted(comparison: Comparison, max_request_kl: float) -> bool:
    """Quality acceptance of one request: its mean KL within the per-request limit."""
    return comparison.mean_kl <= max_request_kl


def compile_patterns(patterns: Sequence[str]) -> list[re.Pattern[str]]:
    return [re.compile(p) for p in patterns]


def redact(text: str, patterns: Sequence[re.Pattern[str]], max_chars: int) -> str:
    """Replace every match with [REDACTED], then cut to max_chars (redacting first, so a cut cannot leave half a
    secret that no longer matches)."""
    text, _ = redact_all(text, list(patterns))
    return text if len(text) <= max_chars else text[:max_chars] + "…"


@dataclass(frozen=True)
class DiffSample:
    """A compared request that was not quality-accepted, as a human reads it at /quantrol/diffs (already redacted):
    the prompt, the stable arm's answer, the candidate's own answer to the same request when it has one (mirrored
    traffic; sampled answers differ by chance, so read it beside the figures), and where the arms' top-1 first
    disagreed on the stable arm's tokens."""

    at: float
    endpoint: str
    slice: str
    traffic: str  # mirror or probe
    prompt: str
    stable: str
    candidate: str
    mean_kl: float
    agreement: float
    first_disagreement: int | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class DiffStore:
    """The most recent `capacity` differing pairs (a ring: memory stays bounded however long shadow runs)."""

    def __init__(self, capacity: int) -> None:
        self._items: deque[DiffSample] = deque(maxlen=capacity)

    def resize(self, capacity: int) -> None:
        if capacity != self._items.maxlen:
            self._items = deque(self._items, maxlen=capacity)

    def clear(self) -> None:
        self._items.clear()

    def add(self, sample: DiffSample) -> None:
        self._items.append(sample)

    def items(self) -> list[DiffSample]:
        return list(self._items)


def prompt_text(body: dict[str, Any]) -> str:
    """The request's prompt as text for a human (chat messages as `role: content` lines)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        return "\n".join(
            f"{m.get('role', '?')}: {m.get('content', '')}" for m in messages if isinstance(m, dict)
        )
    prompt = body.get("prompt")
    return prompt if isinstance(prompt, str) else str(prompt)


def now() -> float:
    return time.time()
