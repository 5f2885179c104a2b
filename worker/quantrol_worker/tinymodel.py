"""A tiny Llama-architecture model, trained for seconds on text already on this machine.

Tests and the benchmark need a real model whose quality numbers mean something, without a hub download:
this module trains a byte-level BPE tokenizer (`tokenizers`) and a ~5M-parameter `LlamaForCausalLM` on two
kinds of local text — prose (the licence texts every Debian system ships) and code (Python's own standard
library) — and writes a Hugging Face checkpoint plus a calibration JSONL with a `slice` label per line.

Everything is deterministic for a given seed and cached under the output directory by a key over the build
parameters, so a test session trains once. Run it with `python -m quantrol_worker.tinymodel --out DIR`.
torch and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import sysconfig
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PROSE_DIRS = ("/usr/share/common-licenses",)
SLICES = ("prose", "code")
INFO_FILE = "tiny-model.json"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Build parameters; their hash is the cache key."""

    seed: int = 0
    # Serving this model with vLLM CPU 0.32 needs 4096 (at 2048 its worker dies with SIGILL at the first request on
    # these machines): `--vocab-size 4096`. The calibration tests' damage thresholds are tuned for 2048.
    vocab_size: int = 2048
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 150
    lr: float = 3e-3
    doc_chars: int = 600
    prose_chars: int = 400_000
    code_chars: int = 400_000
    save_dtype: str = "bfloat16"  # what a real base checkpoint ships; evaluation runs in float32

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def _read_texts(paths: list[Path], budget: int) -> list[str]:
    texts: list[str] = []
    used = 0
    for path in sorted(paths):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        used += len(text)
        if used >= budget:
            break
    return texts


def _chunk(texts: list[str], size: int, split_on: str) -> list[str]:
    """Cut texts into documents of about `size` characters at `split_on` boundaries."""
    docs: list[str] = []
    for text in texts:
        current = ""
        for part in text.split(split_on):
            if current and len(current) + len(part) > size:
                docs.append(current.strip())
                current = ""
            current += part + split_on
        if current.strip():
            docs.append(current.strip())
    return [d for d in docs if len(d) >= 80]


def local_corpus(spec: TinySpec) -> dict[str, list[str]]:
    """Documents per slice, from files already on the machine (never downloaded)."""
    prose_paths = [p for d in PROSE_DIRS for p in Path(d).glob("*") if p.is_file()]
    code_paths = list(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    prose = _chunk(_read_texts(prose_paths, spec.prose_chars), spec.doc_chars, "\n\n")
    code = _chunk(_read_texts(code_paths, spec.code_chars), spec.doc_chars, "\n\n")
    if len(prose) < 50 or len(code) < 50:
        raise RuntimeError(f"not enough local text: {len(prose)} prose and {len(code)} code documents")
    return {"prose": prose, "code": code}


def _split(docs: dict[str, list[str]], seed: int) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    rng = random.Random(seed)
    train: dict[str, list[str]] = {}
    held: dict[str, list[str]] = {}
    for name, items in docs.items():
        items = list(items)
        rng.shuffle(items)
        cut = int(len(items) * 0.8)
        train[name], held[name] = items[:cut], items[cut:]
    return train, held


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _token_stream(tokenizer: Any, docs: list[str]) -> list[int]:
    eos = int(tokenizer.eos_token_id)
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.append(eos)
    return ids


def unigram_perplexity(train_ids: list[int], eval_ids: list[int], vocab: int) -> float:
    """Perplexity of an add-one unigram model fitted on the training tokens: the bar a model must beat."""
    counts = Counter(train_ids)
    total = len(train_ids) + vocab
    nll = -sum(math.log((counts.get(t, 0) + 1) / total) for t in eval_ids)
    return math.exp(nll / max(1, len(eval_ids)))


def model_perplexity(model: Any, ids: list[int], seq_len: int) -> float:
    import torch

    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, seq_len):
            chunk = ids[start : start + seq_len + 1]
            if len(chunk) < 2:
                break
            x = torch.tensor([chunk])
            logits = model(input_ids=x[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="sum")
            nll += float(loss)
            count += len(chunk) - 1
    return math.exp(nll / max(1, count))


def _train(model: Any, ids: list[int], spec: TinySpec) -> float:
    import torch

    gen = torch.Generator().manual_seed(spec.seed)
    data = torch.tensor(ids)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, spec.steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, spec.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    started = time.monotonic()
    for step in range(spec.steps):
        starts = torch.randint(0, len(data) - spec.seq_len - 1, (spec.batch_size,), generator=gen)
        batch = torch.stack([data[s : s + spec.seq_len + 1] for s in starts.tolist()])
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 30 == 0 or step == spec.steps - 1:
            print(f"tinymodel: step {step + 1}/{spec.steps} loss {loss.item():.3f}", file=sys.stderr, flush=True)
    model.eval()
    return time.monotonic() - started


def write_calibration_jsonl(path: Path, held: dict[str, list[str]]) -> None:
    """Held-out documents (never trained on) as JSONL lines {"text", "slice"}; the worker splits them again."""
    with path.open("w", encoding="utf-8") as fh:
        for name in SLICES:
            for doc in held[name]:
                fh.write(json.dumps({"text": doc, "slice": name}) + "\n")


def build(out: Path, spec: TinySpec | None = None) -> dict[str, Any]:
    """Build (or reuse from `out`) the tiny model; returns the info written to tiny-model.json."""
    spec = spec or TinySpec()
    info_path = out / INFO_FILE
    if info_path.exists():
        info: dict[str, Any] = json.loads(info_path.read_text())
        if info.get("key") == spec.key():
            return info
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.seed)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))  # more threads only add contention here
    docs = local_corpus(spec)
    train_docs, held_docs = _split(docs, spec.seed)
    all_train = [d for name in SLICES for d in train_docs[name]]
    tokenizer = train_tokenizer(all_train, spec.vocab_size)
    train_ids = _token_stream(tokenizer, random.Random(spec.seed).sample(all_train, len(all_train)))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=max(512, spec.seq_len * 4),
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    train_seconds = _train(model, train_ids, spec)
    metrics: dict[str, dict[str, float]] = {}
    for name in SLICES:
        held_ids = _token_stream(tokenizer, held_docs[name])[:8192]
        metrics[name] = {
            "heldout_perplexity": model_perplexity(model, held_ids, spec.seq_len),
            "unigram_perplexity": unigram_perplexity(train_ids, held_ids, len(tokenizer)),
        }
    model_dir = out / "model"
    model.to(getattr(torch, spec.save_dtype)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    write_calibration_jsonl(out / "calibration.jsonl", held_docs)
    info = {
        "key": spec.key(),
        "spec": asdict(spec),
        "model_dir": str(model_dir),
        "calibration_jsonl": str(out / "calibration.jsonl"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens": len(train_ids),
        "train_seconds": round(train_seconds, 2),
        "slices": metrics,
        "documents": {name: {"train": len(train_docs[name]), "heldout": len(held_docs[name])} for name in SLICES},
    }
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quantrol_worker.tinymodel", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="cache directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=TinySpec.steps)
    parser.add_argument("--vocab-size", type=int, default=TinySpec.vocab_size)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    info = build(args.out, TinySpec(seed=args.seed, steps=args.steps, vocab_size=args.vocab_size))
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
