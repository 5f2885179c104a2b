"""Quality probes' prompts: read from the candidate artifact's evaluation prompts or from a mounted ConfigMap, and
handed out in turn, slice by slice. Bounded whatever the source holds: a tenant controls both the artifact's
registry and the ConfigMap.

The artifact's file is the calibration Job's `quantrol-evaluation-prompts.json` (contracts.EvaluationPrompts):
already tokenized by the artifact's tokenizer, so a probe sends token ids and needs no tokenizer and no chat
template. A ConfigMap holds text: one key per slice, its value a JSON list of prompt strings.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from quantrol_worker.contracts import EVALUATION_PROMPTS_FILE, EVALUATION_PROMPTS_MAX_BYTES, EvaluationPrompts

MAX_SLICES = 64
MAX_PER_SLICE = 256
MAX_PROMPT_CHARS = 8192  # text prompts
MAX_PROMPT_TOKENS = 4096  # token-id prompts
MAX_CONFIGMAP_KEY_BYTES = 1024 * 1024  # a ConfigMap holds at most 1 MiB in all


@dataclass(frozen=True)
class ProbePrompt:
    slice: str
    prompt: str | list[int]


class ProbePrompts:
    """The prompts of one source, per slice, and a round-robin over the slices (each slice's prompts in turn), so a
    slice with few prompts is probed as often as one with many."""

    def __init__(self, by_slice: dict[str, list[str | list[int]]]) -> None:
        self.by_slice = {name: prompts[:MAX_PER_SLICE] for name, prompts in list(by_slice.items())[:MAX_SLICES]
                         if prompts}
        self._turn = self._cycle()

    def counts(self) -> dict[str, int]:
        return {name: len(prompts) for name, prompts in self.by_slice.items()}

    def _cycle(self) -> Iterator[ProbePrompt]:
        i = 0
        while self.by_slice:
            for name, prompts in self.by_slice.items():
                yield ProbePrompt(name, prompts[i % len(prompts)])
            i += 1

    def next(self) -> ProbePrompt | None:
        return next(self._turn, None)


def from_evaluation_prompts(prompts: EvaluationPrompts) -> ProbePrompts:
    return ProbePrompts({s.slice: [p.token_ids[:MAX_PROMPT_TOKENS] for p in s.prompts if p.token_ids]
                         for s in prompts.slices})


def from_artifact(reference: str, insecure: bool, credentials: Path | None = None) -> ProbePrompts:
    """Pull only the evaluation-prompts file of `reference` (verified by digest) and read it; an artifact without
    one has no probes (empty). The size its manifest declares is checked before anything is downloaded. Raises
    ArtifactError or ValueError when the artifact cannot be read."""
    from quantrol_worker import oci  # the registry client only where probes are used

    ref = oci.OciRef.parse(reference)
    declared = [layer for layer in oci.layers_of(oci.fetch_manifest(ref, insecure=insecure, credentials=credentials))
                if layer.title == EVALUATION_PROMPTS_FILE]
    if not declared:
        return ProbePrompts({})
    if (declared[0].size or 0) > EVALUATION_PROMPTS_MAX_BYTES:
        raise ValueError(f"{EVALUATION_PROMPTS_FILE} declares {declared[0].size} bytes, over the "
                         f"{EVALUATION_PROMPTS_MAX_BYTES}-byte limit")
    with tempfile.TemporaryDirectory(prefix="quantrol-probes-") as tmp:
        oci.pull(reference, Path(tmp), insecure=insecure, credentials=credentials,
                 titles=frozenset({EVALUATION_PROMPTS_FILE}))
        path = Path(tmp) / EVALUATION_PROMPTS_FILE
        if not path.is_file():
            return ProbePrompts({})
        return from_evaluation_prompts(EvaluationPrompts.read(path))


def from_directory(directory: Path) -> ProbePrompts:
    """A mounted ConfigMap: every key (file) a slice, a JSON list of strings; other shapes are refused (ValueError
    naming the key). Kubernetes' `..data` links and dot files are not keys."""
    by_slice: dict[str, list[str | list[int]]] = {}
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.stat().st_size > MAX_CONFIGMAP_KEY_BYTES:
            raise ValueError(f"probe prompts {path.name}: over {MAX_CONFIGMAP_KEY_BYTES} bytes")
        prompts = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"probe prompts {path.name}: must be a JSON list of prompt strings")
        by_slice[path.name] = [p[:MAX_PROMPT_CHARS] for p in prompts if p.strip()]
    return ProbePrompts(by_slice)
