"""Registry credentials end to end in the worker: push, pull and fetch read one docker config.json (what a mounted
`kubernetes.io/dockerconfigjson` Secret holds), and a registry that refuses is named with its HTTP answer.

The registry is real and private as GHCR, Harbor or Artifactory are: Debian's docker-registry with an htpasswd user
over TLS (the `secure_registry` fixture; its CA made by trustme), trusted through REQUESTS_CA_BUNDLE as a pod with a
private CA in its image would. Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from quantrol_worker.oci import ArtifactError, ArtifactReason, check_push_access, credentials_for, plain_http, push

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.stack


@pytest.fixture
def trusted(secure_registry: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The secure registry, its CA trusted by this process (requests reads REQUESTS_CA_BUNDLE)."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(secure_registry.login.ca_path))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return secure_registry


def _artifact(root: Path) -> Path:
    src = root / "artifact"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (src / "model.safetensors").write_bytes(os.urandom(2048))
    return src


def _docker_config(registry: Any, path: Path, **override: Any) -> Path:
    config = registry.docker_config
    if override:
        config = {"auths": {registry.address: override}}
    path.write_text(json.dumps(config))
    return path


def _fetch(ref: str, dest: Path, term: Path, *extra: str, ca: Path) -> tuple[int, dict[str, Any], str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "worker"), "NO_PROXY": "127.0.0.1,localhost",
           "REQUESTS_CA_BUNDLE": str(ca)}
    proc = subprocess.run([sys.executable, "-m", "quantrol_worker.cli", "fetch", "--ref", f"oci://{ref}", "--dest",
                           str(dest), "--termination-log", str(term), *extra], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    message = json.loads(term.read_text()) if term.is_file() and term.read_text() else {}
    return proc.returncode, message, proc.stderr


def test_push_and_fetch_need_the_credentials_and_name_the_registry_when_refused(trusted: Any, tmp_path: Path) -> None:
    config = _docker_config(trusted, tmp_path / "config.json")
    repo = f"{trusted.address}/creds/model"
    with pytest.raises(ArtifactError) as anonymous:
        push(_artifact(tmp_path), repo, insecure=False, tag="v1", annotations={})
    assert anonymous.value.reason is ArtifactReason.REGISTRY_UNAUTHORIZED
    assert trusted.address in anonymous.value.message and "401" in anonymous.value.message
    assert "no registry credentials were given" in anonymous.value.message

    ref = push(tmp_path / "artifact", repo, insecure=False, tag="v1", annotations={}, credentials=config)
    code, message, stderr = _fetch(ref, tmp_path / "anon", tmp_path / "anon.term", ca=trusted.login.ca_path)
    assert code != 0 and message["reason"] == "RegistryUnauthorized", stderr
    assert trusted.address in message["message"] and "401" in message["message"]
    assert not (tmp_path / "anon" / "model.safetensors").exists()

    code, message, stderr = _fetch(ref, tmp_path / "dest", tmp_path / "term", "--registry-config", str(config),
                                   ca=trusted.login.ca_path)
    assert code == 0, stderr
    assert message["phase"] == "Fetched" and message["ref"] == ref
    assert (tmp_path / "dest" / "model.safetensors").read_bytes() == (tmp_path / "artifact" / "model.safetensors"
                                                                     ).read_bytes()
    assert trusted.login.password not in stderr  # the log names the registry, never the secret


def test_wrong_credentials_are_refused_by_name_without_revealing_them(trusted: Any, tmp_path: Path) -> None:
    wrong = _docker_config(trusted, tmp_path / "wrong.json", username=trusted.login.username, password="not-it")
    with pytest.raises(ArtifactError) as err:
        check_push_access(f"{trusted.address}/creds/wrong", insecure=False, credentials=wrong)
    assert err.value.reason is ArtifactReason.REGISTRY_UNAUTHORIZED
    assert "refused the credentials given" in err.value.message and "not-it" not in err.value.message
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"auths": {"ghcr.io": {"auth": "dXNlcjpwYXNz"}}}))
    with pytest.raises(ArtifactError) as err:
        check_push_access(f"{trusted.address}/creds/other", insecure=False, credentials=other)
    assert f"hold none for {trusted.address}" in err.value.message


def test_push_access_is_checked_before_anything_is_uploaded(trusted: Any, tmp_path: Path) -> None:
    """The calibration worker asks first, so a refusal costs seconds, not a calibration; the question leaves no
    upload behind in the registry."""
    config = _docker_config(trusted, tmp_path / "config.json")
    check_push_access(f"{trusted.address}/creds/probe", insecure=False, credentials=config)
    uploads = trusted.storage_dir / "docker/registry/v2/repositories/creds/probe/_uploads"
    # A cancelled upload loses its data and start time (distribution keeps an empty hash-state folder).
    assert uploads.is_dir() and not [p for p in uploads.rglob("*") if p.name in ("data", "startedat")]


def test_the_routers_probes_log_in_with_the_arms_secret(trusted: Any, tmp_path: Path) -> None:
    """The router reads the candidate's evaluation prompts from the tenant's private registry, as the arms' fetch
    does: refused by name without the Secret the operator mounts (children/router.py), read with it."""
    from quantrol_worker.contracts import EVALUATION_PROMPTS_FILE, EvaluationPrompt, EvaluationPrompts, SlicePrompts
    from quantrol_worker.router import probes

    config = _docker_config(trusted, tmp_path / "config.json")
    artifact = _artifact(tmp_path)
    prompts = EvaluationPrompts(slices=[SlicePrompts(slice="code", prompts=[
        EvaluationPrompt(text="def f", token_ids=[5, 6, 7 + i]) for i in range(3)])])
    (artifact / EVALUATION_PROMPTS_FILE).write_text(prompts.model_dump_json(by_alias=True))
    ref = "oci://" + push(artifact, f"{trusted.address}/creds/probed", insecure=False, tag=None, annotations={},
                          credentials=config)
    with pytest.raises(ArtifactError) as anonymous:
        probes.from_artifact(ref, insecure=False)
    assert anonymous.value.reason is ArtifactReason.REGISTRY_UNAUTHORIZED and trusted.address in anonymous.value.message
    assert probes.from_artifact(ref, insecure=False, credentials=config).counts() == {"code": 3}


def test_calibration_pull_reads_the_same_credentials(trusted: Any, tmp_path: Path) -> None:
    config = _docker_config(trusted, tmp_path / "config.json")
    ref = push(_artifact(tmp_path), f"{trusted.address}/creds/base", insecure=False, tag="base", annotations={},
               credentials=config)
    env = {**os.environ, "PYTHONPATH": str(REPO / "worker")}
    args = [sys.executable, "-m", "quantrol_worker.calibrate", "pull", ref, "--out", str(tmp_path / "pulled")]
    refused = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert json.loads(refused.stdout.strip().splitlines()[-1])["reason"] == "RegistryUnauthorized"
    pulled = subprocess.run([*args, "--registry-config", str(config)], capture_output=True, text=True, env=env,
                            timeout=120, check=False)
    assert pulled.returncode == 0, pulled.stderr
    assert (tmp_path / "pulled" / "model.safetensors").is_file()


# --- the docker config: pure ---


def test_docker_config_keys_as_docker_and_kubectl_write_them(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": "aHViOmh1Yi1wYXNz"},  # hub:hub-pass
        "https://registry.example.com": {"username": "u", "password": "p"},
        "harbor.local:8443": {"auth": "aGFyYm9yOnM6ZWNyZXQ="},  # harbor:s:ecret (a colon in the password)
    }}))
    hub = credentials_for(config, "registry-1.docker.io")
    assert hub is not None and (hub.username, hub.password) == ("hub", "hub-pass")
    example = credentials_for(config, "registry.example.com")
    assert example is not None and example.username == "u"
    harbor = credentials_for(config, "harbor.local:8443")
    assert harbor is not None and harbor.password == "s:ecret"
    assert credentials_for(config, "harbor.local") is None and credentials_for(None, "x") is None
    assert "hub-pass" not in repr(hub)


def test_credential_helpers_in_a_tenant_config_are_never_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A docker config comes from a tenant's Secret: `credsStore` names a program, which must not run."""
    marker = tmp_path / "ran"
    helper = tmp_path / "bin" / "docker-credential-evil"
    helper.parent.mkdir()
    helper.write_text(f"#!/bin/sh\ntouch {marker}\necho '{{\"Username\":\"u\",\"Secret\":\"s\"}}'\n")
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{helper.parent}:{os.environ['PATH']}")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"auths": {"registry.example.com": {}}, "credsStore": "evil",
                                  "credHelpers": {"registry.example.com": "evil"}}))
    assert credentials_for(config, "registry.example.com") is None
    from quantrol_worker.oci import Registry

    # oras' own loader, handed the tenant's file as push and pull hand it theirs: switched off, it runs nothing.
    Registry("registry.example.com", insecure=False, credentials=config).client.auth.load_configs(
        "registry.example.com/x", configs=[str(config)])
    assert not marker.exists()


@pytest.mark.parametrize("body", ["not json", json.dumps({"auth": "x"}), json.dumps({"auths": {"h": {"auth": "!!"}}})])
def test_a_malformed_docker_config_is_refused_by_name(tmp_path: Path, body: str) -> None:
    config = tmp_path / "config.json"
    config.write_text(body)
    with pytest.raises(ArtifactError) as err:
        credentials_for(config, "h")
    assert err.value.reason is ArtifactReason.REGISTRY_UNAUTHORIZED and str(config) in err.value.message


def test_plain_http_is_decided_per_registry_by_one_rule() -> None:
    allowed = ["registry.ci.svc", "10.0.0.5:5000"]
    assert plain_http("registry.ci.svc:5000", allowed) and plain_http("registry.ci.svc", allowed)
    assert plain_http("10.0.0.5:5000", allowed) and not plain_http("10.0.0.5:5001", allowed)
    assert not plain_http("ghcr.io", allowed) and not plain_http("registry.ci.svc.evil.com", allowed)
