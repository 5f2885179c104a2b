"""What the router reads from OpenAI-compatible requests and responses (vLLM's dialect): pure, no I/O.

vLLM specifics relied on (vllm/entrypoints/openai/{completion,chat_completion}/protocol.py):
- `return_token_ids: true` adds `token_ids` (per choice, per streamed delta) and `prompt_token_ids` (per choice for
  completions, top level for chat; first streamed chunk only);
- `prompt_logprobs: k` on /v1/completions returns per choice a list, one entry per prompt token: `null` for the
  first, else a map from token id (as a JSON string) to `{"logprob", "rank", "decoded_token"}` that always holds
  the prompt's own token; not available with `stream: true`;
- a prompt may be a list of token ids, which is how teacher-forced scoring reuses the chat-templated prompt;
- `logprobs: k` (completions) or `logprobs: true, top_logprobs: k` (chat) return, per generated token, the
  log-probabilities of the top k tokens and of the token emitted, from the model's raw distribution (vLLM's default
  `--logprobs-mode raw_logprobs`: before temperature, so a sampled request still shows the model's distribution);
  `return_tokens_as_token_ids: true` writes those tokens as `token_id:<id>` instead of decoded text.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from quantrol_worker.router.compare import TopLogprobs

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
TOKEN_FIELDS = ("token_ids", "prompt_token_ids")
TOKEN_ID_PREFIX = "token_id:"
ADDED_TOKEN_IDS = "token_ids"  # what the router added to a stable request for comparison, to strip from the answer
ADDED_LOGPROBS = "logprobs"


def is_greedy(body: Mapping[str, Any]) -> bool:
    """Greedy decoding. vLLM's default temperature is the model's generation config or 1.0, so an absent
    temperature is *not* greedy."""
    if int(body.get("n") or 1) != 1 or body.get("use_beam_search"):
        return False
    temperature = body.get("temperature")
    top_k = body.get("top_k")
    return (isinstance(temperature, (int, float)) and temperature == 0) or top_k == 1


def decoding(body: Mapping[str, Any]) -> str:
    """The `decoding` label of a compared request: greedy or sampled (the comparison is the same for both)."""
    return "greedy" if is_greedy(body) else "sampled"


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


def _token_id(token: Any) -> int | None:
    """`token_id:123` (return_tokens_as_token_ids) → 123; anything else (decoded text) → None."""
    if isinstance(token, str) and token.startswith(TOKEN_ID_PREFIX):
        try:
            return int(token[len(TOKEN_ID_PREFIX):])
        except ValueError:
            return None
    return None


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not math.isnan(value) else None


def _position(top: Mapping[int, float], emitted: tuple[int, float] | None) -> TopLogprobs | None:
    """One generated position: the top-k listed (their least likely is the bound for any unlisted token) and the
    token emitted (listed too, but not part of the bound: it may lie far outside the top k)."""
    if not top:
        return None
    listed = dict(top)
    if emitted is not None:
        listed.setdefault(*emitted)
    return TopLogprobs(listed, min(top.values()))


def completion_positions(logprobs: Mapping[str, Any]) -> list[TopLogprobs] | None:
    """Positions from a completions `logprobs` object (CompletionLogProbs); None when not keyed by token id."""
    tokens, values, tops = logprobs.get("tokens"), logprobs.get("token_logprobs"), logprobs.get("top_logprobs")
    if not (isinstance(tokens, list) and isinstance(values, list) and isinstance(tops, list)):
        return None
    out: list[TopLogprobs] = []
    for token, value, top in zip(tokens, values, tops, strict=False):
        if not isinstance(top, dict):
            return None
        listed = {_token_id(k): _finite(v) for k, v in top.items()}
        emitted_id, emitted_value = _token_id(token), _finite(value)
        if None in listed or None in listed.values() or emitted_id is None or emitted_value is None:
            return None
        position = _position({k: v for k, v in listed.items() if k is not None and v is not None},
                             (emitted_id, emitted_value))
        if position is None:
            return None
        out.append(position)
    return out


def chat_positions(logprobs: Mapping[str, Any]) -> list[TopLogprobs] | None:
    """Positions from a chat `logprobs` object (`content`: one entry per token, with `top_logprobs`)."""
    content = logprobs.get("content")
    if not isinstance(content, list):
        return None
    out: list[TopLogprobs] = []
    for entry in content:
        if not isinstance(entry, dict) or not isinstance(entry.get("top_logprobs"), list):
            return None
        top: dict[int, float] = {}
        for item in entry["top_logprobs"]:
            if not isinstance(item, dict):
                return None
            token, value = _token_id(item.get("token")), _finite(item.get("logprob"))
            if token is None or value is None:
                return None
            top[token] = value
        emitted, value = _token_id(entry.get("token")), _finite(entry.get("logprob"))
        position = _position(top, (emitted, value)) if emitted is not None and value is not None else None
        if position is None:
            return None
        out.append(position)
    return out


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
    positions: list[TopLogprobs] = field(default_factory=list)  # the top-k distribution at each generated token
    positions_usable: bool = True  # False once a logprobs object could not be read by token id

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
        self._feed_logprobs(choice.get("logprobs"), chat)
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

    def _feed_logprobs(self, logprobs: Any, chat: bool) -> None:
        if not isinstance(logprobs, dict) or not self.positions_usable:
            return
        found = chat_positions(logprobs) if chat else completion_positions(logprobs)
        if found is None:
            self.positions_usable = False
        else:
            self.positions.extend(found)

    def comparable(self) -> list[TopLogprobs] | None:
        """The per-position distributions, when there is one for every emitted token id."""
        if not (self.saw_token_ids and self.positions_usable and self.token_ids):
            return None
        return self.positions if len(self.positions) == len(self.token_ids) else None


def strip_added(obj: dict[str, Any], added: frozenset[str], streamed: bool) -> None:
    """Undo the fields the router itself asked for (`comparison_body`), so the client's answer is what it would
    have been: vLLM writes unset token-id fields as `null` in whole bodies and leaves them out of streamed chunks
    (exclude_unset); `logprobs` it always writes, as `null` when not asked for."""
    choices = [c for c in obj.get("choices") or [] if isinstance(c, dict)]
    if ADDED_TOKEN_IDS in added:
        for holder in [obj, *choices]:
            for key in TOKEN_FIELDS:
                if key in holder:
                    if streamed:
                        del holder[key]
                    else:
                        holder[key] = None
    if ADDED_LOGPROBS in added:
        for choice in choices:
            if "logprobs" in choice:
                choice["logprobs"] = None


def comparison_body(body: Mapping[str, Any], chat: bool, top_k: int) -> tuple[dict[str, Any], frozenset[str]]:
    """A copy of a stable-arm request that also returns what the teacher-forced comparison needs, and which
    fields were added (to strip from the client's answer): token ids, and the top-k log-probabilities keyed by
    token id. Generation is unchanged by either. A client that asked for log-probabilities itself keeps exactly
    its own request; its answer is compared when it happens to be keyed by token id, else skipped (counted)."""
    copy, added = dict(body), set()
    if not body.get("return_token_ids"):
        copy["return_token_ids"] = True
        added.add(ADDED_TOKEN_IDS)
    if not (body.get("logprobs") if chat else body.get("logprobs") is not None):
        if chat:
            copy["logprobs"], copy["top_logprobs"] = True, top_k
        else:
            copy["logprobs"] = top_k
        copy["return_tokens_as_token_ids"] = True
        added.add(ADDED_LOGPROBS)
    return copy, frozenset(added)


def score_body(model: Any, prompt_ids: Sequence[int], output_ids: Sequence[int], top_k: int) -> dict[str, Any]:
    """Teacher-forced scoring on the candidate: prompt + the stable arm's output in one prefill, with the top-k
    prompt log-probabilities at every position; one token is generated because vLLM needs max_tokens ≥ 1,
    temperature 0 keeps it cheap and deterministic."""
    body: dict[str, Any] = {
        "prompt": [*prompt_ids, *output_ids],
        "max_tokens": 1,
        "temperature": 0,
        "prompt_logprobs": top_k,
    }
    if model is not None:
        body["model"] = model
    return body


def scored_positions(response: Mapping[str, Any], start: int, count: int, top_k: int) -> list[TopLogprobs] | None:
    """The candidate's distribution at `count` positions from `start`, read from a scoring response's
    prompt_logprobs (`{token id: {logprob, rank, …}}` per position: the top k by rank, and the prompt's own token).

    None when the engine did not return prompt log-probabilities (or returned a shape we cannot trust)."""
    choices = response.get("choices") or []
    entries = choices[0].get("prompt_logprobs") if choices and isinstance(choices[0], dict) else None
    if entries is None:
        entries = response.get("prompt_logprobs")  # chat responses carry it at the top level
    if not isinstance(entries, list) or len(entries) < start + count:
        return None
    out: list[TopLogprobs] = []
    for entry in entries[start:start + count]:
        if not isinstance(entry, dict):
            return None
        listed: dict[int, float] = {}
        ranked: list[float] = []
        for key, item in entry.items():
            value = _finite(item.get("logprob")) if isinstance(item, dict) else None
            if value is None or not str(key).lstrip("-").isdigit():
                return None
            listed[int(key)] = value
            rank = item.get("rank")
            if isinstance(rank, int) and rank <= top_k:
                ranked.append(value)
        out.append(TopLogprobs(listed, min(ranked or listed.values())))
    return out


def error_body(message: str, kind: str, code: int) -> bytes:
    """An OpenAI-shaped error body, so clients' SDKs surface the message."""
    return json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()


# ---- non-streamed clients, streamed upstream ------------------------------------------------------------------

# What an assembled answer cannot reproduce faithfully, so such requests go upstream as they came: several choices,
# beam search, prompt log-probabilities (vLLM refuses them with stream), echo, and tool calls (their deltas are
# fragments of JSON arguments).
_NOT_ASSEMBLED = ("prompt_logprobs", "echo", "use_beam_search", "tools", "functions", "tool_choice")


def assemblable(body: Mapping[str, Any]) -> bool:
    """Whether a non-streamed request can be streamed from the engine and assembled for the client, so that its
    time to first token and inter-token latency exist like every streamed request's."""
    if body.get("stream") or int(body.get("n") or 1) != 1 or int(body.get("best_of") or 1) != 1:
        return False
    return not any(body.get(key) for key in _NOT_ASSEMBLED)


def as_stream(body: Mapping[str, Any]) -> dict[str, Any]:
    """The upstream form of an assemblable request: streamed, with the usage chunk a non-streamed body has."""
    return {**body, "stream": True, "stream_options": {"include_usage": True}}


class Assembler:
    """Builds the non-streamed answer (vLLM's CompletionResponse / ChatCompletionResponse, choice 0) from the
    streamed chunks of one request."""

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.head: dict[str, Any] = {}
        self.text: list[str] = []
        self.token_ids: list[int] | None = None
        self.prompt_token_ids: list[int] | None = None
        self.logprobs: dict[str, list[Any]] | None = None
        self.finish: tuple[Any, Any] = (None, None)
        self.usage: Any = None

    def feed(self, chunk: Mapping[str, Any]) -> None:
        if not self.head:
            self.head = {k: chunk.get(k) for k in ("id", "created", "model")}
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        if isinstance(chunk.get("prompt_token_ids"), list):
            self.prompt_token_ids = list(chunk["prompt_token_ids"])
        choices = chunk.get("choices") or []
        if not choices or not isinstance(choices[0], dict):
            return
        choice = choices[0]
        part = (choice.get("delta") or {}) if self.chat else choice
        if isinstance(part.get("content" if self.chat else "text"), str):
            self.text.append(part["content" if self.chat else "text"])
        if isinstance(choice.get("prompt_token_ids"), list):
            self.prompt_token_ids = list(choice["prompt_token_ids"])
        if isinstance(choice.get("token_ids"), list):
            self.token_ids = (self.token_ids or []) + list(choice["token_ids"])
        if isinstance(choice.get("logprobs"), dict):
            self._logprobs(choice["logprobs"])
        if choice.get("finish_reason") is not None:
            self.finish = (choice.get("finish_reason"), choice.get("stop_reason"))

    def _logprobs(self, part: Mapping[str, Any]) -> None:
        keys = ("content",) if self.chat else ("text_offset", "token_logprobs", "tokens", "top_logprobs")
        merged = self.logprobs or {k: [] for k in keys}
        for key in keys:
            merged[key].extend(part.get(key) or [])
        self.logprobs = merged

    def body(self) -> dict[str, Any]:
        text = "".join(self.text)
        finish, stop = self.finish
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": self.logprobs,
                      "finish_reason": finish, "stop_reason": stop, "token_ids": self.token_ids}
            return {**self.head, "object": "chat.completion", "choices": [choice], "usage": self.usage,
                    "prompt_logprobs": None, "prompt_token_ids": self.prompt_token_ids}
        choice = {"index": 0, "text": text, "logprobs": self.logprobs, "finish_reason": finish, "stop_reason": stop,
                  "prompt_logprobs": None, "prompt_token_ids": self.prompt_token_ids, "token_ids": self.token_ids}
        return {**self.head, "object": "text_completion", "choices": [choice], "usage": self.usage}
