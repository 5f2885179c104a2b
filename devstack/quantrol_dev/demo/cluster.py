"""`quantrol demo --cluster`: the demo story on a real cluster, with the chart's operator and real pods.

The resources are the local story's (demo_story.py): three QuantizedModels on target cpu-x86 (W8A8, FP8_DYNAMIC,
W8A16) and one ServingPolicy whose candidate is edited from one to the next. They go to the cluster of the current
kubeconfig (or of `context`), are followed by the same recorder, and end in the same report. What the local stack
did on this machine, the cluster does:

- the tiny model is built in the cluster, by a Job on the operator's calibration worker image, into a PVC
  (`tiny-model`), and its bf16 checkpoint is pushed to the registry as the baseline, pinned by digest. The
  QuantizedModels read it as `pvc://tiny-model/model` and their calibration data from the same claim;
- the client fleet (`quantrol-worker fleet`: GuideLLM with the fleet's mix) runs as a pod on the install's serving
  image, which holds the worker and GuideLLM, sending to the router's Service; the engine warm-up runs as a pod on
  the operator's image (Python's standard library is all it needs), sending to the arms' Services;
- the registry and Prometheus are the cluster's: by default the ones e2e/kind-up.sh installs (a TLS registry whose
  CA the e2e images trust, and a Prometheus that scrapes annotated pods with the `namespace` and `policy` labels).

It first checks that the operator is installed (both CRDs, and a ready operator Deployment with the chart's labels)
and says how to install it otherwise. It works in namespace quantrol-demo, which it deletes and re-creates at the
start: a previous run's objects must not be mistaken for this run's. e2e/test_rollout.py runs the same steps as
pytest scenarios.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes.client.exceptions import ApiException

from quantrol_dev.demo import warmup
from quantrol_dev.demo.story import (
    CANDIDATES,
    FLEET_PROMPTS,
    NAMESPACE,
    PAUSED,
    POLICY,
    Api,
    DemoError,
    DemoSettings,
    Recorder,
    build_report,
    interrupt_on_signals,
    print_yaml,
    quantized_model,
    report_markdown,
    rolled_back_after,
    say,
    serving_policy,
    wait_for,
    wait_policy,
    wait_quantized_models,
)
from quantrol_operator.api.kinds import KINDS, QUANTIZED_MODEL
from quantrol_operator.children.calibration import MODELS_DIR
from quantrol_operator.children.router import ROUTER_PORT
from quantrol_operator.children.serving import ENGINE_PORT, arm_name
from quantrol_operator.cli.statusview import render_quantizedmodel, render_servingpolicy
from quantrol_operator.defaults import OperatorDefaults
from quantrol_operator.kube import Kube
from quantrol_worker.fleet import COUNTS, prompts_jsonl

DEFAULT_REGISTRY = "registry.quantrol-infra.svc:5000"  # e2e/kind-up.sh: TLS, CA baked into the e2e images
DEFAULT_PROMETHEUS = "http://prometheus.quantrol-infra.svc:9090"
OPERATOR_SELECTOR = "app.kubernetes.io/name=quantrol,app.kubernetes.io/component=operator"  # the chart's labels
CRD_NAMES = tuple(f"{k.plural}.{k.group}" for k in KINDS)
HELM_INSTALL = ("helm install quantrol charts/quantrol -n quantrol-system --create-namespace "
                "--set 'watch.namespaces={quantrol-demo}'")
MODEL_CLAIM = "tiny-model"
DEMO_LABELS = {"app.kubernetes.io/part-of": "quantrol-demo"}
LOAD_NAME = f"{POLICY}-load"
TERMINATION_LOG = "/dev/termination-log"


@dataclass(frozen=True)
class ClusterTarget:
    """Where the cluster's registry and Prometheus answer (defaults: what e2e/kind-up.sh installs)."""

    registry: str = DEFAULT_REGISTRY
    prometheus_url: str = DEFAULT_PROMETHEUS
    # Plain HTTP: the chart's installPolicy.registries.plainHttp must list the registry (push and fetch alike).
    insecure_registry: bool = False
    storage_class: str | None = None  # for the tiny-model claim; None: the cluster's default StorageClass


@dataclass(frozen=True)
class OperatorInstall:
    namespace: str
    name: str
    image: str  # the operator's own image: the helper pods run on it
    defaults: OperatorDefaults  # read from the operator container's environment (the chart's workerImages.*)


class ClusterApi(Api):
    """The story's Api (namespace quantrol-demo) on a real kubeconfig and context, plus what the cluster story reads
    besides the custom resources; all of it through kube.Kube, the operator's own client."""

    def __init__(self, context: str | None = None, kubeconfig: str | None = None) -> None:
        super().__init__(Kube.from_kubeconfig(kubeconfig, context))

    def create_builtin(self, obj: dict[str, Any]) -> None:
        """Create a Job, Deployment or PersistentVolumeClaim in the demo namespace from its dict."""
        self.kube.create({**obj, "metadata": {**obj["metadata"], "namespace": NAMESPACE}})

    def pods(self, selector: str = "") -> list[dict[str, Any]]:
        return self.kube.list_objects("v1", "Pod", NAMESPACE, selector)

    def log_tail(self, pod: dict[str, Any], lines: int) -> str:
        return self.kube.read_text(f"/api/v1/namespaces/{NAMESPACE}/pods/{pod['metadata']['name']}/log",
                                   [("tailLines", str(lines))])


# --- what runs in the helper pods: standard library only (quantrol_worker too for the seed), shipped as source --


def _seed_main() -> None:
    """In the worker image: build the tiny model into the claim, push its bf16 checkpoint, report the digest."""
    import json
    from pathlib import Path

    from quantrol_worker.oci import push
    from quantrol_worker.tinymodel import TinySpec, build

    info = build(Path(os.environ["QUANTROL_SEED_OUT"]), TinySpec(vocab_size=4096))  # vLLM CPU needs 4096
    ref = push(Path(info["model_dir"]), os.environ["QUANTROL_SEED_REPOSITORY"],
               insecure=os.environ.get("QUANTROL_SEED_INSECURE") == "true", tag="bf16",
               annotations={"org.opencontainers.image.title": "tiny-llama bf16 baseline"})
    result = json.dumps({"baseline": f"oci://{ref}", "parameters": info["parameters"],
                         "slices": sorted(info["slices"])})
    Path(os.environ["QUANTROL_TERMINATION_LOG"]).write_text(result)
    print(result, flush=True)


def function_script(main: Callable[[], None]) -> str:
    """A self-contained module-level function of this file as a `python -c` program: its source, then a call."""
    return f"{inspect.getsource(main)}\n{main.__name__}()\n"


# --- the objects the demo applies besides the custom resources -----------------------------------------------------


def _env(values: dict[str, str]) -> list[dict[str, str]]:
    return [{"name": k, "value": v} for k, v in values.items()]


def _meta(name: str, **labels: str) -> dict[str, Any]:
    return {"name": name, "namespace": NAMESPACE, "labels": {**DEMO_LABELS, **labels}}


def helper_job(name: str, image: str, script: str, env: dict[str, str], deadline: float,
               volumes: Sequence[dict[str, Any]] = (), mounts: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """A one-shot pod running the `python -c` `script` on `image`; it fails at once rather than retrying."""
    container = {"name": "main", "image": image, "command": ["python", "-c", script],
                 "env": _env({"PYTHONUNBUFFERED": "1", "QUANTROL_TERMINATION_LOG": TERMINATION_LOG, **env}),
                 "volumeMounts": list(mounts), "terminationMessagePath": TERMINATION_LOG,
                 "terminationMessagePolicy": "FallbackToLogsOnError"}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(name),
            "spec": {"backoffLimit": 0, "activeDeadlineSeconds": int(deadline),
                     "template": {"metadata": {"labels": dict(DEMO_LABELS)},
                                  "spec": {"restartPolicy": "Never", "containers": [container],
                                           "volumes": list(volumes)}}}}


def model_claim(storage_class: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
    if storage_class:
        spec["storageClassName"] = storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _meta(MODEL_CLAIM), "spec": spec}


def seed_job(name: str, worker_image: str, target: ClusterTarget, deadline: float) -> dict[str, Any]:
    """Builds the tiny model into the claim (mounted where the operator mounts pvc:// models) and pushes the
    baseline; the result (`baseline`: oci://…@sha256:…) is the pod's termination message."""
    mount_path = f"{MODELS_DIR}/{MODEL_CLAIM}"
    env = {"QUANTROL_SEED_OUT": mount_path, "QUANTROL_SEED_REPOSITORY": f"{target.registry}/models/tiny-bf16",
           "QUANTROL_SEED_INSECURE": "true" if target.insecure_registry else "false", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    return helper_job(name, worker_image, function_script(_seed_main), env, deadline,
                      volumes=[{"name": "model", "persistentVolumeClaim": {"claimName": MODEL_CLAIM}}],
                      mounts=[{"name": "model", "mountPath": mount_path}])


def warm_job(name: str, image: str, artifact: str, deadline: float) -> dict[str, Any]:
    url = f"http://{arm_name(POLICY, artifact)}.{NAMESPACE}.svc:{ENGINE_PORT}/v1/completions"
    env = {"QUANTROL_WARM_URL": url, "QUANTROL_WARM_MODEL": POLICY, "QUANTROL_WARM_TIMEOUT": str(int(deadline))}
    return helper_job(name, image, warmup.pod_script(warmup.warm_main), env, deadline)


def load_prompts_config_map() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(LOAD_NAME, **DEMO_LABELS),
            "data": {"prompts.jsonl": prompts_jsonl(FLEET_PROMPTS)}}


def load_deployment(image: str, settings: DemoSettings) -> dict[str, Any]:
    """The client fleet, bounded by its own `--seconds` too (the Deployment restarts it after that)."""
    labels = {**DEMO_LABELS, "app.kubernetes.io/name": LOAD_NAME}
    command = ["quantrol-worker", "fleet", "--target", f"http://{POLICY}.{NAMESPACE}.svc:{ROUTER_PORT}",
               "--model", POLICY, "--prompts", "/prompts/prompts.jsonl", "--rate", str(settings.load_rate),
               "--max-tokens", str(settings.max_tokens), "--seconds", str(int(4 * settings.phase_timeout + 600)),
               "--work", "/work"]
    container = {"name": "load", "image": image, "command": command,
                 "env": _env({"PYTHONUNBUFFERED": "1", "HOME": "/work", "HF_HUB_OFFLINE": "1"}),
                 "volumeMounts": [{"name": "prompts", "mountPath": "/prompts", "readOnly": True},
                                  {"name": "work", "mountPath": "/work"}]}
    volumes = [{"name": "prompts", "configMap": {"name": LOAD_NAME}}, {"name": "work", "emptyDir": {}}]
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(LOAD_NAME, **labels),
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app.kubernetes.io/name": LOAD_NAME}},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"terminationGracePeriodSeconds": 75, "containers": [container],
                                           "volumes": volumes}}}}


def cluster_quantized_model(name: str, scheme: str, target: ClusterTarget) -> dict[str, Any]:
    """The local story's QuantizedModel, reading the tiny model and its calibration data from the claim."""
    qm = quantized_model(name, scheme, {"model_dir": "", "calibration_jsonl": ""}, target.registry)
    spec = qm["spec"]
    spec["baseModel"]["uri"] = f"pvc://{MODEL_CLAIM}/model"
    spec["calibration"]["uri"] = f"pvc://{MODEL_CLAIM}/calibration.jsonl"
    spec["artifact"].pop("credentialsSecretRef", None)  # kind's registry (e2e/kind-up.sh) takes anonymous pushes
    spec["artifact"]["insecure"] = target.insecure_registry
    return qm


def _label_text(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def _ref(obj: dict[str, Any]) -> str:
    return f"{obj['metadata'].get('namespace')}/{obj['metadata']['name']}"


def _ready_replicas(deployment: dict[str, Any]) -> int:
    return int((deployment.get("status") or {}).get("readyReplicas") or 0)


def _container_state(cs: dict[str, Any]) -> str:
    """Why a container is not running ("" when it is, or ended well), for pods_report."""
    state = cs.get("state") or {}
    if state.get("waiting"):
        waiting = state["waiting"]
        return f"{cs['name']} waiting: {waiting.get('reason')} {waiting.get('message') or ''}".rstrip()
    terminated = state.get("terminated") or {}
    if terminated.get("exitCode"):
        return (f"{cs['name']} exited {terminated['exitCode']}: {terminated.get('reason')} "
                f"{(terminated.get('message') or '')[-300:]}").rstrip()
    return ""


# --- the story's steps ---------------------------------------------------------------------------------------------


class ClusterStory:
    """The demo's steps on a cluster, one method each: run_cluster_story runs them all, the e2e scenarios in turn."""

    def __init__(self, settings: DemoSettings, target: ClusterTarget | None = None, context: str | None = None,
                 kubeconfig: str | None = None) -> None:
        self.settings = settings
        self.target = target or ClusterTarget()
        self.api = ClusterApi(context, kubeconfig)
        self.recorder = Recorder(self.api, time.monotonic())
        self.install: OperatorInstall | None = None
        self.began = time.monotonic()
        self.baseline = ""
        self.settled: dict[str, dict[str, Any]] = {}  # QuantizedModel name -> the object once Ready/Rejected/Failed
        self.artifacts: dict[str, str] = {}  # QuantizedModel name -> oci://…@sha256:… (published ones only)
        self.marks: list[tuple[float, str]] = []
        self.rollbacks: list[dict[str, Any]] = []
        self._jobs = 0

    def preflight(self) -> OperatorInstall:
        """Both CRDs and a ready operator Deployment with the chart's labels, or a DemoError saying how to install."""
        missing = [name for name in CRD_NAMES
                   if self.api.kube.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", "", name) is None]
        if missing:
            raise DemoError(f"Quantrol is not installed on this cluster (no CRD {', '.join(missing)}); install it "
                            f"with `{HELM_INSTALL}` (on kind, `bash e2e/kind-up.sh` does everything)")
        found = self.api.kube.list_objects("apps/v1", "Deployment", None, OPERATOR_SELECTOR)
        ready = [d for d in found if _ready_replicas(d) >= 1]
        if not ready:
            seen = ", ".join(f"{_ref(d)} ({_ready_replicas(d)} ready)" for d in found) or "none"
            raise DemoError(f"no ready Quantrol operator (Deployments labelled {OPERATOR_SELECTOR}: {seen}); install "
                            f"it with `{HELM_INSTALL}`, or see why its pod is not ready (kubectl describe pod -A -l "
                            f"{OPERATOR_SELECTOR})")
        meta, container = ready[0]["metadata"], ready[0]["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e["value"] for e in container.get("env") or [] if e.get("value") is not None}
        self.install = OperatorInstall(meta["namespace"], meta["name"], container["image"],
                                       OperatorDefaults.from_env(env))
        say(f"operator {_ref(ready[0])} ready ({container['image']}); calibration image "
             f"{self.install.defaults.worker_image}, serving image {self.install.defaults.serving_image}")
        return self.install

    def _installed(self) -> OperatorInstall:
        return self.install or self.preflight()

    def reset(self) -> None:
        """Delete the demo namespace (a previous run's objects, children and claim) and create it afresh."""
        if self.api.kube.get("v1", "Namespace", NAMESPACE, NAMESPACE) is not None:
            self.api.kube.delete({"apiVersion": "v1", "kind": "Namespace", "namespace": None, "name": NAMESPACE})
            say(f"deleting namespace {NAMESPACE} and a previous run's objects in it")

        def gone() -> bool:
            return self.api.kube.get("v1", "Namespace", NAMESPACE, NAMESPACE) is None

        wait_for(f"namespace {NAMESPACE} to be deleted (the operator removes its finalizers: is it running?)", gone,
              self.settings.phase_timeout, every=2.0)
        self.api.ensure_namespace(NAMESPACE)

    def seed(self) -> str:
        """The tiny model, built in the cluster into the claim; its bf16 checkpoint pushed as the baseline."""
        image = self._installed().defaults.worker_image
        self.api.create_builtin(model_claim(self.target.storage_class))
        name = self._job_name("seed")
        self.api.create_builtin(seed_job(name, image, self.target, self.settings.phase_timeout))
        say(f"Job {name} on {image}: the tiny model into PVC {MODEL_CLAIM}, its bf16 checkpoint to "
             f"{self.target.registry}")
        result = json.loads(self.wait_job(name, self.settings.phase_timeout))
        self.baseline = str(result["baseline"])
        say(f"tiny model ready ({result.get('parameters'):,} parameters, slices {result.get('slices')}); baseline "
             f"published by digest: {self.baseline}")
        return self.baseline

    def calibrate(self, candidates: Sequence[tuple[str, str]]) -> dict[str, dict[str, Any]]:
        """Apply one QuantizedModel per (name, scheme) and wait until each is Ready, Rejected or Failed."""
        qms = [cluster_quantized_model(name, scheme, self.target) for name, scheme in candidates]
        for qm in qms:
            if not self.settings.quiet:
                print_yaml(qm)
            self.api.create(qm)
        say(f"applied {len(qms)} QuantizedModels; the operator's calibration Jobs run on "
             f"{self._installed().defaults.worker_image}")
        settled = wait_quantized_models(self.api, [q["metadata"]["name"] for q in qms], self.settings.phase_timeout)
        self.settled.update(settled)
        for name, obj in settled.items():
            ref = ((obj.get("status") or {}).get("artifact") or {}).get("ref")
            if ref:
                self.artifacts[name] = f"oci://{ref}"
        return settled

    def start_policy(self, candidate: str) -> None:
        """Apply the ServingPolicy (held), start the load, warm both arms' engines, release the hold."""
        if candidate not in self.artifacts:
            raise DemoError(f"{candidate} has no published artifact to roll out ({self.describe_model(candidate)})")
        policy = serving_policy(self.baseline, candidate, self.settings, self.target.prometheus_url)
        if not self.settings.quiet:
            print_yaml(policy)
        self.recorder.candidate = candidate
        self.recorder.started = time.monotonic()
        self.api.create(policy)
        self.recorder.start()
        self.api.create_builtin(load_prompts_config_map())
        self.api.create_builtin(load_deployment(self._installed().defaults.serving_image, self.settings))
        say(f"applied ServingPolicy {POLICY} (held while its engines warm up); bounded load from Deployment "
             f"{LOAD_NAME}: GuideLLM at {self.settings.load_rate:g} requests/s (Poisson), "
             f"{self.settings.max_tokens} tokens each")
        self.hold_and_warm([self.baseline, self.artifacts[candidate]])

    def hold_and_warm(self, artifacts: Sequence[str]) -> None:
        """While the policy is held (quantrol.io/paused), wait for the arms of `artifacts` and warm their engines
        up from Jobs that send straight to the engines (demo_story.hold_and_warm), then release the hold."""
        began, timeout = time.monotonic(), self.settings.phase_timeout
        arms = [arm_name(POLICY, artifact) for artifact in artifacts]
        try:
            wait_for(f"the arms {', '.join(arms)} to be ready", lambda: all(self._ready(a) for a in arms), timeout, 2.0)
        except DemoError as exc:
            raise DemoError(f"{exc}\n{self.pods_report()}") from None
        jobs = [self._job_name("warm") for _ in artifacts]
        for job, artifact in zip(jobs, artifacts, strict=True):
            self.api.create_builtin(warm_job(job, self._installed().image, artifact, timeout))
        for job in jobs:
            self.wait_job(job, timeout + 60)
        say(f"engines {', '.join(arms)} warm in {time.monotonic() - began:.0f}s (requests straight to the engines, "
             "unseen by the metrics); releasing the hold")
        self.api.patch_policy({"metadata": {"annotations": {PAUSED: None}}})

    def wait_promoted(self) -> None:
        candidate = self.recorder.candidate
        wait_policy(self.recorder, f"{candidate} to be promoted", lambda s: s.get("phase") == "Promoted",
                    self.settings.phase_timeout, stop_on=("RolledBack",))
        self.marks.append((time.monotonic() - self.recorder.started, f"{candidate} promoted"))

    def switch_candidate(self, name: str) -> dict[str, Any]:
        """Edit the policy's candidate as a user would in git, and wait for the rollback that ends it; returns the
        rollback record. The spec edit alone restarts a rolled-back policy; only a candidate that will be served is
        held (paused) while its engine warms up."""
        with self.recorder.lock:
            seen = len(self.recorder.status.get("history") or [])
        refused = name not in self.artifacts
        say(f"editing the policy: spec.candidate.quantizedModelRef.name = {name}")
        self.recorder.candidate = name
        self.marks.append((time.monotonic() - self.recorder.started, f"candidate → {name}"))
        patch: dict[str, Any] = {"spec": {"candidate": {"quantizedModelRef": {"name": name}}}}
        if not refused:
            patch["metadata"] = {"annotations": {PAUSED: "true"}}
        self.api.patch_policy(patch)
        if not refused:
            self.hold_and_warm([self.artifacts[name]])
        wait_policy(self.recorder, f"{name} to be rolled back", rolled_back_after(seen), self.settings.phase_timeout)
        with self.recorder.lock:
            record = dict(self.recorder.status.get("rollback") or {})
        self.marks.append((time.monotonic() - self.recorder.started, f"RolledBack: {name} ({record.get('reason')})"))
        self.rollbacks.append({"candidate": name, "record": record})
        say(f"rollback record for {name}: {json.dumps(record, sort_keys=True)}")
        return record

    def finish(self) -> dict[str, Any]:
        """Stop the load and gather the report (the same keys as the local story's report.json)."""
        self.recorder.observe()
        load = self.stop_load()
        final = self.api.get("servingpolicies", POLICY)
        return build_report(
            seconds=time.monotonic() - self.began, settings=self.settings, baseline=self.baseline,
            quantized={name: self.api.get("quantizedmodels", name) for name in self.settled}, final=final,
            recorder=self.recorder, rollbacks=self.rollbacks,
            rollbacks_total=self.operator_metric("quantrol_rollbacks_total"), load=load, marks=self.marks)

    def close(self) -> None:
        """Stop following, stop the load (also after a failure), keep what was recorded."""
        self.recorder.stop.set()
        with contextlib.suppress(Exception):
            self.stop_load()
        with contextlib.suppress(OSError):
            self.settings.output.mkdir(parents=True, exist_ok=True)
            self.recorder.dump(self.settings.output / "timeline.json")
        self.api.close()

    # --- reading the cluster ---------------------------------------------------------------------------------------

    def _job_name(self, kind: str) -> str:
        self._jobs += 1
        return f"{POLICY}-{kind}-{self._jobs}"

    def _ready(self, deployment: str) -> bool:
        found = self.api.kube.get("apps/v1", "Deployment", NAMESPACE, deployment)
        return found is not None and _ready_replicas(found) >= 1  # None: not created yet

    def wait_job(self, name: str, timeout: float) -> str:
        """Wait for a helper Job to succeed; returns its pod's termination message. A failure or a timeout raises
        DemoError with the pod's state and log tail."""

        def done() -> bool:
            status = (self.api.kube.get("batch/v1", "Job", NAMESPACE, name) or {}).get("status") or {}
            if status.get("failed"):
                raise DemoError(f"Job {name} failed")
            return bool(status.get("succeeded"))

        try:
            wait_for(f"Job {name}", done, timeout, every=2.0)
        except DemoError as exc:
            raise DemoError(f"{exc}\n{self.pods_report(f'job-name={name}', logs=True)}") from None
        for pod in self._pods(f"job-name={name}"):
            for cs in (pod.get("status") or {}).get("containerStatuses") or []:
                message = ((cs.get("state") or {}).get("terminated") or {}).get("message")
                if message:
                    return str(message)
        return ""

    def _pods(self, selector: str = "") -> list[dict[str, Any]]:
        return self.api.pods(selector)

    def _log_tail(self, pod: dict[str, Any], lines: int) -> str:
        return self.api.log_tail(pod, lines)

    def pods_report(self, selector: str = "", logs: bool = False) -> str:
        """One line per pod of the demo namespace (phase, and why each container is not running), with the last log
        lines of each when `logs`: what a failed wait shows."""
        lines: list[str] = []
        for pod in self._pods(selector):
            status = pod.get("status") or {}
            states = [_container_state(cs) for cs in (status.get("initContainerStatuses") or [])
                      + (status.get("containerStatuses") or [])]
            why = "; ".join(s for s in states if s)
            lines.append(f"  pod {pod['metadata']['name']}: {status.get('phase')}" + (f" — {why}" if why else ""))
            if logs:
                with contextlib.suppress(Exception):
                    lines += [f"    | {line}" for line in self._log_tail(pod, 30).splitlines()]
        return "\n".join(lines) or f"  no pods in {NAMESPACE}" + (f" matching {selector}" if selector else "")

    def describe_model(self, name: str) -> str:
        obj = self.settled.get(name) or self.api.get_optional("quantizedmodels", name)
        return render_quantizedmodel(obj) if obj else f"QuantizedModel {NAMESPACE}/{name}: not found"

    def describe(self) -> str:
        """The policy and the models at a glance (`quantrol status`), and the pods: what a failed test prints."""
        parts: list[str] = []
        with contextlib.suppress(Exception):
            policy = self.api.get_optional("servingpolicies", POLICY)
            parts.append(render_servingpolicy(policy) if policy else f"ServingPolicy {NAMESPACE}/{POLICY}: not found")
        with contextlib.suppress(Exception):
            listed = self.api.kube.list_objects(QUANTIZED_MODEL.api_version, QUANTIZED_MODEL.kind, NAMESPACE)
            parts += [render_quantizedmodel(obj) for obj in listed]
        with contextlib.suppress(Exception):
            parts.append(f"pods in {NAMESPACE}:\n{self.pods_report()}")
        return "\n".join(parts)

    def stop_load(self) -> dict[str, int]:
        """The load generator's last counts (from its log), then its Deployment deleted."""
        counts = {"ok": 0, "failed": 0}
        for pod in self._pods(f"app.kubernetes.io/name={LOAD_NAME}"):
            with contextlib.suppress(ApiException):
                found = COUNTS.findall(self._log_tail(pod, 20))
                if found:
                    counts["ok"] += int(found[-1][0])
                    counts["failed"] += int(found[-1][1])
        # 404 is fine: never started, or already stopped (Kube.delete ignores it)
        self.api.kube.delete({"apiVersion": "apps/v1", "kind": "Deployment", "namespace": NAMESPACE,
                              "name": LOAD_NAME})
        self.api.kube.delete({"apiVersion": "v1", "kind": "ConfigMap", "namespace": NAMESPACE, "name": LOAD_NAME})
        return counts

    def operator_metric(self, name: str) -> dict[str, float]:
        """Every sample of one of the operator's metrics, read through the API server's proxy to its metrics Service
        (the chart's `<release>-metrics`), keyed by label text; empty when that Service is not there."""
        from prometheus_client.parser import text_string_to_metric_families

        install = self._installed()
        out: dict[str, float] = {}
        services = self.api.kube.list_objects("v1", "Service", install.namespace, OPERATOR_SELECTOR)
        for svc in services:
            if not any(port.get("name") == "metrics" for port in svc["spec"].get("ports") or []):
                continue
            try:
                text = self.api.kube.read_text(f"/api/v1/namespaces/{install.namespace}/services/"
                                               f"{svc['metadata']['name']}:metrics/proxy/metrics")
            except Exception as exc:  # the report says so; the story itself is done
                say(f"could not read the operator's metrics through {_ref(svc)}: {exc}")
                return out
            for family in text_string_to_metric_families(str(text)):
                out.update({_label_text(s.labels): s.value for s in family.samples if s.name == name})
        return out


# --- the whole story -----------------------------------------------------------------------------------------------


def run_cluster_story(story: ClusterStory) -> dict[str, Any]:
    """The local story's flow on the cluster: W8A8 promoted, FP8_DYNAMIC rolled back on latency (or refused as
    KernelFallback under kernelPolicy enforce), W8A16 refused as KernelUnavailable."""
    story.preflight()
    story.reset()
    story.seed()
    story.calibrate(CANDIDATES)
    story.start_policy(CANDIDATES[0][0])
    story.wait_promoted()
    fp8_reason = "SloBreach" if story.settings.kernel_policy == "warn" else "KernelFallback"
    for name, expect in ((CANDIDATES[1][0], fp8_reason), (CANDIDATES[2][0], "KernelUnavailable")):
        record = story.switch_candidate(name)
        if record.get("reason") != expect:
            say(f"!! expected {expect} for {name}, got {record.get('reason')}")
    report = story.finish()
    print(render_servingpolicy(report["servingPolicy"]), flush=True)
    for obj in report["quantizedModels"].values():
        print(render_quantizedmodel(obj), flush=True)
    return report


def write_report(output: Path, report: dict[str, Any], story: ClusterStory) -> None:
    """report.json and report.md as the local story writes them, and chart.png where matplotlib is installed."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (output / "report.md").write_text(report_markdown(report))
    try:
        from quantrol_dev.demo.story import draw_chart

        draw_chart(story.recorder.series, story.marks, output / "chart.png")
    except ImportError as exc:  # matplotlib comes with the dev extra, not with the operator's
        say(f"no chart.png: {exc}")


def run_cluster_demo(output: Path, context: str | None = None, *, target: ClusterTarget | None = None,
                     settings: DemoSettings | None = None) -> int:
    """`quantrol demo --cluster`: 0 when the story ran to its end, 1 when it stopped (the reason printed)."""
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config import ConfigException

    settings = settings or DemoSettings(output=output, phase_timeout=900.0)  # a cluster pulls and schedules, too
    interrupt_on_signals()
    say(f"quantrol demo on the cluster of {f'context {context}' if context else 'the current kube context'}; "
         f"output in {output}")
    try:
        story = ClusterStory(settings, target, context)
    except (ConfigException, OSError) as exc:
        say(f"demo stopped: no usable kubeconfig ({exc}); set KUBECONFIG or pass a context")
        return 1
    try:
        report = run_cluster_story(story)
    except (DemoError, ApiException) as exc:
        say(f"demo stopped: {exc}")
        if story.install is not None:  # past the preflight: the objects and pods say what went wrong
            with contextlib.suppress(Exception):
                print(story.describe(), flush=True)
        return 1
    except KeyboardInterrupt:
        say(f"interrupted; the objects stay in namespace {NAMESPACE} (the load generator is stopped)")
        return 130
    finally:
        story.close()
    write_report(output, report, story)
    print(report_markdown(report), flush=True)
    say(f"report {output / 'report.md'}; objects left in namespace {NAMESPACE}; total {report['seconds']:.0f}s")
    return 0
