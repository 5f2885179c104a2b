"""The Helm chart, its alerts, dashboard and Argo CD health checks, checked with the real tools, offline.

- rendering, linting and values-schema validation: the Helm v4 SDK itself (helm-python-sdk), not a re-implementation;
- rendered manifests: kubernetes-validate against the Kubernetes OpenAPI schemas of the versions we support;
- alerts: `promtool check rules` and `promtool test rules` (Debian's Prometheus 2.42);
- dashboard PromQL: parsed and evaluated by a real local Prometheus (the `prometheus` fixture);
- Argo CD health checks: executed in Lua 5.1 (lupa), the language version of Argo CD's gopher-lua.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import lupa.lua51
import pytest
import yaml

from quantrol_dev.localstack.prometheus import PrometheusServer, promtool_binary
from quantrol_operator.api.common import Condition, ConditionStatus
from quantrol_operator.api.quantizedmodel import Artifact, QuantizedModelStatus, SliceQuality
from quantrol_operator.api.servingpolicy import RollbackRecord, ServingPolicyStatus, Weights
from quantrol_operator.defaults import OperatorDefaults
from tests.plugins.servers import require_binaries

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "quantrol"
ALERTS = CHART / "files" / "alerts" / "quantrol.rules.yaml"
ALERT_TESTS = CHART / "files" / "alerts" / "tests" / "quantrol.test.yaml"
DASHBOARD = CHART / "files" / "dashboards" / "quantrol.json"
ARGOCD = CHART / "files" / "argocd"
RELEASE, NAMESPACE = "quantrol", "quantrol-system"

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion: CEL validation rules are GA there) and a current
# one; kubernetes-validate bundles the schemas of both.
KUBE_VERSIONS = ("1.29.0", "1.33.0")

MONITORING_ON = {
    "serviceMonitor": {"enabled": True},
    "podMonitors": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "prometheusRule": {"enabled": True},
    "grafanaDashboard": {"enabled": True},
}
# name -> (values, kinds the chart must render, with counts)
COMBOS: dict[str, tuple[dict[str, Any], dict[str, int]]] = {
    "default: the release namespace": (
        {},
        {"ServiceAccount": 1, "Role": 1, "RoleBinding": 1, "ClusterRole": 1, "ClusterRoleBinding": 1,
         "Deployment": 1, "Service": 1, "NetworkPolicy": 2},
    ),
    "cluster-wide": (
        {"watch": {"allNamespaces": True}},
        {"ServiceAccount": 1, "ClusterRole": 1, "ClusterRoleBinding": 1, "Deployment": 1, "Service": 1},
    ),
    "cluster-wide+monitoring": (
        {"watch": {"allNamespaces": True}, "monitoring": MONITORING_ON},
        {"ServiceAccount": 1, "ClusterRole": 1, "ClusterRoleBinding": 1, "Deployment": 1, "Service": 1,
         "ServiceMonitor": 1, "PrometheusRule": 1, "ConfigMap": 1},
    ),
    "namespaced": (
        {"watch": {"allNamespaces": False, "namespaces": ["team-a", "team-b"]}},
        {"ServiceAccount": 1, "Role": 2, "RoleBinding": 2, "ClusterRole": 1, "ClusterRoleBinding": 1,
         "Deployment": 1, "Service": 1, "NetworkPolicy": 4},
    ),
    "namespaced+monitoring, no cluster-scoped rights": (
        {"watch": {"allNamespaces": False}, "rbac": {"clusterDiscovery": False}, "monitoring": MONITORING_ON,
         "metrics": {"port": 9100, "service": {"enabled": True}}},
        {"ServiceAccount": 1, "Role": 1, "RoleBinding": 1, "Deployment": 1, "Service": 1,
         "ServiceMonitor": 1, "PrometheusRule": 1, "ConfigMap": 1, "NetworkPolicy": 2},
    ),
    "bring your own RBAC and account": (
        {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "platform-quantrol"},
         "metrics": {"port": 9090, "service": {"enabled": False}},
         "image": {"repository": "registry.example.com/quantrol-operator", "digest": "sha256:" + "a" * 64}},
        {"Deployment": 1, "NetworkPolicy": 2},
    ),
}
# Kinds the Prometheus Operator defines: no schema in kubernetes-validate, checked by shape below.
MONITORING_KINDS = {"ServiceMonitor", "PrometheusRule", "PodMonitor"}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [doc for doc in yaml.safe_load_all(text) if doc]
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def rbac_rules() -> dict[str, list[dict[str, Any]]]:
    rules: dict[str, list[dict[str, Any]]] = yaml.safe_load((CHART / "files" / "rbac.yaml").read_text())
    return rules


# --- rendering, lint, schema --------------------------------------------------------------------------------------


@pytest.mark.parametrize("combo", COMBOS)
def test_renders_exactly_the_expected_kinds(chart: helm.Chart, combo: str) -> None:
    values, expected = COMBOS[combo]
    docs = render(chart, values)
    counts = {kind: len(list(group)) for kind, group in itertools.groupby(sorted(d["kind"] for d in docs))}
    assert counts == expected


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("combo", COMBOS)
def test_rendered_manifests_validate_against_kubernetes(chart: helm.Chart, combo: str, version: str) -> None:
    docs = render(chart, COMBOS[combo][0])
    validated = set()
    for doc in docs:
        if doc["kind"] in MONITORING_KINDS:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1" and isinstance(doc["spec"], dict)
            continue
        # strict: unknown fields are errors, as they are on a real API server with field validation.
        kubernetes_validate.validate(doc, version, strict=True)
        validated.add(doc["kind"])
    # kubernetes-validate only warns on kinds it has no schema for: make sure every core kind was really checked.
    assert validated == set(COMBOS[combo][1]) - MONITORING_KINDS


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_chart_crds_validate_against_kubernetes(version: str) -> None:
    for path in sorted((CHART / "crds").glob("*.yaml")):
        kubernetes_validate.validate(yaml.safe_load(path.read_text()), version, strict=True)


@pytest.mark.parametrize("combo", COMBOS)
def test_lint_is_clean_in_strict_mode(combo: str) -> None:
    report = helm.lint(CHART, COMBOS[combo][0], strict=True, kube_version="v" + KUBE_VERSIONS[0],
                       namespace=NAMESPACE)
    # Severity 1 is informational (e.g. "icon is recommended"); warnings (2) and errors (3) fail.
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == []


def test_lint_reports_what_it_should() -> None:
    # Proof that the lint test above can fail: a typo in values is an error in strict lint.
    report = helm.lint(CHART, {"watch": {"allNamespace": False}}, strict=True, kube_version="v" + KUBE_VERSIONS[0])
    assert any("allNamespace" in error for error in report["errors"])


def test_service_monitor_without_its_service_is_refused(chart: helm.Chart) -> None:
    values = {"monitoring": {"serviceMonitor": {"enabled": True}}, "metrics": {"service": {"enabled": False}}}
    with pytest.raises(helm.HelmRenderError, match=re.escape("needs metrics.service.enabled")):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_default_values_pass_the_schema(chart: helm.Chart) -> None:
    chart.validate_schema({})
    for values, _ in COMBOS.values():
        chart.validate_schema(values)


BAD_VALUES: dict[str, dict[str, Any]] = {
    "unknown top-level key": {"replicaCount": 2},
    "typo in a section": {"watch": {"allNamespace": False}},
    "namespace not a DNS label": {"watch": {"allNamespaces": False, "namespaces": ["Team_A"]}},
    "duplicate namespace": {"watch": {"allNamespaces": False, "namespaces": ["a", "a"]}},
    "digest not sha256": {"image": {"digest": "latest"}},
    "port out of range": {"metrics": {"port": 70000}},
    "boolean as string": {"rbac": {"create": "yes"}},
    "no memory limit": {"resources": {"limits": {"memory": None}}},
    "memory not a quantity": {"resources": {"requests": {"memory": "lots"}}},
    "stuck deadline too short": {"monitoring": {"prometheusRule": {"rolloutStuckAfterSeconds": 5}}},
    "unknown log level": {"operator": {"logLevel": "trace"}},
    "prometheus url without scheme": {"analysis": {"prometheusUrl": "prometheus:9090"}},
    "pod monitors neither auto, true nor false": {"monitoring": {"podMonitors": {"enabled": "yes"}}},
    "pod monitor label value with a comma": {"monitoring": {"podMonitors": {"labels": {"release": "a,b"}}}},
    "pod monitor label key with an equals sign": {"monitoring": {"podMonitors": {"labels": {"a=b": "c"}}}},
    "plain-http registry as a URL": {"installPolicy": {"registries": {"plainHttp": ["http://registry.ci.svc"]}}},
    "plain-http registry with a path": {"installPolicy": {"registries": {"plainHttp": ["registry.ci.svc/models"]}}},
    "typo in the registries policy": {"installPolicy": {"registries": {"plainHTTP": []}}},
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_schema_rejects_bad_values(chart: helm.Chart, case: str) -> None:
    with pytest.raises(helm.HelmValuesError):
        # Like `helm install`, validate_schema coalesces these with the chart's defaults first (null deletes a key).
        chart.validate_schema(BAD_VALUES[case])


def test_render_refuses_bad_values(chart: helm.Chart) -> None:
    # The schema is enforced on the path `helm install` takes, not only when asked.
    with pytest.raises(helm.HelmError):
        chart.render({"watch": {"allNamespace": False}}, name=RELEASE, namespace=NAMESPACE)


# --- the operator's Deployment and RBAC ---------------------------------------------------------------------------


def operator_container(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    (deployment,) = by_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


@pytest.mark.parametrize("combo", COMBOS)
def test_operator_pod_is_locked_down(chart: helm.Chart, combo: str) -> None:
    docs = render(chart, COMBOS[combo][0])
    (deployment,) = by_kind(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod, container = operator_container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]
    health_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "health")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert f"--liveness=http://0.0.0.0:{health_port}/healthz" in container["args"]
    assert "--standalone" in container["args"]


def test_operator_args_follow_the_watch_mode(chart: helm.Chart) -> None:
    _, default = operator_container(render(chart, {}))
    assert "--all-namespaces" not in default["args"], "cluster-wide is an explicit value, never the default"
    _, cluster = operator_container(render(chart, {"watch": {"allNamespaces": True}}))
    assert "--all-namespaces" in cluster["args"] and not any(a.startswith("--namespace") for a in cluster["args"])
    _, named = operator_container(render(chart, COMBOS["namespaced"][0]))
    assert "--all-namespaces" not in named["args"]
    assert [a for a in named["args"] if a.startswith("--namespace")] == ["--namespace=team-a", "--namespace=team-b"]
    _, release = operator_container(render(chart, {"watch": {"allNamespaces": False}}))
    assert [a for a in release["args"] if a.startswith("--namespace")] == [f"--namespace={NAMESPACE}"]


def test_image_is_pinned_by_digest_when_given(chart: helm.Chart) -> None:
    _, container = operator_container(render(chart, COMBOS["bring your own RBAC and account"][0]))
    assert container["image"] == "registry.example.com/quantrol-operator@sha256:" + "a" * 64


def test_operator_defaults_reach_the_operator_only_when_set(chart: helm.Chart) -> None:
    def env(values: dict[str, Any]) -> dict[str, str | None]:
        _, container = operator_container(render(chart, values))
        return {e["name"]: e.get("value") for e in container["env"]}

    # Unset values leave the operator's own defaults (quantrol_operator.defaults) in charge.
    assert not {"QUANTROL_WORKER_IMAGE", "QUANTROL_SERVING_IMAGE", "QUANTROL_PROMETHEUS_URL"} & set(env({}))
    given = env({"workerImages": {"calibrate": "r.example/worker@sha256:" + "1" * 64, "serving": "r.example/serve:1",
                                  "router": "r.example/serve:1"},
                 "analysis": {"prometheusUrl": "http://prometheus.monitoring:9090"}})
    assert given["QUANTROL_WORKER_IMAGE"] == "r.example/worker@sha256:" + "1" * 64
    assert given["QUANTROL_SERVING_IMAGE"] == given["QUANTROL_ROUTER_IMAGE"] == "r.example/serve:1"
    assert given["QUANTROL_PROMETHEUS_URL"] == "http://prometheus.monitoring:9090"


def test_plain_http_registries_and_engine_flags_reach_the_operator(chart: helm.Chart) -> None:
    """Issue 14's rules in the same rendered policy, read by the operator's own reader: none by default (every
    registry over TLS; engine flags from the operator's list), what the values give otherwise."""
    from quantrol_operator.policy import DEFAULT_ENGINE_FLAGS, InstallPolicy

    def policy(values: dict[str, Any]) -> InstallPolicy:
        _, container = operator_container(render(chart, values))
        return InstallPolicy.from_env({e["name"]: e["value"] for e in container["env"] if "value" in e})

    default = policy({})
    assert default.registries.plain_http == () and default.workloads.engine_flags == DEFAULT_ENGINE_FLAGS
    given = policy({"installPolicy": {"registries": {"plainHttp": ["registry.ci.svc", "10.0.0.5:5000"]},
                                      "workloads": {"engineFlags": ["--enforce-eager"]}}})
    assert given.allows_plain_http("registry.ci.svc:5000") and given.allows_plain_http("10.0.0.5:5000")
    assert given.workloads.engine_flags == ("--enforce-eager",)


def test_the_tools_image_is_the_operator_image_unless_given(chart: helm.Chart) -> None:
    def tools(values: dict[str, Any]) -> str:
        _, container = operator_container(render(chart, values))
        return str(next(e["value"] for e in container["env"] if e["name"] == "QUANTROL_TOOLS_IMAGE"))

    assert tools({}) == operator_container(render(chart, {}))[1]["image"]
    assert tools({"workerImages": {"tools": "r.example/tools:1"}}) == "r.example/tools:1"


def test_cluster_mode_grants_exactly_the_rules_file(chart: helm.Chart) -> None:
    rules = rbac_rules()
    # podMonitors.enabled=auto (the default) needs the rights as much as true: the operator decides at start-up.
    cluster = {"watch": {"allNamespaces": True}}
    (role,) = by_kind(render(chart, cluster), "ClusterRole")
    assert role["rules"] == rules["workload"] + rules["podMonitors"] + rules["clusterDiscovery"]
    (monitored,) = by_kind(render(chart, {**cluster, "monitoring": MONITORING_ON}), "ClusterRole")
    assert monitored["rules"] == rules["workload"] + rules["podMonitors"] + rules["clusterDiscovery"]
    (unmonitored,) = by_kind(render(chart, {**cluster, "monitoring": {"podMonitors": {"enabled": False}}}),
                             "ClusterRole")
    assert unmonitored["rules"] == rules["workload"] + rules["clusterDiscovery"]


def test_pod_monitor_settings_reach_the_operator_as_it_reads_them(chart: helm.Chart) -> None:
    def settings(pod_monitors: dict[str, Any]) -> OperatorDefaults:
        _, container = operator_container(render(chart, {"monitoring": {"podMonitors": pod_monitors}}))
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        return OperatorDefaults.from_env(env)  # the operator's own parser, on the rendered environment

    assert (settings({}).pod_monitors, settings({}).pod_monitor_labels) == ("auto", {})
    assert settings({"enabled": False}).pod_monitors == "false"
    labelled = settings({"enabled": True, "labels": {"team": "ml", "release": "kube-prometheus-stack"}})
    assert labelled.pod_monitors == "true"
    assert labelled.pod_monitor_labels == {"release": "kube-prometheus-stack", "team": "ml"}


def test_namespaced_mode_grants_workload_rights_only_in_watched_namespaces(chart: helm.Chart) -> None:
    rules = rbac_rules()
    docs = render(chart, COMBOS["namespaced"][0])
    assert sorted(r["metadata"]["namespace"] for r in by_kind(docs, "Role")) == ["team-a", "team-b"]
    assert all(r["rules"] == rules["workload"] + rules["podMonitors"] for r in by_kind(docs, "Role"))
    for binding in by_kind(docs, "RoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": RELEASE, "namespace": NAMESPACE}]
    # The one cluster-scoped grant left is read-only discovery.
    (discovery,) = by_kind(docs, "ClusterRole")
    assert discovery["rules"] == rules["clusterDiscovery"] + rules["namespaceDiscovery"]
    assert {verb for rule in discovery["rules"] for verb in rule["verbs"]} == {"list", "watch"}


@pytest.mark.parametrize("combo", COMBOS)
def test_no_wildcards_and_no_secret_enumeration(chart: helm.Chart, combo: str) -> None:
    docs = render(chart, COMBOS[combo][0])
    for role in by_kind(docs, "Role") + by_kind(docs, "ClusterRole"):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
            if "update" in rule["verbs"]:
                # The operator merge-patches and never replaces objects; `update` only on the owners' finalizers
                # subresource, which OwnerReferencesPermissionEnforcement asks for blockOwnerDeletion.
                assert all(r.endswith("/finalizers") for r in rule["resources"]), rule
            if "secrets" in rule["resources"]:
                # No list or watch: the operator reads its own token by name and cannot enumerate others.
                assert not {"list", "watch"} & set(rule["verbs"])


def test_service_monitor_scrapes_the_metrics_service(chart: helm.Chart) -> None:
    docs = render(chart, {"monitoring": MONITORING_ON})
    (service,) = by_kind(docs, "Service")
    (monitor,) = by_kind(docs, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [p["name"] for p in service["spec"]["ports"]]
    _, container = operator_container(docs)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["QUANTROL_METRICS_PORT"] == str(service["spec"]["ports"][0]["port"])
    assert env["QUANTROL_POD_MONITORS"] == "true"


def test_chart_crds_are_the_generated_crds() -> None:
    generated = {p.name: p.read_bytes() for p in (ROOT / "crds").glob("*.yaml")}
    shipped = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    assert shipped == generated, "copy them: cp crds/*.yaml charts/quantrol/crds/"


def test_dashboard_configmap_holds_the_dashboard_verbatim(chart: helm.Chart) -> None:
    (configmap,) = by_kind(render(chart, {"monitoring": MONITORING_ON}), "ConfigMap")
    assert json.loads(configmap["data"]["quantrol.json"]) == json.loads(DASHBOARD.read_text())
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"


# --- alerts -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    require_binaries({"promtool": promtool_binary()})
    binary = promtool_binary()
    assert binary is not None
    return binary


def run_promtool(promtool: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *map(str, args)], capture_output=True, text=True, timeout=60, check=False)


def rendered_rules(chart: helm.Chart, prometheus_rule: dict[str, Any]) -> dict[str, Any]:
    docs = render(chart, {"monitoring": {"prometheusRule": {"enabled": True, **prometheus_rule}}})
    (rule,) = by_kind(docs, "PrometheusRule")
    return {"groups": rule["spec"]["groups"]}


def write_rule_tests(directory: Path, rules: dict[str, Any], tests: dict[str, Any]) -> Path:
    """The unit tests of ALERT_TESTS, pointed at `rules` written next to them."""
    (directory / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    test_file = directory / "rules.test.yaml"
    test_file.write_text(yaml.safe_dump({**tests, "rule_files": ["rules.yaml"]}, sort_keys=False))
    return test_file


def test_alert_rules_are_valid(promtool: str, chart: helm.Chart, tmp_path: Path) -> None:
    result = run_promtool(promtool, "check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump(rendered_rules(chart, {})))
    result = run_promtool(promtool, "check", "rules", rendered)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_unit_tests_pass_on_the_rule_file(promtool: str) -> None:
    result = run_promtool(promtool, "test", "rules", ALERT_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_unit_tests_pass_on_the_rules_the_chart_renders(
    promtool: str, chart: helm.Chart, tmp_path: Path
) -> None:
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    result = run_promtool(promtool, "test", "rules", write_rule_tests(tmp_path, rendered_rules(chart, {}), tests))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_wrong_expectation_fails(promtool: str, chart: helm.Chart, tmp_path: Path) -> None:
    """Proof that the promtool tests can fail: the stuck alert is expected one step too early."""
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    stuck = next(t for t in tests["tests"] if any(a["alertname"] == "QuantrolRolloutStuck"
                                                    for a in t["alert_rule_test"]))
    quiet = next(a for a in stuck["alert_rule_test"] if a["exp_alerts"] == [])
    quiet["exp_alerts"] = [{"exp_labels": {"severity": "warning", "namespace": "team-a", "policy": "chat"}}]
    result = run_promtool(promtool, "test", "rules", write_rule_tests(tmp_path, rendered_rules(chart, {}), tests))
    assert result.returncode != 0
    assert "QuantrolRolloutStuck" in result.stdout + result.stderr


def test_alert_thresholds_come_from_values(promtool: str, chart: helm.Chart, tmp_path: Path) -> None:
    rules = rendered_rules(chart, {"rolloutStuckAfterSeconds": 1800, "reconcileErrorsPer15m": 0.5})
    thresholds = {r["record"]: r["expr"] for r in rules["groups"][0]["rules"]}
    assert thresholds == {
        "quantrol:alert_rollout_stuck_after_seconds": "vector(1800)",
        "quantrol:alert_reconcile_errors_per_15m": "vector(0.5)",
    }
    # With the deadline at 30 min, the policy stuck in Canary already alerts at the 1 h step the file expects quiet.
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    stuck = next(t for t in tests["tests"] if any(a["alertname"] == "QuantrolRolloutStuck"
                                                    for a in t["alert_rule_test"]))
    stuck["alert_rule_test"] = [{"eval_time": "1h", "alertname": "QuantrolRolloutStuck", "exp_alerts": [
        {"exp_labels": {"severity": "warning", "namespace": "team-a", "policy": "chat"},
         "exp_annotations": stuck["alert_rule_test"][1]["exp_alerts"][0]["exp_annotations"]
         | {"summary": "ServingPolicy team-a/chat has not left its phase for 1h 0m 0s"}}]}]
    tests["tests"] = [stuck]
    result = run_promtool(promtool, "test", "rules", write_rule_tests(tmp_path, rules, tests))
    assert result.returncode == 0, result.stdout + result.stderr


# --- dashboard ----------------------------------------------------------------------------------------------------

# Grafana's built-in variables, replaced by what Grafana would send for a 6 h view.
GRAFANA_BUILTINS = {"__rate_interval": "2m", "__interval": "30s", "__range": "6h"}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in board["panels"] if p["type"] != "row"]


def dashboard_exprs(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every query: panel targets, annotations, and the metric selectors of variables."""
    found = [(f"panel {p['title']!r}", t["expr"]) for p in panels(board) for t in p["targets"]]
    found += [(f"annotation {a['name']!r}", a["expr"]) for a in board["annotations"]["list"]]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", var["query"]["query"])
            assert match, f"variable {var['name']}: only label_values(selector, label) is used here"
            found.append((f"variable {var['name']!r}", match.group(1)))
    return found


def substitute(expr: str, variables: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in variables, f"undefined dashboard variable ${name} in {expr!r}"
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def dashboard_variables(board: dict[str, Any]) -> dict[str, str]:
    samples = {"namespace": "team-a", "policy": "chat", "datasource": "prometheus"}
    variables = dict(GRAFANA_BUILTINS)
    for var in board["templating"]["list"]:
        variables[var["name"]] = var["query"] if var["type"] == "textbox" else samples[var["name"]]
    return variables


def test_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        covered = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                   for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & covered, f"panel {panel['title']!r} overlaps another"
        cells |= covered
    for panel in panels(board):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
    # Every variable a query uses is defined (substitute() asserts it).
    variables = dashboard_variables(board)
    for _, expr in dashboard_exprs(board):
        substitute(expr, variables)


def test_dashboard_covers_what_the_issue_asks() -> None:
    text = " ".join(expr for _, expr in dashboard_exprs(dashboard()))
    for metric in ("quantrol_candidate_weight_percent", "quantrol_rollout_phase", "quantrol_rollbacks_total",
                   "quantrol_router_time_to_first_token_seconds", "quantrol_router_inter_token_latency_seconds",
                   "quantrol_router_errors_total", "quantrol_router_queue_wait_seconds", "quantrol_router_shed_total",
                   "quantrol_router_compare_kl_nats_total", "quantrol_router_compare_top1_matches_total",
                   "vllm:num_requests_running", "$max_num_seqs"):
        assert metric in text, metric


def range_query(prometheus: PrometheusServer, expr: str) -> tuple[int, dict[str, Any]]:
    """What Grafana sends for a time-series panel: /api/v1/query_range over the last hour."""
    # No proxy for 127.0.0.1, whatever $http_proxy says (as in the local stack's own client).
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    end = int(time.time())
    params = {"query": expr, "start": str(end - 3600), "end": str(end), "step": "60"}
    url = f"{prometheus.url}/api/v1/query_range?" + urllib.parse.urlencode(params)
    try:
        with opener.open(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.stack
def test_every_dashboard_query_parses_and_evaluates(prometheus: PrometheusServer) -> None:
    """Each query, with its variables filled in, is run by a real Prometheus as a range query: a parse error, or
    an expression Grafana could not graph (a range vector, a string), answers 400 `bad_data`."""
    board = dashboard()
    variables = dashboard_variables(board)
    failures = []
    for where, expr in dashboard_exprs(board):
        status, body = range_query(prometheus, substitute(expr, variables))
        if status != 200 or body.get("status") != "success":
            failures.append(f"{where}: {body.get('error', status)}")
    assert failures == []


@pytest.mark.stack
def test_the_query_check_catches_broken_promql(prometheus: PrometheusServer) -> None:
    for broken in ("sum by (arm) (rate(quantrol_router_requests_total[5m])", "quantrol_router_requests_total[5m]"):
        status, body = range_query(prometheus, broken)
        assert status == 400 and body["errorType"] == "bad_data", broken


# --- Argo CD health checks ----------------------------------------------------------------------------------------

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def lua_health(script: str, obj: dict[str, Any]) -> dict[str, Any]:
    runtime = lupa.lua51.LuaRuntime(unpack_returned_tuples=True)
    # Argo CD's sandbox has no os, io or require: a script that needs them would fail there, so fail here too.
    for name in ("os", "io", "require", "dofile", "loadfile"):
        runtime.globals()[name] = None
    runtime.globals().obj = runtime.table_from(obj, recursive=True)
    result = runtime.execute((ARGOCD / script).read_text())
    return dict(result)


def servingpolicy(status: ServingPolicyStatus | None, generation: int = 3) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": "quantrol.io/v1alpha1", "kind": "ServingPolicy",
                           "metadata": {"name": "chat", "namespace": "team-a", "generation": generation}}
    if status is not None:
        obj["status"] = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    return obj


def quantizedmodel(status: QuantizedModelStatus | None, generation: int = 1) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": "quantrol.io/v1alpha1", "kind": "QuantizedModel",
                           "metadata": {"name": "llama-w4", "namespace": "team-a", "generation": generation}}
    if status is not None:
        obj["status"] = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    return obj


def ready(status: ConditionStatus, reason: str, message: str = "", ctype: str = "Ready") -> Condition:
    return Condition(type=ctype, status=status, reason=reason, message=message)


SP = ServingPolicyStatus
DIGEST = "oci://registry.example.com/llama@sha256:" + "b" * 64
SERVINGPOLICY_CASES: dict[str, tuple[dict[str, Any], str, str]] = {
    "no status yet": (servingpolicy(None), "Progressing", "Waiting for the operator"),
    "status of an older generation": (
        servingpolicy(SP(phase="Promoted", observed_generation=2)), "Progressing", "observe generation 3"),
    "pending": (servingpolicy(SP(phase="Pending", observed_generation=3)), "Progressing", "Pending"),
    "shadow": (servingpolicy(SP(phase="Shadow", observed_generation=3, weights=Weights(mirror_fraction=0.1))),
               "Progressing", "Shadow, candidate weight 0%"),
    "canary": (servingpolicy(SP(phase="Canary", step=1, observed_generation=3,
                                weights=Weights(stable=75, candidate=25))),
               "Progressing", "Canary step 1, candidate weight 25%"),
    "promoted": (servingpolicy(SP(phase="Promoted", observed_generation=3, stable_artifact=DIGEST,
                                  conditions=[ready(ConditionStatus.TRUE, "Promoted")])),
                 "Healthy", "Promoted; serving " + DIGEST),
    "promoted but not ready": (
        servingpolicy(SP(phase="Promoted", observed_generation=3,
                         conditions=[ready(ConditionStatus.FALSE, "ArmUnavailable", "0/1 candidate replicas")])),
        "Degraded", "ArmUnavailable: 0/1 candidate replicas"),
    "rolled back on an SLO": (
        servingpolicy(SP(phase="RolledBack", observed_generation=3, rollback=RollbackRecord(
            reason="SloBreach", slo="ttftP99", candidate_value=1.8, limit=0.5, time=NOW,
            message="3 failed windows in a row"))),
        "Degraded", "rolled back: SloBreach (ttftP99 1.8 > limit 0.5): 3 failed windows in a row"),
    "rolled back on a kernel": (
        servingpolicy(SP(phase="RolledBack", observed_generation=3,
                         rollback=RollbackRecord(reason="KernelUnavailable", time=NOW))),
        "Degraded", "rolled back: KernelUnavailable"),
    "paused": (servingpolicy(SP(phase="Paused", observed_generation=3, weights=Weights(stable=90, candidate=10))),
               "Suspended", "Paused, candidate weight 10%"),
    "failed": (
        servingpolicy(SP(phase="Failed", observed_generation=3, conditions=[
            ready(ConditionStatus.FALSE, "CandidateNotFound", "QuantizedModel llama-w4 not found")])),
        "Degraded", "Failed: CandidateNotFound: QuantizedModel llama-w4 not found"),
}

QM = QuantizedModelStatus
QUANTIZEDMODEL_CASES: dict[str, tuple[dict[str, Any], str, str]] = {
    "no status yet": (quantizedmodel(None), "Progressing", "Waiting for the operator"),
    "calibrating": (quantizedmodel(QM(phase="Calibrating", observed_generation=1, job_name="llama-w4-calib-1")),
                    "Progressing", "Calibrating (job llama-w4-calib-1)"),
    "evaluating": (quantizedmodel(QM(phase="Evaluating", observed_generation=1)), "Progressing", "Evaluating"),
    "ready": (quantizedmodel(QM(phase="Ready", observed_generation=1, artifact=Artifact(
        ref="registry.example.com/llama-w4@sha256:" + "c" * 64))), "Healthy", "Ready: registry.example.com/llama"),
    "rejected by the quality gate": (
        quantizedmodel(QM(phase="Rejected", observed_generation=1, conditions=[
            ready(ConditionStatus.TRUE, "Calibrated", ctype="Calibrated"),
            ready(ConditionStatus.FALSE, "QualityGateFailed", "1 of 2 slices over limits", ctype="QualityQualified"),
            ready(ConditionStatus.FALSE, "Rejected")],
            quality=[SliceQuality(slice="chat", passed=True),
                     SliceQuality(slice="code", passed=False, failed_limits=["klDivergence", "top1Agreement"])])),
        "Degraded",
        "Rejected: QualityQualified QualityGateFailed: 1 of 2 slices over limits; "
        "failed slices: code (klDivergence, top1Agreement)"),
    "failed": (
        quantizedmodel(QM(phase="Failed", observed_generation=1, conditions=[
            ready(ConditionStatus.FALSE, "JobFailed", "calibration Job exceeded its deadline")])),
        "Degraded", "Failed: Ready JobFailed: calibration Job exceeded its deadline"),
    "re-quantizing after a spec change": (
        quantizedmodel(QM(phase="Ready", observed_generation=1), generation=2), "Progressing", "generation 2"),
}


@pytest.mark.parametrize("case", SERVINGPOLICY_CASES)
def test_argocd_health_of_servingpolicy(case: str) -> None:
    obj, status, message = SERVINGPOLICY_CASES[case]
    health = lua_health("servingpolicy.lua", copy.deepcopy(obj))
    assert health["status"] == status
    assert message in health["message"]


@pytest.mark.parametrize("case", QUANTIZEDMODEL_CASES)
def test_argocd_health_of_quantizedmodel(case: str) -> None:
    obj, status, message = QUANTIZEDMODEL_CASES[case]
    health = lua_health("quantizedmodel.lua", copy.deepcopy(obj))
    assert health["status"] == status
    assert message in health["message"]


def test_argocd_health_statuses_are_ones_argocd_knows() -> None:
    known = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}
    for script in ARGOCD.glob("*.lua"):
        assert set(re.findall(r'hs\.status = "(\w+)"', script.read_text())) <= known, script.name


def test_readme_embeds_the_shipped_health_checks() -> None:
    """charts/README.md shows the argocd-cm snippet; it must carry the same Lua as the files the tests run."""
    readme = (ROOT / "charts" / "README.md").read_text()
    for script, kind in (("servingpolicy.lua", "ServingPolicy"), ("quantizedmodel.lua", "QuantizedModel")):
        assert f"resource.customizations.health.quantrol.io_{kind}: |" in readme
        body = (ARGOCD / script).read_text()
        indented = "".join("    " + line if line.strip() else line for line in body.splitlines(keepends=True))
        assert indented in readme, f"charts/README.md is out of date with {script}"



# --- the install policy and the NetworkPolicies (issue 20) --------------------------------------------------------


def test_the_install_policy_reaches_the_operator_as_it_reads_it(chart: helm.Chart) -> None:
    from quantrol_operator.policy import InstallPolicy

    def policy(values: dict[str, Any]) -> InstallPolicy:
        _, container = operator_container(render(chart, values))
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        return InstallPolicy.from_env(env)  # the operator's own reader, on the rendered environment

    default = policy({})
    assert default.prometheus.allowed_addresses == () and default.workloads.service_accounts == ("default",)
    assert default.workloads.image_prefixes and all(p.endswith(("/", ":")) for p in default.workloads.image_prefixes)
    assert default.reads.max_bytes == 1 << 20 and default.router.max_body_bytes == 4 << 20
    custom = policy({"installPolicy": {"workloads": {"tolerations": False},
                                       "prometheus": {"allowedAddresses": ["https://prom.example.com"]}}})
    assert custom.workloads.tolerations is False and custom.prometheus.allowed_addresses == ("https://prom.example.com",)
    with pytest.raises(ValueError):  # a typo stops the operator at start-up, naming the key
        policy({"installPolicy": {"workloads": {"imagePrefix": ["x"]}}})


def test_network_policies_select_the_pods_quantrol_builds(chart: helm.Chart) -> None:
    """Static: the chart's NetworkPolicies select arm and router pods by the labels the children carry, open the
    engine port only to routers (and scrapers), and the router's admin port only to the operator's pods."""
    from quantrol_operator.children import router
    from quantrol_operator.children.serving import ENGINE_PORT, LAUNCHER_PORT
    from tests.test_api_admission import children

    docs = render(chart, COMBOS["namespaced"][0])
    policies = {(p["metadata"]["namespace"], p["metadata"]["name"].rsplit("-", 1)[1]): p
                for p in by_kind(docs, "NetworkPolicy")}
    assert {ns for ns, _ in policies} == {"team-a", "team-b"}
    built = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in children()
             if d["kind"] == "Deployment"}
    arm_labels = next(labels for labels in built.values() if "quantrol.io/arm" in labels)
    (router_labels,) = [labels for labels in built.values() if labels.get(router.LABEL_COMPONENT) == "router"]
    arms, routers = policies[("team-a", "arms")]["spec"], policies[("team-a", "routers")]["spec"]

    def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
        ok = all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())
        for expression in selector.get("matchExpressions") or []:
            present = expression["key"] in labels
            ok &= present and labels[expression["key"]] in expression["values"] if expression["operator"] == "In" \
                else present
        return ok

    assert selects(arms["podSelector"], arm_labels) and not selects(arms["podSelector"], router_labels)
    assert selects(routers["podSelector"], router_labels) and not selects(routers["podSelector"], arm_labels)
    engine, launcher = arms["ingress"]
    assert engine["ports"] == [{"port": ENGINE_PORT, "protocol": "TCP"}]
    assert selects(engine["from"][0]["podSelector"], router_labels)
    assert launcher["ports"] == [{"port": LAUNCHER_PORT, "protocol": "TCP"}]
    (deployment,) = by_kind(docs, "Deployment")
    assert selects(launcher["from"][0]["podSelector"], deployment["spec"]["template"]["metadata"]["labels"])
    public, admin = routers["ingress"]
    assert public == {"ports": [{"port": router.ROUTER_PORT, "protocol": "TCP"}]}
    assert admin["ports"] == [{"port": router.ADMIN_PORT, "protocol": "TCP"}] and len(admin["from"]) == 1
    assert selects(admin["from"][0]["podSelector"], deployment["spec"]["template"]["metadata"]["labels"])
    # The router Service exposes the inference port only, never the admin port.
    service = next(c for c in children() if c["kind"] == "Service" and c["metadata"]["name"] == "llama-3-1-8b")
    assert [p["port"] for p in service["spec"]["ports"]] == [router.ROUTER_PORT]
