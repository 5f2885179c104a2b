"""What the router reads from OpenAI-compatible requests and responses (vLLM's dialect): pure, no I/O.

vLLM specifics relied on (vllm/entrypoints/openai/{completion,chat_completion}/protocol.py):
- `return_token_ids: true` adds `token_ids` (per choice, per streamed delta) and `prompt_token_ids` (per choice for
  completions, top level for chat; first streamed chunk only);
- `prompt_logprobs: k` on /v1/completions returns per choice a list, one entry per prompt token: `null` for the
  first, else a map from token id (as a JSON string) to `{"logprob", "rank", "decoded_token"}` that always holds
  the prompt's own token; not available with `stream: true`;
- a prompt may be a list of token ids, which is how the teacher-forced probe reuses the chat-templated prompt.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
TOKEN_FIELDS = ("token_ids", "prompt_token_ids")


def is_greedy(body: Mapping[str, Any]) -> bool:
    """Greedy decoding, where token agreement between arms means something. vLLM's default temperature is the
    model's generation config or 1.0, so an absent temperature is *not* greedy."""
    if int(body.get("n") or 1) != 1 or body.get("use_beam_search"):
        return False
    temperature = body.get("temperature")
    top_k = body.get("top_k")
    return (isinstance(temperature, (int, float)) and temperature == 0) or top_k == 1


def prompt_chars(path: str, body: Mapping[str, Any]) -> int:
    """Prompt length in characters (token-id prompts count one per id); the router has no tokenizer."""
    if path == CHAT:
        total = 0
        for message in body.get("messages") or []:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                total += len(content)
            elif isinstance(content, list):
                total += sum(len(str(part.get("text", ""))) for part in content if isinstance(part, dict))
        return total
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, list):
        return sum(len(p) if isinstance(p, str) else 1 for p in prompt)
    return 0


def slice_label(header_value: str | None, allowed: Sequence[str], chars: int, buckets: Sequence[int]) -> str:
    """The `slice` label: a listed header value, `other` for an unlisted one, else a prompt-length bucket
    (`len_le_256`, …, `len_gt_16384`)."""
    if header_value:
        return header_value if header_value in allowed else "other"
    for bound in buckets:
        if chars <= bound:
            return f"len_le_{bound}"
    return f"len_gt_{buckets[-1]}" if buckets else "all"


_DECODER = json.JSONDecoder()


def loads(data: bytes) -> Any:
    """`json.loads` for UTF-8 bytes, without its per-call encoding sniffing: the router parses every streamed chunk,
    and for chunks of a few hundred bytes that overhead is a third of the parse. Raises ValueError as json.loads
    does (UnicodeDecodeError is one)."""
    return _DECODER.decode(data.decode())


class SSEParser:
    """Splits a server-sent-event byte stream into `data:` payloads, whatever the network chunking."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        # One split per chunk (this runs for every streamed token): the last piece is an incomplete event.
        events = (self._buffer + chunk if self._buffer else chunk).split(b"\n\n")
        self._buffer = events.pop()
        payloads: list[bytes] = []
        for event in events:
            if b"\n" not in event:  # the usual event: one `data:` line
                if event.startswith(b"data:"):
                    payloads.append(event[5:].strip())
                continue
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    payloads.append(line[5:].strip())
        return payloads


@dataclass
class Output:
    """One response's generated output, accumulated from a JSON body or from streamed chunks (choice 0 only:
    comparison is defined for n=1)."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    prompt_token_ids: list[int] | None = None
    tokens: int = 0
    usage_completion_tokens: int | None = None
    saw_token_ids: bool = False

    @property
    def joined(self) -> str:
        return "".join(self.text)

    @property
    def output_tokens(self) -> int:
        # The engine's own count when it sent one (stream_options.include_usage, or any non-streamed body).
        return self.usage_completion_tokens if self.usage_completion_tokens is not None else self.tokens

    def feed(self, obj: Mapping[str, Any], chat: bool) -> int:
        """Take one response object (or streamed chunk); return how many output tokens it carried."""
        usage = obj.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.usage_completion_tokens = usage["completion_tokens"]
        if chat and isinstance(obj.get("prompt_token_ids"), list):
            self.prompt_token_ids = list(obj["prompt_token_ids"])
        choices = obj.get("choices") or []
        if not choices or not isinstance(choices[0], dict):
            return 0
        choice = choices[0]
        if not chat and isinstance(choice.get("prompt_token_ids"), list):
            self.prompt_token_ids = list(choice["prompt_token_ids"])
        if chat:
            part = choice.get("delta") or choice.get("message") or {}
            text = part.get("content") if isinstance(part, dict) else None
        else:
            text = choice.get("text")
        ids = choice.get("token_ids")
        if isinstance(ids, list):
            self.saw_token_ids = True
            self.token_ids.extend(int(i) for i in ids)
            count = len(ids)
        else:
            # Without token ids, a chunk with text is one token: vLLM streams one token per chunk unless
            # --stream-interval says otherwise, and the final usage (when sent) corrects the total.
            count = 1 if text else 0
        if text:
            self.text.append(text)
        self.tokens += count
        return count


def strip_token_fields(obj: dict[str, Any], streamed: bool) -> None:
    """Undo the token-id fields the router itself asked for, so the client's answer is what it would have been:
    vLLM writes unset fields as `null` in whole bodies and leaves them out of streamed chunks (exclude_unset)."""
    for holder in [obj, *(c for c in obj.get("choices") or [] if isinstance(c, dict))]:
        for key in TOKEN_FIELDS:
            if key in holder:
                if streamed:
                    del holder[key]
                else:
                    holder[key] = None


def with_token_ids(body: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the request that also returns token ids (generation is unchanged by this flag)."""
    copy = dict(body)
    copy["return_token_ids"] = True
    return copy


def probe_body(model: Any, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> dict[str, Any]:
    """Teacher-forcing probe: score prompt + stable's output in one prefill; one token is generated because vLLM
    needs max_tokens ≥ 1, temperature 0 keeps it cheap and deterministic."""
    body: dict[str, Any] = {
        "prompt": [*prompt_ids, *output_ids],
        "max_tokens": 1,
        "temperature": 0,
        "prompt_logprobs": 0,
    }
    if model is not None:
        body["model"] = model
    return body


def scored_logprobs(response: Mapping[str, Any], token_ids: Sequence[int], start: int) -> list[float] | None:
    """The log-probabilities of `token_ids`, read from a probe response's prompt_logprobs from position `start`.

    None when the engine did not return prompt log-probabilities (or returned a shape we cannot trust)."""
    choices = response.get("choices") or []
    entries = choices[0].get("prompt_logprobs") if choices and isinstance(choices[0], dict) else None
    if entries is None:
        entries = response.get("prompt_logprobs")  # chat responses carry it at the top level
    if not isinstance(entries, list) or len(entries) < start + len(token_ids):
        return None
    values: list[float] = []
    for offset, token in enumerate(token_ids):
        entry = entries[start + offset]
        if not isinstance(entry, dict):
            return None
        item = entry.get(str(token))
        value = item.get("logprob") if isinstance(item, dict) else None
        if not isinstance(value, (int, float)):
            return None
        values.append(float(value) if math.isfinite(value) else -1e4)  # -inf: a token the arm rules out
    return values


def error_body(message: str, kind: str, code: int) -> bytes:
    """An OpenAI-shaped error body, so clients' SDKs surface the message."""
    return json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()
