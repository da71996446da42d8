"""deploy/grafana/mailworker.json and deploy/prometheus/alerts.yml: their shape, and every
expression names only metrics mailworker/metrics.py defines (a renamed metric fails here,
not in an operator's empty dashboard). `promtool check rules` runs too where installed.
The Kubernetes manifests scrape and probe the metrics port."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from typing import Any

import pytest

from mailworker.backoff import parse_duration
from mailworker.metrics import METRICS, metric_names

from ._files import DEPLOY, K8S

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (pip install pyyaml)")

ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "mailworker.json"
LABELS = {"relay", "queue", "state", "class", "stage", "le"}
#: PromQL words that look like metric names but are functions or keywords.
_WORDS = {"sum", "max", "min", "rate", "increase", "by", "on", "and", "or", "vector",
          "histogram_quantile", "label_values", "humanize", "humanizeDuration"}


def names_in(expr: str) -> set[str]:
    """Every mailworker_* identifier in *expr* (outside label values in quotes)."""
    bare = re.sub(r'"[^"]*"', '""', expr)
    return set(re.findall(r"\bmailworker_[a-z_]+\b", bare))


def check_expr(expr: str) -> None:
    bare = re.sub(r'"[^"]*"', '""', expr)
    for o, c in ("()", "{}", "[]"):
        depth = 0
        for ch in bare:
            depth += (ch == o) - (ch == c)
            assert depth >= 0, f"unbalanced {o}{c} in {expr!r}"
        assert depth == 0, f"unbalanced {o}{c} in {expr!r}"
    found = names_in(expr)
    assert found, f"no mailworker metric in {expr!r}"
    unknown = found - metric_names()
    assert not unknown, f"{expr!r} names metrics mailworker does not export: {unknown}"
    for group in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", bare):
        used = {g.strip() for g in group.split(",") if g.strip()}
        assert used <= LABELS, f"{expr!r} groups by unknown labels {used - LABELS}"
    for matcher in re.findall(r"\{([^}]*)\}", bare):
        used = {m.split("=")[0].strip(" =~!") for m in matcher.split(",") if m.strip()}
        assert used <= LABELS, f"{expr!r} matches unknown labels {used - LABELS}"
    for window in re.findall(r"\[(\w+)(?::\w*)?\]", bare):
        assert parse_duration(window) > 0


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    assert set(doc) == {"groups"}
    rules = []
    for group in doc["groups"]:
        assert group["name"] and group["rules"]
        rules.extend(group["rules"])
    return rules


def test_alert_rules_shape_and_metrics() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    assert {"MailworkerRelayPaused", "MailworkerDeadLettersRising", "MailworkerQueueAgeHigh",
            "MailworkerNoDeliveries"} <= set(names)
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
        assert rule["for"] == "0m" or parse_duration(rule["for"]) > 0
        check_expr(rule["expr"])


def test_promtool_accepts_the_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    done = subprocess.run([promtool, "check", "rules", str(ALERTS)], check=False,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_shape_and_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "mailworker" and dash["title"]
    assert isinstance(dash["schemaVersion"], int)
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "relay", "queue"} <= variables
    ids, used = set(), set()
    for panel in dash["panels"]:
        assert panel["id"] not in ids
        ids.add(panel["id"])
        assert panel["type"] in {"timeseries", "stat", "gauge", "table"} and panel["title"]
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0
        assert panel["targets"]
        for target in panel["targets"]:
            check_expr(target["expr"])
            used |= names_in(target["expr"])
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            assert names_in(var["query"]["query"]) <= metric_names()
    # Every metric is on the dashboard (histograms through their buckets).
    shown = {n.removesuffix("_bucket") for n in used}
    assert set(METRICS) - shown == set()


@pytest.mark.parametrize("name", ["worker-deployment.yaml", "scheduler-deployment.yaml"])
def test_kubernetes_scrapes_and_probes_the_metrics_port(name: str) -> None:
    env = next(d for d in yaml.safe_load_all((K8S / "configmap.yaml").read_text())
               if d and d["metadata"]["name"] == "mailworker-env")
    port = int(env["data"]["MAILWORKER_METRICS_PORT"])
    dep = yaml.safe_load((K8S / name).read_text())
    template = dep["spec"]["template"]
    notes = template["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert int(notes["prometheus.io/port"]) == port and notes["prometheus.io/path"] == "/metrics"
    (container,) = template["spec"]["containers"]
    assert {"name": "metrics", "containerPort": port} in container["ports"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
