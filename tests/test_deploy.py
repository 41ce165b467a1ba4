"""deploy/ (docs/runbook.md): manifests, dashboard and alert rules agree with the code.

Metric names are checked against the registry that `consumer.metrics.Metrics`
builds, environment variables against `consumer.settings.Settings`, probes
against the HTTP routes, and the termination grace period against the
worker's shutdown budget. `promtool` and `kubectl kustomize` run when they are
installed (neither comes from PyPI).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from prometheus_client import CollectorRegistry

from consumer.metrics import Metrics
from consumer.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
DASHBOARD = DEPLOY / "grafana" / "absence-sync.json"
RULES = DEPLOY / "prometheus" / "rules.yaml"
RULE_TESTS = DEPLOY / "prometheus" / "rules.test.yaml"
RUNBOOK = ROOT / "docs" / "runbook.md"

YAML_FILES = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
# metrics that are not the worker's own but every Prometheus has
STANDARD_METRICS = frozenset({"up"})
SETTINGS_ENV = frozenset("ABSENCE_SYNC_" + name.upper() for name in Settings.model_fields)
# worst case of consumer.worker._shutdown: the shutdown budget (work in flight
# and leaving the group), then up to 5 s closing the PostgreSQL pool
POOL_CLOSE_SECONDS = 5


# --- loading ------------------------------------------------------------------


def load_yaml(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"
    return docs


def k8s_objects() -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in load_yaml(path)
    ]


def k8s_object(kind: str, name: str = "absence-sync") -> dict[str, Any]:
    found = [o for o in k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r} in {K8S}, found {len(found)}"
    return found[0]


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for obj in k8s_objects():
        if obj["kind"] in ("Deployment", "Job"):
            yield f"{obj['kind']}/{obj['metadata']['name']}", obj["spec"]["template"]["spec"]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def worker_container() -> dict[str, Any]:
    pod = k8s_object("Deployment")["spec"]["template"]["spec"]
    workers: list[dict[str, Any]] = [c for c in pod["containers"] if c["name"] == "worker"]
    assert len(workers) == 1
    return workers[0]


def configmap_env() -> dict[str, str]:
    data: dict[str, str] = k8s_object("ConfigMap")["data"]
    return data


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return doc


def alert_rules() -> list[dict[str, Any]]:
    (doc,) = load_yaml(RULES)
    return [rule for group in doc["groups"] for rule in group["rules"]]


# --- metric names ---------------------------------------------------------------

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "gauge": ("",),
}


def exported_metric_names() -> frozenset[str]:
    """Every series name `/metrics` can expose, labelled children or not."""
    registry = Metrics(CollectorRegistry()).registry
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return frozenset(names)


def metric_families() -> frozenset[str]:
    return frozenset(f.name for f in Metrics(CollectorRegistry()).registry.collect())


_KEYWORDS = frozenset({
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
    "and", "or", "unless", "atan2", "inf", "nan",
})
_FUNCTIONS = frozenset({
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max",
    "clamp_min", "day_of_month", "day_of_week", "day_of_year", "days_in_month", "delta",
    "deriv", "exp", "floor", "histogram_quantile", "histogram_count", "histogram_sum",
    "histogram_fraction", "histogram_avg", "holt_winters", "hour", "idelta", "increase",
    "irate", "label_join", "label_replace", "ln", "log2", "log10", "minute", "month",
    "predict_linear", "rate", "resets", "round", "scalar", "sgn", "sort", "sort_desc",
    "sqrt", "time", "timestamp", "vector", "year", "avg_over_time", "min_over_time",
    "max_over_time", "sum_over_time", "count_over_time", "quantile_over_time",
    "stddev_over_time", "stdvar_over_time", "last_over_time", "present_over_time",
    # Grafana's Prometheus variable queries
    "label_values", "label_names", "metrics", "query_result",
})
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VAR = re.compile(r"\$\{[^}]*\}|\$\w+")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.:])[A-Za-z_:][\w:]*")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (strings, labels, ranges, functions removed)."""
    # Grafana's label_values(selector, label): the label is not a metric
    text = re.sub(r"\blabel_values\((.*),\s*\w+\s*\)", r"label_values(\1)", expr)
    text = _STRING.sub('""', text)
    text = _GRAFANA_VAR.sub("", text)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _GROUPING.sub(r"\1", text)
    names: set[str] = set()
    for match in _IDENT.finditer(text):
        word = match.group()
        if word.lower() in _KEYWORDS:
            continue
        if text[match.end():].lstrip().startswith("("):
            assert word in _FUNCTIONS, f"unknown PromQL function {word!r} in: {expr}"
            continue
        names.add(word)
    return names


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, query) for every panel target and variable query of the dashboard."""
    found: list[tuple[str, str]] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            title = node.get("title") or node.get("name") or where
            if isinstance(node.get("expr"), str):
                found.append((f"panel {title!r}", node["expr"]))
            for value in node.values():
                walk(value, str(title))
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    doc = dashboard()
    walk(doc["panels"], "panels")
    for var in doc["templating"]["list"]:
        if var["type"] == "query":
            found.append((f"variable {var['name']!r}", var["definition"]))
    return found


def rule_queries() -> list[tuple[str, str]]:
    return [(f"alert {r['alert']!r}", r["expr"]) for r in alert_rules()]


# --- every file parses ----------------------------------------------------------


def test_deploy_holds_the_expected_files() -> None:
    for name in (
        "deployment.yaml", "migrate-job.yaml", "configmap.yaml", "secret.example.yaml",
        "service.yaml", "pdb.yaml", "hpa.yaml", "servicemonitor.yaml", "kustomization.yaml",
    ):
        assert (K8S / name).is_file(), name
    assert DASHBOARD.is_file()
    assert RULES.is_file()


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path: Path) -> None:
    assert load_yaml(path), f"{path} holds no document"


def test_manifests_are_namespace_agnostic() -> None:
    for obj in k8s_objects():
        assert "namespace" not in obj["metadata"], f"{obj['kind']} sets a namespace"
        assert obj.get("apiVersion") and obj.get("kind")
    (kustomization,) = load_yaml(K8S / "kustomization.yaml")
    assert "namespace" not in kustomization


def test_kustomization_lists_the_manifests() -> None:
    (kustomization,) = load_yaml(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    for name in listed:
        assert (K8S / name).is_file(), f"kustomization lists a missing file: {name}"
    # placeholders never get applied; a Job is immutable, so it is applied on its own
    assert "secret.example.yaml" not in listed
    assert "migrate-job.yaml" not in listed
    others = {p.name for p in K8S.glob("*.yaml")} - {
        "kustomization.yaml", "secret.example.yaml", "migrate-job.yaml"
    }
    assert others <= listed, f"not in kustomization.yaml: {sorted(others - listed)}"


def test_kustomize_builds() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    kinds = {doc["kind"] for doc in yaml.safe_load_all(out.stdout) if doc}
    assert {"Deployment", "ConfigMap", "Service", "PodDisruptionBudget"} <= kinds
    assert {"ScaledObject", "ServiceMonitor"} <= kinds


# --- the Deployment ---------------------------------------------------------------


def test_deployment_runs_three_workers_after_migrating() -> None:
    deployment = k8s_object("Deployment")
    assert deployment["spec"]["replicas"] == 3
    worker = worker_container()
    assert [*worker.get("command", []), *worker.get("args", [])] == ["absence-sync", "run"]
    migrations = [
        [*c.get("command", []), *c.get("args", [])]
        for _, pod in pod_specs()
        for c in containers(pod)
    ]
    assert migrations.count(["absence-sync", "migrate"]) >= 2  # init container and Job
    init = deployment["spec"]["template"]["spec"]["initContainers"]
    assert [*init[0]["command"], *init[0]["args"]] == ["absence-sync", "migrate"]
    job = k8s_object("Job", "absence-sync-migrate")
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_probes_hit_healthz_and_readyz_on_the_http_port() -> None:
    from consumer.web import create_app

    worker = worker_container()
    ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
    http_port = load_settings_from(configmap_env()).http_port
    assert http_port == 8080

    def target(probe: dict[str, Any]) -> tuple[str, int]:
        get = probe["httpGet"]
        port = get["port"]
        return get["path"], ports[port] if isinstance(port, str) else port

    assert target(worker["livenessProbe"]) == ("/healthz", http_port)
    assert target(worker["readinessProbe"]) == ("/readyz", http_port)
    assert target(worker["startupProbe"]) == ("/healthz", http_port)
    # the routes exist (create_app only registers them; no server starts)
    from unittest.mock import MagicMock

    from consumer.web import WebState

    app = create_app(WebState(MagicMock(), MagicMock()))
    paths = {r.resource.canonical for r in app.router.routes() if r.resource is not None}
    assert {"/healthz", "/readyz", "/metrics"} <= paths


def test_termination_grace_outlasts_the_shutdown_budget() -> None:
    settings = load_settings_from(configmap_env())
    timeout = settings.shutdown_timeout_seconds
    for where, pod in pod_specs():
        if where.startswith("Deployment"):
            grace = pod["terminationGracePeriodSeconds"]
            assert grace > timeout
            worst = timeout + POOL_CLOSE_SECONDS
            assert grace > worst, (
                f"{where}: terminationGracePeriodSeconds {grace} <= "
                f"ABSENCE_SYNC_SHUTDOWN_TIMEOUT_SECONDS ({timeout}) + {POOL_CLOSE_SECONDS}"
            )


def test_rollout_never_exceeds_the_replica_count() -> None:
    strategy = k8s_object("Deployment")["spec"]["strategy"]
    assert strategy["rollingUpdate"]["maxSurge"] == 0  # a surplus consumer never gets ready


def test_containers_run_non_root_on_a_read_only_root_filesystem() -> None:
    for where, pod in pod_specs():
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod.get("automountServiceAccountToken") is False, where
        for c in containers(pod):
            ctx = c["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True, f"{where}/{c['name']}"
            assert ctx["allowPrivilegeEscalation"] is False, f"{where}/{c['name']}"
            assert ctx["capabilities"]["drop"] == ["ALL"], f"{where}/{c['name']}"
            assert c["resources"]["requests"]["memory"], f"{where}/{c['name']}"
            assert c["resources"]["limits"]["memory"], f"{where}/{c['name']}"


def test_selectors_match_the_pods() -> None:
    deployment = k8s_object("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selected = deployment["spec"]["selector"]["matchLabels"]
    assert selected.items() <= pod_labels.items()
    service = k8s_object("Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert k8s_object("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= (
        pod_labels.items()
    )
    monitor = k8s_object("ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"][
        "labels"
    ].items()
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports
        assert endpoint["path"] == "/metrics"


def test_autoscaling_follows_lag_and_stops_at_the_partition_count() -> None:
    scaled = k8s_object("ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == k8s_object("Deployment")["metadata"]["name"]
    settings = load_settings_from(configmap_env())
    assert scaled["spec"]["minReplicaCount"] <= k8s_object("Deployment")["spec"]["replicas"]
    assert scaled["spec"]["maxReplicaCount"] <= settings.topic_partitions
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["allowIdleConsumers"] == "false"
    assert meta["offsetResetPolicy"] == "earliest"  # as the workers' consumer
    assert meta["consumerGroupFromEnv"] == "ABSENCE_SYNC_GROUP_ID"


# --- environment ----------------------------------------------------------------


def manifest_env_names() -> list[tuple[str, str]]:
    """(where, variable) for every environment variable the manifests set or read."""
    names: list[tuple[str, str]] = []
    for obj in k8s_objects():
        kind = obj["kind"]
        if kind == "ConfigMap":
            names += [(f"ConfigMap/{obj['metadata']['name']}", k) for k in obj.get("data", {})]
        elif kind == "Secret":
            for field in ("data", "stringData"):
                names += [(f"Secret/{obj['metadata']['name']}", k) for k in obj.get(field, {})]
        elif kind == "ScaledObject":
            for trigger in obj["spec"]["triggers"]:
                names += [
                    ("ScaledObject", v)
                    for k, v in trigger["metadata"].items()
                    if k.endswith("FromEnv")
                ]
    for where, pod in pod_specs():
        for c in containers(pod):
            names += [(f"{where}/{c['name']}", e["name"]) for e in c.get("env", [])]
    return names


def test_every_environment_variable_is_a_setting() -> None:
    names = manifest_env_names()
    assert len(names) > 10
    unknown = [(where, name) for where, name in names if name not in SETTINGS_ENV]
    assert not unknown, f"not ABSENCE_SYNC_ + a Settings field: {unknown}"


def test_env_sources_exist() -> None:
    configmaps = {o["metadata"]["name"] for o in k8s_objects() if o["kind"] == "ConfigMap"}
    secrets = {o["metadata"]["name"] for o in k8s_objects() if o["kind"] == "Secret"}
    for where, pod in pod_specs():
        for c in containers(pod):
            refs = c["envFrom"]
            assert {r["configMapRef"]["name"] for r in refs if "configMapRef" in r} <= configmaps
            assert {r["secretRef"]["name"] for r in refs if "secretRef" in r} <= secrets, where


def test_secret_example_holds_placeholders_only() -> None:
    secret = k8s_object("Secret")
    values = secret["stringData"]
    assert {"ABSENCE_SYNC_DATABASE_URL", "ABSENCE_SYNC_SECRET_KEYS"} <= values.keys()
    for key, value in values.items():
        assert "CHANGE-ME" in value, f"{key} looks like a real secret"


def load_settings_from(env: dict[str, str]) -> Settings:
    """The settings a container with exactly `env` (plus nothing else of ours) would get."""
    saved = {k: v for k, v in os.environ.items() if k.upper().startswith("ABSENCE_SYNC_")}
    try:
        for key in saved:
            del os.environ[key]
        os.environ.update(env)
        return load_settings()
    finally:
        for key in env:
            os.environ.pop(key, None)
        os.environ.update(saved)


def test_configmap_values_are_valid_settings() -> None:
    settings = load_settings_from(configmap_env())
    assert settings.kafka_bootstrap_servers  # never the embedded broker in a cluster
    assert settings.log_format == "json"
    assert settings.topic_partitions >= k8s_object("Deployment")["spec"]["replicas"]


# --- dashboard ------------------------------------------------------------------


def test_dashboard_is_a_grafana_dashboard_with_a_datasource_variable() -> None:
    doc = dashboard()
    assert 36 <= doc["schemaVersion"] <= 41
    assert doc["uid"] and doc["title"]
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in doc["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"


def test_dashboard_shows_every_metric() -> None:
    exprs = " ".join(q for _, q in dashboard_queries())
    used = {name for _, q in dashboard_queries() for name in promql_metric_names(q)}
    for family in metric_families():
        assert any(name.startswith(family) for name in used), f"no panel shows {family}"
    for quantile in ("0.5", "0.95", "0.99"):
        assert (
            f"histogram_quantile({quantile}, sum by (le, provider) "
            "(rate(absence_sync_calendar_request_duration_seconds_bucket"
        ) in exprs


@pytest.mark.parametrize(
    ("where", "expr"), [*dashboard_queries(), *rule_queries()], ids=lambda v: str(v)[:60]
)
def test_queries_use_only_exported_metrics(where: str, expr: str) -> None:
    names = promql_metric_names(expr)
    assert names, f"{where}: no metric found in {expr!r}"
    unknown = names - exported_metric_names() - STANDARD_METRICS
    assert not unknown, f"{where}: unknown metrics {sorted(unknown)} in {expr!r}"


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, code) (rate(absence_sync_nope_bucket'
        '{job=~"$job", code!~"a|b"}[$__rate_interval] offset 5m))) > 1e3'
        ' or on (namespace) group_left absent(up{job="x"} == 1)'
    )
    assert promql_metric_names(expr) == {"absence_sync_nope_bucket", "up"}
    assert "absence_sync_events_consumed_total" in exported_metric_names()
    assert "absence_sync_calendar_request_duration_seconds_bucket" in exported_metric_names()
    with pytest.raises(AssertionError, match="unknown PromQL function"):
        promql_metric_names("rates(absence_sync_dead_letters_total[5m])")


# --- alert rules ----------------------------------------------------------------


def runbook_anchors() -> set[str]:
    """GitHub's heading anchors of docs/runbook.md."""
    anchors = set()
    for line in RUNBOOK.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_alert_rules_are_complete() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    anchors = runbook_anchors()
    for rule in rules:
        assert rule["for"], rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        url = annotations["runbook_url"]
        assert "docs/runbook.md#" in url, rule["alert"]
        assert url.rsplit("#", 1)[1] in anchors, f"{rule['alert']}: no anchor for {url}"


def test_alert_severities() -> None:
    by_name = {r["alert"]: r for r in alert_rules()}
    config = by_name["AbsenceSyncCalendarConfigurationError"]
    assert config["labels"]["severity"] == "critical"
    for code in ("auth_failed", "consent_missing", "access_denied"):
        assert code in config["expr"]
    assert by_name["AbsenceSyncCalendarThrottled"]["labels"]["severity"] == "warning"
    assert 'code="throttled"' in by_name["AbsenceSyncCalendarThrottled"]["expr"]
    assert "absent(up" in by_name["AbsenceSyncDown"]["expr"]
    assert "> 900" in by_name["AbsenceSyncPendingWriteOld"]["expr"]
    assert "> 60" in by_name["AbsenceSyncEndToEndLatencyHigh"]["expr"]
    for name in ("AbsenceSyncConsumerLagGrowing", "AbsenceSyncDeadLetters"):
        assert name in by_name


def test_runbook_anchors_referenced_from_deploy_exist() -> None:
    anchors = runbook_anchors()
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            for anchor in re.findall(r"runbook\.md#([\w-]+)", path.read_text(encoding="utf-8")):
                assert anchor in anchors, f"{path.relative_to(ROOT)}: no heading for #{anchor}"


# `absence-sync CMD [SUB]` at the start of a code line or after kubectl's `--`
_INVOCATION = re.compile(r"(?m)(?:^\s*|--\s+)absence-sync ([a-z][a-z-]*)(?: ([a-z]+))?")


def test_runbook_documents_only_existing_commands() -> None:
    from consumer.cli import main

    text = RUNBOOK.read_text(encoding="utf-8")
    code = [*re.findall(r"(?s)```\w*\n(.*?)```", text), *re.findall(r"`([^`\n]+)`", text)]
    invocations = [
        m.group(1, 2)
        for segment in code
        for m in re.finditer(_INVOCATION, segment)
    ]
    assert len(invocations) > 10
    for command, sub in invocations:
        assert command in main.commands, f"docs/runbook.md documents 'absence-sync {command}'"
        group = main.commands[command]
        if isinstance(group, click.Group):
            assert sub in group.commands, f"docs/runbook.md documents '{command} {sub}'"


def test_promtool_accepts_the_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        message = ("promtool is not installed (Debian package 'prometheus'; "
                   "scripts/test.sh installs it when run as root)")
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail("CI must check the alert rules: " + message)
        pytest.skip(message)
    check = subprocess.run(
        [promtool, "check", "rules", str(RULES)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        [promtool, "test", "rules", str(RULE_TESTS)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr
