"""Calibration benchmark on the tiny Llama: per scheme, what the worker costs and what it buys.

Prints, per scheme: wall time and peak RSS of the whole worker run, the time of its calibrate stage, the wall
time of bare llm-compressor `oneshot` on the same model/recipe/samples (and our total / bare ratio), artifact
bytes vs the same weights in bf16, and the headline quality per slice. Figures only, never pass/fail.

    QUANTROL_CALIBRATE_PYTHON=.venvs/calibrate/bin/python python bench/bench_calibrate.py [--schemes W8A8,W4A16]

Each run is a fresh subprocess of the calibrate environment (so peak memory is per run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]

# (label, quantization config)
SCHEMES: list[tuple[str, dict[str, Any]]] = [
    ("FP8_DYNAMIC/rtn", {"scheme": "FP8_DYNAMIC", "method": "rtn"}),
    ("W8A8/smoothquant+gptq", {"scheme": "W8A8", "method": "smoothquant+gptq"}),
    ("W8A8/rtn+kv-fp8", {"scheme": "W8A8", "method": "rtn", "kvCacheScheme": "fp8"}),
    ("W4A16/gptq-g128", {"scheme": "W4A16", "method": "gptq"}),
    ("W4A16/rtn-g128", {"scheme": "W4A16", "method": "rtn"}),
    ("W4A8/gptq", {"scheme": "W4A8", "method": "gptq"}),
    ("W8A16/gptq", {"scheme": "W8A16", "method": "gptq"}),
]

RUN_WITH_PEAK = (
    "import resource, runpy, sys\n"
    "sys.argv = sys.argv[1:]\n"
    "try:\n    runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
    "except SystemExit:\n    pass\n"
    "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
)

BARE_ONESHOT = r"""
import json, resource, sys, time
import torch
from datasets import Dataset
from llmcompressor import oneshot
from transformers import AutoModelForCausalLM, AutoTokenizer
from quantrol_worker.calibrate.data import load_slices
from quantrol_worker.calibrate.pipeline import load_config
from quantrol_worker.calibrate.recipe import build_modifiers

cfg = load_config(__import__("pathlib").Path(sys.argv[1]))
base = cfg.base_model.removeprefix("file://")
tok = AutoTokenizer.from_pretrained(base)
slices, _ = load_slices(cfg.calibration, tok)
ids = [s for sl in slices for s in sl.calibration]
ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})
model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
start = time.monotonic()
oneshot(model=model, dataset=ds, recipe=build_modifiers(cfg.quantization), num_calibration_samples=len(ids),
        max_seq_length=cfg.calibration.max_sequence_length, shuffle_calibration_samples=False)
print(json.dumps({"oneshot_s": time.monotonic() - start,
                  "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "worker"), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return env


def _python() -> str:
    py = os.environ.get("QUANTROL_CALIBRATE_PYTHON")
    if not py:
        sys.exit("set QUANTROL_CALIBRATE_PYTHON to the calibrate environment's python (see .ci/setup)")
    return py


def build_tiny(cache: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [_python(), "-m", "quantrol_worker.tinymodel", "--out", str(cache)],
        capture_output=True, text=True, env=_env(), check=True,
    )  # fmt: skip
    info: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return info


def run_scheme(tiny: dict[str, Any], quant: dict[str, Any], work: Path, samples: int, evals: int) -> dict[str, Any]:
    config = {
        "baseModel": f"file://{tiny['model_dir']}",
        "quantization": {"target": "cuda-sm90", **quant},
        "calibration": {
            "uri": tiny["calibration_jsonl"],
            "maxSequenceLength": 128,
            "slices": [{"name": n, "samples": samples, "evalSamples": evals} for n in ("prose", "code")],
        },
        "evaluation": {"sampleGenerations": 1, "maxNewTokens": 16},
        "workDir": str(work / "work"),
        "terminationMessagePath": str(work / "termination-log"),
    }
    work.mkdir(parents=True, exist_ok=True)
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    start = time.monotonic()
    proc = subprocess.run(
        [_python(), "-c", RUN_WITH_PEAK, "quantrol_worker.calibrate", "--config", str(path)],
        capture_output=True, text=True, env=_env(), check=False,
    )  # fmt: skip
    wall = time.monotonic() - start
    peak = next((int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB")), 0)
    report = json.loads((work / "work" / "quantrol-report.json").read_text())
    bare = subprocess.run(
        [_python(), "-c", BARE_ONESHOT, str(path)], capture_output=True, text=True, env=_env(), check=False
    )
    bare_out = json.loads(bare.stdout.strip().splitlines()[-1]) if bare.returncode == 0 else {}
    return {"wall_s": wall, "peak_rss_mb": peak / 1024, "report": report, "bare": bare_out, "rc": proc.returncode}


def fmt_quality(report: dict[str, Any]) -> str:
    parts = []
    for q in report.get("quality", []):
        parts.append(
            f"{q['slice']}: KL {q['meanKlDivergence']:.2e}/p99 {q['p99KlDivergence']:.2e} "
            f"top1 {q['top1Agreement']:.3f} ppl x{q['perplexityRatio']:.3f} {'pass' if q['passed'] else 'FAIL'}"
        )
    return "; ".join(parts) or f"{report['phase']}/{report['reason']}: {report['message'][:80]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemes", help="comma-separated labels (default: all)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "quantrol-tiny-model")
    parser.add_argument("--samples", type=int, default=16, help="calibration samples per slice")
    parser.add_argument("--eval-samples", type=int, default=16)
    args = parser.parse_args()
    wanted = set(args.schemes.split(",")) if args.schemes else None
    tiny = build_tiny(args.cache)
    print(
        f"tiny model: {tiny['parameters'] / 1e6:.2f}M params, trained {tiny['train_seconds']} s; held-out ppl "
        + ", ".join(
            f"{k} {v['heldout_perplexity']:.0f} (unigram {v['unigram_perplexity']:.0f})"
            for k, v in tiny["slices"].items()
        )
    )
    header = f"{'scheme':24} {'total s':>8} {'calib s':>8} {'bare s':>7} {'ratio':>6} {'peak MB':>8} {'bytes/bf16':>10}"
    print(header + "  quality per slice")
    with tempfile.TemporaryDirectory(prefix="quantrol-bench-") as tmp:
        for label, quant in SCHEMES:
            if wanted and label not in wanted:
                continue
            r = run_scheme(tiny, quant, Path(tmp) / label.replace("/", "_"), args.samples, args.eval_samples)
            rep = r["report"]
            calib_s = rep["timings"].get("calibrate", float("nan"))
            bare_s = r["bare"].get("oneshot_s", float("nan"))
            size = (rep.get("checkpointBytes") or 0) / max(1, rep.get("baselineBf16Bytes") or 1)
            print(
                f"{label:24} {r['wall_s']:8.1f} {calib_s:8.1f} {bare_s:7.1f} {r['wall_s'] / bare_s:6.1f} "
                f"{r['peak_rss_mb']:8.0f} {size:10.2f}  {fmt_quality(rep)}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
