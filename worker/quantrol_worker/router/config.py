"""The router's configuration: what the operator writes into the ConfigMap and pushes to the admin endpoint.

One document, one schema, two ways in (file and `POST /quantrol/config`), so the durable copy and the fast copy
can never mean different things. `version` is a monotonic integer the operator bumps on every change: the router
applies a document only when its version is newer than the applied one, which makes the two paths commute (an
admin push that overtook the kubelet's ConfigMap sync is not undone when the older file arrives) and lets the
operator confirm, pod by pod from the version each push answers, that a rollback has really landed on every
replica (`quantrol_router_config_version` shows the same on dashboards).

Torch-free and aiohttp-free: the operator imports this module to build the ConfigMap.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from quantrol_worker.contracts import DEFAULT_REDACT_PATTERNS, check_patterns

ArmName = Literal["stable", "candidate"]
MAX_BODY_BYTES = 4 << 20  # a request body beyond this is refused (413) before it is read: 4 MiB holds 100k+ tokens
# An admin push may move the version at most this far past the applied one: the operator's sequence moves by one per
# change, so a router behind by more than this many changes is not plausible, while `version: 2**62` from anyone
# holding the token would make every later push (rollbacks included) look stale until the pod restarts.
MAX_VERSION_STEP = 1000
ARMS: tuple[ArmName, ...] = ("stable", "candidate")


class _Strict(BaseModel):
    # A typo in a hand-edited ConfigMap must fail loudly, not be ignored silently.
    model_config = ConfigDict(extra="forbid", frozen=True)


class AdmissionLimits(_Strict):
    """Per-arm admission: at most `max_in_flight` requests upstream, at most `max_queue` waiting for a slot, and no
    request waits longer than `max_queue_wait_s`; beyond either bound the client gets 429 with Retry-After.

    Set these at or a little above the arm's vLLM `--max-num-seqs` times its replicas: vLLM queues without bound
    on its own, and a queue the router cannot see is exactly what makes a slow candidate look like an outage.
    """

    max_in_flight: int = Field(default=64, ge=1)
    max_queue: int = Field(default=128, ge=0)
    max_queue_wait_s: float = Field(default=5.0, ge=0.0)


class ArmConfig(_Strict):
    """One serving arm: its upstream base URL (the arm's Service) and its share of live traffic."""

    url: str = Field(description="Base URL of the arm's OpenAI-compatible server, e.g. http://sp-stable:8000")
    weight: int = Field(default=0, ge=0, le=100, description="Share of live traffic, relative to the other arm")
    admission: AdmissionLimits = Field(default_factory=AdmissionLimits)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"arm url must be http(s)://host[:port], got {value!r}")
        return value.rstrip("/")


INTERACTIVE = "interactive"  # the deadline the operator derives from a policy's latency SLOs (goodput's numerator)


class GoodputDeadline(_Strict):
    """A latency deadline a request must meet for its output tokens to count toward goodput (see metrics)."""

    name: str = Field(pattern=r"^[a-z0-9_]{1,32}$")
    ttft_s: float = Field(gt=0)
    tpot_s: float = Field(gt=0, description="Mean time per output token after the first")


class CompareConfig(_Strict):
    """Teacher-forced comparison of mirrored (and probe) requests (compare.py has the definition)."""

    max_concurrent_mirrors: int = Field(
        default=8, ge=0, description="Mirrors beyond this many in flight are dropped (counted), never queued"
    )
    top_logprobs: int = Field(
        default=5, ge=1, le=20,
        description="k of the top-k log-probabilities both arms return per position (vLLM's --max-logprobs is 20)",
    )
    max_request_kl: float = Field(
        default=0.1, gt=0, description="A compared request is quality-accepted when its mean KL (nats per token) "
        "is within this; `slice_max_request_kl` overrides it per slice",
    )
    slice_max_request_kl: dict[str, float] = Field(default_factory=dict, max_length=64)
    timeout_s: float = Field(default=120.0, gt=0, description="A mirror or its scoring running longer is abandoned")

    def request_kl_limit(self, slice_: str) -> float:
        return self.slice_max_request_kl.get(slice_, self.max_request_kl)


class ProbeConfig(_Strict):
    """Quality probes: held-out prompts per slice replayed greedily to the stable arm at a bounded rate and compared
    teacher-forced like mirrored requests (`traffic="probe"`, never live), so quality has samples when the traffic
    is sampled and when there is none. The prompts come from the candidate artifact's evaluation prompts
    (`artifact`), or from a mounted ConfigMap (`directory`: one key per slice, each a JSON list of prompt strings)."""

    artifact: str | None = Field(default=None, description="oci://repo@sha256:… holding the evaluation prompts")
    insecure: bool = Field(default=False, description="Plain HTTP to the artifact's registry (the install policy's "
                           "plain-HTTP registries only)")
    registry_config: str | None = Field(default=None, description="A docker config.json to log in to the artifact's "
                                        "registry with (the arms' registry Secret, mounted)")
    directory: str | None = Field(default=None, description="A mounted ConfigMap of probe prompts per slice")
    rate_per_second: float = Field(default=0.0, ge=0.0, le=10.0, description="Probes started per second (0: off)")
    max_tokens: int = Field(default=16, ge=1, le=256, description="Tokens the stable arm generates per probe")


class DiffsConfig(_Strict):
    """Samples of differing stable/candidate pairs for a human. Prompts are user data: off unless enabled, bounded
    in count, size and age, redacted before they are kept, readable only on the admin port with the token, and
    dropped when the candidate leaves (a rollback)."""

    enabled: bool = False
    capacity: int = Field(default=50, ge=1, le=1000)
    max_chars: int = Field(default=2000, ge=16, le=8192, description="Each text is cut to this many characters")
    retention_s: float = Field(default=3600.0, gt=0, le=7 * 86400, description="Samples older than this are dropped")
    redact_patterns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_REDACT_PATTERNS), max_length=64,
        description="Regular expressions whose matches are replaced by [REDACTED] before a sample is stored",
    )

    @field_validator("redact_patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        return check_patterns(patterns)


class SliceRule(_Strict):
    """How a request's `slice` label is chosen. Header values are user input, so only listed ones become label
    values (anything else is `other`): an unbounded label would let any client blow up Prometheus."""

    header: str = "X-Quantrol-Slice"
    allowed: list[str] = Field(default_factory=list)
    # Character counts, not tokens: the router has no tokenizer (it must stay torch- and transformers-free).
    length_buckets: list[int] = Field(default_factory=lambda: [256, 1024, 4096, 16384])


class RouterConfig(_Strict):
    """The whole router configuration (ConfigMap key `router.yaml`, or the JSON body of POST /quantrol/config)."""

    version: int = Field(ge=0, description="Monotonic; a document is applied only when newer than the applied one")
    arms: dict[ArmName, ArmConfig]
    mirror_fraction: float = Field(default=0.0, ge=0.0, le=1.0, description="Share of stable traffic mirrored")
    sticky_header: str | None = Field(default=None, description="Requests with equal values stay on one arm")
    slices: SliceRule = Field(default_factory=SliceRule)
    compare: CompareConfig = Field(default_factory=CompareConfig)
    probes: ProbeConfig = Field(default_factory=ProbeConfig)
    diffs: DiffsConfig = Field(default_factory=DiffsConfig)
    goodput_deadlines: list[GoodputDeadline] = Field(
        default_factory=lambda: [GoodputDeadline(name=INTERACTIVE, ttft_s=2.0, tpot_s=0.2)]
    )
    upstream_timeout_s: float = Field(default=600.0, gt=0)
    max_body_bytes: int = Field(default=MAX_BODY_BYTES, ge=1024, le=64 << 20,
                                description="Request bodies beyond this are refused (413) before they are read")

    @model_validator(mode="after")
    def _consistent(self) -> RouterConfig:
        if "stable" not in self.arms:
            raise ValueError("arms.stable is required: it is what serves when anything else is in doubt")
        if sum(arm.weight for arm in self.arms.values()) <= 0:
            raise ValueError("at least one arm needs a positive weight")
        if self.mirror_fraction > 0 and "candidate" not in self.arms:
            raise ValueError("mirror_fraction > 0 needs arms.candidate")
        return self

    def weights(self) -> dict[ArmName, int]:
        return {name: self.arms[name].weight if name in self.arms else 0 for name in ARMS}


def parse_config(text: str) -> RouterConfig:
    """Parse YAML (a superset of JSON) into a validated config; raises ValueError with the reason."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"config is not valid YAML/JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError("config must be a mapping")
    return RouterConfig.model_validate(data)


def load_config(path: Path) -> RouterConfig:
    return parse_config(path.read_text(encoding="utf-8"))


def dump_config(config: RouterConfig) -> str:
    """The canonical JSON form (what GET /quantrol/config returns and what the operator may push)."""
    return json.dumps(config.model_dump(mode="json"), sort_keys=True)


ApplyDecision = Literal["apply", "unchanged", "stale", "conflict", "jump"]


def arm_outside(config: RouterConfig, namespace: str) -> ArmName | None:
    """The first arm whose URL is not a Service of `namespace` (http://<service>.<namespace>.svc[.cluster.local]
    [:port]), or None. A router serves one policy: its arms are that policy's Services, never another host, where a
    pushed config could send every prompt."""
    pattern = re.compile(rf"^https?://[a-z]([-a-z0-9]*[a-z0-9])?\.{re.escape(namespace)}\.svc(\.cluster\.local)?"
                         r"(:\d+)?$")
    return next((name for name, arm in config.arms.items() if not pattern.match(arm.url)), None)


def apply_decision(applied: RouterConfig | None, offered: RouterConfig, max_step: int | None = None) -> ApplyDecision:
    """Whether an offered document replaces the applied one.

    Newer version → apply, unless more than `max_step` newer (admin pushes: MAX_VERSION_STEP) → jump (refused: not
    the operator's sequence).
    Same version and content → unchanged (the ConfigMap catching up with an admin push).
    Same version, other content → conflict: two writers disagree, keep what serves and say so. Older → stale.
    """
    if applied is None or offered.version > applied.version:
        jumped = applied is not None and max_step is not None and offered.version - applied.version > max_step
        return "jump" if jumped else "apply"
    if offered.version < applied.version:
        return "stale"
    return "unchanged" if offered == applied else "conflict"
