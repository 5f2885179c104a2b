"""The calibration Job end to end: every stage reports progress, every failure ends in a reason and a report."""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from quantrol_worker import oci
from quantrol_worker.calibrate import WorkerError, integrity
from quantrol_worker.calibrate.data import SliceData, load_slices
from quantrol_worker.calibrate.progress import Progress
from quantrol_worker.calibrate.sources import directory_digest, pull, resolve_data, resolve_model
from quantrol_worker.contracts import (
    EVALUATION_PROMPTS_FILE,
    EVALUATION_PROMPTS_MAX_BYTES,
    REPORT_FILE,
    TOKENIZER_FILES,
    CalibrationConfig,
    CalibrationReason,
    CalibrationReport,
    EvaluationPrompts,
    EvaluationPromptsSummary,
    ExperimentEnvelope,
    KvCacheScheme,
    RegistryAccess,
    SampleGeneration,
    SliceHeadline,
    SlicePrompts,
    SliceQuality,
    Stage,
    TerminationResult,
    WorkerPhase,
    redact,
)
from quantrol_worker.kernels import LinearShape, precheck

TOOLS = ("torch", "transformers", "llmcompressor", "compressed-tensors", "safetensors", "oras", "quantrol")


def load_config(path: Path) -> CalibrationConfig:
    raw = yaml.safe_load(path.read_text())
    return CalibrationConfig.model_validate(raw)


def matches_ignore(name: str, patterns: list[str]) -> bool:
    """llm-compressor's `ignore` semantics for names: exact, a trailing component path, or `re:<regex>`."""
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif name == p or name.endswith("." + p):
            return True
    return False


def linear_layers(model_dir: Path) -> tuple[list[LinearShape], list[str]]:
    """Every nn.Linear (name, shape) and every attention module, from the config on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    linears = [
        LinearShape(name, m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    attention = [name for name, m in model.named_modules() if name.endswith("self_attn")]
    return linears, attention


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [f"cpu: {cpu}"]
    try:
        import torch

        if torch.cuda.is_available():
            cap = torch.cuda.get_device_capability(0)
            parts.append(f"gpu: {torch.cuda.get_device_name(0)} sm{cap[0]}{cap[1]} cuda {torch.version.cuda}")
    except Exception:  # torch without CUDA: nothing to add
        pass
    return "; ".join(parts)


def tool_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in TOOLS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass
class Run:
    """The state one calibration accumulates; turned into the report at the end, whatever happened."""

    config: CalibrationConfig
    progress: Progress = field(default_factory=Progress)
    report: CalibrationReport | None = None
    base_dir: Path | None = None
    checkpoint: Path | None = None
    slices: list[SliceData] = field(default_factory=list)
    envelope: ExperimentEnvelope = field(default_factory=ExperimentEnvelope)
    prompts: list[SlicePrompts] = field(default_factory=list)  # what EVALUATION_PROMPTS_FILE will carry

    @property
    def work(self) -> Path:
        return Path(self.config.work_dir)


def _layer_progress(model: Any, progress: Progress) -> list[Any]:
    """Log `layer i/N` the first time calibration reaches each decoder layer."""
    layers = getattr(getattr(model, "model", model), "layers", [])
    seen: set[int] = set()
    handles = []
    for i, layer in enumerate(layers):

        def hook(_m: Any, _a: Any, i: int = i) -> None:
            if i not in seen:
                seen.add(i)
                progress.log("calibrating decoder layer", i=i + 1, n=len(layers))

        handles.append(layer.register_forward_pre_hook(hook))
    return handles


def quantize(run: Run, tokenizer: Any) -> Path:
    """llm-compressor oneshot on the calibration samples of every slice; saves the compressed checkpoint."""
    import torch
    from datasets import Dataset
    from llmcompressor.entrypoints.oneshot import oneshot  # where it is defined: the package re-export is implicit
    from transformers import AutoModelForCausalLM

    from quantrol_worker.calibrate.recipe import build_modifiers, recipe_text

    q = run.config.quantization
    assert run.base_dir is not None
    modifiers = build_modifiers(q)
    run.envelope.recipe = recipe_text(modifiers)
    ids = [seq for s in run.slices for seq in s.calibration]
    dataset = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})
    torch.manual_seed(run.config.calibration.seed)
    model = AutoModelForCausalLM.from_pretrained(str(run.base_dir), dtype="auto")
    handles = _layer_progress(model, run.progress)
    try:
        oneshot(
            model=model,
            dataset=dataset,
            recipe=modifiers,
            num_calibration_samples=len(ids),
            max_seq_length=run.config.calibration.max_sequence_length,
            shuffle_calibration_samples=False,
        )
    except Exception as exc:
        raise WorkerError(
            CalibrationReason.QUANTIZATION_FAILED,
            f"llm-compressor oneshot: {type(exc).__name__}: {exc}",
            Stage.CALIBRATE,
        ) from exc
    finally:
        for h in handles:
            h.remove()
    run.progress.stage = Stage.SAVE
    out = run.work / "checkpoint"
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(str(out), save_compressed=True)
    tokenizer.save_pretrained(str(out))
    return out


def evaluate_checkpoint(
    run: Run, checkpoint: Path, tokenizer: Any
) -> tuple[list[SliceQuality], list[SampleGeneration]]:
    """Quality per slice against the baseline, the side-by-side samples (redacted), and, unless the policy keeps
    them in the Job, each slice's evaluation prompts with their golden record (`run.prompts`)."""
    from quantrol_worker.calibrate.evaluate import (
        apply_gate,
        evaluation_prompts,
        load_model,
        measure_slice,
        sample_generations,
    )

    assert run.base_dir is not None
    baseline = load_model(run.base_dir)
    candidate = load_model(checkpoint)
    quality = []
    samples: list[SampleGeneration] = []
    ev = run.config.evaluation
    policy = ev.prompts
    patterns = [re.compile(p) for p in policy.redact_patterns]
    max_tokens = min(policy.max_tokens, run.config.calibration.max_sequence_length)
    for data in run.slices:
        q = measure_slice(baseline, candidate, data, run.progress)
        quality.append(apply_gate(q, run.config.gate_for(data.name)))
        generated = sample_generations(
            baseline, candidate, tokenizer, data, ev.sample_generations, ev.prompt_tokens, ev.max_new_tokens
        )
        samples.extend(
            g.model_copy(update={k: redact(getattr(g, k), patterns)[0] for k in ("prompt", "baseline", "candidate")})
            for g in generated
        )
        if policy.publish:
            run.prompts.append(evaluation_prompts(baseline, candidate, tokenizer, data, policy, max_tokens))
    return quality, samples


def write_evaluation_prompts(run: Run, package: Path) -> EvaluationPromptsSummary:
    """EVALUATION_PROMPTS_FILE into the package, or the reason it is not there (the report says which)."""
    policy = run.config.evaluation.prompts
    if not policy.publish:
        return EvaluationPromptsSummary(
            published=False, message="evaluation.prompts.publish is false: the prompts stayed in the Job")
    document = EvaluationPrompts(
        tokenizer_digest=run.envelope.tokenizer_digest, redact_patterns=len(policy.redact_patterns), slices=run.prompts
    )
    text = document.model_dump_json(by_alias=True, exclude_none=True)
    if len(text.encode()) > EVALUATION_PROMPTS_MAX_BYTES:
        return EvaluationPromptsSummary(
            published=False, message=f"the prompts take {len(text.encode())} bytes, over the "
            f"{EVALUATION_PROMPTS_MAX_BYTES}-byte limit: lower evaluation prompts maxPerSlice or maxTokens")
    path = package / EVALUATION_PROMPTS_FILE
    path.write_text(text)
    return EvaluationPromptsSummary(
        published=True,
        file=EVALUATION_PROMPTS_FILE,
        digest=oci.sha256_file(path),
        prompts={s.slice: len(s.prompts) for s in run.prompts},
        redacted_prompts=sum(1 for s in run.prompts for p in s.prompts if p.redactions),
        redact_patterns=len(policy.redact_patterns),
        message=f"{sum(len(s.prompts) for s in run.prompts)} held-out prompts in {len(run.prompts)} slices, "
        f"redacted with {len(policy.redact_patterns)} patterns",
    )


def _prepare(run: Run) -> tuple[Any, list[str], list[str]]:
    """LOAD, PRECHECK and DATA: everything before compute is spent."""
    from transformers import AutoTokenizer

    cfg = run.config
    p = run.progress
    _check_push_access(cfg)
    with p.stage_of(Stage.LOAD):
        run.base_dir = resolve_model(cfg.base_model, run.work, cfg.registries)
        run.envelope.base_model_uri = cfg.base_model
        run.envelope.base_model_digest = directory_digest(run.base_dir)
        run.envelope.tokenizer_digest = directory_digest(run.base_dir, TOKENIZER_FILES)
        tokenizer = AutoTokenizer.from_pretrained(str(run.base_dir))
        linears, attention = linear_layers(run.base_dir)
    quantized = [lin for lin in linears if not matches_ignore(lin.name, cfg.quantization.ignore)]
    with p.stage_of(Stage.PRECHECK):
        q = cfg.quantization
        kc = precheck(q.scheme, q.target, quantized, q.effective_group_size, q.tensor_parallel_size, q.kv_cache_scheme)
        assert run.report is not None
        run.report.kernel_check = kc
        p.log("kernel pre-check", family=kc.family, verdict=kc.verdict.value, violations=len(kc.violations))
        if not kc.compatible:
            v = kc.violations[0]
            more = f" (+{len(kc.violations) - 1} more)" if len(kc.violations) > 1 else ""
            raise WorkerError(
                CalibrationReason.KERNEL_INCOMPATIBLE, f"{v.layer}: {v.rule}: {v.detail}{more}", Stage.PRECHECK
            )
    with p.stage_of(Stage.DATA):
        data = cfg.calibration.model_copy(update={"uri": resolve_data(cfg.calibration.uri, run.work, cfg.registries)})
        run.slices, run.envelope.calibration_data_digest = load_slices(data, tokenizer)
        run.envelope.seed = cfg.calibration.seed
        for s in run.slices:
            p.log(f"slice {s.name}", calibration=len(s.calibration), evaluation=len(s.evaluation))
    return tokenizer, [lin.name for lin in quantized], attention


def _registry(cfg: CalibrationConfig, repository: str) -> tuple[bool, Path | None]:
    """(plain HTTP?, credentials file) for the registry of `repository`."""
    host = oci.OciRef.parse(repository).host
    access = cfg.registries
    return (oci.plain_http(host, access.plain_http),
            Path(access.credentials_file) if access.credentials_file else None)


def _check_push_access(cfg: CalibrationConfig) -> None:
    """Ask the registry whether these credentials may push, before hours of calibration depend on the answer."""
    if cfg.artifact is None:
        return
    insecure, credentials = _registry(cfg, cfg.artifact.repository)
    try:
        oci.check_push_access(cfg.artifact.repository, insecure=insecure, credentials=credentials)
    except oci.ArtifactError as exc:
        error = WorkerError.from_artifact(exc, Stage.PUBLISH, unavailable=CalibrationReason.PUBLISH_FAILED)
        error.message = f"{error.message} (checked before calibrating: nothing was calibrated)"
        raise error from exc


def _execute(run: Run) -> None:
    cfg = run.config
    p = run.progress
    report = run.report
    assert report is not None
    tokenizer, quantized, attention = _prepare(run)
    with p.stage_of(Stage.CALIBRATE):
        run.checkpoint = quantize(run, tokenizer)
    with p.stage_of(Stage.EVALUATE):
        report.quality, report.samples = evaluate_checkpoint(run, run.checkpoint, tokenizer)
        report.gate_passed = all(q.passed for q in report.quality)
    with p.stage_of(Stage.INTEGRITY):
        from quantrol_worker.calibrate.evaluate import load_model

        assert run.base_dir is not None
        base_sd = load_model(run.base_dir).state_dict()
        report.integrity, report.scale_stats = integrity.check(
            run.checkpoint, quantized, attention, cfg.quantization.kv_cache_scheme is not KvCacheScheme.NONE, base_sd
        )
        report.baseline_bf16_bytes = sum(t.numel() * 2 for t in base_sd.values())
        report.checkpoint_bytes = _dir_bytes(run.checkpoint)
    failed_checks = [c for c in report.integrity if not c.passed]
    if failed_checks:
        detail = "; ".join(f"{c.name}: {c.detail}" for c in failed_checks)
        raise WorkerError(CalibrationReason.INTEGRITY_CHECK_FAILED, detail, Stage.INTEGRITY)
    if not report.gate_passed:
        bad = [f"{q.slice} ({', '.join(q.failed_limits)})" for q in report.quality if not q.passed]
        report.phase, report.reason = WorkerPhase.REJECTED, CalibrationReason.QUALITY_GATE_FAILED
        report.message = "quality gate failed for slice " + "; ".join(bad)
    else:
        report.phase, report.reason = WorkerPhase.READY, CalibrationReason.SUCCEEDED
        report.message = f"{cfg.quantization.scheme.value} passed the quality gate on {len(report.quality)} slices"


def _annotations(run: Run, report: CalibrationReport) -> dict[str, str]:
    cfg = run.config
    ann = {
        "org.opencontainers.image.title": cfg.name or "quantrol-artifact",
        "io.quantrol.phase": report.phase.value,
        "io.quantrol.scheme": cfg.quantization.scheme.value,
        "io.quantrol.method": cfg.quantization.method.value,
        "io.quantrol.kv-cache-scheme": cfg.quantization.kv_cache_scheme.value,
        "io.quantrol.target": cfg.quantization.target.value,
        "io.quantrol.format": "compressed-tensors",
    }
    if run.envelope.base_model_digest:
        ann["io.quantrol.base-model-digest"] = run.envelope.base_model_digest
    if run.envelope.calibration_data_digest:
        ann["io.quantrol.calibration-data-digest"] = run.envelope.calibration_data_digest
    if cfg.generation is not None:
        ann["io.quantrol.generation"] = str(cfg.generation)
    return ann


def _package_and_publish(run: Run, result: TerminationResult) -> None:
    """Write the report beside the checkpoint and push; a rejected or failed run pushes its report alone."""
    report = run.report
    assert report is not None
    cfg = run.config
    ready = report.phase is WorkerPhase.READY and run.checkpoint is not None
    package = run.checkpoint if ready and run.checkpoint is not None else run.work / "report-only"
    package.mkdir(parents=True, exist_ok=True)
    if ready:
        report.evaluation_prompts = write_evaluation_prompts(run, package)
        result.evaluation_prompts = sum(report.evaluation_prompts.prompts.values())
    (package / REPORT_FILE).write_text(report.model_dump_json(by_alias=True, exclude_none=True, indent=2) + "\n")
    result.size_bytes = _dir_bytes(package) if ready else None
    if cfg.artifact is None:
        return
    if result.reason in (CalibrationReason.PUBLISH_FAILED, CalibrationReason.REGISTRY_UNAUTHORIZED):
        return  # the registry already said no: a second push of the report alone would only be refused again
    insecure, credentials = _registry(cfg, cfg.artifact.repository)
    with run.progress.stage_of(Stage.PUBLISH):
        try:
            ref = oci.push(
                package,
                cfg.artifact.repository,
                insecure=insecure,
                tag=cfg.artifact.tag,
                annotations=_annotations(run, report),
                credentials=credentials,
            )
        except oci.ArtifactError as exc:
            raise WorkerError.from_artifact(exc, Stage.PUBLISH, unavailable=CalibrationReason.PUBLISH_FAILED) from exc
    run.progress.log("pushed", ref=ref)
    if ready:
        result.artifact_ref, result.digest = ref, ref.split("@", 1)[1]
    else:
        result.report_ref = ref


def run_calibration(
    config: CalibrationConfig, progress: Progress | None = None
) -> tuple[CalibrationReport, TerminationResult]:
    run = Run(config=config, progress=progress or Progress())
    q = config.quantization
    run.report = CalibrationReport(
        phase=WorkerPhase.FAILED,
        reason=CalibrationReason.INTERNAL_ERROR,
        name=config.name,
        generation=config.generation,
        scheme=q.scheme,
        method=q.method,
        kv_cache_scheme=q.kv_cache_scheme,
    )
    run.work.mkdir(parents=True, exist_ok=True)
    stage: Stage | None = None
    try:
        _execute(run)
    except WorkerError as exc:
        rejected = exc.reason in (CalibrationReason.KERNEL_INCOMPATIBLE,)
        run.report.phase = WorkerPhase.REJECTED if rejected else WorkerPhase.FAILED
        run.report.reason, run.report.message, stage = exc.reason, exc.message, exc.stage
    except Exception as exc:  # anything else is still written down, never a silent crash
        run.report.phase, run.report.reason = WorkerPhase.FAILED, CalibrationReason.INTERNAL_ERROR
        run.report.message, stage = f"{type(exc).__name__}: {exc}", run.progress.stage
    report = run.report
    report.envelope = run.envelope.model_copy(update={"hardware": hardware(), "tool_versions": tool_versions()})
    report.timings = dict(run.progress.timings)
    result = TerminationResult(
        phase=report.phase,
        reason=report.reason,
        message=report.message,
        stage=stage,
        gate_passed=report.gate_passed,
        quality=[SliceHeadline.of(q) for q in report.quality],
        base_model_digest=run.envelope.base_model_digest,
        calibration_data_digest=run.envelope.calibration_data_digest,
    )
    try:
        _package_and_publish(run, result)
    except WorkerError as exc:
        report.phase, report.reason, report.message = WorkerPhase.FAILED, exc.reason, exc.message
        result.phase, result.reason, result.message, result.stage = report.phase, exc.reason, exc.message, exc.stage
        result.artifact_ref = result.digest = None
    report.timings = dict(run.progress.timings)
    return report, result


def write_outputs(config: CalibrationConfig, report: CalibrationReport, result: TerminationResult) -> None:
    work = Path(config.work_dir)
    (work / REPORT_FILE).write_text(report.model_dump_json(by_alias=True, exclude_none=True, indent=2) + "\n")
    message = result.to_message()
    (work / "termination-message.json").write_text(message)
    path = Path(config.termination_message_path)
    try:
        path.write_text(message)
    except OSError as exc:  # outside a pod /dev/termination-log may not be writable; the work dir has a copy
        print(f"quantrol: cannot write termination message to {path}: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quantrol-worker calibrate")
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except Exception as exc:
        result = TerminationResult(
            phase=WorkerPhase.FAILED, reason=CalibrationReason.INVALID_CONFIG, message=str(exc)[:2000]
        )
        print(result.to_message())
        return 1
    report, result = run_calibration(config)
    write_outputs(config, report, result)
    print(result.to_message())
    return 1 if result.phase is WorkerPhase.FAILED else 0


def evaluate_main(argv: list[str] | None = None) -> int:
    """Evaluate an existing checkpoint against the config's baseline (integrity + per-slice gate); JSON on stdout."""
    parser = argparse.ArgumentParser(prog="python -m quantrol_worker.calibrate evaluate")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--candidate", type=Path, required=True)
    args = parser.parse_args(argv)
    config = load_config(args.config)
    run = Run(config=config)
    run.report = CalibrationReport(phase=WorkerPhase.FAILED, reason=CalibrationReason.INTERNAL_ERROR)
    tokenizer, quantized, attention = _prepare(run)
    quality, _ = evaluate_checkpoint(run, args.candidate, tokenizer)
    checks, _ = integrity.check(
        args.candidate, quantized, attention, config.quantization.kv_cache_scheme is not KvCacheScheme.NONE
    )
    out = {
        "quality": [q.model_dump(mode="json", by_alias=True) for q in quality],
        "integrity": [c.model_dump(mode="json", by_alias=True) for c in checks],
    }
    print(json.dumps(out))
    return 0


def pull_main(argv: list[str] | None = None) -> int:
    """Pull an artifact by digest and verify it; prints {"ok", "reason", "message", "files"}."""
    parser = argparse.ArgumentParser(prog="python -m quantrol_worker.calibrate pull")
    parser.add_argument("reference")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--insecure", action="store_true", help="plain HTTP to this reference's registry")
    parser.add_argument("--registry-config", default=None, help="docker config.json with registry credentials")
    args = parser.parse_args(argv)
    host = oci.OciRef.parse(args.reference).host if args.insecure else ""
    access = RegistryAccess(credentials_file=args.registry_config, plain_http=[host] if host else [])
    try:
        out = pull(args.reference, args.out, access)
    except WorkerError as exc:
        print(json.dumps({"ok": False, "reason": exc.reason.value, "message": exc.message}))
        return 1
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    print(json.dumps({"ok": True, "reason": CalibrationReason.SUCCEEDED.value, "message": "verified", "files": files}))
    return 0
