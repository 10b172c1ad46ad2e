"""deploy/: the Prometheus rules pass ``promtool check rules`` and fire as intended
(``promtool test rules``), and every query of the Grafana dashboard and of the rules
names a series Mandant exports (or a recording rule defined next to it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from mandant.config import SloConfig, TenantConfig
from mandant.observability.metrics import InflightRequests, PrometheusObserver
from mandant.tenancy.directory import TenantDirectory

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
GRAFANA = ROOT / "deploy" / "grafana" / "mandant-dashboard.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool missing: `make test` installs Debian's prometheus"
)
METRIC = re.compile(r"\b((?:tenant:)?mandant[_:][a-z0-9_:]+)")


def exported_series() -> set[str]:
    """Every sample name a fully exercised observer exposes."""
    registry = CollectorRegistry()
    observer = PrometheusObserver(
        registry, [TenantConfig(id="acme", slo=SloConfig(latency_ms=50))], ["classifier"]
    )
    observer.request_finished("acme", "classifier", "OK", 0.01)
    observer.request_timing("acme", "classifier", 0.001, 0.002)
    observer.batch_executed("classifier", 2, 0.002, {"acme": 2})
    observer.admitted("acme", "classifier", 2)
    observer.rejected("acme", "quota")
    observer.store_error("redis")
    acme = TenantDirectory([TenantConfig(id="acme")])
    registry.register(InflightRequests(acme, lambda: {"acme": 1}))
    return {s.name for family in registry.collect() for s in family.samples}


def rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def recorded() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


def grafana_panels() -> list[dict[str, Any]]:
    return [p for p in json.loads(GRAFANA.read_text())["panels"] if p["type"] != "row"]


@needs_promtool
def test_promtool_check_rules() -> None:
    result = subprocess.run(
        [str(PROMTOOL), "check", "rules", str(ALERTS)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def _series(tenant: str, good_per_step: int) -> list[dict[str, str]]:
    return [
        {"series": f'mandant_slo_requests_total{{tenant="{tenant}",instance="a"}}',
         "values": "0+50x40"},
        {"series": f'mandant_slo_good_requests_total{{tenant="{tenant}",instance="a"}}',
         "values": f"0+{good_per_step}x40"},
        {"series": f'mandant_slo_objective{{tenant="{tenant}",instance="a"}}',
         "values": "0.99x40"},
    ]  # fmt: skip


@needs_promtool
def test_fast_burn_pages_for_the_failing_tenant_only(tmp_path: Path) -> None:
    """acme answers nothing in time (burn rate 100), globex everything: after 10
    minutes the critical alert fires for acme, and for nobody else."""
    critical = {
        "eval_time": "10m",
        "alertname": "MandantSLOBurnRateCritical",
        "exp_alerts": [{
            "exp_labels": {"severity": "page", "slo": "latency", "tenant": "acme"},
            "exp_annotations": {
                "summary": "Tenant acme latency SLO page: burn rate 100.0x",
                "description": "Tenant acme is burning its error budget 14.4x too fast "
                "(1h and 5m): 2 % of a 30-day budget per hour.",
                "dashboard": "http://mandant-internal:8002/",
            },
        }],
    }  # fmt: skip
    quiet_at_start = {"eval_time": "1m", "alertname": "MandantSLOBurnRateCritical"}
    spec = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "30s",
        "tests": [{
            "interval": "30s",
            "input_series": _series("acme", 0) + _series("globex", 50),
            "alert_rule_test": [quiet_at_start, critical],
            "promql_expr_test": [{
                "expr": 'tenant:mandant_slo_burn_rate:rate5m{tenant="globex"}',
                "eval_time": "10m",
                "exp_samples": [{"labels": 'tenant:mandant_slo_burn_rate:rate5m{tenant="globex"}',
                                 "value": 0}],
            }],
        }],
    }  # fmt: skip
    path = tmp_path / "rules_test.yml"
    path.write_text(yaml.safe_dump(spec))
    result = subprocess.run(
        [str(PROMTOOL), "test", "rules", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_are_multi_window_and_per_tenant() -> None:
    alerts = {rule["alert"]: rule for rule in rules() if "alert" in rule}
    burn = {name: rule for name, rule in alerts.items() if "BurnRate" in name}
    assert len(burn) == 4
    for rule in burn.values():
        windows = re.findall(r"burn_rate:rate(\w+)", rule["expr"])
        assert len(windows) == 2 and windows[0] != windows[1]
        assert "on (tenant)" in rule["expr"]
        assert rule["labels"]["severity"] in {"page", "ticket"}


def test_every_query_names_an_existing_series() -> None:
    known = exported_series() | recorded()
    queries = [t["expr"] for p in grafana_panels() for t in p["targets"]]
    queries += [rule["expr"] for rule in rules()]
    dashboard = json.loads(GRAFANA.read_text())
    queries += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    assert queries
    for query in queries:
        names = METRIC.findall(query)
        assert names, f"no Mandant series in {query!r}"
        for name in names:
            assert name in known, f"{name} (in {query!r}) is not exported"


def test_grafana_dashboard_has_the_dashboard_panels() -> None:
    dashboard = json.loads(GRAFANA.read_text())
    assert dashboard["uid"] and dashboard["title"]
    titles = " | ".join(p["title"] for p in grafana_panels())
    for topic in ("p50 / p99 vs SLO", "SLO attainment", "Error budget", "Throughput",
                  "Rejections by reason", "Batch-size distribution", "Burn rate"):  # fmt: skip
        assert topic in titles
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in grafana_panels():
        assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}"


def test_the_tenant_variable_offers_every_tenant_and_all_means_all() -> None:
    """It listed the tenants of ``mandant_slo_objective``, which only tenants with an
    SLO have, and "All" was a regex of those: a tenant without an SLO (75% of the
    calls in a reviewer's run) was missing from every per-tenant panel."""
    (variable,) = [
        v for v in json.loads(GRAFANA.read_text())["templating"]["list"] if v["name"] == "tenant"
    ]
    series = re.fullmatch(r"label_values\((\w+), tenant\)", variable["definition"])
    assert series is not None and variable["query"]["query"] == variable["definition"]
    assert variable["allValue"] == ".+"  # tenants that come later are in "All" too
    registry = CollectorRegistry()
    tenants = [TenantConfig(id="acme", slo=SloConfig(latency_ms=50)), TenantConfig(id="umbrella")]
    PrometheusObserver(registry, tenants, ["classifier"])
    registry.register(InflightRequests(TenantDirectory(tenants), dict))
    offered = {
        sample.labels["tenant"]
        for family in registry.collect()
        for sample in family.samples
        if sample.name == series[1]
    }
    assert offered == {"acme", "umbrella"}


def test_the_batch_size_panel_keeps_a_tuned_variant_apart_from_its_shared_model() -> None:
    """``sum by (le)`` drew globex's tuned ``classifier`` and the shared one as one
    distribution (and every model as one under "All")."""
    (panel,) = [p for p in grafana_panels() if p["title"].startswith("Batch-size")]
    (target,) = panel["targets"]
    grouped = re.search(r"sum by \(([^)]*)\)", target["expr"])
    assert grouped is not None
    assert {label.strip() for label in grouped[1].split(",")} == {"le", "model", "tenant"}
    assert "{{model}}" in target["legendFormat"] and "{{tenant}}" in target["legendFormat"]
