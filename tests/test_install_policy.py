"""The install policy (operator/quantrol_operator/policy.py): read once from the file the chart mounts, refused
loudly when unreadable or invalid (never a wider policy than written), and one rule per choice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantrol_operator.policy import DEFAULT_ENGINE_FLAGS, POLICY_ENV, InstallPolicy, PolicyError


def test_without_a_file_the_policy_allows_only_the_safe_choices() -> None:
    policy = InstallPolicy.from_environment({})
    assert policy.plain_http_registries == () and not policy.allows_plain_http("registry.ci.svc")
    assert policy.engine_flags == DEFAULT_ENGINE_FLAGS and "--trust-remote-code" not in policy.engine_flags


def test_the_mounted_file_is_read_as_json_or_yaml(tmp_path: Path) -> None:
    as_json = tmp_path / "policy.json"
    as_json.write_text(json.dumps({"plainHttpRegistries": ["registry.ci.svc"], "engineFlags": ["--enforce-eager"]}))
    policy = InstallPolicy.from_environment({POLICY_ENV: str(as_json)})
    assert policy.allows_plain_http("registry.ci.svc:5000") and not policy.allows_plain_http("ghcr.io")
    assert policy.refused_engine_args(["--enforce-eager", "--seed", "3"]) == [(1, "--seed")]
    as_yaml = tmp_path / "policy.yaml"
    as_yaml.write_text("plainHttpRegistries:\n  - 10.0.0.5:5000\n")
    assert InstallPolicy.from_file(as_yaml).plain_http_registries == ("10.0.0.5:5000",)


@pytest.mark.parametrize(("body", "words"), [
    (None, "cannot be read"),
    ("[1, 2]", "must be a mapping"),
    ('{"plainHttpRegistries": ["http://registry"]}', "plainHttpRegistries"),
    ('{"plainHTTPRegistries": []}', "plainHTTPRegistries"),  # a typo is refused, not ignored
    ('{"engineFlags": ["trust-remote-code"]}', "engineFlags"),
])
def test_an_unreadable_or_invalid_policy_stops_the_start_up_naming_the_rule(tmp_path: Path, body: str | None,
                                                                            words: str) -> None:
    path = tmp_path / "policy.json"
    if body is not None:
        path.write_text(body)
    with pytest.raises(PolicyError) as err:
        InstallPolicy.from_environment({POLICY_ENV: str(path)})
    assert words in str(err.value) and str(path) in str(err.value)


def test_flag_values_are_not_flags() -> None:
    policy = InstallPolicy()
    assert policy.refused_engine_args(["--gpu-memory-utilization", "0.9", "--swap-space=8"]) == []
    assert policy.refused_engine_args(["--enforce-eager", "--download-dir", "/tmp"]) == [(1, "--download-dir")]
