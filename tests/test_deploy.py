"""deploy/grafana and deploy/prometheus against the real thing: every metric they use exists on a live
server's /metrics, and a real Prometheus (Debian's package) scraping that server evaluates every
dashboard query and alert rule without error; promtool unit-tests the drift and error alerts.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from conftest import colour_image, image_bytes, make_colour_bundle
from helpers import update_meta

from food_classifier.client import GrpcClient
from food_classifier.inference import Classifier
from food_classifier.monitoring.statistics import reference_stats
from food_classifier.testing import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "food-classifier.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
KEY = "deploy-key"
COLOURS = ["red", "green", "blue"]


def dashboard_queries() -> list[str]:
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            found.extend(v for k, v in node.items() if k in ("expr", "query") and isinstance(v, str))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(json.loads(DASHBOARD.read_text()))
    return found


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


@pytest.fixture(scope="module")
def exporting(tmp_path_factory):
    """A server with every metric family populated: HTTP and gRPC traffic, an error, feedback, the log."""
    tmp = tmp_path_factory.mktemp("deploy")
    bundle = make_colour_bundle(tmp / "colour" / "v1", version="v1")
    clf = Classifier(bundle)
    photos = [image_bytes(colour_image(c, seed=i)) for i in range(20) for c in COLOURS]
    update_meta(bundle, {"reference": reference_stats(np.concatenate(
        [clf.predict_proba(clf.preprocess(p)[None]) for p in photos]), 0.5)})
    grpc_port = free_port()
    srv = ServerProcess([tmp / "colour"], env={"FOOD_CLASSIFIER_API_KEY": KEY},
                        args=["--grpc-port", str(grpc_port), "--prediction-log", str(tmp / "log")])
    with srv, httpx.Client(base_url=srv.url, headers={"X-API-Key": KEY}, timeout=30) as c:
        first = c.post("/predict", content=photos[0], headers={"content-type": "image/jpeg"}).json()
        for p in photos[1:30]:
            c.post("/predict", content=p, headers={"content-type": "image/jpeg"})
        c.post("/predict", content=b"junk", headers={"content-type": "image/jpeg"})
        c.post("/v1/models/colour/feedback", json={"request_id": first["request_id"], "label": "red"})
        with GrpcClient(f"127.0.0.1:{grpc_port}", api_key=KEY) as g:
            g.predict(photos[1])
        yield srv, c


@pytest.mark.live
def test_dashboard_and_alerts_only_use_metrics_the_server_exports(exporting):
    _, c = exporting
    exported = {line.split("{")[0].split(" ")[0] for line in c.get("/metrics").text.splitlines()
                if line and not line.startswith("#")}
    queries, rules = dashboard_queries(), alert_rules()
    assert len(queries) >= 15 and len(rules) >= 10
    assert all({"alert", "expr", "for", "labels", "annotations"} <= set(r) for r in rules)
    used = {m for q in queries + [r["expr"] for r in rules] for m in re.findall(r"\bfood_classifier_[a-z0-9_]+", q)}
    assert used - exported == set(), "metrics the dashboard or the alerts use but /metrics lacks"
    assert {"food_classifier_drift_class_psi", "food_classifier_live_accuracy", "food_classifier_requests_total",
            "food_classifier_grpc_requests_total", "food_classifier_monitor_cache_hits_total"} <= used


def _prom_query(url: str, expr: str) -> dict:
    r = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    return r.json()


@pytest.mark.live
def test_prometheus_evaluates_every_dashboard_query_and_rule(exporting, tmp_path):
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    srv, _ = exporting
    port = free_port()
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(ALERTS)],
              "scrape_configs": [{"job_name": "food-classifier", "authorization": {"credentials": KEY},
                                  "static_configs": [{"targets": [f"127.0.0.1:{srv.port}"]}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "prometheus.log", "wb") as log:
        prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline and prom.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                samples = _prom_query(url, "food_classifier_drift_class_psi")["data"]["result"]
                if len(_prom_query(url, "count_over_time(up[1m])")["data"]["result"] or []) and samples:
                    break
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.3)
        time.sleep(3)  # a few scrapes and rule evaluations
        for q in dashboard_queries():
            if q.startswith("label_values("):
                continue  # a Grafana template function, not PromQL
            answer = _prom_query(url, q.replace("$model", ".*"))
            assert answer["status"] == "success", (q, answer)
        rules = [r for g in httpx.get(f"{url}/api/v1/rules", timeout=10).json()["data"]["groups"] for r in g["rules"]]
        assert len(rules) == len(alert_rules()) and all(r["health"] == "ok" for r in rules), rules
        psi = _prom_query(url, 'food_classifier_drift_class_psi{model="colour"}')["data"]["result"]
        assert psi and 0 <= float(psi[0]["value"][1]) < 0.5
    finally:
        prom.terminate()
        prom.wait(20)


PROMTOOL_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'food_classifier_drift_class_psi{{model="food"}}'
        values: '0.05x10 0.35x30'
      - series: 'food_classifier_monitor_window_predictions{{model="food"}}'
        values: '1000x40'
      - series: 'food_classifier_requests_total{{status="200"}}'
        values: '0+100x30'
      - series: 'food_classifier_requests_total{{status="500"}}'
        values: '0+5x30'
    alert_rule_test:
      - {{eval_time: 9m, alertname: FoodClassifierClassDrift, exp_alerts: []}}
      - {{eval_time: 20m, alertname: FoodClassifierClassDrift, exp_alerts: []}}
      - eval_time: 30m
        alertname: FoodClassifierClassDrift
        exp_alerts:
          - exp_labels: {{severity: warning, model: food}}
            exp_annotations:
              summary: "food: predicted classes shifted (PSI 0.35)"
              description: "{drift_description}"
      - eval_time: 25m
        alertname: FoodClassifierServerErrors
        exp_alerts:
          - exp_labels: {{severity: critical}}
            exp_annotations:
              summary: "food-classifier: 4.762% of requests fail with 5xx"
              description: "{errors_description}"
"""


def test_alert_rules_are_valid_and_fire_on_drift(tmp_path):
    """promtool parses every rule and runs the drift and 5xx alerts on synthetic series (the drift alert
    waits its 15 minutes: not at 20 min, ten minutes into the shift, but at 30)."""
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    check = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and f"SUCCESS: {len(alert_rules())} rules found" in check.stdout, check.stdout
    described = {r["alert"]: r["annotations"].get("description") for r in alert_rules()}
    spec = tmp_path / "alerts_test.yml"
    spec.write_text(PROMTOOL_TESTS.format(rules=json.dumps(str(ALERTS)),
                                          drift_description=described["FoodClassifierClassDrift"],
                                          errors_description=described["FoodClassifierServerErrors"]))
    run = subprocess.run(["promtool", "test", "rules", str(spec)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
