"""What this installation lets tenants choose: the install policy (chart values `installPolicy:`).

Tenants (who write QuantizedModels and ServingPolicies in their namespace) are untrusted; the install decides what
they may ask for. A spec that asks for more is refused in a status condition naming the field and this policy; the
operator never widens what the policy allows.

How the operator reads it: one JSON (or YAML) file, named by QUANTROL_INSTALL_POLICY, that the chart renders from
`installPolicy:` into a ConfigMap and mounts. A file, not one environment variable per rule, because the rules are
lists and will be nested (allowed images, ServiceAccounts and Prometheus addresses per namespace arrive next), and
a list in an environment variable needs a syntax of its own for each. It is read once at start-up, like the
operator's defaults: a pass never sees the policy change under it; the chart's checksum annotation restarts the
operator when the values change. Without the variable the policy is the default: nothing beyond the safe choices
(no plain-HTTP registry). An unreadable or invalid file stops the start-up with the reason: never a wider policy.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import ConfigDict, Field, StringConstraints, ValidationError

from quantrol_operator.api.base import ApiModel
from quantrol_worker.oci import plain_http

POLICY_ENV = "QUANTROL_INSTALL_POLICY"
POLICY_FILE_LIMIT = 1 << 20  # bytes
# vLLM flags a ServingPolicy's engineArgs may carry by default: they tune memory, batching and compilation only;
# none reads a path, loads code or reaches a network (unlike --trust-remote-code, --download-dir, --hf-overrides).
DEFAULT_ENGINE_FLAGS = ("--enforce-eager", "--gpu-memory-utilization", "--swap-space", "--block-size",
                        "--enable-prefix-caching", "--no-enable-prefix-caching", "--enable-chunked-prefill",
                        "--no-enable-chunked-prefill", "--max-seq-len-to-capture", "--disable-log-stats",
                        "--disable-log-requests", "--seed")

# `host` or `host:port`, as an image reference or an OCI repository starts.
RegistryHost = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]{1,5})?$",
                                                max_length=253)]


class PolicyError(ValueError):
    """The policy file is missing, unreadable or invalid: the operator does not start on a guess."""


class InstallPolicy(ApiModel):
    """The rules of this installation (chart values `installPolicy:`, camelCase as there)."""

    model_config = ConfigDict(frozen=True)

    plain_http_registries: tuple[RegistryHost, ...] = Field(
        default=(), max_length=256,
        description="Registries reached over plain HTTP (`host` for every port of it, or `host:port`): a "
        "QuantizedModel's artifact.insecure is allowed only for these, and push, pulls and the arms' fetch use plain "
        "HTTP for them and TLS for every other registry.")

    engine_flags: tuple[Annotated[str, StringConstraints(pattern=r"^--[a-z0-9][a-z0-9-]*$")], ...] = Field(
        default=DEFAULT_ENGINE_FLAGS, max_length=256,
        description="vLLM flags a ServingPolicy's serving.engineArgs may set (Quantrol's own flags never).")

    def allows_plain_http(self, host: str) -> bool:
        return plain_http(host, self.plain_http_registries)

    def refused_engine_args(self, args: list[str]) -> list[tuple[int, str]]:
        """(index, flag) of every flag in `args` this policy does not allow; other items are values of a flag."""
        flags = [(i, a.split("=", 1)[0]) for i, a in enumerate(args) if a.startswith("-")]
        return [(i, flag) for i, flag in flags if flag not in self.engine_flags]

    @classmethod
    def from_mapping(cls, data: Mapping[str, object], source: str = "install policy") -> InstallPolicy:
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise PolicyError(f"{source} is invalid: {problems}") from exc

    @classmethod
    def from_file(cls, path: Path) -> InstallPolicy:
        try:
            if path.stat().st_size > POLICY_FILE_LIMIT:
                raise PolicyError(f"install policy {path} is larger than {POLICY_FILE_LIMIT} bytes")
            text = path.read_text()
        except OSError as exc:
            raise PolicyError(f"install policy {path} cannot be read: {exc.strerror}") from exc
        try:
            data = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            raise PolicyError(f"install policy {path} is neither JSON nor YAML: {exc}") from exc
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise PolicyError(f"install policy {path} must be a mapping of rules, not {type(data).__name__}")
        return cls.from_mapping(data, f"install policy {path}")

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> InstallPolicy:
        path = (os.environ if env is None else env).get(POLICY_ENV, "").strip()
        return cls.from_file(Path(path)) if path else cls()


def registry_host(repository: str) -> str:
    """The registry part of `registry[:port]/repo[...]` or `oci://…`."""
    return re.sub(r"^oci://", "", repository).split("/", 1)[0]
