"""`quantrol-worker qualify --config FILE`: the golden-output check, then each arm in three regimes, then the verdict.

Order, cheapest bounded refusal first: the candidate's floor (a candidate slower than its SLO one request at a time
is refused within `floorMaxSeconds`, before anything else is spent: a slow engine would take long over every golden
prompt); the golden-output check (the candidate engine alone, bounded by `goldenMaxSeconds`); the rest of the
candidate's regimes; the stable arm's; the goodput ratio. Every step is bounded by the config.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from quantrol_worker import oci
from quantrol_worker.addresses import from_environment
from quantrol_worker.contracts import (
    EVALUATION_PROMPTS_FILE,
    EVALUATION_PROMPTS_MAX_BYTES,
    TOKENIZER_FILES,
    ArmQualification,
    ArmRole,
    EvaluationPrompts,
    QualificationConfig,
    QualificationReason,
    QualificationReport,
    QualifyArm,
    Regime,
    RegimeFigures,
)
from quantrol_worker.qualify import admission, golden_check, load, regimes

log = logging.getLogger("quantrol.qualify")
# Used only when neither the artifact nor a probe ConfigMap has prompts: plain, any tokenizer can count them.
FALLBACK_PROMPTS = (
    "Explain, in a few sentences, how a bicycle stays upright while moving.",
    "Write a short function that returns the largest of three numbers, and explain it.",
    "Summarise the main causes of the seasons on Earth.",
    "List three ways to make a small web service more reliable.",
)


RECOVERY_REQUESTS = 5


class Refused(Exception):
    def __init__(self, reason: QualificationReason, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


@dataclass
class Materials:
    tokenizer: Path
    prompts: EvaluationPrompts | None
    load_prompts: list[str]
    source: str


@dataclass
class QualificationRun:
    config: QualificationConfig
    work: Path
    report: QualificationReport = field(default_factory=lambda: QualificationReport(
        reason=QualificationReason.INTERNAL_ERROR, tool=load.tool_version()))
    # Both arms climb one ladder, from the first arm's floor rate: their goodput is compared at matched offered load,
    # where a ratio is fair (a ladder per arm would compare different rungs).
    ladder_start: float | None = None

    def arm(self, role: ArmRole) -> QualifyArm | None:
        return next((a for a in self.config.arms if a.arm is role), None)


def materials(config: QualificationConfig, work: Path) -> Materials:
    """The tokenizer and the evaluation prompts from the candidate artifact (those files only, verified), or the
    probe ConfigMap's prompts, or a few built-in ones (said in the report)."""
    dest = work / "artifact"
    if config.prompts_artifact and config.prompts_artifact.startswith("file://"):
        dest = Path(config.prompts_artifact.removeprefix("file://"))  # a local model folder (the bench), as is
    elif config.prompts_artifact:
        titles = frozenset({EVALUATION_PROMPTS_FILE, "config.json", *TOKENIZER_FILES})
        access = config.registries
        host = oci.OciRef.parse(config.prompts_artifact).host
        oci.pull(config.prompts_artifact, dest, insecure=oci.plain_http(host, access.plain_http), titles=titles,
                 credentials=Path(access.credentials_file) if access.credentials_file else None,
                 max_layer_bytes=EVALUATION_PROMPTS_MAX_BYTES)  # the artifact's registry may be a tenant's
    prompts = None
    if (dest / EVALUATION_PROMPTS_FILE).is_file():
        prompts = EvaluationPrompts.read(dest / EVALUATION_PROMPTS_FILE)
    if prompts is not None and any(s.prompts for s in prompts.slices):
        texts = [p.text for s in prompts.slices for p in s.prompts if p.text.strip()]
        return Materials(dest, prompts, texts, "artifact")
    if config.probe_prompts_file:
        lines = Path(config.probe_prompts_file).read_text().splitlines()[:10_000]
        texts = [str(json.loads(line).get("text", ""))[:100_000] for line in lines if line.strip()]
        return Materials(dest, None, [t for t in texts if t.strip()], "configMap")
    return Materials(dest, None, list(FALLBACK_PROMPTS), "none: the artifact carries no evaluation prompts and "
                     "spec.qualification.probePrompts is unset (built-in prompts drove the load)")


def golden(q: QualificationRun, found: Materials) -> None:
    candidate = q.arm(ArmRole.CANDIDATE)
    if found.prompts is None or candidate is None:
        return
    url = from_environment().url(candidate.url)
    q.report.golden = golden_check.check(url, q.config.model, found.prompts, q.config.golden,
                                         max_seconds=q.config.golden_max_seconds)
    bad = [g for g in q.report.golden if not g.passed]
    if bad:
        raise Refused(QualificationReason.GOLDEN_OUTPUT_MISMATCH, "the candidate engine does not reproduce "
                      "calibration's quality on slice " + "; ".join(f"{g.slice} ({', '.join(g.failed)})" for g in bad))


def _run(q: QualificationRun, found: Materials, url: str, rate: float | None, seconds: float,
         max_requests: int | None = None) -> regimes.LoadRun:
    before = admission.queue_wait_buckets(url)
    run = load.run(url, found.tokenizer, found.load_prompts, q.config.output_tokens, q.work, rate=rate,
                   seconds=seconds, max_requests=max_requests)
    after = admission.queue_wait_buckets(url)
    return regimes.LoadRun(run.requests, run.seconds, run.rate_rps, admission.p99_between(before, after))


def floor_of(q: QualificationRun, found: Materials, arm: QualifyArm, url: str) -> tuple[RegimeFigures, float]:
    """Regime (i), and the rate it reached one request at a time (where the ladder starts)."""
    r, limits = q.config.regimes, q.config.limits
    run = _run(q, found, url, None, r.floor_max_seconds, r.floor_requests)
    floor = regimes.judge(regimes.figures(Regime.FLOOR, run, limits, arm.replicas), limits, r.floor_max_seconds)
    return floor, max(len([s for s in run.requests if s.ok]) / run.seconds, 0.05)


def measure_arm(q: QualificationRun, found: Materials, arm: QualifyArm) -> ArmQualification:
    """The three regimes on one arm; the candidate's floor comes first and refuses it at once when it fails its SLO,
    and its golden-output check runs right after (the engine is known to answer in time by then)."""
    result = ArmQualification(arm=arm.arm, artifact=arm.artifact)
    q.report.arms.append(result)
    with admission.router(from_environment().url(arm.url), q.config.admission, q.work) as url:
        floor, start = floor_of(q, found, arm, url)
        result.regimes.append(floor)
        q.ladder_start = start = q.ladder_start or start
        if arm.arm is ArmRole.CANDIDATE:
            if not floor.passed:
                raise Refused(QualificationReason.QUALIFICATION_FAILED,
                              f"regime floor (one request at a time): {'; '.join(floor.failed)}")
            golden(q, found)
        sustainable = sweep(q, found, url, arm, start)
        result.regimes.append(sustainable)
        result.regimes.append(overload(q, found, url, arm, sustainable if sustainable.passed else None, start, floor))
    return result


def sweep(q: QualificationRun, found: Materials, url: str, arm: QualifyArm, start: float) -> RegimeFigures:
    """Regime (ii): the rate ladder (regimes.next_rung); the highest passing rate, else the lowest that failed."""
    limits = q.config.limits
    passed: list[float] = []
    failed: list[float] = []
    runs: dict[float, RegimeFigures] = {}
    while (rate := regimes.next_rung(passed, failed, start, q.config.regimes.sweep_rates)) is not None:
        run = _run(q, found, url, rate, q.config.regimes.seconds_per_rate)
        runs[rate] = regimes.judge(regimes.figures(Regime.SUSTAINABLE, run, limits, arm.replicas), limits,
                                   q.config.regimes.seconds_per_rate)
        (passed if runs[rate].passed else failed).append(rate)
        log.info("%s: %.3g req/s %s", arm.arm.value, rate, "passed" if runs[rate].passed else runs[rate].failed)
    return runs[max(passed)] if passed else runs[min(failed)]


def overload(q: QualificationRun, found: Materials, url: str, arm: QualifyArm, sustainable: RegimeFigures | None,
             start: float, floor: RegimeFigures) -> RegimeFigures:
    """Regime (iii): factor × the sustainable rate for a bounded time, then one at a time until floor latency."""
    r, limits = q.config.regimes, q.config.limits
    rate = round(r.overload_factor * ((sustainable.rate_rps if sustainable else None) or start), 3)
    run = _run(q, found, url, rate, r.overload_seconds)
    fig = regimes.figures(Regime.OVERLOAD, run, limits, arm.replicas)
    # A few requests one at a time: the first back at floor latency ends the question (bounded by recoverySeconds).
    after = load.run(url, found.tokenizer, found.load_prompts, q.config.output_tokens, q.work, rate=None,
                     seconds=r.recovery_seconds, max_requests=RECOVERY_REQUESTS)
    recovered = regimes.recovery_seconds(after.requests, floor.ttft_p50_seconds)
    failed = [] if recovered is not None else [f"recovery: not back to floor latency within {r.recovery_seconds} s"]
    return fig.model_copy(update={"recovery_seconds": recovered, "passed": not failed, "failed": failed})


def verdict(q: QualificationRun) -> None:
    """The goodput ratio at each arm's sustainable rate against the policy's; a rate that was not sustainable
    counts as no goodput."""
    def goodput(role: ArmRole) -> RegimeFigures | None:
        arm = q.report.arm(role)
        fig = arm.regime(Regime.SUSTAINABLE) if arm else None
        return fig if fig is None or fig.passed else fig.model_copy(update={"goodput_tokens_per_engine_second": 0.0})

    ratio = regimes.goodput_ratio(goodput(ArmRole.CANDIDATE), goodput(ArmRole.STABLE))
    q.report.goodput_ratio, q.report.required_goodput_ratio = ratio, q.config.min_goodput_ratio
    if ratio is not None and ratio < q.config.min_goodput_ratio:
        raise Refused(QualificationReason.QUALIFICATION_FAILED, f"regime sustainable: goodput {ratio:.3g} × stable "
                      f"< the required {q.config.min_goodput_ratio:.3g} × (spec.qualification.minGoodputRatio)")


def qualify(config: QualificationConfig) -> QualificationReport:
    work = Path(config.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    q = QualificationRun(config, work)
    try:
        found = materials(config, work)
        q.report.golden_source = found.source if found.prompts is not None else (
            f"{found.source}; no golden record: the golden-output check did not run")
        for role in (ArmRole.CANDIDATE, ArmRole.STABLE):
            arm = q.arm(role)
            if arm is not None:
                measure_arm(q, found, arm)
        verdict(q)
        q.report.reason = QualificationReason.QUALIFIED
        ratio = q.report.goodput_ratio
        q.report.message = "qualified: golden output " + ("matches" if q.report.golden else "not checked") + (
            f"; sustainable goodput {ratio:.3g} × stable" if ratio is not None else "")
    except Refused as exc:
        q.report.reason, q.report.message = exc.reason, exc.message
    except Exception as exc:  # written down as a result, never a silent crash
        log.exception("qualification could not measure")
        q.report.reason, q.report.message = QualificationReason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"[:2000]
    return q.report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quantrol-worker qualify")
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = QualificationConfig.model_validate(yaml.safe_load(args.config.read_text()))
    except Exception as exc:
        report = QualificationReport(reason=QualificationReason.INVALID_CONFIG, message=str(exc)[:2000])
        print(report.to_message())
        return 1
    report = qualify(config)
    message = report.to_message()
    try:
        Path(config.termination_message_path).write_text(message)
    except OSError as exc:
        print(f"quantrol: cannot write the termination message: {exc}", file=sys.stderr)
    print(message)
    return 1 if report.reason is QualificationReason.INTERNAL_ERROR else 0
