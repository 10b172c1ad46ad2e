"""A 10-second headless locust run of the noisy-neighbour scenario against a test
server: every tenant's calls go through, and the only failures are those the
scenario provokes (acme, rate limited, gets RESOURCE_EXHAUSTED)."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mandant.config import parse_config
from tests.servers import DEMO_CONFIG, ROOT, ServerThread

LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
SCENARIO = ROOT / "loadtests" / "noisy_neighbour.yaml"


@pytest.mark.skipif(
    importlib.util.find_spec("locust") is None, reason="locust is not installed"
)  # never imported here: it monkey-patches the process with gevent
def test_noisy_neighbour_smoke(tmp_path: Path) -> None:
    data = yaml.safe_load(DEMO_CONFIG.read_text())
    data["server"] = {**data["server"], "grpc_port": 0, "http_port": 0, "rest_port": 0}
    for tenant in data["tenants"]:
        if tenant["id"] == "acme":
            tenant["rate_limit"] = {"requests_per_s": 100, "burst": 20}
    with ServerThread(parse_config(data, str(DEMO_CONFIG)), tmp_path / "models") as server:
        env = {**os.environ, "MANDANT_TARGET": server.target,
               "MANDANT_LOADTEST_CONFIG": str(SCENARIO)}  # fmt: skip
        prefix = tmp_path / "smoke"
        result = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
             "-u", "6", "-r", "6", "-t", "5s", "--csv", str(prefix),
             "--html", str(tmp_path / "smoke.html"), "--only-summary",
             "--exit-code-on-error", "0", "--stop-timeout", "5"],
            capture_output=True, text=True, timeout=90, env=env, cwd=ROOT,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with open(f"{prefix}_stats.csv") as file:
        stats = {(r["Type"], r["Name"]): r for r in csv.DictReader(file)}
    with open(f"{prefix}_failures.csv") as file:
        failures = list(csv.DictReader(file))
    expected = set(yaml.safe_load(SCENARIO.read_text())["expected_failures"])
    for row in failures:
        assert row["Error"].strip("'\"").split("(")[-1].strip("')\"") in expected, row
    for tenant, model in (("acme", "classifier"), ("acme", "echo"),
                          ("initech", "classifier"), ("globex", "classifier")):  # fmt: skip
        row = stats[(tenant, model)]
        assert int(row["Request Count"]) > 0, row
    # The light tenants are never refused, whatever the heavy one does.
    for tenant in ("initech", "globex"):
        assert int(stats[(tenant, "classifier")]["Failure Count"]) == 0
    assert (tmp_path / "smoke.html").stat().st_size > 10_000
