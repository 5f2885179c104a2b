"""Comparing the candidate's output with the stable arm's on identical inputs: pure functions.

Two signals, both defined on token ids (so they mean the same for chat and completions, and need no tokenizer):
- agreement under greedy decoding: the share of positions where both arms chose the same token, over the longer
  of the two outputs (a shorter or longer answer is a disagreement), and the first position where they differ;
- the teacher-forced quality delta: the candidate's mean log-probability of the stable arm's tokens minus the
  stable arm's own, in nats per token. 0 means the candidate is as sure of the stable answer as stable is;
  negative means it would rather have said something else. Unlike agreement it does not collapse after the first
  divergence, so it is the better early signal for a small quantization error.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from quantrol_worker.contracts import REDACTED as REDACTED  # re-exported: readers of diff samples test for it
from quantrol_worker.contracts import redact as redact_all


@dataclass(frozen=True)
class Agreement:
    ratio: float
    first_divergence: int | None  # None: identical sequences
    compared: int  # the longer length, the denominator of ratio


def token_agreement(stable: Sequence[int], candidate: Sequence[int]) -> Agreement:
    longest = max(len(stable), len(candidate))
    if longest == 0:
        return Agreement(ratio=1.0, first_divergence=None, compared=0)
    matches = sum(1 for a, b in zip(stable, candidate, strict=False) if a == b)
    first: int | None = None
    for position, (a, b) in enumerate(zip(stable, candidate, strict=False)):
        if a != b:
            first = position
            break
    if first is None and len(stable) != len(candidate):
        first = min(len(stable), len(candidate))
    return Agreement(ratio=matches / longest, first_divergence=first, compared=longest)


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def quality_delta(candidate_logprobs: Sequence[float], stable_logprobs: Sequence[float]) -> float | None:
    """Mean candidate log-prob minus mean stable log-prob of the same (stable) tokens; None if nothing to score."""
    if not candidate_logprobs or len(candidate_logprobs) != len(stable_logprobs):
        return None
    cand, stab = mean(candidate_logprobs), mean(stable_logprobs)
    assert cand is not None and stab is not None
    return cand - stab


def compile_patterns(patterns: Sequence[str]) -> list[re.Pattern[str]]:
    return [re.compile(p) for p in patterns]


def redact(text: str, patterns: Sequence[re.Pattern[str]], max_chars: int) -> str:
    """Replace every match with [REDACTED], then cut to max_chars (redacting first, so a cut cannot leave half a
    secret that no longer matches)."""
    text, _ = redact_all(text, list(patterns))
    return text if len(text) <= max_chars else text[:max_chars] + "…"


@dataclass(frozen=True)
class DiffSample:
    """A stable/candidate pair that differed, as a human reads it at /quantrol/diffs (already redacted)."""

    at: float
    endpoint: str
    slice: str
    prompt: str
    stable: str
    candidate: str
    agreement: float
    first_divergence: int | None
    quality_delta: float | None

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
