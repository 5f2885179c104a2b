"""The install policy: what the platform team that installed Quantrol lets tenants choose.

Tenants (whoever may create QuantizedModels and ServingPolicies in a namespace) are untrusted: without a policy they
could run any image under any ServiceAccount of their namespace, on tainted nodes, point the analysis at any URL,
and make the operator read without bound. The chart's `installPolicy:` values section is rendered as JSON into
QUANTROL_INSTALL_POLICY; this module is its one schema and its one reader. A spec the policy refuses is never
half-applied: the planner reports the field and the rule in a status condition and creates nothing.

Without the variable (a laptop, the tests) the built-in policy is permissive, like Quantrol before the policy
existed; the chart's defaults are the safe ones. Two rules are safe even there: no registry is reached over plain
HTTP unless listed (`registries.plainHttp`), and `serving.engineArgs` carries only flags that tune memory, batching
and compilation (`workloads.engineFlags`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel

from quantrol_worker.oci import plain_http

ENV = "QUANTROL_INSTALL_POLICY"
MAX_BYTES_CEILING = 64 << 20  # no install may let one answer hold more of the operator's 512 Mi than this
# vLLM flags a ServingPolicy's engineArgs may carry by default: they tune memory, batching and compilation only;
# none reads a path, loads code or reaches a network (unlike --trust-remote-code, --download-dir, --hf-overrides).
DEFAULT_ENGINE_FLAGS = ("--enforce-eager", "--gpu-memory-utilization", "--swap-space", "--block-size",
                        "--enable-prefix-caching", "--no-enable-prefix-caching", "--enable-chunked-prefill",
                        "--no-enable-chunked-prefill", "--max-seq-len-to-capture", "--disable-log-stats",
                        "--disable-log-requests", "--seed")
# `host` or `host:port`, as an image reference or an OCI repository starts.
RegistryHost = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]{1,5})?$",
                                                max_length=253)]
EngineFlag = Annotated[str, StringConstraints(pattern=r"^--[a-z0-9][a-z0-9-]*$", max_length=128)]


class _Policy(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class ReadBounds(_Policy):
    """What the operator reads from anything a tenant controls (launcher endpoints, Prometheus, registries): at most
    `maxBytes` per answer and `totalSeconds` for the whole call, not per socket read."""

    max_bytes: int = Field(default=1 << 20, ge=1024, le=MAX_BYTES_CEILING)
    total_seconds: float = Field(default=5.0, gt=0, le=60)


class PrometheusPolicy(_Policy):
    """Which Prometheus a ServingPolicy may name (`spec.analysis.prometheus.address`) besides the operator's own
    (QUANTROL_PROMETHEUS_URL): these (empty: none), or any (None). TLS is verified against the system's CAs, or
    `caFile` when set."""

    allowed_addresses: tuple[str, ...] | None = None
    ca_file: str | None = None


class WorkloadPolicy(_Policy):
    """What a tenant's pods may be: images by prefix (None: any), ServiceAccounts by name (None: any), and whether
    tolerations and node selectors may be set at all."""

    image_prefixes: tuple[str, ...] | None = None
    service_accounts: tuple[str, ...] | None = None
    tolerations: bool = True
    node_selectors: bool = True  # node selectors and affinity: both pick nodes
    engine_flags: tuple[EngineFlag, ...] = Field(default=DEFAULT_ENGINE_FLAGS, max_length=256)


class RegistryPolicy(_Policy):
    """Registries reached over plain HTTP (`host` for every port of it, or `host:port`): a QuantizedModel's
    artifact.insecure is allowed only for these, and push, pulls and the arms' fetch use plain HTTP for exactly these
    and TLS for every other registry."""

    plain_http: tuple[RegistryHost, ...] = Field(default=(), max_length=256)


class RouterPolicy(_Policy):
    max_body_bytes: int = Field(default=4 << 20, ge=1024, le=MAX_BYTES_CEILING)


class InstallPolicy(_Policy):
    reads: ReadBounds = Field(default_factory=ReadBounds)
    prometheus: PrometheusPolicy = Field(default_factory=PrometheusPolicy)
    workloads: WorkloadPolicy = Field(default_factory=WorkloadPolicy)
    router: RouterPolicy = Field(default_factory=RouterPolicy)
    registries: RegistryPolicy = Field(default_factory=RegistryPolicy)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> InstallPolicy:
        text = (os.environ if env is None else env).get(ENV, "").strip()
        return cls.model_validate(json.loads(text)) if text else cls()

    def allows_plain_http(self, host: str) -> bool:
        return plain_http(host, self.registries.plain_http)

    def refused_engine_args(self, args: list[str]) -> list[tuple[int, str]]:
        """(index, flag) of every flag in `args` this policy does not allow; other items are values of a flag."""
        flags = [(i, a.split("=", 1)[0]) for i, a in enumerate(args) if a.startswith("-")]
        return [(i, flag) for i, flag in flags if flag not in self.workloads.engine_flags]

    def prometheus_allowed(self, address: str, default: str) -> bool:
        if self.prometheus.allowed_addresses is None:
            return True
        allowed = {a.rstrip("/") for a in (*self.prometheus.allowed_addresses, default)}
        return address.rstrip("/") in allowed


@dataclass(frozen=True)
class Refusal:
    """A spec field the install policy does not allow, and the rule that says so."""

    field: str
    rule: str

    def __str__(self) -> str:
        return f"{self.field}: {self.rule}"


def image_refusal(field: str, image: str | None, policy: WorkloadPolicy) -> Refusal | None:
    prefixes = policy.image_prefixes
    if image is None or prefixes is None or any(image.startswith(p) for p in prefixes):
        return None
    allowed = ", ".join(prefixes) if prefixes else "none: tenants use the install's images"
    return Refusal(field, f"image {image!r} is not allowed by the install policy (allowed prefixes: {allowed})")


def pod_refusals(prefix: str, spec: Any, policy: WorkloadPolicy) -> list[Refusal]:
    """Refusals for the pod-level overrides `spec` (a CalibrationJob or ServingTemplate) carries under `prefix`."""
    out = [r for r in [image_refusal(f"{prefix}.image", getattr(spec, "image", None), policy)] if r]
    account = getattr(spec, "service_account_name", None)
    if account and policy.service_accounts is not None and account not in policy.service_accounts:
        out.append(Refusal(f"{prefix}.serviceAccountName", f"ServiceAccount {account!r} is not allowed by the "
                           f"install policy (allowed: {', '.join(policy.service_accounts) or 'none'})"))
    if getattr(spec, "tolerations", None) and not policy.tolerations:
        out.append(Refusal(f"{prefix}.tolerations", "the install policy does not let tenants set tolerations"))
    if getattr(spec, "node_selector", None) and not policy.node_selectors:
        out.append(Refusal(f"{prefix}.nodeSelector", "the install policy does not let tenants set node selectors"))
    if getattr(spec, "affinity", None) and not policy.node_selectors:
        out.append(Refusal(f"{prefix}.affinity", "the install policy does not let tenants pick nodes (affinity, like "
                           "node selectors)"))
    return out


def registry_host(repository: str) -> str:
    """The registry part of `registry[:port]/repo[...]` or `oci://…`."""
    return re.sub(r"^oci://", "", repository).split("/", 1)[0]
