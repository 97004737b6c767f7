"""The deployment files in deploy/: real validators, and their agreement with the code.

`deploy/validate/run.sh` runs hadolint, the compose-spec schema and compose-go, kustomize
and kubeconform (strict, local schemas, KEDA CRDs), promtool (configs, rules, rule unit
tests, every dashboard query); CI installs them (the README's test command runs
`deploy/validate/install.sh`, a user's set-up does not), so a missing validator is a failure, not a skip. The pure
Python checks below tie the files to the code: metric and label names to what
`workers.ops.WorkerMetrics` exports, INTERNEG_* variables to `schemas.settings.Settings`,
probe paths to what `OpsServer` serves.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.error
import urllib.request
from functools import lru_cache
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from schemas.settings import Settings
from workers.ops import OpsServer, WorkerMetrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
RUN = DEPLOY / "validate" / "run.sh"
COMPOSE = DEPLOY / "compose" / "docker-compose.yml"
K8S = DEPLOY / "k8s"
RULES = DEPLOY / "prometheus" / "rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "rules_test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "interneg.json"
DOCKERFILE = DEPLOY / "image" / "Dockerfile"

# Labels Prometheus (or the k8s scrape config) attaches to every scraped series.
TARGET_LABELS = {"job", "instance", "namespace", "pod"}
# Series Prometheus makes itself.
PROMETHEUS_SERIES = {"up", "ALERTS", "ALERTS_FOR_STATE"}


def run_validators(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(RUN), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def load_yaml_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s_objects() -> list[dict]:
    return [doc for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml" for doc in load_yaml_docs(path)]


def k8s_object(kind: str, name: str) -> dict:
    found = [o for o in k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


# ------------------------------------------------------------------ the validators themselves


def test_run_sh_validates_every_deployment_file():
    result = run_validators()
    assert result.returncode == 0, f"deploy/validate/run.sh failed:\n{result.stdout}\n{result.stderr}"
    out = result.stdout
    assert "run.sh: all deployment files are valid" in out
    for step in ("hadolint", "compose-spec schema", "kubeconform -strict", "kustomize build", "promtool check config",
                 "promtool check rules", "promtool test rules", "Grafana dashboard PromQL"):
        assert step in out, f"step {step!r} did not run:\n{out}"
    assert "FAILED" not in out
    assert out.count("Invalid: 0, Errors: 0, Skipped: 0") >= 4  # files and kustomize output, two k8s versions each
    assert "SUCCESS" in out


BROKEN_DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: broken}
spec:
  replicas: "two"
  selector: {matchLabels: {app: broken}}
  template:
    metadata: {labels: {app: broken}}
    spec:
      containers:
        - name: worker
          image: interneg:0.1.0
          livenessProbe: {httpGet: {path: /healthz, port: 9400}, periodSecond: 5}
"""
UNKNOWN_KIND = "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\n"
BROKEN_SCALEDOBJECT = """\
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata: {name: s}
spec:
  scaleTargetRef: {name: interneg-score-worker}
  maxReplicaCount: many
  triggers: [{type: kafka, metadata: {topic: frames}}]
"""
BROKEN_RULES = "groups:\n  - name: x\n    rules:\n      - alert: A\n        expr: sum(rate(interneg_frames_total[5m]) by\n"
FAILING_RULE_TEST = """\
rule_files: [RULES]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'up{job="interneg-scoring", instance="a:9400"}'
        values: "1x10"
    alert_rule_test:
      - eval_time: 10m
        alertname: InternegWorkerDown
        exp_alerts: [{exp_labels: {severity: warning, job: interneg-scoring, instance: "a:9400"}}]
"""
BROKEN_PROM_CONFIG = "global:\n  scrape_interval: 15s\nscrape_configs:\n  - job_name: x\n    static_config:\n      - targets: [a:1]\n"
BROKEN_COMPOSE = "services:\n  worker:\n    image: interneg:0.1.0\n    depends_on: [kafka]\n    replicas: 3\n"
UNDEFINED_DEPENDENCY_COMPOSE = "services:\n  worker:\n    image: interneg:0.1.0\n    depends_on: [kafka]\n"
BROKEN_DASHBOARD = json.dumps({"panels": [{"id": 1, "type": "timeseries", "targets": [
    {"refId": "A", "expr": "sum(rate(interneg_frames_total[$__rate_interval])"}]}]})
BROKEN_DOCKERFILE = "FROM python:latest\nRUN cd /tmp && pip install requests\nCMD interneg\n"


@pytest.mark.parametrize(
    ("check", "name", "content"),
    [
        ("k8s", "deployment.yaml", BROKEN_DEPLOYMENT),
        ("k8s", "widget.yaml", UNKNOWN_KIND),  # strict: an unknown kind fails, it is not skipped
        ("k8s", "scaledobject.yaml", BROKEN_SCALEDOBJECT),
        ("prom-rules", "rules.yml", BROKEN_RULES),
        ("prom-rules-test", "rules_test.yml", FAILING_RULE_TEST),
        ("prom-config", "prometheus.yml", BROKEN_PROM_CONFIG),
        ("compose", "schema.yml", BROKEN_COMPOSE),
        ("compose", "consistency.yml", UNDEFINED_DEPENDENCY_COMPOSE),
        ("dashboard", "dashboard.json", BROKEN_DASHBOARD),
        ("dockerfile", "Dockerfile", BROKEN_DOCKERFILE),
    ],
)
def test_each_validator_rejects_a_broken_file(tmp_path, check, name, content):
    path = tmp_path / name
    path.write_text(content.replace("RULES", str(RULES)))
    result = run_validators(check, str(path), timeout=120)
    assert result.returncode not in (0, 2), f"{check} accepted a broken file (or is missing):\n{result.stdout}\n{result.stderr}"


def test_each_validator_accepts_the_real_file():
    """The counterpart of the broken files: the same single checks pass on the shipped ones."""
    for check, path in [("k8s", K8S / "score-worker.yaml"), ("prom-rules", RULES), ("compose", COMPOSE),
                        ("dashboard", DASHBOARD), ("dockerfile", DOCKERFILE)]:
        result = run_validators(check, str(path), timeout=120)
        assert result.returncode == 0, f"{check} {path}:\n{result.stdout}\n{result.stderr}"


# ------------------------------------------------------------------ metric names and labels


@lru_cache(maxsize=None)
def exported() -> tuple[dict[str, set[str]], dict[tuple[str, str], set[str]]]:
    """({sample name: label names}, {(sample name, label): values known before any event})."""
    roles = ("scoring", "inversion", "events")  # each exports its own (workers/ops.py ROLE_METRICS)
    known: dict[tuple[str, str], set[str]] = {}
    for role in roles:
        for family in text_string_to_metric_families(WorkerMetrics(role).exposition().decode()):
            for sample in family.samples:
                for label, value in sample.labels.items():
                    if label != "le":
                        known.setdefault((sample.name, label), set()).add(value)
    names: dict[str, set[str]] = {}
    for role in roles:
        for name, labels in _exercised(WorkerMetrics(role)).items():
            names.setdefault(name, set()).update(labels)
    return names, known


def _exercised(m: WorkerMetrics) -> dict[str, set[str]]:
    """Every metric touched, so that the labelled ones without preset values show up too."""
    m.frames.labels(outcome="scored").inc()
    m.batch_seconds.observe(0.1)
    m.end_to_end_seconds.observe(0.1)
    m.consumer_lag.labels(topic="frames", partition="0").set(1)
    m.group_lag.labels(topic="frames").set(1)
    m.bank_size.set(1)
    m.bank_version.set(1)
    m.deadletters.labels(reason="undecodable").inc()
    m.negatives_published.labels(kind="negative").inc()
    m.inverted.labels(outcome="admitted").inc()
    m.camera_frames.labels(camera="yard", outcome="scored").inc()
    m.camera_end_to_end_seconds.labels(camera="yard").observe(0.1)
    m.camera_events.labels(camera="yard", status="opened").inc()
    m.events_open.set(1)
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(m.exposition().decode()):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def test_exported_names_are_the_documented_ones():
    names, known = exported()
    for name in ("interneg_frames_total", "interneg_batch_seconds_bucket", "interneg_end_to_end_seconds_bucket",
                 "interneg_consumer_lag", "interneg_bank_size", "interneg_bank_version", "interneg_deadletters_total",
                 "interneg_negatives_published_total", "interneg_inverted_total", "interneg_worker_info",
                 "interneg_group_lag", "interneg_worker_stalled", "interneg_consumer_renewals_total"):
        assert name in names
    assert {"scored", "alert", "deadletter", "candidate"} <= known[("interneg_frames_total", "outcome")]


def recorded_names() -> set[str]:
    return {rule["record"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"] if "record" in rule}


def rule_exprs() -> list[tuple[str, str]]:
    return [(rule.get("alert") or rule.get("record"), rule["expr"])
            for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[tuple[str, str]]:
    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    dashboard = json.loads(DASHBOARD.read_text())
    return [(f"panel {p['id']} {p.get('title', '')!r} {t['refId']}", t["expr"])
            for p in panels(dashboard["panels"]) for t in p.get("targets", []) if "expr" in t]


def rule_test_series() -> list[tuple[str, str]]:
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    return [(f"rules_test input {i}", s["series"]) for i, t in enumerate(tests) for s in t.get("input_series", [])]


STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
INTERNEG_NAME = re.compile(r"\binterneg[_:][a-zA-Z0-9_:]*")


def check_expr(where: str, expr: str) -> list[str]:
    """Problems with the metric names, label names and label values an expression uses."""
    names, known = exported()
    recorded = recorded_names()
    problems = []
    bare = STRING.sub('""', expr)
    for name in INTERNEG_NAME.findall(bare):
        if name not in names and name not in recorded:
            problems.append(f"{where}: {name} is neither exported by WorkerMetrics nor recorded in rules.yml")
    for name, body in SELECTOR.findall(expr):
        if name in PROMETHEUS_SERIES or name in recorded:
            continue
        if name not in names:
            problems.append(f"{where}: selector on unknown series {name}")
            continue
        for label, op, value in MATCHER.findall(body):
            if label in TARGET_LABELS:
                continue
            if label not in names[name]:
                problems.append(f"{where}: {name} has no label {label!r} (it has {sorted(names[name])})")
            elif (name, label) in known and op in ("=", "=~"):
                values = value.split("|") if op == "=~" else [value]
                unknown = [v for v in values if v not in known[(name, label)]]
                if unknown and not any(c in value for c in ".*+?[]()"):
                    problems.append(f"{where}: {name}{{{label}}} never takes {unknown} (known: {sorted(known[(name, label)])})")
    return problems


def test_rules_use_only_exported_metrics_and_labels():
    exprs = rule_exprs()
    assert len(exprs) >= 10
    problems = [p for where, expr in exprs for p in check_expr(where, expr)]
    assert not problems, "\n".join(problems)


def test_dashboard_uses_only_exported_metrics_and_labels():
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    problems = [p for where, expr in exprs for p in check_expr(where, expr)]
    assert not problems, "\n".join(problems)
    used = " ".join(expr for _, expr in exprs)
    for name in ("interneg_frames_total", "interneg_end_to_end_seconds_bucket", "interneg_batch_seconds_bucket",
                 "interneg_consumer_lag", "interneg_deadletters_total", "interneg_bank_size", "interneg_bank_version",
                 "interneg_inverted_total", "interneg_negatives_published_total"):
        assert name in used, f"the dashboard shows nothing of {name}"


def test_rule_unit_tests_feed_real_series():
    problems = [p for where, series in rule_test_series() for p in check_expr(where, series)]
    assert not problems, "\n".join(problems)


def test_the_name_check_catches_a_wrong_name():
    assert check_expr("x", 'rate(interneg_frames[5m])')  # the counter is exported as interneg_frames_total
    assert check_expr("x", 'interneg_consumer_lag{group="a"}')
    assert check_expr("x", 'interneg_frames_total{outcome="scorred"}')
    assert not check_expr("x", 'sum by (outcome) (rate(interneg_frames_total{job="interneg-scoring", outcome=~"alert|scored"}[5m]))')


def test_dashboard_is_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    names = {v["name"] for v in dashboard["templating"]["list"]}
    provisioned = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    datasource_var = next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")
    assert datasource_var["current"]["value"] in {d["uid"] for d in provisioned}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"].strip("${}") in names | {d["uid"] for d in provisioned}, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/interneg.yml").read_text())["providers"][0]
    compose = yaml.safe_load(COMPOSE.read_text())
    mounts = {v["target"]: v["source"] for v in compose["services"]["grafana"]["volumes"] if isinstance(v, dict)}
    assert (COMPOSE.parent / mounts[provider["options"]["path"]]).resolve() == DASHBOARD.parent


# ------------------------------------------------------------------ settings


def setting_field(var: str):
    """The Settings field an INTERNEG_* variable sets (prefix INTERNEG_, nesting "__"), or None."""
    assert var.startswith("INTERNEG_"), var
    model: type[BaseModel] = Settings
    parts = var[len("INTERNEG_"):].lower().split("__")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return None
        if i < len(parts) - 1:
            model = field.annotation
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                return None
    return field


def compose_value(value) -> str:
    """A compose value with ${VAR:-default} replaced by its default."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", str(value))


def deployment_env() -> dict[str, dict[str, str]]:
    """{where: {INTERNEG_* name: value or ''}} for every place that sets one."""
    places: dict[str, dict[str, str]] = {}
    compose = yaml.safe_load(COMPOSE.read_text())
    for name, service in compose["services"].items():
        env = service.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env)
        places[f"compose {name}"] = {k: compose_value(v) for k, v in env.items() if k.startswith("INTERNEG_")}
    for obj in k8s_objects():
        where = f"k8s {obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "ConfigMap":
            places[where] = {k: v for k, v in obj["data"].items()}
        if obj["kind"] in ("Deployment", "Job"):
            for container in obj["spec"]["template"]["spec"]["containers"]:
                places[f"{where} env"] = {e["name"]: e.get("value", "") for e in container.get("env", [])}
    dockerfile_env = {}
    for line in DOCKERFILE.read_text().replace("\\\n", " ").splitlines():
        if line.startswith("ENV "):
            dockerfile_env.update(re.findall(r"(INTERNEG_[A-Z0-9_]+)=(\S+)", line))
    places["Dockerfile"] = dockerfile_env
    return places


def test_every_interneg_variable_is_a_real_setting(monkeypatch):
    places = deployment_env()
    assert sum(len(v) for v in places.values()) >= 20
    problems = [f"{where}: {var} is no field of schemas.settings.Settings"
                for where, env in places.items() for var in env if setting_field(var) is None]
    assert not problems, "\n".join(problems)
    # And their values parse: a Settings read from each place's variables has them.
    for where, env in places.items():
        for var in [v for v in list(os.environ) if v.startswith("INTERNEG_")]:
            monkeypatch.delenv(var)
        for var, value in env.items():
            if value:
                monkeypatch.setenv(var, value)
        settings = Settings(_env_file=None)
        for var, value in env.items():
            if not value:
                continue
            obj = settings
            for part in var[len("INTERNEG_"):].lower().split("__"):
                obj = getattr(obj, part)
            assert str(obj).lower() == value.lower() or str(obj) == str(Path(value)), f"{where}: {var}={value!r} read as {obj!r}"


def test_the_deployments_set_what_a_container_needs():
    configmap = k8s_object("ConfigMap", "interneg-config")["data"]
    compose_env = deployment_env()["compose score-worker"]
    # the default 127.0.0.1 is unreachable from probes and Prometheus: compose binds its
    # network, k8s the pod's address (and a NetworkPolicy admits only Prometheus)
    assert compose_env["INTERNEG_WORKER__HTTP_HOST"] == "0.0.0.0"
    assert "INTERNEG_WORKER__HTTP_HOST" not in configmap
    for name in ("interneg-score-worker", "interneg-invert-worker"):
        env = {e["name"]: e for e in k8s_object("Deployment", name)["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["INTERNEG_WORKER__HTTP_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    policy = k8s_object("NetworkPolicy", "interneg-ops")["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "interneg"}
    assert [p["port"] for rule in policy["ingress"] for p in rule["ports"]] == [9400]
    for env in (configmap, compose_env):
        assert int(env["INTERNEG_WORKER__HTTP_PORT"]) > 0  # the default 0 picks a random port
        assert env["INTERNEG_WORKER__BUNDLE"] == "/bundle"
        assert env["INTERNEG_WORKER__EXACTLY_ONCE"] in ("true", "false")
    assert setting_field("INTERNEG_WORKER__EXACTLY_ONCE") is not None
    assert setting_field("INTERNEG_WORKER__NO_SUCH_THING") is None


def secret_keys() -> dict[str, set[str]]:
    return {o["metadata"]["name"]: set(o.get("stringData", {})) | set(o.get("data", {})) for o in k8s_objects() if o["kind"] == "Secret"}


def test_secret_references_resolve():
    keys = secret_keys()
    for obj in k8s_objects():
        if obj["kind"] in ("Deployment", "Job"):
            pod = obj["spec"]["template"]["spec"]
            for container in pod["containers"]:
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["key"] in keys.get(ref["name"], set()), env
                for source in container.get("envFrom", []):
                    if "configMapRef" in source:
                        k8s_object("ConfigMap", source["configMapRef"]["name"])
            for volume in pod.get("volumes", []):
                if "secret" in volume:
                    items = {i["key"] for i in volume["secret"].get("items", [])}
                    assert items <= keys.get(volume["secret"]["secretName"], set()) and volume["secret"]["secretName"] in keys, volume
    auth = k8s_object("TriggerAuthentication", "interneg-kafka")
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["key"] in keys.get(ref["name"], set()), ref


def test_each_role_has_its_own_kafka_user_and_only_the_inversion_worker_holds_the_signing_key():
    """What deploy/kafka/acls allows is per principal: sharing one user would give the scoring
    workers the right to write negatives. And a scoring worker that could read the signing key
    could sign a forged negative every other worker would accept."""
    def user_secret(deployment_name: str) -> str:
        (container,) = k8s_object("Deployment", deployment_name)["spec"]["template"]["spec"]["containers"]
        (ref,) = [e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if e["name"] == "INTERNEG_KAFKA__SASL_PLAIN_USERNAME"]
        return ref

    users = {name: user_secret(name) for name in ("interneg-score-worker", "interneg-invert-worker")}
    assert len(set(users.values())) == 2, users
    acl_principals = {line.split()[0] for line in (ROOT / "deploy" / "kafka" / "acls").read_text().splitlines()
                      if line.strip() and not line.startswith("#")}
    for secret in users.values():
        assert f"User:{k8s_object('Secret', secret)['stringData']['username']}" in acl_principals, secret

    def mounted_key_files(deployment_name: str) -> set[str]:
        pod = k8s_object("Deployment", deployment_name)["spec"]["template"]["spec"]
        files = set()
        for volume in pod["volumes"]:
            if volume.get("secret", {}).get("secretName") == "interneg-negatives-keys":
                items = volume["secret"].get("items")
                files |= {i["path"] for i in items} if items else secret_keys()["interneg-negatives-keys"]
        return files

    assert mounted_key_files("interneg-score-worker") == {"negatives-verify.pem"}
    assert mounted_key_files("interneg-invert-worker") == {"negatives-signing.pem", "negatives-verify.pem"}
    config = k8s_object("ConfigMap", "interneg-config")["data"]
    assert config["INTERNEG_BANK__VERIFY_KEY"].endswith("/negatives-verify.pem")
    assert "INTERNEG_BANK__SIGNING_KEY" not in config  # set on the inversion worker alone
    (inverter,) = k8s_object("Deployment", "interneg-invert-worker")["spec"]["template"]["spec"]["containers"]
    assert any(e["name"] == "INTERNEG_BANK__SIGNING_KEY" for e in inverter["env"])
    # compose: the same split, through its secrets
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert services["score-worker"]["secrets"] == ["negatives-verify"]
    assert set(services["invert-worker"]["secrets"]) == {"negatives-verify", "negatives-signing"}
    assert "INTERNEG_BANK__SIGNING_KEY" not in services["score-worker"]["environment"]
    assert services["invert-worker"]["environment"]["INTERNEG_BANK__SIGNING_KEY"] == "/run/secrets/negatives-signing"
    assert services["score-worker"]["environment"]["INTERNEG_BANK__VERIFY_KEY"] == "/run/secrets/negatives-verify"


# ------------------------------------------------------------------ probes, ports, scaling


def served_paths() -> dict[str, int]:
    """Status of each path a real OpsServer answers, ready and beating."""
    ops = OpsServer(WorkerMetrics("scoring"), "127.0.0.1", 0)
    ops.start()
    try:
        ops.set_ready(True)
        statuses = {}
        for path in ("/healthz", "/readyz", "/metrics", "/status", "/no-such-path"):
            try:
                with urllib.request.urlopen(ops.url + path, timeout=5) as resp:
                    statuses[path] = resp.status
            except urllib.error.HTTPError as err:
                statuses[path] = err.code
        return statuses
    finally:
        ops.stop()


def test_probes_point_at_served_paths_and_ports():
    statuses = served_paths()
    assert statuses["/no-such-path"] == 404
    port = int(k8s_object("ConfigMap", "interneg-config")["data"]["INTERNEG_WORKER__HTTP_PORT"])
    for name in ("interneg-score-worker", "interneg-invert-worker"):
        pod = k8s_object("Deployment", name)["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            get = container[probe]["httpGet"]
            assert statuses[get["path"]] == 200, f"{name} {probe}: {get['path']}"
            assert ports[get["port"]] == port
        # Workers drain on SIGTERM: more than a minute to finish the batches in flight.
        assert pod["terminationGracePeriodSeconds"] >= 60
        annotations = k8s_object("Deployment", name)["spec"]["template"]["metadata"]["annotations"]
        assert statuses[annotations["prometheus.io/path"]] == 200 and int(annotations["prometheus.io/port"]) == port
        assert any(m["mountPath"] == "/bundle" and m.get("readOnly") for m in container["volumeMounts"])
    compose = yaml.safe_load(COMPOSE.read_text())
    for name in ("score-worker", "invert-worker"):
        service = compose["services"][name]
        test = " ".join(service["healthcheck"]["test"])
        url = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", test)
        assert url and int(url.group(1)) == port and statuses[url.group(2)] == 200, test
        assert re.fullmatch(r"\d+s", service["stop_grace_period"]) and int(service["stop_grace_period"][:-1]) >= 60
    prometheus = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    for job in prometheus["scrape_configs"]:
        if job["job_name"].startswith("interneg-"):
            assert statuses[job.get("metrics_path", "/metrics")] == 200
            assert all(sd["port"] == port for sd in job["dns_sd_configs"])
    assert f"EXPOSE {port}" in DOCKERFILE.read_text()


def test_keda_scales_the_scoring_group_on_the_frames_topic():
    settings = Settings(_env_file=None)
    configmap = k8s_object("ConfigMap", "interneg-config")["data"]
    scaled = k8s_object("ScaledObject", "interneg-score-worker")["spec"]
    assert scaled["scaleTargetRef"]["name"] == "interneg-score-worker"
    k8s_object("Deployment", scaled["scaleTargetRef"]["name"])
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["consumerGroup"] == configmap.get("INTERNEG_KAFKA__SCORING_GROUP", settings.kafka.scoring_group)
    assert meta["topic"] == configmap.get("INTERNEG_TOPICS__FRAMES", settings.topics.frames)
    assert meta["bootstrapServers"] == configmap["INTERNEG_KAFKA__BOOTSTRAP_SERVERS"]
    assert scaled["maxReplicaCount"] <= int(configmap["INTERNEG_TOPICS__PARTITIONS"])
    assert "replicas" not in k8s_object("Deployment", "interneg-score-worker")["spec"]  # KEDA owns it
    k8s_object("TriggerAuthentication", trigger["authenticationRef"]["name"])
    pdb = k8s_object("PodDisruptionBudget", "interneg-score-worker")["spec"]
    labels = k8s_object("Deployment", "interneg-score-worker")["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    assert "namespace" not in kustomization  # namespace-agnostic
    assert all("namespace" not in obj["metadata"] for obj in k8s_objects())
    kinds = {obj["kind"] for obj in k8s_objects()}
    assert {"ConfigMap", "Secret", "Deployment", "Service", "ScaledObject", "PodDisruptionBudget"} <= kinds


def test_compose_runs_the_documented_commands():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert services["topics"]["command"] == ["topics"]
    assert services["score-worker"]["command"] == ["score-worker"]
    assert services["invert-worker"]["command"] == ["invert-worker"]
    assert services["score-worker"]["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert "replicas" in services["score-worker"]["deploy"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft
    from workers.cli import app

    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert {"topics", "score-worker", "invert-worker"} <= commands
    text = DOCKERFILE.read_text()
    assert 'ENTRYPOINT ["interneg"]' in text and "USER 10001" in text and "requirements.lock" in text


def test_compose_publishes_on_loopback_only_and_grafana_has_no_default_password():
    compose = yaml.safe_load(COMPOSE.read_text())
    published = [port for service in compose["services"].values() for port in service.get("ports", [])]
    assert published and all(str(port).startswith("127.0.0.1:") for port in published), published
    password = compose["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert password.startswith("${GRAFANA_ADMIN_PASSWORD:?"), password  # compose refuses to start without one
    assert "INTERNEG_WORKER__HTTP_HOST" not in DOCKERFILE.read_text()  # the image keeps the loopback default
