"""Alerts and dashboard: promtool, Grafana JSON shape, and metric names against docs/metrics.md."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

import render

DOCS_METRICS = render.ROOT / "docs" / "metrics.md"
DOCS_ALERTS = render.ROOT / "docs" / "alerts.md"
DASHBOARD = render.CHART / "files" / "dashboards" / "sluice.json"
PROM_DIR = render.ROOT / "deploy" / "prometheus"
ALERTS = ["SluiceJobSLAAtRisk", "SluiceJobSLABreached", "SluiceJobInfeasible",
          "SluiceJobStalled", "SluiceJobShardFailures", "SluiceOperatorDown"]
# Labels Prometheus attaches to every scraped series (target labels), besides the exposition's.
TARGET_LABELS = {"job", "namespace", "pod", "instance", "service", "container", "endpoint"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
                "unless", "bool", "offset", "sum", "min", "max", "avg", "count", "group",
                "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values"}


# --- The contract: docs/metrics.md ----------------------------------------------------------

def documented_metrics() -> dict[str, dict]:
    """metric name -> {"type": ..., "labels": {label: set of values or None}}."""
    metrics: dict[str, dict] = {}
    for line in DOCS_METRICS.read_text().splitlines():
        line = line.replace("\\|", "\x00")  # escaped pipes separate label values
        m = re.match(r"^\|\s*`(sluice_[a-z0-9_]+)`\s*\|\s*(\w+)\s*\|(.*?)\|", line)
        if not m:
            continue
        name, kind, label_text = m.group(1), m.group(2), m.group(3)
        label_text = re.sub(r"\([^)]*\)", "", label_text).replace("\x00", "|")
        labels: dict[str, set | None] = {}
        for item in label_text.split(","):
            item = item.strip()
            if not item or item in ("—", "-"):
                continue
            key, _, values = item.partition("=")
            labels[key.strip()] = set(re.findall(r"`([^`]*)`", values)) or None
        metrics[name] = {"type": kind, "labels": labels}
    return metrics


def test_metrics_doc_parses() -> None:
    metrics = documented_metrics()
    assert "sluice_job_slack_seconds" in metrics
    assert metrics["sluice_job_sla_status"]["labels"]["status"] >= {"OnTrack", "Infeasible"}
    assert metrics["sluice_reconcile_duration_seconds"]["type"] == "histogram"


def _base_metric(name: str, metrics: dict) -> str | None:
    if name in metrics:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and metrics.get(base, {}).get("type") == "histogram":
            return base
    return None


def check_expr(expr: str, metrics: dict) -> list[str]:
    """Problems with the metric names and label matchers of one PromQL expression."""
    problems = []
    # Drop strings inside matchers before looking for names, then look at each selector.
    for name in set(re.findall(r"\b(sluice_[a-zA-Z0-9_]+)\b", re.sub(r'"[^"]*"', '""', expr))):
        if _base_metric(name, metrics) is None:
            problems.append(f"{name} is not in docs/metrics.md")
    for name, body in re.findall(r"\b(sluice_[a-zA-Z0-9_]+)\s*\{([^}]*)\}", expr):
        base = _base_metric(name, metrics)
        if base is None:
            continue
        labels = metrics[base]["labels"]
        for label, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', body):
            if label in labels:
                allowed = labels[label]
                if allowed and "$" not in value and not re.search(r"[.*+?()\[\]]", value):
                    for v in value.split("|") if op in ("=~", "!~") else [value]:
                        if v not in allowed:
                            problems.append(f"{name}{{{label}{op}\"{value}\"}}: {v!r} is not "
                                            f"one of {sorted(allowed)}")
            elif label == "le" and name.endswith("_bucket"):
                pass
            elif label in TARGET_LABELS and not ({"namespace", "job"} & set(labels)):
                pass  # a target label on an operator-wide series (e.g. job="<scrape job>")
            else:
                problems.append(f"{name}: label {label!r} is not documented")
    # Names used as bare identifiers that are neither PromQL nor a documented metric.
    bare = re.sub(r'"[^"]*"|\{[^}]*\}|\[[^\]]*\]|\$\w+', " ", expr)
    for word in set(re.findall(r"\b([a-z_][a-z0-9_]*)\b(?!\s*\()", bare)):
        if word.startswith("sluice_") or word in PROMQL_WORDS or word == "up":
            continue
        if re.search(rf"\b(by|without|on|ignoring)\s*\([^)]*\b{word}\b", bare):
            continue  # a label in a grouping clause
        problems.append(f"unknown identifier {word!r} (not a documented metric)")
    return problems


def test_metric_check_is_not_vacuous() -> None:
    metrics = documented_metrics()
    assert check_expr('sluice_job_slack_seconds{namespace="a"}', metrics) == []
    assert check_expr("sluice_job_progress_ratio", metrics)
    assert check_expr('sluice_job_requests{state="done"}', metrics)
    assert check_expr('sluice_job_workers{custom_id="x"}', metrics)
    assert check_expr("rate(some_other_metric[5m])", metrics)
    assert check_expr("histogram_quantile(0.9, sum by (le) (rate("
                      "sluice_reconcile_duration_seconds_bucket[5m])))", metrics) == []


# --- Alerts ---------------------------------------------------------------------------------

def alert_rules() -> list[dict]:
    spec = yaml.safe_load(render.ALERTS_YAML.read_text())
    return [r for g in spec["groups"] for r in g["rules"]]


def test_alerts_are_the_required_set() -> None:
    assert sorted(r["alert"] for r in alert_rules()) == sorted(ALERTS)


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_is_documented_and_uses_only_real_metrics(rule: dict) -> None:
    assert check_expr(rule["expr"], documented_metrics()) == []
    ann = rule["annotations"]
    assert ann["summary"] and ann["description"]
    anchor = rule["alert"].lower()
    assert ann["runbook_url"].endswith(f"docs/alerts.md#{anchor}")
    headings = re.findall(r"^## (\S+)", DOCS_ALERTS.read_text(), re.M)
    assert rule["alert"] in headings, f"docs/alerts.md has no '## {rule['alert']}' section"
    assert rule["labels"]["severity"] in ("warning", "critical")
    if rule["alert"] != "SluiceOperatorDown":
        assert "{{ $labels.job }}" in ann["description"]
        assert "{{ $labels.namespace }}" in ann["description"]
    else:
        assert render.NAMESPACE in ann["description"]


def _promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is not installed (apt-get install prometheus; tests/packaging/run.sh)"
    return path


def test_promtool_check_rules() -> None:
    out = subprocess.run([_promtool(), "check", "rules", str(render.ALERTS_YAML)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in out.stdout


def test_promtool_unit_tests() -> None:
    tests = PROM_DIR / "alerts_test.yaml"
    out = subprocess.run([_promtool(), "test", "rules", str(tests)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    print(out.stdout)


def test_promtool_tests_cover_every_alert_both_ways() -> None:
    spec = yaml.safe_load((PROM_DIR / "alerts_test.yaml").read_text())
    assert spec["rule_files"] == [render.ALERTS_YAML.name]
    fires, silent = set(), set()
    for case in spec["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
            for alert in check.get("exp_alerts") or []:
                assert alert.get("exp_annotations"), "expected annotations must be spelled out"
    assert fires == set(ALERTS), f"no firing case for {set(ALERTS) - fires}"
    assert silent == set(ALERTS), f"no silent case for {set(ALERTS) - silent}"


# --- Dashboard ------------------------------------------------------------------------------

def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict) -> list[dict]:
    out = []
    for panel in dash["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def test_dashboard_is_grafana_dashboard_json() -> None:
    dash = dashboard()
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "namespace", "job"} <= variables
    occupied: set[tuple[int, int]] = set()
    data_panels = [p for p in panels(dash) if p["type"] != "row"]
    assert len(data_panels) >= 10
    for p in panels(dash):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & occupied, f"panel {p['title']!r} overlaps another"
        occupied |= cells
    for p in data_panels:
        assert p["title"] and p["type"] in {"timeseries", "stat", "table", "piechart", "gauge",
                                            "bargauge"}, p
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], f"panel {p['title']!r} has no targets"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip(), p["title"]
            for var in re.findall(r"\$(\w+)", t["expr"]):
                assert var in variables or var.startswith("__"), f"{p['title']}: ${var}"


def test_dashboard_covers_the_required_views() -> None:
    exprs = "\n".join(t["expr"] for p in panels(dashboard()) for t in p.get("targets", []))
    for metric in ("sluice_job_requests", "sluice_job_throughput_requests_per_second",
                   "sluice_job_projected_completion_timestamp_seconds",
                   "sluice_job_deadline_timestamp_seconds", "sluice_job_slack_seconds",
                   "sluice_job_workers", "sluice_job_gpu_seconds", "sluice_job_sla_status"):
        assert metric in exprs, f"the dashboard shows nothing from {metric}"
    assert re.search(r"by \(status\)[^\n]*sluice_job_sla_status", exprs), "fleet view by SLA state"


def test_dashboard_queries_use_only_real_metrics() -> None:
    metrics = documented_metrics()
    dash = dashboard()
    queries = [t["expr"] for p in panels(dash) for t in p.get("targets", [])]
    problems = []
    for var in dash["templating"]["list"]:
        if isinstance(var.get("query"), dict):
            # Grafana's label_values(<selector>, <label>): check both parts.
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["query"]["query"])
            assert m, var["query"]["query"]
            queries.append(m.group(1))
            base = re.match(r"\w+", m.group(1)).group(0)
            if m.group(2) not in metrics[base]["labels"]:
                problems.append(f"{var['name']}: {base} has no label {m.group(2)}")
    problems += [f"{q!r}: {p}" for q in queries for p in check_expr(q, metrics)]
    assert not problems, "\n".join(problems)


def test_dashboard_configmap_carries_the_file(request) -> None:
    from conftest import by_kind
    docs = request.getfixturevalue("rendered")["all-on"]
    (cm,) = [c for c in by_kind(docs, "ConfigMap")
             if c["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert json.loads(cm["data"]["sluice.json"]) == dashboard()
