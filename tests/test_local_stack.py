"""The whole local stack starts, serves, and leaves no process and no port behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from quantrol_dev.localstack import procs
from quantrol_dev.localstack.procs import port_is_open
from quantrol_dev.localstack.stack import LocalStack

pytestmark = pytest.mark.stack


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_free_port_never_hands_out_one_port_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel may give two bind-to-0 calls the same port when neither was bound in between (a router's traffic
    and admin ports once collided so). The kernel's choice is played by a fake socket, since a real one repeats
    only by chance: it answers port 3 twice, then 4."""
    answers = iter([3, 3, 4])

    class OneSocket:
        def __init__(self, *args: object) -> None:
            self.port = next(answers)

        def __enter__(self) -> OneSocket:
            return self

        def __exit__(self, *args: object) -> None:
            pass

        def bind(self, address: object) -> None:
            pass

        def getsockname(self) -> tuple[str, int]:
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(procs.socket, "socket", OneSocket)
    monkeypatch.setattr(procs, "_HANDED_OUT", set())
    assert [procs.free_port(), procs.free_port()] == [3, 4]


def test_stack_starts_every_server_and_stop_leaves_nothing(tmp_path: Path) -> None:
    stack = LocalStack(tmp_path).start()
    try:
        assert stack.kubeapi and stack.prometheus and stack.registry and stack.operator
        ports = [stack.kubeapi.port, stack.prometheus.port, stack.registry.port]
        pids = [p.pid for p in (stack.kubeapi.process, stack.prometheus.process, stack.registry.process,
                                stack.operator.process) if p is not None]
        assert len(pids) == 4 and all(map(port_is_open, ports))
        assert stack.operator.logged("watching QuantizedModel and ServingPolicy")
        with pytest.raises(RuntimeError, match="already running"):
            stack.start()
    finally:
        stack.stop()
    assert not any(map(port_is_open, ports))
    assert not any(map(_group_alive, pids))


def test_a_failing_part_stops_the_parts_already_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUANTROL_REGISTRY", str(tmp_path / "no-such-registry"))
    stack = LocalStack(tmp_path)
    with pytest.raises(FileNotFoundError):
        stack.start()
    assert stack.kubeapi is not None and stack.prometheus is not None
    assert not port_is_open(stack.kubeapi.port) and not port_is_open(stack.prometheus.port)


def test_stack_with_runner_runs_workloads_and_scrapes_routers(tmp_path: Path) -> None:
    """With an image map, the runner runs pods, and every ready router Service becomes a Prometheus target with
    the namespace/policy labels the analysis selects on."""
    import json

    import kubernetes

    from quantrol_dev.localstack.runner_plan import ImageEnv
    from quantrol_dev.localstack.scrape import engine_targets, router_targets

    stack = LocalStack(tmp_path, with_operator=False,
                       image_map=[ImageEnv("quantrol-test/*", Path(sys.executable).parent)]).start()
    try:
        assert stack.runner is not None and stack.scrape is not None and stack.kubeconfig is not None
        assert stack.runner.services_path.is_file()
        api = kubernetes.config.new_client_from_config(config_file=str(stack.kubeconfig))
        core = kubernetes.client.CoreV1Api(api)
        core.create_namespace({"metadata": {"name": "demo"}})
        labels = {"quantrol.io/servingpolicy": "tiny", "app.kubernetes.io/component": "router"}
        core.create_namespaced_service("demo", {"metadata": {"name": "tiny", "labels": labels},
                                                "spec": {"selector": labels, "ports": [{"port": 8080}]}})
        listed = [api.sanitize_for_serialization(s) for s in core.list_service_for_all_namespaces().items]
        groups = router_targets({"demo/tiny": {"host": "127.0.0.1", "ports": {"8080": 4242}}}, listed)
        assert [g.as_json() for g in groups] == [{"targets": ["127.0.0.1:4242"],
                                                  "labels": {"namespace": "demo", "policy": "tiny"}}]
        assert router_targets({"demo/tiny": {"host": "127.0.0.1", "ports": {}}}, listed) == []  # not ready yet
        # Several router replicas: every pod is a target (another policy's router and an arm are not).
        def pod(name: str, **pod_labels: str) -> dict[str, object]:
            return {"metadata": {"name": name, "namespace": "demo", "labels": pod_labels}}

        router = {"quantrol.io/servingpolicy": "tiny", "app.kubernetes.io/component": "router"}
        pods = [pod("tiny-router-a", **router), pod("tiny-router-b", **router),
                pod("other-router-c", **{**router, "quantrol.io/servingpolicy": "other"}),
                pod("tiny-arm", **{"quantrol.io/servingpolicy": "tiny"})]
        addresses = {"pods": {f"demo/{name}": {"host": "127.0.0.1", "ports": {"8080": port}}
                              for name, port in (("tiny-router-a", 5001), ("tiny-router-b", 5002),
                                                 ("other-router-c", 5003), ("tiny-arm", 5004))},
                     "demo/tiny": {"host": "127.0.0.1", "ports": {"8080": 5001}}}
        [group] = router_targets(addresses, listed, pods)
        assert group.targets == ["127.0.0.1:5001", "127.0.0.1:5002"]
        # Each arm's engine is a target of its own, labelled with the arm's digest as the PodMonitor labels it.
        arm = {"quantrol.io/servingpolicy": "tiny", "quantrol.io/arm": "d8c6e59f2629"}
        addresses["pods"]["demo/tiny-d8c6e59f2629-x"] = {"host": "127.0.0.1", "ports": {"8000": 5005}}
        [engine] = engine_targets(addresses, [*pods, pod("tiny-d8c6e59f2629-x", **arm)])
        assert engine.as_json() == {"targets": ["127.0.0.1:5005"], "labels": {"namespace": "demo", "policy": "tiny",
                                                                             "arm": "d8c6e59f2629"}}
        api.close()
        ports = [stack.kubeapi.port, stack.prometheus.port, stack.registry.port]  # type: ignore[union-attr]
    finally:
        stack.stop()
    assert not any(map(port_is_open, ports))
    assert json.loads((tmp_path / "prometheus" / "file_sd" / "targets.json").read_text()) == []


@pytest.mark.parametrize("cwd_after_start", ["same", "moved"])
def test_stack_from_a_relative_folder_scrapes_its_targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          cwd_after_start: str) -> None:
    """Issue 12: `quantrol demo`'s default output is relative (`out/demo`), and Prometheus resolved the file_sd path
    written into its config against the config's own folder, so it never had a target. Started from a relative
    folder, every path the stack writes into a config file or hands on is absolute, Prometheus scrapes a file_sd
    target (`up == 1`), also after the process changed its working folder, and nothing lands outside the folder."""
    import json

    from quantrol_dev.localstack.procs import wait_until
    from quantrol_dev.localstack.prometheus import TargetGroup
    from quantrol_dev.localstack.runner_plan import ImageEnv
    from quantrol_operator.observe.prometheus import PrometheusSource

    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.chdir(repo)
    stack = LocalStack(Path("out/demo/stack"), with_operator=False,
                       image_map=[ImageEnv("quantrol-test/*", Path(sys.executable).parent)]).start()
    try:
        if cwd_after_start == "moved":
            monkeypatch.chdir(tmp_path)
        assert stack.prometheus is not None and stack.runner is not None and stack.kubeconfig is not None
        config = json.loads(stack.prometheus.config_path.read_text())
        [file_sd] = [job for job in config["scrape_configs"] if "file_sd_configs" in job]
        assert all(Path(f).is_absolute() for f in file_sd["file_sd_configs"][0]["files"])
        assert stack.kubeconfig.is_absolute() and stack.runner.services_path.is_absolute()
        itself = stack.prometheus.url.removeprefix("http://")
        stack.prometheus.set_file_sd_targets([TargetGroup([itself], {"namespace": "demo", "policy": "tiny"})])
        source = PrometheusSource(stack.prometheus.url)
        wait_until(lambda: source.scalar('max(up{namespace="demo",policy="tiny"})') == 1.0, timeout=30,
                   interval=0.5, what="the file_sd target scraped")
        assert "Error adding file watch" not in stack.prometheus.log_path.read_text()
    finally:
        stack.stop()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]
    assert sorted(p.name for p in repo.iterdir()) == ["out"]


def test_demo_command_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "quantrol_operator.cli", "demo", "--quick", "--output", str(out)],
        capture_output=True, text=True, timeout=180, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "stack.json").is_file()
    assert "the operator has reconciled it" in result.stdout  # the operator really reconciled the applied objects
    assert "spec.rollout.canarySteps" in result.stdout  # the broken spec was refused naming the field


def test_demo_with_a_cluster_configured_asks_which_is_meant(tmp_path: Path) -> None:
    """`quantrol demo` without --local or --cluster never acts on a configured cluster by surprise."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "prod-eu",
        "clusters": [{"name": "prod", "cluster": {"server": "https://10.255.255.1:6443"}}],
        "users": [{"name": "me", "user": {"token": "x"}}],
        "contexts": [{"name": "prod-eu", "context": {"cluster": "prod", "user": "me"}}]}))
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "quantrol_operator.cli", "demo", "--kubeconfig", str(kubeconfig), "--output", str(out)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "'prod-eu'" in result.stderr and "--local" in result.stderr and "--cluster" in result.stderr
    assert not out.exists()  # nothing started, nothing written


def test_demo_without_the_worker_environments_says_what_to_do(tmp_path: Path) -> None:
    """The full demo is tests/test_demo.py (it needs the calibrate and serve environments); without them the
    command stops at once, says which variables to set, and starts nothing."""
    env = {k: v for k, v in os.environ.items() if k not in ("QUANTROL_CALIBRATE_PYTHON", "QUANTROL_SERVE_PYTHON")}
    result = subprocess.run(
        [sys.executable, "-m", "quantrol_operator.cli", "demo", "--local", "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "QUANTROL_CALIBRATE_PYTHON" in result.stdout
