"""The deployment files in deploy/ and the README's metric reference, checked against the code.

No Docker or Kubernetes here: the manifests are parsed (PyYAML) and compared with the daemon's
defaults, the CLI and the configuration loader; the Prometheus rules and config go through promtool.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from monitor.cli import build_parser
from monitor.config import Config, ConfigError, MetricsConfig
from monitor.metrics import (
    REFERENCE_BEGIN,
    REFERENCE_END,
    Metrics,
    reference_table,
    update_reference,
)

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "forewarn.yml"
RULE_TESTS = sorted((DEPLOY / "prometheus" / "rules" / "tests").glob("*.yml"))
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "forewarn.json"
K8S = DEPLOY / "kubernetes"
PORT = MetricsConfig().port

# Series that come from Prometheus itself, not from the daemon.
PROMETHEUS_SERIES = {"up"}


# ---- helpers ----------------------------------------------------------------------------------------
def exported_names() -> set[str]:
    """Every series name a Metrics instance exposes, with the suffixes of its type."""
    m = Metrics(CollectorRegistry())
    names: set[str] = set()
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "info": ("_info",), "summary": ("_sum", "_count", "_created")}
    for family in m.registry.collect():
        names |= {s.name for s in family.samples}
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
    return names


_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
                 "unless", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (Grafana variables allowed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                    # string literals
    expr = re.sub(r"\$\{?\w+\}?", "x", expr)                             # Grafana variables
    expr = re.sub(r"\{[^}]*\}", "", expr)                                # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)                               # ranges and subqueries
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)  # label lists
    names = set()
    for m in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)\s*(\()?", expr):
        if m.group(2) is None and m.group(1).lower() not in _PROMQL_WORDS:
            names.add(m.group(1))
    return names


def test_metric_names_parser():
    assert metric_names('sum by (job, le) (rate(forewarn_processing_latency_seconds_bucket[5m]))') == \
        {"forewarn_processing_latency_seconds_bucket"}
    assert metric_names('forewarn_anomaly_score{device="$device"} >= on (job, instance) group_left () '
                        'forewarn_anomaly_threshold or vector(0)') == {"forewarn_anomaly_score",
                                                                      "forewarn_anomaly_threshold"}
    assert metric_names('absent(up{job="forewarn"}) > 1e3 * 0.5') == {"up"}
    assert metric_names("job:forewarn_readings:rate5m offset 5m") == {"job:forewarn_readings:rate5m"}


def load_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def dashboard_queries(dashboard: dict) -> list[str]:
    queries = []

    def walk(panels):
        for p in panels:
            queries.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))
    walk(dashboard["panels"])
    return queries


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def promtool():
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (apt-get install prometheus; .ci/run does)")
    return path


def k8s(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    assert len(docs) == 1, name
    return docs[0]


# ---- Prometheus rules -------------------------------------------------------------------------------
def test_promtool_check_rules(promtool):
    result = run_tool(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests(promtool):
    assert RULE_TESTS
    result = run_tool(promtool, "test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_config(promtool):
    result = run_tool(promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alertmanager_config():
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.skip("amtool is not installed (apt-get install prometheus-alertmanager; .ci/run does)")
    result = run_tool(amtool, "check-config", str(DEPLOY / "alertmanager" / "alertmanager.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_documented_and_unit_tested_firing_and_silent():
    alerts = [r for r in load_rules() if "alert" in r]
    assert {"ForewarnDeviceAnomaly", "ForewarnFleetAnomalyRateHigh", "ForewarnDown", "ForewarnNotReady",
            "ForewarnConsumerLagGrowing", "ForewarnNoReadings", "ForewarnBadRecordRateHigh",
            "ForewarnAdaptationBacklog"} <= {a["alert"] for a in alerts}
    firing, silent = set(), set()
    for path in RULE_TESTS:
        spec = yaml.safe_load(path.read_text())
        assert spec["rule_files"] == ["../forewarn.yml"], path
        for test in spec["tests"]:
            for case in test.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else silent).add(case["alertname"])
    for a in alerts:
        assert {"summary", "description"} <= set(a.get("annotations", {})), a["alert"]
        assert a.get("labels", {}).get("severity") in ("critical", "warning", "info"), a["alert"]
        assert a["alert"] in firing, f"{a['alert']}: no promtool case where it fires"
        assert a["alert"] in silent, f"{a['alert']}: no promtool case where it stays silent"


def test_the_device_alert_compares_surprises_with_the_exported_alarm_level():
    """Scores round to 1 past a surprise of ~16, so a score threshold could not tell 20 from 65; and
    `for:` alone cannot tell a lasting anomaly from one flagged reading of a slowly reporting device."""
    device = next(r for r in load_rules() if r.get("alert") == "ForewarnDeviceAnomaly")
    assert metric_names(device["expr"]) == {"forewarn_anomaly_surprise", "forewarn_anomaly_alarm_surprise",
                                            "forewarn_device_consecutive_anomalous_readings",
                                            "forewarn_device_last_reading_timestamp_seconds"}  # frozen copies out
    assert device["for"]


def test_rules_and_dashboard_read_only_exported_metrics():
    exported = exported_names()
    assert {"forewarn_readings_total", "forewarn_processing_latency_seconds_bucket", "forewarn_build_info",
            "forewarn_anomaly_score"} <= exported
    assert "forewarn_ready" in exported   # ForewarnNotReady reads it
    rules = load_rules()
    recorded = {r["record"] for r in rules if "record" in r}
    known = exported | PROMETHEUS_SERIES | recorded
    for rule in rules:
        unknown = metric_names(rule["expr"]) - known
        assert not unknown, f"{rule.get('alert') or rule.get('record')} reads {unknown}, which Metrics does not export"
    dashboard = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(dashboard)
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["definition"])
            assert m, var["definition"]
            queries.append(m.group(1))
    for q in queries:
        unknown = metric_names(q) - known
        assert not unknown, f"dashboard query {q!r} reads {unknown}, which Metrics does not export"


# ---- Grafana ----------------------------------------------------------------------------------------
def test_dashboard_fleet_and_device_views():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "forewarn" and dashboard["panels"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["device"]["type"] == "query"
    assert "forewarn_anomaly_score" in variables["device"]["definition"]
    queries = " ".join(dashboard_queries(dashboard))
    for needed in ("forewarn_streams", "forewarn_anomalies_total", "topk(10, forewarn_anomaly_surprise",
                   "forewarn_readings_total", "histogram_quantile(0.5, sum by (le) (rate(forewarn_processing_latency",
                   "histogram_quantile(0.99, sum by (le) (rate(forewarn_processing_latency",
                   "forewarn_consumer_lag_records", 'forewarn_anomaly_surprise{device="$device"}',
                   "forewarn_anomaly_alarm_surprise"):
        assert needed in queries, needed
    ids = []
    for p in dashboard["panels"]:
        ids.append(p["id"])
        if p["type"] != "row":
            assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]
            assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
    assert len(ids) == len(set(ids))


def test_dashboard_promql_parses(promtool, tmp_path):
    """Every dashboard query, with Grafana's variables filled in, is valid PromQL for promtool."""
    queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": q.replace("$__rate_interval", "1m").replace("$device", "d")}
        for i, q in enumerate(queries)]}]}
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run_tool(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_counts_a_moved_device_once_and_by_its_current_copy(promtool, tmp_path):
    """pump-20 moved from fw-0 to fw-1 (the input topic grew): fw-0 keeps a frozen copy, flagged at
    surprise 5, while fw-1 scores it at 0.2. The alerts leave the frozen copy out; so must the panels,
    which showed a healthy device as over the alarm level, twice in the top ten."""
    exprs = {p["title"]: p["targets"][0]["expr"].replace("$device", "pump-20")
             for p in json.loads(DASHBOARD.read_text())["panels"] if p.get("targets")}
    series = {'forewarn_anomaly_alarm_surprise{job="forewarn", instance="fw-0:9108"}': "3x20",
              'forewarn_anomaly_alarm_surprise{job="forewarn", instance="fw-1:9108"}': "3x20",
              'forewarn_anomaly_surprise{job="forewarn", instance="fw-0:9108", device="pump-20"}': "5x20",
              'forewarn_anomaly_score{job="forewarn", instance="fw-0:9108", device="pump-20"}': "0.99999x20",
              'forewarn_device_last_reading_timestamp_seconds{job="forewarn", instance="fw-0:9108", device="pump-20"}': "0x20",
              'forewarn_anomaly_surprise{job="forewarn", instance="fw-1:9108", device="pump-20"}': "_ 0.2x19",
              'forewarn_anomaly_score{job="forewarn", instance="fw-1:9108", device="pump-20"}': "_ 0.37x19",
              'forewarn_device_last_reading_timestamp_seconds{job="forewarn", instance="fw-1:9108", device="pump-20"}':
                  "_ 60+60x19"}
    expected = {"Devices scored": ("{}", 1), "Devices over alarm level": ("{}", 0),
                "Latest surprise": ("{}", 0.2), "Over alarm level": ("{}", 0),
                "Top devices by surprise": ('{__name__="forewarn_anomaly_surprise", job="forewarn", '
                                            'instance="fw-1:9108", device="pump-20"}', 0.2)}
    spec = {"rule_files": [], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": [{"series": k, "values": v} for k, v in series.items()],
        "promql_expr_test": [{"expr": exprs[title], "eval_time": "10m",
                              "exp_samples": [{"labels": labels, "value": value}]}
                             for title, (labels, value) in expected.items()]}]}
    path = tmp_path / "dashboard_test.yml"
    path.write_text(yaml.safe_dump(spec))
    result = run_tool(promtool, "test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning():
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/forewarn.yml").read_text())["providers"]
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards"


# ---- compose and the image --------------------------------------------------------------------------
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_stack():
    services = compose()["services"]
    assert {"kafka", "kafka-init", "forewarn", "replay", "prometheus", "alertmanager", "grafana"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "KAFKA_PROCESS_ROLES" in services["kafka"]["environment"]   # KRaft, no ZooKeeper
    fw = services["forewarn"]
    env = {k: str(v) for k, v in fw["environment"].items()}
    settings = {f"FOREWARN_{section.upper()}_{key.upper()}" for section, values in Config().__dict__.items()
                for key in values.__dict__}
    assert set(env) <= settings, set(env) - settings
    cfg = Config.load(environ=env)
    assert cfg.kafka.anomalies_topic and cfg.kafka.dead_letter_topic
    assert cfg.kafka.bootstrap_servers.split(":")[0] in services
    topics = " ".join(services["kafka-init"]["command"])
    for topic in (cfg.kafka.topic, cfg.kafka.anomalies_topic, cfg.kafka.dead_letter_topic):
        assert topic in topics
    assert f"{PORT}:{PORT}" in fw["ports"] and cfg.metrics.port == PORT
    args = build_parser().parse_args(fw["command"])
    assert args.command == "run"

    # the replay: the bundled recording cut at a line inside its last labelled window, then published
    replay = services["replay"]
    assert replay["entrypoint"] == ["/bin/sh", "-c"]
    cut, publish = (shlex.split(part) for part in replay["command"][0].split("&&"))
    assert cut[0] == "sed" and cut[-2] == ">"
    stop = re.fullmatch(r"/\^(.*)/q", cut[1]).group(1)
    recording = (ROOT / cut[2]).read_text()   # bundled at that path (the image copies monitor/data/nab)
    assert f"\n{stop}," in recording
    assert publish[0] == "forewarn" and publish[2] == cut[-1]
    args = build_parser().parse_args(publish[1:])
    assert args.command == "replay-to-kafka" and args.topic == cfg.kafka.topic and args.speed > 0
    assert args.bootstrap_servers == cfg.kafka.bootstrap_servers

    for name in ("prometheus", "alertmanager", "grafana"):
        for volume in services[name]["volumes"]:
            assert (DEPLOY / volume.split(":")[0]).exists(), volume
    prometheus = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "forewarn")
    assert job["static_configs"][0]["targets"] == [f"forewarn:{PORT}"]
    assert (DEPLOY / "prometheus" / prometheus["rule_files"][0]).resolve() == RULES


def test_dockerfile():
    text = (DEPLOY / "Dockerfile").read_text()
    assert "torch==2.13.0" in text and "download.pytorch.org/whl/cpu" in text
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    healthcheck = re.search(r"^HEALTHCHECK .*?(?<!\\)$", text, re.MULTILINE | re.DOTALL).group(0)
    assert "/healthz" in healthcheck and f"'{PORT}'" in healthcheck
    assert re.search(rf"^EXPOSE {PORT}$", text, re.MULTILINE)
    entry = json.loads(re.search(r"^ENTRYPOINT (.*)$", text, re.MULTILINE).group(1))
    cmd = json.loads(re.search(r"^CMD (.*)$", text, re.MULTILINE).group(1))
    assert entry == ["forewarn"] and build_parser().parse_args(cmd).command == "run"
    assert "COPY monitor/data/nab /app/monitor/data/nab" in text and "WORKDIR /app" in text


def test_the_image_build_installs_every_module_and_the_shipped_data(tmp_path):
    """What the Dockerfile's build stage does, minus Docker: copy what it copies, build the
    wheel ``pip install /src`` builds, and import every module from the installed files alone."""
    build = re.search(r"^FROM .* AS build$(.*?)^FROM ", (DEPLOY / "Dockerfile").read_text(), re.M | re.S).group(1)
    src = tmp_path / "src"
    src.mkdir()
    for line in re.findall(r"^COPY (.+) /src/\S*$", build, re.M):
        for name in line.split():
            copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
            copy(ROOT / name, src / name)
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)], check=True)
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), *map(str, wheels.glob("*.whl"))], check=True)
    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                     for top in ("monitor", "connectors") for p in (ROOT / top).rglob("*.py"))
    check = ("import importlib, pathlib, sys\n"
             "from monitor.checkpoint import Initialization\n"
             "Initialization.default()\n"
             "for name in sys.argv[1:]:\n"
             "    module = importlib.import_module(name)\n"
             "    assert pathlib.Path(module.__file__).is_relative_to(pathlib.Path.cwd()), module.__file__\n")
    # run from the install directory with the repository off the path: only installed files count
    result = subprocess.run([sys.executable, "-c", check, *modules], cwd=site, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert (site / "monitor" / "data" / "nab" / "machine_temperature_system_failure.csv").exists()
    entry_points = next(site.glob("forewarn-*.dist-info")) / "entry_points.txt"
    assert "forewarn = monitor.entry:main" in entry_points.read_text()


# ---- Kubernetes -------------------------------------------------------------------------------------
def test_kubernetes_manifests_parse():
    files = sorted(K8S.glob("*.yaml"))
    kinds = set()
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            assert {"apiVersion", "kind"} <= set(doc), path
            if doc["kind"] != "Kustomization":
                assert doc["metadata"]["name"] and doc["metadata"].get("namespace", "forewarn") == "forewarn", path
            kinds.add(doc["kind"])
    assert {"Deployment", "ConfigMap", "Secret", "Service", "ServiceMonitor", "Kustomization"} <= kinds
    listed = set(k8s("kustomization.yaml")["resources"])
    assert listed <= {p.name for p in files}


def test_kubernetes_deployment_matches_the_daemon(tmp_path):
    deployment, service, monitor = k8s("deployment.yaml"), k8s("service.yaml"), k8s("servicemonitor.yaml")
    configmap, secret = k8s("configmap.yaml"), k8s("secret.yaml")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": PORT}

    def probe(name):
        get = container[name]["httpGet"]
        return get["path"], ports.get(get["port"], get["port"])
    assert probe("livenessProbe") == ("/healthz", PORT)
    assert probe("readinessProbe") == ("/readyz", PORT)
    assert probe("startupProbe") == ("/healthz", PORT)
    for res in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][res])

    # the command line, the mounted ConfigMap and its TOML
    args = build_parser().parse_args(container["args"])
    assert args.command == "run" and args.threads
    mount = next(m for m in container["volumeMounts"] if args.config.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    toml = configmap["data"][args.config.rsplit("/", 1)[1]]
    (tmp_path / "forewarn.toml").write_text(toml)
    secret_env = {"FOREWARN_KAFKA_SASL_PLAIN_USERNAME": "u", "FOREWARN_KAFKA_SASL_PLAIN_PASSWORD": "p"}
    with pytest.raises(ConfigError, match="needs kafka.sasl_plain_username"):  # the Secret is needed
        Config.load(tmp_path / "forewarn.toml", environ={})
    cfg = Config.load(tmp_path / "forewarn.toml", environ=secret_env)
    assert cfg.metrics.port == PORT and cfg.kafka.security_protocol.startswith("SASL")
    assert not {"sasl_plain_username", "sasl_plain_password"} & set(tomllib.loads(toml)["kafka"]), "use the Secret"

    # SASL credentials from the Secret, as the daemon's own environment variables
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert set(env) == {"FOREWARN_KAFKA_SASL_PLAIN_USERNAME", "FOREWARN_KAFKA_SASL_PLAIN_PASSWORD"}
    for ref in env.values():
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    assert cfg.kafka.security()["sasl_plain_password"] == "p"

    # the Service and the ServiceMonitor reach the metrics port
    assert service["spec"]["selector"].items() <= labels.items()
    (sport,) = service["spec"]["ports"]
    assert ports.get(sport["targetPort"], sport["targetPort"]) == PORT
    notes = service["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert notes["prometheus.io/port"] == str(PORT) and notes["prometheus.io/path"] == "/metrics"
    # on the Service only: annotation-based configs scrape pods and service endpoints alike, so
    # annotated pods behind an annotated Service would each be scraped twice, under two jobs
    assert not any(k.startswith("prometheus.io/") for k in pod["metadata"].get("annotations", {}))
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == sport["name"]
    assert service["metadata"]["name"] == "forewarn", "the ServiceMonitor's job label, which the rules expect"


# ---- README -----------------------------------------------------------------------------------------
def test_readme_metric_reference_is_generated():
    readme = (ROOT / "README.md").read_text()
    assert REFERENCE_BEGIN in readme and REFERENCE_END in readme
    assert update_reference(readme) == readme, \
        "README's metric table is stale: python -m monitor.metrics --update-readme README.md"
    for name in exported_names() - {n for n in exported_names() if n.endswith(("_created", "_sum", "_count"))}:
        base = re.sub(r"_bucket$", "", name)
        assert f"`{base}`" in reference_table(), name


def test_readme_deploy_section():
    readme = (ROOT / "README.md").read_text()
    assert "\n## Deploy\n" in readme
    for path in ("deploy/compose.yaml", "deploy/kubernetes", "deploy/Dockerfile"):
        assert path in readme
        assert (ROOT / path).exists()
